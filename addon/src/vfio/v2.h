// VFIO migration v2 and the cdev + iommufd open path on a real kernel device fd (vfio-facts §4, kernel-guest.md).
// Every call is one ioctl or one read/write; the protocol (FSM walk, data-fd rules) is in TypeScript.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace vfio {

struct CdevHandles { int device, iommufd; uint32_t devId, ioasId; };
struct PrecopyInfo { uint64_t initialBytes, dirtyBytes; };
struct IovaRange { uint64_t iova, length; };

// Open /dev/vfio/devices/vfioN, bind it to a new iommufd (/dev/iommu), allocate an IOAS and attach to it.
CdevHandles openCdev(const std::string& cdevPath);
// VFIO_DEVICE_FEATURE GET MIGRATION: VFIO_MIGRATION_* flags. ENOTTY: the driver has no migration support.
uint64_t migrationFlags(int dev);
// VFIO_DEVICE_FEATURE PROBE of `feature` with GET and/or SET bits: true if supported, false on ENOTTY/EOPNOTSUPP/EINVAL.
bool featureProbe(int dev, uint32_t feature, uint32_t getSet);
uint32_t migStateGet(int dev);
// SET MIG_DEVICE_STATE (one call; the kernel may walk several arcs). Returns the new data fd or -1.
int migStateSet(int dev, uint32_t state);
// VFIO_MIG_GET_PRECOPY_INFO on a PRE_COPY data fd.
PrecopyInfo precopyInfo(int dataFd);
uint64_t migDataSize(int dev);
// DMA logging on the device fd. Start returns the page size the driver chose.
uint64_t dmaLoggingStart(int dev, uint64_t pageSize, const std::vector<IovaRange>& ranges);
void dmaLoggingStop(int dev);
void dmaLoggingReport(int dev, uint64_t iova, uint64_t length, uint64_t pageSize, uint8_t* bitmap);
std::vector<std::pair<const char*, double>> layoutV2();

}  // namespace vfio
