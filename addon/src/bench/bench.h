// Native loops used only by `npm run bench`: the copy ceiling, and the seed's sequential save (the baseline).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "region/region.h"

namespace bench {

// Ranges are validated by the caller. Returns elapsed nanoseconds. Throws vm::NativeError.
double copyLimit(region::Region& r, uint64_t off, uint64_t len, uint64_t chunk, uint64_t total, unsigned threads,
                 uint8_t* dst, size_t dstLen);

// profile: 0 draft-2019, 1 linux-5.8 (header size for data_offset validation). Returns bytes written to outFd.
uint64_t sequentialSave(const std::vector<std::shared_ptr<region::Region>>& regions, uint32_t profile, uint8_t* buf,
                        size_t bufLen, int outFd);

}  // namespace bench
