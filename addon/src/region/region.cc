#include "region/region.h"
#include "common/registry.h"

#include <sys/uio.h>
#include <climits>
#include <cerrno>

#include "common/crc32c.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>

#include "common/error.h"
#include "emu/device.h"

namespace region {

Region::~Region() = default;

// ---- real VFIO device fd -----------------------------------------------------------------------------------------
FdRegion::FdRegion(int fd, uint64_t regionOffset, uint64_t size, std::vector<AreaSpec> areas, bool map)
    : fd_(fd), base_(regionOffset) {
  size_ = size;
  if (!map) return;
  for (const AreaSpec& a : areas) {
    if (a.size == 0) continue;
    void* p = mmap(nullptr, a.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, static_cast<off_t>(regionOffset + a.offset));
    if (p != MAP_FAILED) areas_.push_back({a.offset, a.size, static_cast<uint8_t*>(p)});
  }
  std::sort(areas_.begin(), areas_.end(), [](const MappedArea& x, const MappedArea& y) { return x.offset < y.offset; });
}

FdRegion::~FdRegion() {
  for (const MappedArea& a : areas_) munmap(a.ptr, a.size);
}

int FdRegion::rw(bool write, uint64_t off, void* buf, size_t len) {
  uint8_t* p = static_cast<uint8_t*>(buf);
  for (size_t done = 0; done < len;) {
    off_t at = static_cast<off_t>(base_ + off + done);
    ssize_t n = write ? pwrite(fd_, p + done, len - done, at) : pread(fd_, p + done, len - done, at);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) return -EIO;  // the region ended early
    done += static_cast<size_t>(n);
  }
  return 0;
}

// ---- emulated device ---------------------------------------------------------------------------------------------
EmuRegion::EmuRegion(std::shared_ptr<emu::Device> dev) : dev_(std::move(dev)) {
  size_ = dev_->regionSize();
  // Map the data memfd the way a device fd would be mapped: a fresh mapping per open, area by area (the memfd is laid
  // out like the region).
  for (const emu::Area& a : dev_->areas()) {
    void* p = mmap(nullptr, a.size, PROT_READ | PROT_WRITE, MAP_SHARED, dev_->dataFd(), static_cast<off_t>(a.offset));
    if (p != MAP_FAILED) areas_.push_back({a.offset, a.size, static_cast<uint8_t*>(p)});
  }
}

EmuRegion::~EmuRegion() {
  for (const MappedArea& a : areas_) munmap(a.ptr, a.size);
}

int EmuRegion::rw(bool write, uint64_t off, void* buf, size_t len) { return dev_->access(write, off, buf, len); }
std::string EmuRegion::errorText() const { return emu::threadErrorText(); }

// ---- section split (QEMU get_data_section_size) --------------------------------------------------------------
// Calls fn(off, n, map) for consecutive pieces of [off, off+len): map points into a mapped area, or is null for a
// trapped piece, which ends at the next area start.
template <typename F>
static void sections(const Region& r, uint64_t off, uint64_t len, F fn) {
  const auto& areas = r.areas();
  while (len > 0) {
    // first area ending after off
    auto it = std::upper_bound(areas.begin(), areas.end(), off,
                               [](uint64_t o, const MappedArea& a) { return o < a.offset + a.size; });
    uint64_t n;
    uint8_t* map = nullptr;
    if (it != areas.end() && it->offset <= off) {
      n = std::min(len, it->offset + it->size - off);
      map = it->ptr + (off - it->offset);
    } else {
      n = it != areas.end() ? std::min(len, it->offset - off) : len;
    }
    fn(off, n, map);
    off += n;
    len -= n;
  }
}

int trappedRw(Region& r, bool write, uint64_t off, uint8_t* buf, uint64_t len, uint64_t* failOff, uint64_t* failLen) {
  if (!r.alignedAccess()) {
    int rc = r.rw(write, off, buf, len);
    if (rc < 0) *failOff = off, *failLen = len;
    return rc;
  }
  // QEMU vfio_mig_rw: 8 bytes where 8 are left and the offset is 8-aligned, else 4, 2, 1 likewise.
  while (len > 0) {
    uint64_t w = len >= 8 && off % 8 == 0 ? 8 : len >= 4 && off % 4 == 0 ? 4 : len >= 2 && off % 2 == 0 ? 2 : 1;
    int rc = r.rw(write, off, buf, static_cast<size_t>(w));
    if (rc < 0) {
      *failOff = off, *failLen = w;
      return rc;
    }
    off += w, buf += w, len -= w;
  }
  return 0;
}

static void trappedFail(const Region& r, int rc, bool write, uint64_t off, uint64_t n) {
  std::string t = r.errorText();
  throw vm::NativeError(-rc, vm::fmt("trapped %s at off=%llu len=%llu", write ? "write" : "read",
                                     static_cast<unsigned long long>(off), static_cast<unsigned long long>(n)) +
                                 (t.empty() ? "" : ": " + t));
}

uint64_t copyOut(Region& r, uint64_t off, uint64_t len, uint8_t* dst) {
  uint64_t trapped = 0, start = off;
  sections(r, off, len, [&](uint64_t o, uint64_t n, uint8_t* map) {
    uint8_t* d = dst + (o - start);
    if (map) {
      memcpy(d, map, n);
      return;
    }
    uint64_t fo, fl;
    int rc = trappedRw(r, false, o, d, n, &fo, &fl);
    if (rc < 0) trappedFail(r, rc, false, fo, fl);
    trapped += n;
  });
  return trapped;
}

// All of `iov` at file position `pos` with pwritev/preadv, resuming after short transfers and EINTR; a read that
// meets end of file is an error (the caller checked the record lies inside the file, so it was truncated meanwhile).
static uint64_t vectorIo(int fd, std::vector<iovec>& iov, uint64_t pos, bool write) {
  size_t first = 0;
  uint64_t done = 0;
  while (first < iov.size()) {
    int cnt = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
    ssize_t n = write ? pwritev(fd, &iov[first], cnt, static_cast<off_t>(pos + done))
                      : preadv(fd, &iov[first], cnt, static_cast<off_t>(pos + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw vm::NativeError(errno, vm::fmt("%s(fd=%d, pos=%llu)", write ? "pwritev" : "preadv", fd, static_cast<unsigned long long>(pos + done)));
    }
    if (n == 0)
      throw vm::NativeError(EIO, vm::fmt(write ? "pwritev wrote nothing at %llu" : "stream ends at %llu inside a data packet",
                                         static_cast<unsigned long long>(pos + done)));
    done += static_cast<uint64_t>(n);
    // Drop fully transferred vectors, trim a partly transferred one.
    size_t left = static_cast<size_t>(n);
    while (first < iov.size() && left >= iov[first].iov_len) left -= iov[first++].iov_len;
    if (left) {
      iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + left;
      iov[first].iov_len -= left;
    }
  }
  return done;
}

uint64_t sendRecord(Region& r, uint64_t off, uint64_t len, uint8_t* scratch, int fd, uint64_t pos, uint8_t* rec, bool trailer) {
  std::vector<iovec> iov;
  iov.push_back({rec, 48});
  uint32_t crc = crc32c::copyUpdate(0, rec + 32, nullptr, 16);
  uint64_t start = off;
  sections(r, off, len, [&](uint64_t o, uint64_t n, uint8_t* map) {
    uint8_t* p = map;
    if (!p) {
      p = scratch + (o - start);
      uint64_t fo, fl;
      int rc = trappedRw(r, false, o, p, n, &fo, &fl);
      if (rc < 0) trappedFail(r, rc, false, fo, fl);
    }
    crc = crc32c::copyUpdate(crc, p, nullptr, n);
    iov.push_back({p, n});
  });
  if (trailer) {
    crc = crc32c::copyUpdate(crc, rec + 48, nullptr, 8);
    iov.push_back({rec + 48, 8});
  }
  // Record checksum: body, then header bytes 0..11 and 16..31 (as recordCrc in format.ts).
  uint32_t h = crc32c::copyUpdate(crc32c::copyUpdate(crc, rec, nullptr, 12), rec + 16, nullptr, 16);
  for (int i = 0; i < 4; i++) rec[12 + i] = static_cast<uint8_t>(h >> (8 * i));
  return vectorIo(fd, iov, pos, true);
}

uint32_t recvData(Region& r, uint64_t off, uint64_t len, int fd, uint64_t pos, uint8_t* scratch, uint32_t crc) {
  std::vector<iovec> iov;
  uint64_t start = off;
  sections(r, off, len, [&](uint64_t o, uint64_t n, uint8_t* map) { iov.push_back({map ? map : scratch + (o - start), n}); });
  std::vector<iovec> all = iov;  // vectorIo trims `iov`; the checksum walks the untouched list afterwards
  vectorIo(fd, iov, pos, false);
  for (auto& v : all) crc = crc32c::copyUpdate(crc, static_cast<uint8_t*>(v.iov_base), nullptr, v.iov_len);
  return crc;
}

uint64_t copyIn(Region& r, uint64_t off, uint64_t len, const uint8_t* src, int which) {
  uint64_t trapped = 0, start = off;
  sections(r, off, len, [&](uint64_t o, uint64_t n, uint8_t* map) {
    const uint8_t* s = src + (o - start);
    if (map) {
      if (which & kCopyMmap) memcpy(map, s, n);
      return;
    }
    if (!(which & kCopyTrapped)) return;
    uint64_t fo, fl;
    int rc = trappedRw(r, true, o, const_cast<uint8_t*>(s), n, &fo, &fl);
    if (rc < 0) trappedFail(r, rc, true, fo, fl);
    trapped += n;
  });
  return trapped;
}

// ---- handle registry ---------------------------------------------------------------------------------------------
namespace {
vm::Registry<Region>& handles() {
  static auto* r = new vm::Registry<Region>(EBADF, "region handle");
  return *r;
}
}  // namespace

int add(std::shared_ptr<Region> r) { return static_cast<int>(handles().add(std::move(r))); }

void remove(int h) { handles().take(static_cast<uint32_t>(h)); }  // released here, after the table lock

std::shared_ptr<Region> get(int h) { return handles().get(static_cast<uint32_t>(h)); }

}  // namespace region
