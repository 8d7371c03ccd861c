#include "common/crc32c.h"

#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace crc32c {

#if defined(__x86_64__)
bool available() {
  static const bool ok = __builtin_cpu_supports("sse4.2");
  return ok;
}

__attribute__((target("sse4.2"))) uint32_t copyUpdate(uint32_t crc, const uint8_t* src, uint8_t* dst, size_t n) {
  uint64_t c = ~crc;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, src + i, 8);  // unaligned-safe load
    if (dst) memcpy(dst + i, &w, 8);
    c = _mm_crc32_u64(c, w);
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  for (; i < n; i++) {
    if (dst) dst[i] = src[i];
    c32 = _mm_crc32_u8(c32, src[i]);
  }
  return ~c32;
}
#else
bool available() { return false; }
uint32_t copyUpdate(uint32_t crc, const uint8_t* src, uint8_t* dst, size_t n) {
  if (dst) memcpy(dst, src, n);
  return crc;
}
#endif

}  // namespace crc32c
