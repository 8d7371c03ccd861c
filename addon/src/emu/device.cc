// Vendor side of the emulated device: registers, state arcs, staging, resume parsing, dirty logs, faults.
#include "emu/device.h"


#include <linux/vfio.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <system_error>
#include <thread>

#include "common/error.h"
#include "emu/stream_format.h"

namespace emu {

using vm::fmt;
using vm::NativeError;
namespace sf = emu::stream;
static_assert(kDeviceFlags == (VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET), "device info flags");

static thread_local std::string tlsErr;
const std::string& threadErrorText() { return tlsErr; }

uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

bool parseFault(const std::string& s, Fault* out) {
  static const std::pair<const char*, Fault> kNames[] = {
      {"", Fault::kNone}, {"fail-transition", Fault::kFailTransition},
      {"error-on-transition", Fault::kErrorOnTransition}, {"bad-data-offset", Fault::kBadDataOffset},
      {"huge-data-offset", Fault::kHugeDataOffset}, {"bad-data-size", Fault::kBadDataSize}, {"stuck", Fault::kStuck},
      {"eio-on-chunk", Fault::kEioOnChunk}, {"bad-copied-pfns", Fault::kBadCopiedPfns},
      {"slow-chunk", Fault::kSlowChunk}, {"over-estimate", Fault::kOverEstimate},
      {"upper-bound-pending", Fault::kUpperBoundPending}, {"wedged", Fault::kWedged}};
  for (const auto& n : kNames)
    if (s == n.first) return *out = n.second, true;
  return false;
}

static const char* stateName(uint32_t s) {
  static const char* const kNames[8] = {"STOP",     "RUNNING", "STOP-AND-COPY", "PRE-COPY",
                                        "RESUMING", "101",     "ERROR",         "111"};
  return kNames[s & kStateMask];
}

// ---- bitmap helpers (u64 words, bit i of word w = item 64w+i) ------------------------------------------------
static inline bool testBit(const std::vector<uint64_t>& v, uint64_t i) { return (v[i >> 6] >> (i & 63)) & 1; }
// Up to 64 bits starting at `pos` (bits beyond the vector read as 0).
static uint64_t getBits(const std::vector<uint64_t>& v, uint64_t pos) {
  uint64_t w = pos >> 6, sh = pos & 63;
  uint64_t lo = w < v.size() ? v[w] >> sh : 0;
  uint64_t hi = (sh && w + 1 < v.size()) ? v[w + 1] << (64 - sh) : 0;
  return lo | hi;
}
// Clears [lo, lo+n); returns how many bits were set.
static uint64_t clearRange(std::vector<uint64_t>& v, uint64_t lo, uint64_t n) {
  uint64_t cleared = 0;
  for (uint64_t i = lo, end = lo + n; i < end;) {
    uint64_t w = i >> 6, sh = i & 63, take = std::min<uint64_t>(64 - sh, end - i);
    uint64_t mask = (take == 64 ? ~0ull : ((1ull << take) - 1)) << sh;
    cleared += static_cast<uint64_t>(__builtin_popcountll(v[w] & mask));
    v[w] &= ~mask;
    i += take;
  }
  return cleared;
}
static uint64_t countRange(const std::vector<uint64_t>& v, uint64_t lo, uint64_t n) {
  uint64_t c = 0;
  for (uint64_t i = lo, end = lo + n; i < end;) {
    uint64_t w = i >> 6, sh = i & 63, take = std::min<uint64_t>(64 - sh, end - i);
    uint64_t mask = (take == 64 ? ~0ull : ((1ull << take) - 1)) << sh;
    c += static_cast<uint64_t>(__builtin_popcountll(v[w] & mask));
    i += take;
  }
  return c;
}

// `lead` bytes of the file come before the mapping: the data memfd is laid out like the region (data area at
// kDataStart), so any mapper — the region code, or a vfio-user client given the fd — maps an area at its region offset.
static uint8_t* mapMemfd(const char* name, uint64_t size, int* fdOut, uint64_t lead = 0) {
  int fd = memfd_create(name, MFD_CLOEXEC);
  if (fd < 0) throw NativeError(errno, fmt("memfd_create(%s)", name));
  if (ftruncate(fd, static_cast<off_t>(lead + size)) != 0) {
    int e = errno;
    close(fd);
    throw NativeError(e, fmt("ftruncate(%s, %llu)", name, static_cast<unsigned long long>(size)));
  }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, static_cast<off_t>(lead));
  if (p == MAP_FAILED) {
    int e = errno;
    close(fd);
    throw NativeError(e, fmt("mmap(%s, %llu)", name, static_cast<unsigned long long>(size)));
  }
  *fdOut = fd;
  return static_cast<uint8_t*>(p);
}

// ---- construction ---------------------------------------------------------------------------------------------
Device::Device(uint32_t id, const Config& cfg) : id_(id), cfg_(cfg) {
  pages_ = cfg.stateSize / kPage;
  uint64_t bitmapBytes = (cfg.guestPages + 63) / 64 * 8;
  if (cfg.dataArea && (cfg.profile == kV2 || cfg.dataArea % kPage || cfg.dataArea > (1ull << 30)))
    throw NativeError(EINVAL, fmt("data area %llu: a v1 device's data area is a multiple of 4096 up to 1 GiB",
                                  static_cast<unsigned long long>(cfg.dataArea)));
  // An explicit data area may be smaller than the bitmap: a dirty query then reports it in several steps.
  dataAreaSize_ = cfg.dataArea ? cfg.dataArea : (std::max(2 * cfg.maxChunk, bitmapBytes) + kPage - 1) / kPage * kPage;
  chunk_ = std::min(cfg.maxChunk, dataAreaSize_);
  regionSize_ = kDataStart + dataAreaSize_;
  hdrEnd_ = cfg.profile == kDraft2019 ? 64 : 32;
  if (cfg.dataMode == kModeMmap) {
    areas_.push_back({kDataStart, dataAreaSize_});
  } else if (cfg.dataMode == kModeMixed) {
    for (uint64_t o = kDataStart; o < regionSize_; o += 2 * 65536) areas_.push_back({o, std::min<uint64_t>(65536, regionSize_ - o)});
  }
  try {
    // A zero-filled destination's memory is allocated as data arrives (populated per record, below), never up
    // front: its size comes from a stream's device table, which is not trusted.
    // Guest RAM (shared by all devices), the dirty-page bitmap and the DMA log are allocated when first needed.
    state_ = mapMemfd("vfio-mig-state", cfg.stateSize, &stateFd_);
    data_ = mapMemfd("vfio-mig-data", dataAreaSize_, &dataFd_, kDataStart);
  } catch (...) {
    release();  // the destructor does not run for a half-built object
    throw;
  }
  if (!cfg.zeroFill) {
    // Big states are filled by several threads (page faults dominate); the content is per-word, so it is identical.
    uint64_t base = static_cast<uint64_t>(cfg.seed) << 32, words = cfg.stateSize / 8;
    uint64_t* w = reinterpret_cast<uint64_t*>(state_);
    auto fill = [=](uint64_t lo, uint64_t hi) {
      for (uint64_t i = lo; i < hi; i++) w[i] = splitmix64(base + i);
    };
    unsigned nt = cfg.stateSize >= (64u << 20) ? std::min(4u, std::max(1u, std::thread::hardware_concurrency())) : 1;
    std::vector<std::thread> ts;
    unsigned started = 1;
    for (unsigned t = 1; t < nt; t++, started++) {
      try {
        ts.emplace_back(fill, words * t / nt, words * (t + 1) / nt);
      } catch (const std::system_error&) {
        break;  // no helper thread: this thread fills the remaining ranges
      }
    }
    fill(0, words / nt);
    fill(words * started / nt, words);
    for (auto& th : ts) th.join();
    for (uint64_t i = 0; i < 256; i++)
      config_[i] = static_cast<uint8_t>(splitmix64(static_cast<uint64_t>(cfg.seed) ^ (0xC0F1 + i)));
  }
  reg_ = (cfg.reservedBits & ~kStateMask) | kRunning;
  wlRng_ = splitmix64(cfg_.seed ^ 0x5EEDull ^ (static_cast<uint64_t>(id_) << 40));
  try {
    if (cfg.dirtyRate > 0 || cfg.dmaRate > 0) workload::add(this), inPool_ = true;
  } catch (...) {
    release();
    throw;
  }
}

Device::~Device() {
  shutdown();
  release();
}

void Device::release() {
  v2Close();
  if (state_) munmap(state_, cfg_.stateSize), close(stateFd_);
  if (data_) munmap(data_, dataAreaSize_), close(dataFd_);
  state_ = data_ = nullptr;
}

void Device::shutdown() {
  // No device lock here: destroying a device must not wait for a vendor access stuck in progress (that access
  // finishes; the next one fails ENODEV).
  if (inPool_) workload::remove(this), inPool_ = false;
  dead_ = true;
}

int Device::fail(int err, std::string msg) {
  lastError_ = msg;
  tlsErr = std::move(msg);
  return -err;
}

// ---- trapped access ---------------------------------------------------------------------------------------------
int Device::access(bool write, uint64_t off, void* buf, size_t len) {
  std::lock_guard<std::mutex> lk(mu_);
  tlsErr.clear();
  if (dead_) return fail(ENODEV, "device destroyed");
  if (cfg_.profile == kV2) return fail(EINVAL, "a v2 device has no migration region");
  if (off >= kDataStart) {
    if (!vm::fits(off, len, regionSize_)) return fail(EINVAL, fmt("access beyond the region (off=%llu len=%zu)", static_cast<unsigned long long>(off), len));
    if (strictTrapped_ && (len > 8 || (len & (len - 1)) || len == 0 || off % len))
      return fail(EINVAL, fmt("trapped %s off=%llu len=%zu refused: this vendor takes only naturally aligned 1, 2, 4 or 8-byte accesses",
                              write ? "write" : "read", static_cast<unsigned long long>(off), len));
    uint8_t* p = data_ + (off - kDataStart);
    if (!write) {
      memcpy(buf, p, len);
      return 0;
    }
    memcpy(p, buf, len);
    return noteTrappedWrite(off, len);
  }
  if (off >= hdrEnd_ || len > hdrEnd_ - off)
    return fail(EINVAL, fmt("offset %llu len %zu is outside the %llu-byte header", static_cast<unsigned long long>(off), len,
                            static_cast<unsigned long long>(hdrEnd_)));
  size_t want = off < 8 ? 4 : 8;
  if ((off != 0 && off != 4 && off % 8 != 0) || len != want)
    return fail(EINVAL, fmt("register access off=%llu len=%zu does not match a register", static_cast<unsigned long long>(off), len));
  if (write) {
    uint64_t v = 0;
    memcpy(&v, buf, len);
    return writeReg(off, len, v);
  }
  uint64_t v = 0;
  int rc = readReg(off, len, &v);
  if (rc == 0) memcpy(buf, &v, len);
  return rc;
}

int Device::readReg(uint64_t off, size_t, uint64_t* v) {
  switch (off) {
    case 0: *v = reg_; return 0;
    case 4: *v = 0; return 0;
    case 8: *v = readPending(); return 0;
    case 16: return readDataOffset(v);
    case 24: *v = readDataSize(); return 0;
    case 56: return readCopiedPfns(v);
    default: return fail(EINVAL, fmt("register at %llu is write-only", static_cast<unsigned long long>(off)));
  }
}

int Device::writeReg(uint64_t off, size_t, uint64_t v) {
  switch (off) {
    case 0: return writeState(static_cast<uint32_t>(v));
    case 4: return 0;
    case 24: return writeDataSize(v);
    case 32: startPfn_ = v; return 0;
    case 40:
      if (v != kPage) return fail(EINVAL, fmt("page_size %llu unsupported (4096 only)", static_cast<unsigned long long>(v)));
      pageSize_ = v;
      return 0;
    case 48: totalPfns_ = v; return 0;
    default: return fail(EINVAL, fmt("register at %llu is read-only", static_cast<unsigned long long>(off)));
  }
}

// ---- state machine -----------------------------------------------------------------------------------------------
static bool arcAllowed(uint32_t from, uint32_t to) {
  switch (from) {
    case kRunning: return to == 0 || to == (kSaving | kRunning) || to == kSaving || to == kResuming;
    case kSaving | kRunning: return to == kSaving || to == kRunning;
    case kSaving: return to == 0 || to == kRunning;
    case 0: return to == kRunning || to == kSaving || to == kResuming;
    case kResuming: return to == kRunning || to == 0;
    default: return false;  // ERROR (and invalid values) are left only by reset
  }
}

int Device::writeState(uint32_t v) {
  if (wedged_) return fail(EIO, "injected fault: device wedged");
  if (res_.waiting) return fail(EIO, "data_size written but the data never followed");
  if ((v & ~kStateMask) != (reg_ & ~kStateMask))
    return fail(EINVAL, fmt("device_state: reserved bits 3..31 changed (0x%x -> 0x%x)", reg_, v));
  uint32_t cur = reg_ & kStateMask, nw = v & kStateMask;
  if (nw == cur) return 0;
  if (!arcAllowed(cur, nw)) return fail(EINVAL, fmt("device_state: %s -> %s not allowed", stateName(cur), stateName(nw)));
  if (fault_ == Fault::kFailTransition && faultArg_ == nw)
    return fail(EIO, fmt("injected fault: transition %s -> %s failed", stateName(cur), stateName(nw)));
  if (fault_ == Fault::kErrorOnTransition && faultArg_ == nw) {
    reg_ = (reg_ & ~kStateMask) | kSaving | kResuming;
    save_ = SaveSession();
    res_ = ResumeSession();
    return fail(EIO, fmt("injected fault: transition %s -> %s put the device in ERROR", stateName(cur), stateName(nw)));
  }
  if (cur == kResuming) {  // the device never runs with partial state
    if (res_.poisoned) return fail(EINVAL, "resume failed earlier: " + res_.reason);
    if (!res_.sawHeader) return fail(EINVAL, "resume incomplete: no HEADER record loaded");
    if (!res_.sawEnd)
      return fail(EINVAL, res_.headLen || res_.payLeft ? fmt("resume incomplete: no END record loaded (record %u cut short)", res_.seq - (res_.payLeft ? 1 : 0))
                                                       : std::string("resume incomplete: no END record loaded"));
    res_ = ResumeSession();
  }
  if ((nw & kSaving) && !(cur & kSaving)) startSave();
  if (!(nw & kSaving) && (cur & kSaving)) save_ = SaveSession();
  if (nw == kResuming) {
    res_ = ResumeSession();
    res_.active = true;
    chunksConsumed_ = pagesLoaded_ = 0;
  }
  reg_ = (reg_ & ~kStateMask) | nw;
  return 0;
}

void Device::startSave() {
  save_ = SaveSession();
  save_.active = true;
  if (dirty_.empty()) dirty_.assign((pages_ + 63) / 64, 0);
  std::fill(dirty_.begin(), dirty_.end(), ~0ull);
  if (pages_ % 64) dirty_.back() = (1ull << (pages_ % 64)) - 1;
  dirtyCount_ = pages_;
  chunksStaged_ = chunksConsumed_ = pagesSent_ = 0;
}

void Device::reset() {
  std::lock_guard<std::mutex> lk(mu_);
  if (wedged_) throw NativeError(EIO, "injected fault: device wedged, VFIO_DEVICE_RESET failed");
  save_ = SaveSession();
  res_ = ResumeSession();
  bitmapPending_ = false;
  lastError_.clear();
  reg_ = (reg_ & ~kStateMask) | kRunning;
  if (cfg_.profile == kV2) v2Close(), v2state_ = 2;  // VFIO_DEVICE_RESET: data sessions closed, RUNNING
}

// ---- save side -----------------------------------------------------------------------------------------------------
uint64_t Device::estimate() const {
  return (save_.headerSent ? 0 : sf::kHeaderRec) + dirtyCount_ * (kPage + sf::kRecHdr) +
         (!(reg_ & kRunning) && !save_.endSent ? sf::kRecHdr : 0);
}

uint64_t Device::readPending() {
  if (!(reg_ & kSaving) || !save_.active) return 0;
  if (save_.staged && !save_.consumed) {
    save_.consumed = true;
    chunksConsumed_++;
  }
  if (stuckActive()) {
    if (!save_.frozen) save_.frozen = true, save_.frozenPending = std::max<uint64_t>(estimate(), 1);
    return save_.frozenPending;
  }
  uint64_t e = estimate();
  // A hint, not a promise (vfio-facts §2.3): pending_bytes never reaches 0, or stays at its first value until done.
  if (fault_ == Fault::kOverEstimate) return e + std::max<uint64_t>(faultArg_, 1);
  if (fault_ == Fault::kUpperBoundPending && e > 0) {
    if (!save_.frozen) save_.frozen = true, save_.frozenPending = e;
    return save_.frozenPending = std::max(save_.frozenPending, e);
  }
  return e;
}

uint64_t Device::slotOffset(uint64_t k) const {
  if (cfg_.offsetPolicy == kFixed) return kDataStart;
  // The last slot leaves a whole chunk of room, or (a data area smaller than twice the chunk) half the area and at
  // least 8 KiB: a chunk staged there is cut to the room, and a resuming user splits what does not fit.
  uint64_t keep = std::min(dataAreaSize_, std::min(chunk_, std::max(dataAreaSize_ / 2, 2 * kPage)));
  uint64_t slots = (dataAreaSize_ - keep) / kPage + 1;
  return kDataStart + ((k * 37) % slots) * kPage;
}

int Device::readDataOffset(uint64_t* v) {
  if (bitmapPending_) {
    bitmapPending_ = false;
    *v = bitmapOff_;
    return 0;
  }
  uint32_t s = reg_ & kStateMask;
  if (s == kResuming) {
    if (res_.waiting) return fail(EIO, "data_size written but the data never followed");
    *v = slotOffset(res_.k);
    return 0;
  }
  if (!(s & kSaving) || s == (kSaving | kResuming)) return fail(EINVAL, fmt("data_offset: device is %s, not saving", stateName(s)));
  if (!save_.staged || save_.consumed) {
    int rc = stage();
    if (rc) return rc;
  }
  *v = save_.stagedOff;
  if (fault_ == Fault::kBadDataOffset && save_.stagedIdx >= faultArg_) *v = 16;
  if (fault_ == Fault::kHugeDataOffset && save_.stagedIdx >= faultArg_) *v = ~0ull - 4095;
  return 0;
}

uint64_t Device::readDataSize() {
  uint32_t s = reg_ & kStateMask;
  if (s == kResuming) return res_.waiting ? res_.waitSize : 0;
  if (!(s & kSaving) || !save_.staged || save_.consumed) return 0;
  if (fault_ == Fault::kBadDataSize && save_.stagedIdx >= faultArg_) return dataAreaSize_ + kPage;
  return save_.stagedSize;
}

int Device::stage() {
  uint64_t idx = save_.k;
  if (fault_ == Fault::kWedged && idx >= faultArg_) wedged_ = true;
  if (wedged_) return fail(EIO, "injected fault: device wedged");
  if (fault_ == Fault::kEioOnChunk && idx == faultArg_)
    return fail(EIO, fmt("injected fault: staging chunk %llu failed", static_cast<unsigned long long>(idx)));
  if (fault_ == Fault::kSlowChunk) std::this_thread::sleep_for(std::chrono::microseconds(faultArg_));
  uint64_t off = slotOffset(idx), cap = std::min(chunk_, regionSize_ - off);
  if (cap < sf::kHeaderRec + sf::kRecHdr + kPage)
    return fail(ENOSPC, fmt("a %llu-byte data area cannot hold a page record: this device can resume but not save",
                            static_cast<unsigned long long>(dataAreaSize_)));
  uint64_t n = stuckActive() ? 0 : fillChunk(data_ + (off - kDataStart), cap);
  save_.staged = true;
  save_.consumed = false;
  save_.stagedOff = off;
  save_.stagedSize = n;
  save_.stagedIdx = idx;
  save_.k++;
  chunksStaged_++;
  return 0;
}

static uint8_t* putRec(uint8_t* p, uint32_t tag, uint32_t seq, uint64_t a, uint64_t b) {
  sf::RecHdr h{tag, seq, a, b};
  memcpy(p, &h, sizeof h);
  return p + sizeof h;
}

uint64_t Device::fillChunk(uint8_t* out, uint64_t cap) {
  uint8_t* p = out;
  auto room = [&] { return cap - static_cast<uint64_t>(p - out); };
  if (!save_.headerSent) {
    p = putRec(p, sf::kTagHeader, save_.seq++, cfg_.stateSize, sf::kPageSize | (sf::kFormatVersion << 32));
    uint64_t magic = sf::kMagic, zero = 0;
    uint32_t mc = static_cast<uint32_t>(cfg_.maxChunk), flags = 0;
    memcpy(p, &magic, 8), memcpy(p + 8, &mc, 4), memcpy(p + 12, &flags, 4), memcpy(p + 16, &zero, 8);
    p += sf::kHeaderPayload;
    save_.headerSent = true;
  }
  while (dirtyCount_ > 0 && room() >= sf::kRecHdr + kPage) {
    // next dirty page at or after the cyclic cursor
    uint64_t nw = dirty_.size(), w = save_.cursor >> 6, word = dirty_[w] & (~0ull << (save_.cursor & 63)), first = 0;
    for (uint64_t i = 0; i <= nw; i++) {
      if (word) {
        first = w * 64 + static_cast<uint64_t>(__builtin_ctzll(word));
        break;
      }
      w = (w + 1) % nw;
      word = dirty_[w];
    }
    uint64_t maxRun = (room() - sf::kRecHdr) / kPage, n = 1;
    while (n < maxRun && first + n < pages_ && testBit(dirty_, first + n)) n++;
    p = putRec(p, sf::kTagPages, save_.seq++, first, n);
    dirtyCount_ -= clearRange(dirty_, first, n);  // cleared before the copy: a racing write re-dirties the page
    memcpy(p, state_ + first * kPage, n * kPage);
    p += n * kPage;
    save_.pagesSent += n;
    pagesSent_ += n;
    save_.cursor = (first + n) % pages_;
  }
  if (!(reg_ & kRunning) && dirtyCount_ == 0 && !save_.endSent && room() >= sf::kRecHdr) {
    p = putRec(p, sf::kTagEnd, save_.seq, save_.seq, save_.pagesSent);
    save_.seq++;
    save_.endSent = true;
  }
  return static_cast<uint64_t>(p - out);
}

// ---- resume side -----------------------------------------------------------------------------------------------
template <typename F>
void Device::forEachTrapped(uint64_t lo, uint64_t hi, F fn) const {
  for (const Area& a : areas_) {
    if (lo >= hi) return;
    uint64_t aEnd = a.offset + a.size;
    if (aEnd <= lo) continue;
    if (a.offset >= hi) break;
    if (a.offset > lo) fn(lo, a.offset);
    lo = std::max(lo, aEnd);
  }
  if (lo < hi) fn(lo, hi);
}

uint64_t Device::trappedBytes(uint64_t lo, uint64_t hi) const {
  uint64_t n = 0;
  forEachTrapped(lo, hi, [&](uint64_t a, uint64_t b) { n += b - a; });
  return n;
}

int Device::writeDataSize(uint64_t v) {
  if ((reg_ & kStateMask) != kResuming) return fail(EINVAL, fmt("data_size write while %s (only RESUMING)", stateName(reg_)));
  if (res_.poisoned) return fail(EINVAL, "resume failed earlier: " + res_.reason);
  if (res_.waiting) return fail(EIO, "data_size written but the data never followed");
  if (v == 0) return 0;
  uint64_t off = slotOffset(res_.k);
  if (!vm::fits(off, v, regionSize_))
    return fail(EINVAL, fmt("data_size %llu does not fit the data area at offset %llu", static_cast<unsigned long long>(v),
                            static_cast<unsigned long long>(off)));
  if (cfg_.profile == kLinux58) return consume(off, v);
  uint64_t trapped = trappedBytes(off, off + v);
  if (trapped == 0) return consume(off, v);
  res_.waiting = true;  // draft order: the trapped part of the chunk follows this write
  res_.waitOff = off;
  res_.waitSize = v;
  res_.trapped = trapped;
  res_.coveredBytes = 0;
  res_.covered.clear();
  return 0;
}

int Device::noteTrappedWrite(uint64_t off, uint64_t len) {
  if (!res_.waiting) return 0;
  uint64_t lo = std::max(off, res_.waitOff), hi = std::min(off + len, res_.waitOff + res_.waitSize);
  if (lo >= hi) return 0;
  forEachTrapped(lo, hi, [&](uint64_t a, uint64_t b) {
    auto& cov = res_.covered;
    auto it = cov.upper_bound(a);
    if (it != cov.begin() && std::prev(it)->second >= a) {
      --it;
      a = it->first;
      b = std::max(b, it->second);
      res_.coveredBytes -= it->second - it->first;
      it = cov.erase(it);
    }
    while (it != cov.end() && it->first <= b) {
      b = std::max(b, it->second);
      res_.coveredBytes -= it->second - it->first;
      it = cov.erase(it);
    }
    cov[a] = b;
    res_.coveredBytes += b - a;
  });
  if (res_.coveredBytes < res_.trapped) return 0;
  res_.waiting = false;
  res_.covered.clear();
  return consume(res_.waitOff, res_.waitSize);
}

int Device::consume(uint64_t off, uint64_t size) {
  uint64_t chunk = res_.k++;
  int rc = parseChunk(data_ + (off - kDataStart), size, chunk);
  if (rc == 0) chunksConsumed_++;
  return rc;
}

bool Device::storePages(uint64_t off, const uint8_t* src, uint64_t len) {
  while (len > 0) {
    ssize_t w = pwrite(stateFd_, src, len, static_cast<off_t>(off));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;  // the caller falls back to the mapping
    src += w;
    off += static_cast<uint64_t>(w);
    len -= static_cast<uint64_t>(w);
  }
  return true;
}

// Incremental: a data_size write may end anywhere inside a record (QEMU's vfio_load_buffer splits a packet that is
// larger than this device's data area), so the head of the record in progress is kept in res_.head and a PAGES
// payload is stored as its bytes arrive. Whole-record writes take the same path: the head copy is at most 48 bytes a
// record, the payload goes straight to the state.
int Device::parseChunk(const uint8_t* p, uint64_t size, uint64_t chunk) {
  static_assert(sizeof(ResumeSession::head) == sf::kHeaderRec, "record head buffer");
  uint64_t pos = 0, rec = 0;
  auto bad = [&](const std::string& why) {
    res_.poisoned = true;
    res_.reason = fmt("chunk %llu record %llu: ", static_cast<unsigned long long>(chunk), static_cast<unsigned long long>(rec)) + why;
    return fail(EINVAL, res_.reason);
  };
  using ull = unsigned long long;
  ResumeSession& r = res_;
  while (pos < size) {
    if (r.payLeft > 0) {  // the rest of a PAGES payload
      uint64_t n = std::min(r.payLeft, size - pos);
      // Through the memfd rather than the mapping: shmem allocates whole pages for a full-page write without
      // zeroing them first and without a fault per 4 KiB page (the mapping sees the same pages).
      if (!storePages(r.payAt, p + pos, n)) memcpy(state_ + r.payAt, p + pos, n);
      r.payAt += n;
      r.payLeft -= n;
      pos += n;
      if (r.payLeft == 0) rec++;
      continue;
    }
    if (r.sawEnd) return bad("record after END");
    // Gather the record's head: 24 bytes, 48 for HEADER.
    uint64_t take = std::min<uint64_t>(sf::kRecHdr > r.headLen ? sf::kRecHdr - r.headLen : 0, size - pos);
    memcpy(r.head + r.headLen, p + pos, take);
    r.headLen += take;
    pos += take;
    if (r.headLen < sf::kRecHdr) break;  // the head continues in the next write
    sf::RecHdr h;
    memcpy(&h, r.head, sizeof h);
    if (h.seq != r.seq) return bad(fmt("seq %u, expected %u (stale or reordered chunk)", h.seq, r.seq));
    if (!r.sawHeader && h.tag != sf::kTagHeader) return bad(fmt("first record has tag 0x%08x, not HEADER", h.tag));
    if (h.tag == sf::kTagHeader) {
      if (r.sawHeader) return bad("duplicate HEADER");
      take = std::min(sf::kHeaderRec - r.headLen, size - pos);
      memcpy(r.head + r.headLen, p + pos, take);
      r.headLen += take;
      pos += take;
      if (r.headLen < sf::kHeaderRec) break;
      const uint8_t* body = r.head + sf::kRecHdr;
      uint64_t magic;
      memcpy(&magic, body, 8);
      if (magic != sf::kMagic) return bad(fmt("bad magic 0x%016llx", static_cast<ull>(magic)));
      if ((h.b >> 32) != sf::kFormatVersion) return bad(fmt("unsupported format version %llu", static_cast<ull>(h.b >> 32)));
      if ((h.b & 0xffffffffu) != sf::kPageSize) return bad(fmt("page size %llu, expected 4096", static_cast<ull>(h.b & 0xffffffffu)));
      if (h.a != cfg_.stateSize)
        return bad(fmt("state size %llu, this device has %llu", static_cast<ull>(h.a), static_cast<ull>(cfg_.stateSize)));
      // The rest of the header is geometry or reserved: a driver that ignored it would accept damage silently. The
      // chunk size is the device model's (like the state size), not its data area: a destination with a smaller
      // area takes the same records in pieces.
      uint32_t maxChunk, flags;
      uint64_t reserved;
      memcpy(&maxChunk, body + 8, 4);
      memcpy(&flags, body + 12, 4);
      memcpy(&reserved, body + 16, 8);
      if (maxChunk != cfg_.maxChunk)
        return bad(fmt("chunk size %u, this device has %llu", maxChunk, static_cast<ull>(cfg_.maxChunk)));
      if (flags != 0 || reserved != 0) return bad(fmt("reserved header fields set (flags 0x%x, 0x%llx)", flags, static_cast<ull>(reserved)));
      r.sawHeader = true;
    } else if (h.tag == sf::kTagPages) {
      if (h.b == 0 || h.a >= pages_ || h.b > pages_ - h.a)
        return bad(fmt("PAGES %llu+%llu outside the %llu-page state", static_cast<ull>(h.a), static_cast<ull>(h.b), static_cast<ull>(pages_)));
      r.payAt = h.a * kPage;
      r.payLeft = h.b * kPage;
      r.pages += h.b;
      pagesLoaded_ += h.b;
    } else if (h.tag == sf::kTagEnd) {
      if (h.a != r.seq || h.b != r.pages)
        return bad(fmt("END counts (%llu records, %llu pages) do not match the loaded (%u, %llu)", static_cast<ull>(h.a),
                       static_cast<ull>(h.b), r.seq, static_cast<ull>(r.pages)));
      r.sawEnd = true;
    } else {
      return bad(fmt("unknown tag 0x%08x", h.tag));
    }
    r.seq++;
    r.headLen = 0;
    if (r.payLeft == 0) rec++;
  }
  return 0;
}

// ---- dirty pages ---------------------------------------------------------------------------------------------------
void Device::setDirty(uint64_t page) {
  if (dirty_.empty()) return;  // no save session yet: the first one marks every page dirty anyway
  uint64_t& w = dirty_[page >> 6];
  uint64_t bit = 1ull << (page & 63);
  if (!(w & bit)) w |= bit, dirtyCount_++;
}

void Device::logDma(uint64_t page) {
  if (cfg_.profile != kDraft2019 && !logging_) return;
  if (guestLog_.empty()) guestLog_.assign((cfg_.guestPages + 63) / 64, 0);
  guestLog_[page >> 6] |= 1ull << (page & 63);
}

int Device::readCopiedPfns(uint64_t* v) {
  using ull = unsigned long long;
  uint32_t s = reg_ & kStateMask;
  if (s == kResuming || s == (kSaving | kResuming)) return fail(EINVAL, fmt("dirty bitmap query while %s", stateName(s)));
  if (pageSize_ != kPage) return fail(EINVAL, "dirty bitmap query: page_size not set to 4096");
  uint64_t start = startPfn_, total = totalPfns_;
  if (total == 0 || start >= cfg_.guestPages || total > cfg_.guestPages - start)
    return fail(EINVAL, fmt("dirty bitmap query: pfns %llu+%llu beyond the %llu guest pages", static_cast<ull>(start),
                            static_cast<ull>(total), static_cast<ull>(cfg_.guestPages)));
  std::lock_guard<std::mutex> lg(logMu_);
  uint64_t dirty = guestLog_.empty() ? 0 : countRange(guestLog_, start, total);
  if (dirty == 0) {
    *v = 0;  // VFIO_DEVICE_DIRTY_PFNS_NONE
  } else if (dirty == total) {
    clearRange(guestLog_, start, total);
    *v = ~0ull;  // VFIO_DEVICE_DIRTY_PFNS_ALL
  } else {
    // The bitmap goes where the staged chunk is: this sharing is why the user needs a migration lock.
    uint64_t off = (save_.active && save_.staged) ? save_.stagedOff : kDataStart;
    uint64_t n = std::min(total, (regionSize_ - off) / 8 * 64);
    uint8_t* dst = data_ + (off - kDataStart);
    for (uint64_t i = 0; i < n; i += 64) {
      uint64_t word = getBits(guestLog_, start + i);
      if (n - i < 64) word &= (1ull << (n - i)) - 1;
      memcpy(dst + i / 8, &word, 8);
    }
    clearRange(guestLog_, start, n);
    bitmapPending_ = true;
    bitmapOff_ = off;
    *v = n;
  }
  if (fault_ == Fault::kBadCopiedPfns) *v = total + 1;
  return 0;
}

void Device::dirtyPages(uint32_t op, uint64_t iova, uint64_t size, uint64_t pgsize, uint8_t* bitmap, size_t bitmapLen) {
  std::lock_guard<std::mutex> lk(logMu_);  // not mu_: the container never waits for the vendor
  using ull = unsigned long long;
  auto err = [&](const std::string& m) { return NativeError(EINVAL, m); };
  if (cfg_.profile != kLinux58) throw err("VFIO_IOMMU_DIRTY_PAGES: draft-2019 devices report dirty pages through the region");
  if (op == VFIO_IOMMU_DIRTY_PAGES_FLAG_START) {
    if (!logging_) guestLog_.clear();
    logging_ = true;
    return;
  }
  if (op == VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP) {
    logging_ = false;
    return;
  }
  if (op != VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP) throw err(fmt("VFIO_IOMMU_DIRTY_PAGES: bad flags %u", op));
  if (!logging_) throw err("GET_BITMAP: dirty logging not started");
  if (pgsize != kPage) throw err(fmt("GET_BITMAP: pgsize %llu unsupported (4096 only)", static_cast<ull>(pgsize)));
  if (size == 0 || iova % kPage || size % kPage || !vm::fits(iova, size, cfg_.guestPages * kPage))
    throw err(fmt("GET_BITMAP: iova 0x%llx size 0x%llx outside guest memory", static_cast<ull>(iova), static_cast<ull>(size)));
  uint64_t first = iova / kPage, n = size / kPage;
  if (bitmap == nullptr || bitmapLen < (n + 7) / 8)
    throw err(fmt("GET_BITMAP: bitmap of %zu bytes too small for %llu pages", bitmapLen, static_cast<ull>(n)));
  if (guestLog_.empty()) return;  // nothing logged yet
  for (uint64_t i = 0; i < n; i += 64) {
    uint64_t word = getBits(guestLog_, first + i);
    if (n - i < 64) word &= (1ull << (n - i)) - 1;
    for (uint64_t b = 0; b < 8 && i / 8 + b < bitmapLen; b++) bitmap[i / 8 + b] |= static_cast<uint8_t>(word >> (8 * b));
  }
  clearRange(guestLog_, first, n);
}

// ---- test hooks & info -------------------------------------------------------------------------------------------
void Device::setFault(Fault f, uint64_t arg) {
  std::lock_guard<std::mutex> lk(mu_);
  fault_ = f;
  faultArg_ = arg;
  save_.frozen = false;
  wedged_ = false;
}

void Device::setStrictTrapped(bool on) {
  std::lock_guard<std::mutex> lk(mu_);
  strictTrapped_ = on;
}

void Device::readState(uint64_t off, uint8_t* dst, size_t len) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!vm::fits(off, len, cfg_.stateSize)) throw NativeError(EINVAL, "range beyond the device state");
  if (len) memcpy(dst, state_ + off, len);
}

void Device::touch(uint64_t off, uint8_t value) {
  std::lock_guard<std::mutex> lk(mu_);
  if (off >= cfg_.stateSize) throw NativeError(EINVAL, "offset beyond the device state");
  state_[off] = value;
  setDirty(off / kPage);
}

void Device::configRead(uint8_t* dst) {
  std::lock_guard<std::mutex> lk(mu_);
  memcpy(dst, config_, sizeof config_);
}

void Device::configWrite(const uint8_t* src) {
  std::lock_guard<std::mutex> lk(mu_);
  memcpy(config_, src, sizeof config_);
}

void Device::dmaTouch(uint64_t page) {
  std::lock_guard<std::mutex> lk(mu_);
  if (page >= cfg_.guestPages) throw NativeError(EINVAL, "page beyond guest memory");
  guest::Access ram(cfg_.guestPages);
  ram.write8(page, splitmix64(page ^ dmaWrites_));
  std::lock_guard<std::mutex> lg(logMu_);
  logDma(page);
}

Info Device::info() {
  std::lock_guard<std::mutex> lk(mu_);
  return Info{id_, cfg_.profile, cfg_.stateSize, cfg_.maxChunk, kDataStart, dataAreaSize_, regionSize_, reg_,
              chunksStaged_, chunksConsumed_, pagesSent_, pagesLoaded_, workloadWrites_, dmaWrites_, lastError_};
}

std::vector<uint8_t> Device::regionInfo(uint32_t index) const {
  if (index >= kNumRegions) throw NativeError(EINVAL, fmt("region index %u out of range (%u regions)", index, kNumRegions));
  vfio_region_info ri{};
  ri.argsz = sizeof ri;
  ri.index = index;
  ri.offset = static_cast<uint64_t>(index) << 40;  // VFIO_PCI_INDEX_TO_OFFSET
  if (index == 0) {
    ri.flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    ri.size = 16u << 20;
  }
  std::vector<uint8_t> out;
  if (index != kRegionIndex || cfg_.profile == kV2) {  // v2 devices migrate through VFIO_DEVICE_FEATURE
    out.resize(sizeof ri);
    memcpy(out.data(), &ri, sizeof ri);
    return out;
  }
  vfio_region_info_cap_type ct{};
  ct.header.id = VFIO_REGION_INFO_CAP_TYPE;
  ct.header.version = 1;
  ct.type = cfg_.profile == kDraft2019 ? 2 : VFIO_REGION_TYPE_MIGRATION_DEPRECATED;
  ct.subtype = VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED;
  vfio_region_info_cap_sparse_mmap sp{};
  size_t spBytes = areas_.empty() ? 0 : sizeof sp + areas_.size() * sizeof(vfio_region_sparse_mmap_area);
  ri.flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_CAPS |
             (areas_.empty() ? 0u : VFIO_REGION_INFO_FLAG_MMAP);
  ri.size = regionSize_;
  ri.cap_offset = sizeof ri;
  ri.argsz = static_cast<uint32_t>(sizeof ri + sizeof ct + spBytes);
  if (spBytes) ct.header.next = static_cast<uint32_t>(sizeof ri + sizeof ct);
  out.resize(ri.argsz);
  memcpy(out.data(), &ri, sizeof ri);
  memcpy(out.data() + sizeof ri, &ct, sizeof ct);
  if (spBytes) {
    sp.header.id = VFIO_REGION_INFO_CAP_SPARSE_MMAP;
    sp.header.version = 1;
    sp.nr_areas = static_cast<uint32_t>(areas_.size());
    uint8_t* p = out.data() + sizeof ri + sizeof ct;
    memcpy(p, &sp, sizeof sp);
    p += sizeof sp;
    for (const Area& a : areas_) {
      vfio_region_sparse_mmap_area ma{a.offset, a.size};
      memcpy(p, &ma, sizeof ma);
      p += sizeof ma;
    }
  }
  return out;
}

}  // namespace emu
