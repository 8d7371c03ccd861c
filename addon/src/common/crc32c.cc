#include "common/crc32c.h"

#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace crc32c {

#if defined(__x86_64__)
namespace {

// The SSE4.2 crc32 instruction has a 3-cycle latency and 1-cycle throughput: one dependency chain runs at a third
// of the possible rate. Large buffers are therefore summed as three interleaved lanes of kLane bytes, and the lane
// results joined with the linearity of the raw CRC register: raw(a || b) = shift(raw(a), |b|) ^ raw0(b), where
// shift(c, n) is the register after n zero bytes. shift for n = kLane is linear in c, so it is four 256-entry
// tables built once from 32 basis vectors.
constexpr size_t kLane = 8192;
uint32_t gShift[4][256];

__attribute__((target("sse4.2"))) uint32_t zeros(uint32_t c, size_t n) {
  uint64_t x = c;
  for (size_t i = 0; i < n; i += 8) x = _mm_crc32_u64(x, 0);
  return static_cast<uint32_t>(x);
}

void buildTables() {
  uint32_t basis[32];
  for (int b = 0; b < 32; b++) basis[b] = zeros(1u << b, kLane);
  for (int k = 0; k < 4; k++)
    for (int v = 0; v < 256; v++) {
      uint32_t s = 0;
      for (int bit = 0; bit < 8; bit++)
        if (v & (1 << bit)) s ^= basis[8 * k + bit];
      gShift[k][v] = s;
    }
}

inline uint32_t shiftLane(uint32_t c) {
  return gShift[0][c & 0xff] ^ gShift[1][(c >> 8) & 0xff] ^ gShift[2][(c >> 16) & 0xff] ^ gShift[3][c >> 24];
}

}  // namespace

bool available() {
  static const bool ok = [] {
    if (!__builtin_cpu_supports("sse4.2")) return false;
    buildTables();
    return true;
  }();
  return ok;
}

__attribute__((target("sse4.2"))) uint32_t copyUpdate(uint32_t crc, const uint8_t* src, uint8_t* dst, size_t n) {
  uint64_t c = static_cast<uint32_t>(~crc);  // raw register
  size_t i = 0;
  for (; i + 3 * kLane <= n; i += 3 * kLane) {
    uint64_t a = c, b = 0, d = 0;
    const uint8_t* s = src + i;
    for (size_t j = 0; j < kLane; j += 8) {
      uint64_t wa, wb, wd;
      memcpy(&wa, s + j, 8);
      memcpy(&wb, s + kLane + j, 8);
      memcpy(&wd, s + 2 * kLane + j, 8);
      if (dst) {
        memcpy(dst + i + j, &wa, 8);
        memcpy(dst + i + kLane + j, &wb, 8);
        memcpy(dst + i + 2 * kLane + j, &wd, 8);
      }
      a = _mm_crc32_u64(a, wa);
      b = _mm_crc32_u64(b, wb);
      d = _mm_crc32_u64(d, wd);
    }
    c = shiftLane(shiftLane(static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b)) ^ static_cast<uint32_t>(d);
  }
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, src + i, 8);
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
