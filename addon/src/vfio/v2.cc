#include "vfio/v2.h"
#include "vfio/vfio.h"

#include <fcntl.h>
#include <linux/vfio.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/error.h"

// ---- uAPI newer than the build machines' 6.1 <linux/vfio.h> (values from Linux 6.12 include/uapi) --------------
// PRE_COPY (6.2), PRECOPY_INFO (6.2), MIG_DATA_SIZE (6.2), cdev BIND/ATTACH (6.6), iommufd (6.2: no header in 6.1).
namespace uapi {
constexpr uint64_t kMigrationPreCopy = 1u << 2;
constexpr uint32_t kStatePreCopy = 6, kStatePreCopyP2P = 7;
constexpr uint32_t kFeatureMigDataSize = 9;
constexpr unsigned long kMigGetPrecopyInfo = _IO(VFIO_TYPE, VFIO_BASE + 21);
constexpr unsigned long kDeviceBindIommufd = _IO(VFIO_TYPE, VFIO_BASE + 18);
constexpr unsigned long kDeviceAttachIommufdPt = _IO(VFIO_TYPE, VFIO_BASE + 19);
constexpr unsigned long kIommuDestroy = _IO(';', 0x80);
constexpr unsigned long kIommuIoasAlloc = _IO(';', 0x81);
struct PrecopyInfo { uint32_t argsz, flags; alignas(8) uint64_t initial_bytes; alignas(8) uint64_t dirty_bytes; };
struct MigDataSize { alignas(8) uint64_t stop_copy_length; };
struct BindIommufd { uint32_t argsz, flags; int32_t iommufd; uint32_t out_devid; };
struct AttachIommufdPt { uint32_t argsz, flags, pt_id; };
struct IommuDestroy { uint32_t size, id; };
struct IoasAlloc { uint32_t size, flags, out_ioas_id; };
}  // namespace uapi

#define OFF(t, f) offsetof(t, f)
static_assert(sizeof(uapi::PrecopyInfo) == 24 && OFF(uapi::PrecopyInfo, flags) == 4 &&
                  OFF(uapi::PrecopyInfo, initial_bytes) == 8 && OFF(uapi::PrecopyInfo, dirty_bytes) == 16,
              "struct vfio_precopy_info");
static_assert(sizeof(uapi::MigDataSize) == 8, "struct vfio_device_feature_mig_data_size");
static_assert(sizeof(uapi::BindIommufd) == 16 && OFF(uapi::BindIommufd, iommufd) == 8 && OFF(uapi::BindIommufd, out_devid) == 12,
              "struct vfio_device_bind_iommufd");
static_assert(sizeof(uapi::AttachIommufdPt) == 12 && OFF(uapi::AttachIommufdPt, pt_id) == 8, "struct vfio_device_attach_iommufd_pt");
static_assert(sizeof(uapi::IoasAlloc) == 12 && OFF(uapi::IoasAlloc, out_ioas_id) == 8, "struct iommu_ioas_alloc");
static_assert(sizeof(uapi::IommuDestroy) == 8, "struct iommu_destroy");
static_assert(uapi::kMigGetPrecopyInfo == 0x3B79 && uapi::kDeviceBindIommufd == 0x3B76 && uapi::kDeviceAttachIommufdPt == 0x3B77 &&
                  uapi::kIommuDestroy == 0x3B80 && uapi::kIommuIoasAlloc == 0x3B81,
              "ioctl numbers (kernel-guest.md)");
// What the 6.1 header already has: checked against it.
static_assert(VFIO_DEVICE_FEATURE == 0x3B75 && VFIO_DEVICE_RESET == 0x3B6F, "device ioctl numbers");
static_assert(sizeof(vfio_device_feature) == 8 && OFF(vfio_device_feature, flags) == 4 && OFF(vfio_device_feature, data) == 8,
              "struct vfio_device_feature");
static_assert(VFIO_DEVICE_FEATURE_MASK == 0xffff && VFIO_DEVICE_FEATURE_GET == 1u << 16 && VFIO_DEVICE_FEATURE_SET == 1u << 17 &&
                  VFIO_DEVICE_FEATURE_PROBE == 1u << 18,
              "feature flags");
static_assert(VFIO_DEVICE_FEATURE_MIGRATION == 1 && VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE == 2 &&
                  VFIO_DEVICE_FEATURE_DMA_LOGGING_START == 6 && VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP == 7 &&
                  VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT == 8,
              "feature ids");
static_assert(sizeof(vfio_device_feature_migration) == 8 && VFIO_MIGRATION_STOP_COPY == 1 && VFIO_MIGRATION_P2P == 2,
              "struct vfio_device_feature_migration");
static_assert(sizeof(vfio_device_feature_mig_state) == 8 && OFF(vfio_device_feature_mig_state, data_fd) == 4,
              "struct vfio_device_feature_mig_state");
static_assert(VFIO_DEVICE_STATE_ERROR == 0 && VFIO_DEVICE_STATE_STOP == 1 && VFIO_DEVICE_STATE_RUNNING == 2 &&
                  VFIO_DEVICE_STATE_STOP_COPY == 3 && VFIO_DEVICE_STATE_RESUMING == 4 && VFIO_DEVICE_STATE_RUNNING_P2P == 5,
              "enum vfio_device_mig_state");
static_assert(sizeof(vfio_device_feature_dma_logging_control) == 24 &&
                  OFF(vfio_device_feature_dma_logging_control, num_ranges) == 8 &&
                  OFF(vfio_device_feature_dma_logging_control, ranges) == 16 &&
                  sizeof(vfio_device_feature_dma_logging_range) == 16 && OFF(vfio_device_feature_dma_logging_range, length) == 8,
              "DMA logging control");
static_assert(sizeof(vfio_device_feature_dma_logging_report) == 32 && OFF(vfio_device_feature_dma_logging_report, length) == 8 &&
                  OFF(vfio_device_feature_dma_logging_report, page_size) == 16 &&
                  OFF(vfio_device_feature_dma_logging_report, bitmap) == 24,
              "DMA logging report");

namespace vfio {

using vm::fmt;
using vm::NativeError;


// struct vfio_device_feature (8 bytes, flexible data[]) followed by the feature's payload, 8-byte aligned.
template <typename T>
struct Feature {
  static constexpr size_t kHeader = sizeof(vfio_device_feature);
  T data{};
  void run(int dev, uint32_t flags, const std::string& what) {
    alignas(8) uint8_t buf[kHeader + sizeof(T)] = {};
    vfio_device_feature hdr{};
    hdr.argsz = sizeof buf;
    hdr.flags = flags;
    memcpy(buf, &hdr, kHeader);
    memcpy(buf + kHeader, &data, sizeof(T));
    if (xioctl(dev, VFIO_DEVICE_FEATURE, buf) < 0) throw NativeError(errno, what);
    memcpy(&data, buf + kHeader, sizeof(T));
  }
};

// A feature without payload (PROBE, DMA_LOGGING_STOP): 0 on success, else errno.
static int bareFeature(int dev, uint32_t flags) {
  alignas(8) uint8_t buf[sizeof(vfio_device_feature)] = {};
  vfio_device_feature hdr{};
  hdr.argsz = sizeof buf;
  hdr.flags = flags;
  memcpy(buf, &hdr, sizeof hdr);
  return xioctl(dev, VFIO_DEVICE_FEATURE, buf) < 0 ? errno : 0;
}

CdevHandles openCdev(const std::string& cdevPath) {
  int dev = -1, iommu = -1;
  auto bail = [&](const std::string& step) {
    int e = errno;
    if (dev >= 0) close(dev);
    if (iommu >= 0) close(iommu);
    return NativeError(e, step);
  };
  dev = open(cdevPath.c_str(), O_RDWR | O_CLOEXEC);
  if (dev < 0) throw bail("open " + cdevPath);
  iommu = open("/dev/iommu", O_RDWR | O_CLOEXEC);
  if (iommu < 0) throw bail("open /dev/iommu");
  uapi::BindIommufd bind{sizeof(uapi::BindIommufd), 0, iommu, 0};
  if (xioctl(dev, uapi::kDeviceBindIommufd, &bind) < 0) throw bail("VFIO_DEVICE_BIND_IOMMUFD");
  uapi::IoasAlloc ioas{sizeof(uapi::IoasAlloc), 0, 0};
  if (xioctl(iommu, uapi::kIommuIoasAlloc, &ioas) < 0) throw bail("IOMMU_IOAS_ALLOC");
  uapi::AttachIommufdPt att{sizeof(uapi::AttachIommufdPt), 0, ioas.out_ioas_id};
  if (xioctl(dev, uapi::kDeviceAttachIommufdPt, &att) < 0) throw bail(fmt("VFIO_DEVICE_ATTACH_IOMMUFD_PT(ioas %u)", ioas.out_ioas_id));
  return {dev, iommu, bind.out_devid, ioas.out_ioas_id};
}

uint64_t migrationFlags(int dev) {
  Feature<vfio_device_feature_migration> f{};
  f.run(dev, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION, "VFIO_DEVICE_FEATURE GET MIGRATION");
  return f.data.flags;
}

bool featureProbe(int dev, uint32_t feat, uint32_t getSet) {
  if (feat > VFIO_DEVICE_FEATURE_MASK || (getSet & ~(VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET)) || !getSet)
    throw NativeError(EINVAL, "probe needs a 16-bit feature id and GET and/or SET");
  int e = bareFeature(dev, VFIO_DEVICE_FEATURE_PROBE | getSet | feat);
  if (e == 0) return true;
  if (e == ENOTTY || e == EOPNOTSUPP || e == EINVAL) return false;
  throw NativeError(e, fmt("VFIO_DEVICE_FEATURE PROBE feature %u", feat));
}

uint32_t migStateGet(int dev) {
  Feature<vfio_device_feature_mig_state> f{};
  f.run(dev, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, "VFIO_DEVICE_FEATURE GET MIG_DEVICE_STATE");
  return f.data.device_state;
}

int migStateSet(int dev, uint32_t state) {
  if (state > uapi::kStatePreCopyP2P) throw NativeError(EINVAL, fmt("no v2 state %u", state));
  Feature<vfio_device_feature_mig_state> f{};
  f.data.device_state = state;
  f.data.data_fd = -1;
  f.run(dev, VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, fmt("VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE %u", state));
  return f.data.data_fd;
}

PrecopyInfo precopyInfo(int dataFd) {
  uapi::PrecopyInfo p{};
  p.argsz = sizeof p;
  if (xioctl(dataFd, uapi::kMigGetPrecopyInfo, &p) < 0) throw NativeError(errno, "VFIO_MIG_GET_PRECOPY_INFO");
  return {p.initial_bytes, p.dirty_bytes};
}

uint64_t migDataSize(int dev) {
  Feature<uapi::MigDataSize> f{};
  f.run(dev, VFIO_DEVICE_FEATURE_GET | uapi::kFeatureMigDataSize, "VFIO_DEVICE_FEATURE GET MIG_DATA_SIZE");
  return f.data.stop_copy_length;
}

uint64_t dmaLoggingStart(int dev, uint64_t pageSize, const std::vector<IovaRange>& ranges) {
  std::vector<vfio_device_feature_dma_logging_range> r(ranges.size());
  for (size_t i = 0; i < ranges.size(); i++) r[i] = {ranges[i].iova, ranges[i].length};
  Feature<vfio_device_feature_dma_logging_control> f{};
  f.data.page_size = pageSize;
  f.data.num_ranges = static_cast<uint32_t>(r.size());
  f.data.ranges = reinterpret_cast<uintptr_t>(r.data());
  f.run(dev, VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START, fmt("VFIO_DEVICE_FEATURE DMA_LOGGING_START (%zu ranges, page %llu)", r.size(), static_cast<unsigned long long>(pageSize)));
  return f.data.page_size;
}

void dmaLoggingStop(int dev) {
  if (int e = bareFeature(dev, VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP))
    throw NativeError(e, "VFIO_DEVICE_FEATURE DMA_LOGGING_STOP");
}

void dmaLoggingReport(int dev, uint64_t iova, uint64_t length, uint64_t pageSize, uint8_t* bitmap) {
  Feature<vfio_device_feature_dma_logging_report> f{};
  f.data.iova = iova;
  f.data.length = length;
  f.data.page_size = pageSize;
  f.data.bitmap = reinterpret_cast<uintptr_t>(bitmap);
  f.run(dev, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, "VFIO_DEVICE_FEATURE DMA_LOGGING_REPORT");
}

std::vector<std::pair<const char*, double>> layoutV2() {
  return {
      {"ioctlDeviceFeature", VFIO_DEVICE_FEATURE},
      {"ioctlMigGetPrecopyInfo", static_cast<double>(uapi::kMigGetPrecopyInfo)},
      {"ioctlDeviceBindIommufd", static_cast<double>(uapi::kDeviceBindIommufd)},
      {"ioctlDeviceAttachIommufdPt", static_cast<double>(uapi::kDeviceAttachIommufdPt)},
      {"ioctlIommuIoasAlloc", static_cast<double>(uapi::kIommuIoasAlloc)},
      {"featureGet", VFIO_DEVICE_FEATURE_GET},
      {"featureSet", VFIO_DEVICE_FEATURE_SET},
      {"featureProbe", VFIO_DEVICE_FEATURE_PROBE},
      {"featureMigration", VFIO_DEVICE_FEATURE_MIGRATION},
      {"featureMigDeviceState", VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE},
      {"featureDmaLoggingStart", VFIO_DEVICE_FEATURE_DMA_LOGGING_START},
      {"featureDmaLoggingStop", VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP},
      {"featureDmaLoggingReport", VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT},
      {"featureMigDataSize", uapi::kFeatureMigDataSize},
      {"migrationStopCopy", VFIO_MIGRATION_STOP_COPY},
      {"migrationP2P", VFIO_MIGRATION_P2P},
      {"migrationPreCopy", static_cast<double>(uapi::kMigrationPreCopy)},
      {"v2StateError", VFIO_DEVICE_STATE_ERROR},
      {"v2StateStop", VFIO_DEVICE_STATE_STOP},
      {"v2StateRunning", VFIO_DEVICE_STATE_RUNNING},
      {"v2StateStopCopy", VFIO_DEVICE_STATE_STOP_COPY},
      {"v2StateResuming", VFIO_DEVICE_STATE_RESUMING},
      {"v2StateRunningP2P", VFIO_DEVICE_STATE_RUNNING_P2P},
      {"v2StatePreCopy", uapi::kStatePreCopy},
      {"v2StatePreCopyP2P", uapi::kStatePreCopyP2P},
      {"precopyInfoSize", sizeof(uapi::PrecopyInfo)},
      {"migStateSize", sizeof(vfio_device_feature_mig_state)},
      {"dmaLoggingControlSize", sizeof(vfio_device_feature_dma_logging_control)},
      {"dmaLoggingReportSize", sizeof(vfio_device_feature_dma_logging_report)},
      {"bindIommufdSize", sizeof(uapi::BindIommufd)},
      {"attachIommufdPtSize", sizeof(uapi::AttachIommufdPt)},
  };
}

}  // namespace vfio
