// Real kernel VFIO (type1 container + group + device fd) and the uAPI layout facts the engine relies on.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace vfio {

struct Handles { int container, group, device; };
struct DeviceInfo { uint32_t flags, numRegions, numIrqs; };

// All throw vm::NativeError with the failing step in the text.
Handles openDevice(const std::string& groupPath, const std::string& deviceName);
DeviceInfo deviceInfo(int fd);
std::vector<uint8_t> regionInfo(int fd, uint32_t index);
void reset(int fd);
// VFIO_IOMMU_DIRTY_PAGES on the container fd (Linux 5.8 type1): flags START, STOP or GET_BITMAP; GET_BITMAP fills
// `bitmap` (bitmapBytes, one bit per pgsize page of [iova, iova+size)).
void dirtyPages(int containerFd, uint32_t flags, uint64_t iova, uint64_t size, uint64_t pgsize, uint8_t* bitmap, uint64_t bitmapBytes);
void closeFd(int fd);
// ioctl() retried on EINTR (shared by the v1 and v2 code).
int xioctl(int fd, unsigned long req, void* arg);

// (name, value) pairs taken from <linux/vfio.h> and sizeof/offsetof.
std::vector<std::pair<const char*, double>> layout();

}  // namespace vfio
