// SHA-256 (FIPS 180-4), for the device server's digest region: the same sha256(config || state) the engine computes
// with node:crypto for in-process emulated devices, so digests compare across reaches.
#pragma once
#include <cstddef>
#include <cstdint>

namespace vm {
class Sha256 {
 public:
  Sha256();
  void update(const uint8_t* p, size_t n);
  void final(uint8_t out[32]);

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t used_ = 0;
  uint64_t total_ = 0;
};
}  // namespace vm
