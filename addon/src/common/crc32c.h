// CRC32C (Castagnoli) with the SSE4.2 instruction, fused with a copy. The library checksum (@node-rs/crc32) can only
// run as a second pass over the bytes; fusing it into the copy out of the data area removes that pass from the save
// hot path (docs/PERFORMANCE.md). Same update semantics as @node-rs/crc32's crc32c(buf, init); test/addon-crc
// checks the two agree. Without SSE4.2 `available()` is false and the engine uses the library.
#pragma once
#include <cstddef>
#include <cstdint>

namespace crc32c {
bool available();
// Returns crc32c continued from `crc` over src[0..n); copies src to dst when dst is not null.
uint32_t copyUpdate(uint32_t crc, const uint8_t* src, uint8_t* dst, size_t n);
}  // namespace crc32c
