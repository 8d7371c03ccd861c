// CRC32C (Castagnoli) with the SSE4.2 instruction in three interleaved lanes: ~17 GB/s here against ~3.6 GB/s for the
// @node-rs/crc32 library, whose single dependency chain the save hot path could not afford (docs/PERFORMANCE.md).
// Same update semantics as the library's crc32c(buf, init); test/checksum.test.ts checks that they agree.
// Without SSE4.2 `available()` is false and the engine uses the library.
#pragma once
#include <cstddef>
#include <cstdint>

namespace crc32c {
bool available();
// Returns crc32c continued from `crc` over src[0..n); also copies src to dst when dst is not null.
uint32_t copyUpdate(uint32_t crc, const uint8_t* src, uint8_t* dst, size_t n);
}  // namespace crc32c
