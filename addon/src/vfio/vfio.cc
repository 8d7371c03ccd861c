#include "vfio/vfio.h"

#include <fcntl.h>
#include <linux/vfio.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>

#include "common/error.h"

namespace vfio {

// The 2019 draft header (Kirti Wankhede v4/v5/v8, __attribute__((packed))): in no installed header.
struct DraftMigrationInfo {
  uint32_t device_state;
  uint32_t reserved;
  uint64_t pending_bytes;
  uint64_t data_offset;
  uint64_t data_size;
  uint64_t start_pfn;
  uint64_t page_size;
  uint64_t total_pfns;
  uint64_t copied_pfns;
} __attribute__((packed));

#define OFF(t, f) offsetof(struct t, f)
static_assert(OFF(vfio_device_migration_info, device_state) == 0 && OFF(vfio_device_migration_info, reserved) == 4 &&
                  OFF(vfio_device_migration_info, pending_bytes) == 8 &&
                  OFF(vfio_device_migration_info, data_offset) == 16 &&
                  OFF(vfio_device_migration_info, data_size) == 24 && sizeof(vfio_device_migration_info) == 32,
              "linux-5.8 v1 migration header");
static_assert(OFF(DraftMigrationInfo, device_state) == 0 && OFF(DraftMigrationInfo, reserved) == 4 &&
                  OFF(DraftMigrationInfo, pending_bytes) == 8 && OFF(DraftMigrationInfo, data_offset) == 16 &&
                  OFF(DraftMigrationInfo, data_size) == 24 && OFF(DraftMigrationInfo, start_pfn) == 32 &&
                  OFF(DraftMigrationInfo, page_size) == 40 && OFF(DraftMigrationInfo, total_pfns) == 48 &&
                  OFF(DraftMigrationInfo, copied_pfns) == 56 && sizeof(DraftMigrationInfo) == 64,
              "2019 draft migration header");
static_assert(OFF(vfio_region_info, argsz) == 0 && OFF(vfio_region_info, flags) == 4 && OFF(vfio_region_info, index) == 8 &&
                  OFF(vfio_region_info, cap_offset) == 12 && OFF(vfio_region_info, size) == 16 &&
                  OFF(vfio_region_info, offset) == 24 && sizeof(vfio_region_info) == 32,
              "vfio_region_info");
static_assert(OFF(vfio_info_cap_header, id) == 0 && OFF(vfio_info_cap_header, version) == 2 &&
                  OFF(vfio_info_cap_header, next) == 4 && sizeof(vfio_info_cap_header) == 8,
              "vfio_info_cap_header");
static_assert(OFF(vfio_region_info_cap_sparse_mmap, nr_areas) == 8 && OFF(vfio_region_info_cap_sparse_mmap, areas) == 16 &&
                  sizeof(vfio_region_sparse_mmap_area) == 16 && OFF(vfio_region_sparse_mmap_area, size) == 8,
              "sparse mmap cap");
static_assert(OFF(vfio_region_info_cap_type, type) == 8 && OFF(vfio_region_info_cap_type, subtype) == 12 &&
                  sizeof(vfio_region_info_cap_type) == 16,
              "type cap");
static_assert(OFF(vfio_device_info, flags) == 4 && OFF(vfio_device_info, num_regions) == 8 &&
                  OFF(vfio_device_info, num_irqs) == 12,
              "vfio_device_info");
static_assert(VFIO_GROUP_GET_DEVICE_FD == 0x3B6A && VFIO_DEVICE_GET_INFO == 0x3B6B &&
                  VFIO_DEVICE_GET_REGION_INFO == 0x3B6C && VFIO_DEVICE_RESET == 0x3B6F && VFIO_IOMMU_DIRTY_PAGES == 0x3B75,
              "VFIO ioctl numbers");
static_assert(VFIO_REGION_INFO_CAP_SPARSE_MMAP == 1 && VFIO_REGION_INFO_CAP_TYPE == 2 &&
                  VFIO_REGION_TYPE_MIGRATION_DEPRECATED == 3 && VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED == 1,
              "capability and region type ids");
static_assert(VFIO_DEVICE_STATE_V1_RUNNING == 1 && VFIO_DEVICE_STATE_V1_SAVING == 2 && VFIO_DEVICE_STATE_V1_RESUMING == 4 &&
                  VFIO_DEVICE_STATE_MASK == 7,
              "device_state bits");

static_assert(sizeof(vfio_iommu_type1_dirty_bitmap) == 8 && sizeof(vfio_iommu_type1_dirty_bitmap_get) == 40 &&
                  sizeof(vfio_bitmap) == 24 && OFF(vfio_iommu_type1_dirty_bitmap_get, bitmap) == 16 &&
                  VFIO_IOMMU_DIRTY_PAGES_FLAG_START == 1 && VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP == 2 &&
                  VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP == 4 && VFIO_IOMMU_DIRTY_PAGES == 0x3B75,
              "type1 dirty-page tracking (vfio-facts 2.5)");

using vm::fmt;
using vm::NativeError;

int xioctl(int fd, unsigned long req, void* arg) {
  int rc;
  do rc = ioctl(fd, req, arg);
  while (rc < 0 && errno == EINTR);
  return rc;
}

Handles openDevice(const std::string& groupPath, const std::string& deviceName) {
  int container = -1, group = -1;
  auto bail = [&](const std::string& step) {
    int e = errno;
    if (group >= 0) close(group);
    if (container >= 0) close(container);
    return NativeError(e, step);
  };
  container = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
  if (container < 0) throw bail("open /dev/vfio/vfio");
  int v = ioctl(container, VFIO_GET_API_VERSION);
  if (v != VFIO_API_VERSION) {
    if (v >= 0) errno = EINVAL;
    throw bail(fmt("VFIO_GET_API_VERSION returned %d, expected %d", v, VFIO_API_VERSION));
  }
  unsigned long iommu = VFIO_TYPE1v2_IOMMU;
  if (ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) <= 0) {
    iommu = VFIO_TYPE1_IOMMU;
    if (ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU) <= 0) {
      errno = ENOTSUP;
      throw bail("VFIO_CHECK_EXTENSION: no type1 IOMMU");
    }
  }
  group = open(groupPath.c_str(), O_RDWR | O_CLOEXEC);
  if (group < 0) throw bail("open " + groupPath);
  vfio_group_status st{};
  st.argsz = sizeof st;
  if (xioctl(group, VFIO_GROUP_GET_STATUS, &st) < 0) throw bail("VFIO_GROUP_GET_STATUS");
  if (!(st.flags & VFIO_GROUP_FLAGS_VIABLE)) {
    errno = EPERM;
    throw bail("group not viable (all devices of the group must be bound to vfio)");
  }
  if (xioctl(group, VFIO_GROUP_SET_CONTAINER, &container) < 0) throw bail("VFIO_GROUP_SET_CONTAINER");
  if (ioctl(container, VFIO_SET_IOMMU, iommu) < 0) throw bail("VFIO_SET_IOMMU");
  int dev = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, deviceName.c_str());
  if (dev < 0) throw bail("VFIO_GROUP_GET_DEVICE_FD " + deviceName);
  return {container, group, dev};
}

DeviceInfo deviceInfo(int fd) {
  vfio_device_info di{};
  di.argsz = sizeof di;
  if (xioctl(fd, VFIO_DEVICE_GET_INFO, &di) < 0) throw NativeError(errno, "VFIO_DEVICE_GET_INFO");
  return {di.flags, di.num_regions, di.num_irqs};
}

std::vector<uint8_t> regionInfo(int fd, uint32_t index) {
  std::vector<uint8_t> buf(sizeof(vfio_region_info));
  for (int attempt = 0; attempt < 3; attempt++) {
    vfio_region_info ri{};
    ri.argsz = static_cast<uint32_t>(buf.size());
    ri.index = index;
    std::fill(buf.begin(), buf.end(), 0);
    memcpy(buf.data(), &ri, sizeof ri);
    if (xioctl(fd, VFIO_DEVICE_GET_REGION_INFO, buf.data()) < 0) throw NativeError(errno, fmt("VFIO_DEVICE_GET_REGION_INFO index %u", index));
    memcpy(&ri, buf.data(), sizeof ri);
    if (ri.argsz <= buf.size()) {
      buf.resize(std::max<size_t>(ri.argsz, sizeof ri));
      return buf;
    }
    // The capability chain did not fit: the kernel raised argsz to what it needs.
    if (ri.argsz > 65536) throw NativeError(E2BIG, fmt("region %u info needs %u bytes (> 64 KiB)", index, ri.argsz));
    buf.resize(ri.argsz);
  }
  throw NativeError(EAGAIN, fmt("region %u info size kept growing", index));
}

void reset(int fd) {
  if (xioctl(fd, VFIO_DEVICE_RESET, nullptr) < 0) throw NativeError(errno, "VFIO_DEVICE_RESET");
}

void dirtyPages(int containerFd, uint32_t flags, uint64_t iova, uint64_t size, uint64_t pgsize, uint8_t* bitmap, uint64_t bitmapBytes) {
  // argsz covers the header and, for GET_BITMAP, the _get struct in data[] but not the bitmap itself (uAPI text).
  alignas(8) uint8_t req[sizeof(vfio_iommu_type1_dirty_bitmap) + sizeof(vfio_iommu_type1_dirty_bitmap_get)] = {};
  vfio_iommu_type1_dirty_bitmap hdr{};
  hdr.flags = flags;
  hdr.argsz = sizeof(hdr);
  if (flags == VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP) {
    hdr.argsz = sizeof(req);
    vfio_iommu_type1_dirty_bitmap_get get{};
    get.iova = iova;
    get.size = size;
    get.bitmap.pgsize = pgsize;
    get.bitmap.size = bitmapBytes;
    get.bitmap.data = reinterpret_cast<__u64*>(bitmap);
    memcpy(req + sizeof(hdr), &get, sizeof(get));
  }
  memcpy(req, &hdr, sizeof(hdr));
  if (xioctl(containerFd, VFIO_IOMMU_DIRTY_PAGES, req) < 0) throw NativeError(errno, fmt("VFIO_IOMMU_DIRTY_PAGES(flags=%u)", flags));
}

void closeFd(int fd) {
  if (close(fd) < 0 && errno != EINTR) throw NativeError(errno, fmt("close(%d)", fd));
}

std::vector<std::pair<const char*, double>> layout() {
  return {
      {"migInfoSize", sizeof(vfio_device_migration_info)},
      {"migInfoDeviceState", OFF(vfio_device_migration_info, device_state)},
      {"migInfoReserved", OFF(vfio_device_migration_info, reserved)},
      {"migInfoPendingBytes", OFF(vfio_device_migration_info, pending_bytes)},
      {"migInfoDataOffset", OFF(vfio_device_migration_info, data_offset)},
      {"migInfoDataSize", OFF(vfio_device_migration_info, data_size)},
      {"draftInfoSize", sizeof(DraftMigrationInfo)},
      {"draftStartPfn", OFF(DraftMigrationInfo, start_pfn)},
      {"draftPageSize", OFF(DraftMigrationInfo, page_size)},
      {"draftTotalPfns", OFF(DraftMigrationInfo, total_pfns)},
      {"draftCopiedPfns", OFF(DraftMigrationInfo, copied_pfns)},
      {"regionInfoSize", sizeof(vfio_region_info)},
      {"regionInfoFlags", OFF(vfio_region_info, flags)},
      {"regionInfoIndex", OFF(vfio_region_info, index)},
      {"regionInfoCapOffset", OFF(vfio_region_info, cap_offset)},
      {"regionInfoSizeField", OFF(vfio_region_info, size)},
      {"regionInfoOffset", OFF(vfio_region_info, offset)},
      {"regionFlagRead", VFIO_REGION_INFO_FLAG_READ},
      {"regionFlagWrite", VFIO_REGION_INFO_FLAG_WRITE},
      {"regionFlagMmap", VFIO_REGION_INFO_FLAG_MMAP},
      {"regionFlagCaps", VFIO_REGION_INFO_FLAG_CAPS},
      {"capHeaderSize", sizeof(vfio_info_cap_header)},
      {"capTypeSize", sizeof(vfio_region_info_cap_type)},
      {"sparseMmapHeaderSize", sizeof(vfio_region_info_cap_sparse_mmap)},
      {"sparseMmapAreaSize", sizeof(vfio_region_sparse_mmap_area)},
      {"capIdSparseMmap", VFIO_REGION_INFO_CAP_SPARSE_MMAP},
      {"capIdType", VFIO_REGION_INFO_CAP_TYPE},
      {"regionTypeMigration", VFIO_REGION_TYPE_MIGRATION_DEPRECATED},
      {"regionSubtypeMigration", VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED},
      {"pciNumRegions", VFIO_PCI_NUM_REGIONS},
      {"deviceInfoSize", sizeof(vfio_device_info)},
      {"deviceFlagsReset", VFIO_DEVICE_FLAGS_RESET},
      {"deviceFlagsPci", VFIO_DEVICE_FLAGS_PCI},
      {"deviceStateStop", VFIO_DEVICE_STATE_V1_STOP},
      {"deviceStateRunning", VFIO_DEVICE_STATE_V1_RUNNING},
      {"deviceStateSaving", VFIO_DEVICE_STATE_V1_SAVING},
      {"deviceStateResuming", VFIO_DEVICE_STATE_V1_RESUMING},
      {"deviceStateMask", VFIO_DEVICE_STATE_MASK},
      {"apiVersion", VFIO_API_VERSION},
      {"type1Iommu", VFIO_TYPE1_IOMMU},
      {"type1v2Iommu", VFIO_TYPE1v2_IOMMU},
      {"groupFlagsViable", VFIO_GROUP_FLAGS_VIABLE},
      {"ioctlGetApiVersion", VFIO_GET_API_VERSION},
      {"ioctlCheckExtension", VFIO_CHECK_EXTENSION},
      {"ioctlSetIommu", VFIO_SET_IOMMU},
      {"ioctlGroupGetStatus", VFIO_GROUP_GET_STATUS},
      {"ioctlGroupSetContainer", VFIO_GROUP_SET_CONTAINER},
      {"ioctlGroupGetDeviceFd", VFIO_GROUP_GET_DEVICE_FD},
      {"ioctlDeviceGetInfo", VFIO_DEVICE_GET_INFO},
      {"ioctlGetRegionInfo", VFIO_DEVICE_GET_REGION_INFO},
      {"ioctlDeviceReset", VFIO_DEVICE_RESET},
      {"ioctlIommuDirtyPages", VFIO_IOMMU_DIRTY_PAGES},
      {"dirtyPagesFlagStart", VFIO_IOMMU_DIRTY_PAGES_FLAG_START},
      {"dirtyPagesFlagStop", VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP},
      {"dirtyPagesFlagGetBitmap", VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP},
      {"dirtyBitmapSize", sizeof(vfio_iommu_type1_dirty_bitmap)},
      {"dirtyBitmapGetSize", sizeof(vfio_iommu_type1_dirty_bitmap_get)},
  };
}

}  // namespace vfio
