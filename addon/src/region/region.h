// A VFIO region: trapped access (rw) plus directly mapped sparse areas. FdRegion is a real device fd,
// EmuRegion the emulated device; the copy helpers split ranges like QEMU's get_data_section_size().
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace emu { class Device; }

namespace region {

struct MappedArea {
  uint64_t offset, size;
  uint8_t* ptr;  // mapping of [offset, offset+size) of the region
};

class Region {
 public:
  virtual ~Region();
  // One trapped access at region offset `off`. Returns 0 or -errno; errorText() may explain.
  virtual int rw(bool write, uint64_t off, void* buf, size_t len) = 0;
  virtual std::string errorText() const { return {}; }
  uint64_t size() const { return size_; }
  const std::vector<MappedArea>& areas() const { return areas_; }  // sorted, non-overlapping
  // How trapped data pieces are accessed: one pread/pwrite per piece (bulk, the default), or QEMU v1's vfio_mig_rw
  // pattern (aligned): naturally aligned accesses of 8, 4, 2 or 1 bytes, for drivers only ever driven by QEMU.
  void setAlignedAccess(bool on) { aligned_.store(on, std::memory_order_relaxed); }
  bool alignedAccess() const { return aligned_.load(std::memory_order_relaxed); }

 protected:
  uint64_t size_ = 0;
  std::vector<MappedArea> areas_;

 private:
  std::atomic<bool> aligned_{false};
};

// One trapped data piece [off, off+len) in the region's access mode. Returns 0 or -errno; on failure *failOff and
// *failLen name the access that failed. The caller bounds-checked the range.
int trappedRw(Region& r, bool write, uint64_t off, uint8_t* buf, uint64_t len, uint64_t* failOff, uint64_t* failLen);

struct AreaSpec { uint64_t offset, size; };

class FdRegion : public Region {
 public:
  // `areas` must be inside the region and non-overlapping (validated by the caller). Areas whose mmap fails are
  // dropped: the slow path (pread/pwrite) serves them.
  FdRegion(int fd, uint64_t regionOffset, uint64_t size, std::vector<AreaSpec> areas, bool map);
  ~FdRegion() override;
  int rw(bool write, uint64_t off, void* buf, size_t len) override;

 private:
  int fd_;
  uint64_t base_;
};

class EmuRegion : public Region {
 public:
  explicit EmuRegion(std::shared_ptr<emu::Device> dev);
  ~EmuRegion() override;
  int rw(bool write, uint64_t off, void* buf, size_t len) override;
  std::string errorText() const override;

 private:
  std::shared_ptr<emu::Device> dev_;
};

enum : int { kCopyMmap = 1, kCopyTrapped = 2 };

// Both throw vm::NativeError when a trapped access fails; ranges must already be bounds-checked.
uint64_t copyOut(Region& r, uint64_t off, uint64_t len, uint8_t* dst);              // returns trapped bytes
uint64_t copyIn(Region& r, uint64_t off, uint64_t len, const uint8_t* src, int which);  // returns trapped bytes

// Zero-copy save of one container record (src/main/container/format.ts): `rec` holds the 32-byte record header, the
// 16-byte [DATA][size] prefix and, if `trailer`, the 8-byte [END]. The data [off, off+len) goes from the mapped
// areas straight into pwritev(fd, pos); trapped pieces are read into `scratch` (which must hold `len` bytes). The
// body CRC32C and then the header CRC are computed here and stored at rec[12..16). Returns bytes written.
uint64_t sendRecord(Region& r, uint64_t off, uint64_t len, uint8_t* scratch, int fd, uint64_t pos, uint8_t* rec, bool trailer);

// Zero-copy load of one data packet: preadv(fd, pos) `len` bytes into region [off, off+len) — mapped pieces directly,
// trapped pieces into `scratch` (the caller writes those with copyIn, in its profile's order). Returns the CRC32C
// continued from `crc` over the bytes read; a short read is an error.
uint32_t recvData(Region& r, uint64_t off, uint64_t len, int fd, uint64_t pos, uint8_t* scratch, uint32_t crc);

// Handle registry (ids from 1). get() throws vm::NativeError(EBADF) for an unknown handle.
int add(std::shared_ptr<Region> r);
void remove(int h);
std::shared_ptr<Region> get(int h);

}  // namespace region
