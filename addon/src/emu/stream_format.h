// Record layout of the emulated device's opaque migration stream (docs/EMULATED-DEVICE.md, "Stream format").
#pragma once
#include <cstdint>

namespace emu::stream {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "stream records are read/written with host-order memcpy");

constexpr uint32_t kTagHeader = 0x48444D56;  // "VMDH"
constexpr uint32_t kTagPages = 0x53454750;   // "PGES"
constexpr uint32_t kTagEnd = 0x21444E45;     // "END!"
constexpr uint64_t kMagic = 0x3156454455454D46ull;
constexpr uint64_t kPageSize = 4096;
constexpr uint64_t kFormatVersion = 1;
constexpr uint64_t kRecHdr = 24;            // u32 tag, u32 seq, u64 a, u64 b
constexpr uint64_t kHeaderPayload = 24;     // u64 magic, u32 maxChunk, u32 flags, u64 0
constexpr uint64_t kHeaderRec = kRecHdr + kHeaderPayload;

struct RecHdr {
  uint32_t tag;
  uint32_t seq;
  uint64_t a;
  uint64_t b;
};
static_assert(sizeof(RecHdr) == kRecHdr, "packed record header");

}  // namespace emu::stream
