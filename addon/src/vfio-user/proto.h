// vfio-user wire format (QEMU docs/interop/vfio-user.rst; /work/shared/vfio-user-facts.md): a 16-byte header on
// every message, little-endian integers, one request per sendmsg. Shared by the client (conn.cc) and the device
// server (server.cc).
#pragma once
#include <cstddef>
#include <cstdint>

namespace vfu {

enum Cmd : uint16_t {
  kVersion = 1, kDmaMap = 2, kDmaUnmap = 3, kGetInfo = 4, kGetRegionInfo = 5, kGetRegionIoFds = 6, kGetIrqInfo = 7,
  kSetIrqs = 8, kRegionRead = 9, kRegionWrite = 10, kDmaRead = 11, kDmaWrite = 12, kReset = 13, kDirtyPages = 14,
  kRegionWriteMulti = 15, kDeviceFeature = 16, kMigDataRead = 17, kMigDataWrite = 18,
};

constexpr uint32_t kTypeMask = 0xf, kTypeCommand = 0, kTypeReply = 1, kNoReply = 0x10, kErrorFlag = 0x20;

struct Header {
  uint16_t msgId;
  uint16_t cmd;
  uint32_t size;  // header included
  uint32_t flags;
  uint32_t errorNo;
};
static_assert(sizeof(Header) == 16, "vfio-user header is 16 bytes");
constexpr size_t kHeaderSize = sizeof(Header);

// REGION_READ / REGION_WRITE body head.
struct RegionAccess {
  uint64_t offset;
  uint32_t region;
  uint32_t count;
};
static_assert(sizeof(RegionAccess) == 16, "region access head is 16 bytes");

// Defaults and bounds the spec and the common server library use.
constexpr uint32_t kDefaultMaxXfer = 1u << 20;     // max_data_xfer_size when VERSION does not say
constexpr uint32_t kMaxMessage = (1u << 20) + 32;  // larger messages are refused by servers
constexpr uint32_t kPageSize = 4096;

// DIRTY_PAGES (v1): {argsz, flags} then, for GET_BITMAP, one range {iova, size, pgsize, bitmap bytes}.
constexpr uint32_t kDirtyStart = 1, kDirtyStop = 2, kDirtyGetBitmap = 4;
struct DirtyRange {
  uint64_t iova, size, pgsize, bitmapSize;
};
static_assert(sizeof(DirtyRange) == 32, "dirty range is 32 bytes");

// Region of the device server that reports sha256(config space || device state) of its emulated device, so a
// client can verify a migration end to end. PCI vendor-specific type ('VM'), subtype 1; 32 bytes, read-only.
constexpr uint32_t kDigestRegionType = 0x80000000u | 0x564d, kDigestRegionSubtype = 1;

const char* cmdName(uint16_t cmd);

}  // namespace vfu
