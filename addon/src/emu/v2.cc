// The emulated device's VFIO migration v2 vendor side, written like the kernel's sample drivers (mtty): the FSM walk
// of vfio_mig_get_next_state calling one arc at a time, a saving file shared by PRE_COPY / PRE_COPY_P2P / STOP_COPY,
// a resuming file validated on RESUMING -> STOP, PRECOPY_INFO, MIG_DATA_SIZE and DMA logging over guest memory.
// The data fd is a real non-blocking pipe: read() gives EAGAIN when nothing is there for now and 0 (EOF) once
// STOP_COPY has sent everything; a stream the vendor refuses closes the pipe (the user's next write fails EPIPE;
// mtty fails it with EFAULT). The opaque stream is the v1 device's record format (docs/EMULATED-DEVICE.md): HEADER
// (magic, version, geometry) first, so a destination checks it as soon as it arrives, then PAGES, then END.
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "common/error.h"
#include "common/vfio_v2.h"
#include "emu/device.h"
#include "emu/stream_format.h"

namespace v2uapi {

// [current][target] -> next for a device with every feature (vfio_main.c).
static const uint8_t kNext[kNumStates][kNumStates] = {
    //            ERROR STOP RUNNING STOP_COPY RESUMING RUNNING_P2P PRE_COPY PRE_COPY_P2P   (target)
    /* ERROR */ {0, 0, 0, 0, 0, 0, 0, 0},
    /* STOP */ {0, 1, 5, 3, 4, 5, 5, 5},
    /* RUNNING */ {0, 5, 2, 5, 5, 5, 6, 5},
    /* STOP_COPY */ {0, 1, 1, 3, 1, 1, 0, 0},
    /* RESUMING */ {0, 1, 1, 1, 4, 1, 1, 1},
    /* RUNNING_P2P */ {0, 1, 2, 1, 1, 5, 2, 7},
    /* PRE_COPY */ {0, 2, 2, 7, 2, 2, 6, 7},
    /* PRE_COPY_P2P */ {0, 5, 5, 3, 5, 5, 6, 7},
};
static const uint32_t kFlags[kNumStates] = {
    ~0u, kMigStopCopy, kMigStopCopy, kMigStopCopy, kMigStopCopy, kMigStopCopy | kMigP2P, kMigStopCopy | kMigPreCopy,
    kMigStopCopy | kMigP2P | kMigPreCopy};

bool supports(uint32_t flags, uint32_t s) { return s < kNumStates && (kFlags[s] & flags) == kFlags[s]; }

uint32_t nextState(uint32_t flags, uint32_t cur, uint32_t target) {
  if (!supports(flags, cur) || !supports(flags, target)) return kStateError;
  uint32_t next = kNext[cur][target];
  while (next != kStateError && !supports(flags, next)) next = kNext[next][target];
  return next;
}

}  // namespace v2uapi

namespace emu {

using vm::fmt;
using vm::NativeError;
namespace sf = emu::stream;
namespace u = v2uapi;
using ull = unsigned long long;

static const char* v2Name(uint32_t s) {
  static const char* const kNames[u::kNumStates] = {"ERROR", "STOP", "RUNNING", "STOP_COPY", "RESUMING", "RUNNING_P2P",
                                                    "PRE_COPY", "PRE_COPY_P2P"};
  return s < u::kNumStates ? kNames[s] : "?";
}
bool v2Implements(Fault f) {
  switch (f) {
    case Fault::kNone:
    case Fault::kFailTransition:     // v2Arc: the arc to state `arg` fails, state kept
    case Fault::kErrorOnTransition:  // v2Arc: the arc to state `arg` puts the device in ERROR
    case Fault::kStuck:              // v2Fill: after `arg` chunks nothing more, and no end of stream
    case Fault::kEioOnChunk:         // v2Fill: chunk `arg` cuts the stream (premature EOF)
    case Fault::kSlowChunk:          // v2Fill: `arg` us per chunk
      return true;
    default:
      return false;
  }
}

static bool savingGroup(uint32_t s) { return s == u::kStateStopCopy || s == u::kStatePreCopy || s == u::kStatePreCopyP2P; }
static bool preCopy(uint32_t s) { return s == u::kStatePreCopy || s == u::kStatePreCopyP2P; }

// ---- the shared vendor I/O thread ----------------------------------------------------------------------------------
namespace io {
namespace {
int epfd() {
  static int fd = [] {
    int e = epoll_create1(EPOLL_CLOEXEC);
    if (e < 0) throw NativeError(errno, "epoll_create1 (vendor I/O thread)");
    std::thread([e] {
      epoll_event ev[32];
      for (;;) {
        int n = epoll_wait(e, ev, 32, -1);
        for (int i = 0; i < n; i++) {
          uint32_t id = static_cast<uint32_t>(ev[i].data.u64 >> 32), gen = static_cast<uint32_t>(ev[i].data.u64);
          std::shared_ptr<Device> d;
          try {
            d = get(id);
          } catch (const NativeError&) {
            continue;  // destroyed: its pipes were closed with it
          }
          d->v2Pump(gen);
        }
      }
    }).detach();
    return e;
  }();
  return fd;
}
}  // namespace

void watch(int fd, uint32_t id, uint32_t gen, bool out) {
  epoll_event ev{};
  ev.events = (out ? EPOLLOUT : EPOLLIN) | EPOLLONESHOT;
  ev.data.u64 = (static_cast<uint64_t>(id) << 32) | gen;
  if (epoll_ctl(epfd(), EPOLL_CTL_MOD, fd, &ev) < 0 && (errno != ENOENT || epoll_ctl(epfd(), EPOLL_CTL_ADD, fd, &ev) < 0))
    throw NativeError(errno, "epoll_ctl (vendor I/O thread)");
}

void unwatch(int fd) { epoll_ctl(epfd(), EPOLL_CTL_DEL, fd, nullptr); }
}  // namespace io

// ---- features ------------------------------------------------------------------------------------------------------
uint64_t Device::v2MigrationFlags() {
  if (cfg_.profile != kV2) throw NativeError(ENOTTY, "VFIO migration v2 is not supported by this device (a v1 region device)");
  return cfg_.migFlags;
}

bool Device::v2Probe(uint32_t feature) {
  if (cfg_.profile != kV2) return false;
  switch (feature) {
    case VFIO_DEVICE_FEATURE_MIGRATION:
    case VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE:
    case VFIO_DEVICE_FEATURE_DMA_LOGGING_START:
    case VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP:
    case VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT:
    case u::kFeatureMigDataSize: return true;
    default: return false;
  }
}

uint32_t Device::v2GetState() {
  std::lock_guard<std::mutex> lk(mu_);
  v2MigrationFlags();
  if (dead_) throw NativeError(ENODEV, "device destroyed");
  return v2state_;
}

// reg_ keeps mirroring the v1 bits, which the workload (running?) and the shared record writer (END when stopped) read.
void Device::v2Mirror() {
  static const uint32_t kBits[u::kNumStates] = {kSaving | kResuming, 0, kRunning, kSaving, kResuming, kRunning,
                                                kSaving | kRunning, kSaving | kRunning};
  reg_ = (reg_ & ~kStateMask) | kBits[v2state_];
}

int Device::v2SetState(uint32_t target) {
  std::lock_guard<std::mutex> lk(mu_);
  uint32_t flags = static_cast<uint32_t>(v2MigrationFlags());
  if (dead_) throw NativeError(ENODEV, "device destroyed");
  if (target == u::kStateError || !u::supports(flags, target))
    throw NativeError(EINVAL, lastError_ = fmt("MIG_DEVICE_STATE: %s is not a state this device supports", v2Name(target)));
  int fd = -1;
  // mtty's set_state: walk the kernel's table one arc at a time; any arc may return the session's file.
  while (v2state_ != target) {
    uint32_t next = u::nextState(flags, v2state_, target);
    if (next == u::kStateError)
      throw NativeError(EINVAL, lastError_ = fmt("MIG_DEVICE_STATE: no arc from %s towards %s", v2Name(v2state_), v2Name(target)));
    int arcFd = -1;
    int rc = v2Arc(v2state_, next, &arcFd);
    if (rc) {
      if (fd >= 0) close(fd);
      throw NativeError(-rc, lastError_);
    }
    if (arcFd >= 0) fd = arcFd;
    if (v2state_ == u::kStateError) {  // the arc's first fill failed (a cut save): the device fell into ERROR
      if (fd >= 0) close(fd);
      throw NativeError(EIO, lastError_);
    }
  }
  return fd;
}

int Device::v2Arc(uint32_t cur, uint32_t next, int* fdOut) {
  if (fault_ == Fault::kFailTransition && faultArg_ == next)
    return fail(EIO, fmt("injected fault: transition %s -> %s failed", v2Name(cur), v2Name(next)));
  if (fault_ == Fault::kErrorOnTransition && faultArg_ == next) {
    v2Close();
    save_ = SaveSession();
    res_ = ResumeSession();
    v2state_ = u::kStateError;
    v2Mirror();
    return fail(EIO, fmt("injected fault: transition %s -> %s put the device in ERROR", v2Name(cur), v2Name(next)));
  }
  if (cur == u::kStateResuming) {  // RESUMING -> STOP validates everything loaded (mtty: -EINVAL, state kept)
    v2Drain();
    if (!res_.poisoned && v2_.len > 0) v2Poison(fmt("stream ends inside a record (%llu bytes left)", static_cast<ull>(v2_.len)));
    if (res_.poisoned) return fail(EINVAL, "resume failed earlier: " + res_.reason);
    if (!res_.sawHeader) return fail(EINVAL, "resume incomplete: no HEADER record loaded");
    if (!res_.sawEnd) return fail(EINVAL, "resume incomplete: no END record loaded");
    v2Close();
    res_ = ResumeSession();
  }
  if (savingGroup(cur) && !savingGroup(next)) {  // STOP_COPY -> STOP, PRE_COPY -> RUNNING, PRE_COPY_P2P -> RUNNING_P2P
    v2Close();
    save_ = SaveSession();
  }
  if (next == u::kStateResuming) {
    res_ = ResumeSession();
    res_.active = true;
    chunksConsumed_ = pagesLoaded_ = 0;
    *fdOut = v2Open(false);
  } else if (savingGroup(next) && !savingGroup(cur)) {
    startSave();
    *fdOut = v2Open(true);
  }
  v2state_ = next;
  v2Mirror();
  if (savingGroup(next)) v2Fill();  // data is there when SET returns, like a driver that prepared it
  return 0;
}

int Device::v2Open(bool save) {
  int p[2];
  if (pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) throw NativeError(errno, "pipe2 (data fd)");
  fcntl(p[0], F_SETPIPE_SZ, 1 << 20);  // best effort: fewer wakeups per MiB
  v2_ = V2Session();
  v2_.save = save;
  v2_.gen = ++v2gen_;
  v2_.vfd = save ? p[1] : p[0];
  int user = save ? p[0] : p[1];
  try {
    if (!save) io::watch(v2_.vfd, id_, v2_.gen, false);
  } catch (...) {
    close(p[0]), close(p[1]);
    v2_ = V2Session();
    throw;
  }
  return user;
}

void Device::v2Close() {
  if (v2_.vfd >= 0) {
    io::unwatch(v2_.vfd);
    close(v2_.vfd);  // the user's end now reads EOF (save) or writes EPIPE (resume)
  }
  v2_ = V2Session();
}

uint64_t Device::v2Unread() const {
  int inPipe = 0;
  if (v2_.vfd >= 0 && ioctl(v2_.vfd, FIONREAD, &inPipe) != 0) inPipe = 0;
  return static_cast<uint64_t>(inPipe) + (v2_.len - v2_.off);
}

// ---- save: produce the stream into the pipe ---------------------------------------------------------------------
void Device::v2Fill() {
  if (!v2_.save || v2_.vfd < 0) return;
  for (;;) {
    if (v2_.off == v2_.len) {
      if (v2_.eof) return;
      if (fault_ == Fault::kStuck && v2_.fills >= faultArg_) return;  // never produces again: the user waits
      if (fault_ == Fault::kSlowChunk) std::this_thread::sleep_for(std::chrono::microseconds(faultArg_));
      if (fault_ == Fault::kEioOnChunk && v2_.fills == faultArg_) {
        lastError_ = fmt("injected fault: saving chunk %llu failed, stream cut, device in ERROR", static_cast<ull>(v2_.fills));
        // A pipe cannot fail a read with EIO: the reader sees the stream end early. Like a driver whose save failed,
        // the device falls into ERROR, so the source's next arc (STOP_COPY -> STOP) fails and names it.
        io::unwatch(v2_.vfd);
        close(v2_.vfd);
        v2_.vfd = -1;
        v2_.eof = true;
        v2state_ = u::kStateError;
        v2Mirror();
        return;
      }
      // While the first pass over the state runs (the initial bytes), a chunk never goes past its end, so the
      // initial bytes are exactly a stream prefix and PRECOPY_INFO can say when they have all been read.
      uint64_t cap = cfg_.maxChunk;
      bool first = !v2_.firstPassDone && (reg_ & kRunning);
      if (first) cap = std::min(cap, (save_.headerSent ? 0 : sf::kHeaderRec) + sf::kRecHdr + (pages_ - save_.cursor) * kPage);
      uint64_t n = fillChunk(data_, cap);
      v2_.fills++;
      if (!v2_.firstPassDone && save_.pagesSent >= pages_) {
        v2_.firstPassDone = true;
        v2_.initialEnd = v2_.produced + n;
      }
      if (n == 0) {
        if (!(reg_ & kRunning) && save_.endSent) {  // STOP_COPY complete: EOF for the reader
          io::unwatch(v2_.vfd);
          close(v2_.vfd);
          v2_.vfd = -1;
          v2_.eof = true;
        }
        return;  // PRE_COPY: nothing more for now
      }
      v2_.off = 0;
      v2_.len = n;
      v2_.produced += n;
    }
    ssize_t w = write(v2_.vfd, data_ + v2_.off, v2_.len - v2_.off);
    if (w > 0) {
      v2_.off += static_cast<uint64_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN) {
      io::watch(v2_.vfd, id_, v2_.gen, true);  // the I/O thread continues when the reader made room
      return;
    }
    return;  // EPIPE: the user closed its end; nothing to do until the session ends
  }
}

void Device::v2Pump(uint32_t gen) {
  std::lock_guard<std::mutex> lk(mu_);
  if (dead_ || gen != v2_.gen || v2_.vfd < 0) return;
  if (v2_.save) v2Fill();
  else v2Drain();
}

void Device::v2PrecopyInfo(int dataFd, uint64_t* initialBytes, uint64_t* dirtyBytes) {
  std::lock_guard<std::mutex> lk(mu_);
  v2MigrationFlags();
  if (!preCopy(v2state_)) throw NativeError(EINVAL, lastError_ = fmt("PRECOPY_INFO while %s (PRE_COPY states only)", v2Name(v2state_)));
  if (dataFd < 0) throw NativeError(EBADF, "PRECOPY_INFO: bad data fd");
  v2Fill();  // like mlx5, a query prepares what became available (dirty pages)
  uint64_t unread = v2Unread(), consumed = v2_.produced - unread;
  uint64_t initial, dirtyPages;
  if (!v2_.firstPassDone) {
    uint64_t left = pages_ - save_.cursor;  // every page from the cursor on is still unsent in the first pass
    initial = unread + (save_.headerSent ? 0 : sf::kHeaderRec) + (left ? sf::kRecHdr + left * kPage : 0);
    dirtyPages = dirtyCount_ - std::min(dirtyCount_, left);
    *dirtyBytes = dirtyPages * (kPage + sf::kRecHdr);
  } else {
    initial = v2_.initialEnd > consumed ? v2_.initialEnd - consumed : 0;
    *dirtyBytes = dirtyCount_ * (kPage + sf::kRecHdr) + (unread - std::min(unread, initial));
  }
  *initialBytes = initial;
}

uint64_t Device::v2DataSize() {
  std::lock_guard<std::mutex> lk(mu_);
  v2MigrationFlags();
  uint64_t full = sf::kHeaderRec + pages_ * (kPage + sf::kRecHdr) + sf::kRecHdr;
  if (!savingGroup(v2state_)) return full;  // a new STOP_COPY session would send everything
  return (save_.headerSent ? 0 : sf::kHeaderRec) + dirtyCount_ * (kPage + sf::kRecHdr) + (save_.endSent ? 0 : sf::kRecHdr) + v2Unread();
}

// ---- resume: drain the pipe and parse whole records ---------------------------------------------------------------
void Device::v2Poison(const std::string& why) {
  res_.poisoned = true;
  res_.reason = fmt("stream offset %llu: ", static_cast<ull>(v2_.produced)) + why;
  lastError_ = res_.reason;
  if (v2_.vfd >= 0) {  // refuse further writes (EPIPE), as mtty refuses them with EFAULT
    io::unwatch(v2_.vfd);
    close(v2_.vfd);
    v2_.vfd = -1;
  }
}

void Device::v2Drain() {
  if (v2_.save) return;
  while (v2_.vfd >= 0 && !res_.poisoned) {
    if (v2_.len == dataAreaSize_) {  // a record larger than any this geometry produces
      v2Poison(fmt("record larger than %llu bytes", static_cast<ull>(dataAreaSize_)));
      return;
    }
    ssize_t r = read(v2_.vfd, data_ + v2_.len, dataAreaSize_ - v2_.len);
    if (r > 0) {
      v2_.len += static_cast<uint64_t>(r);
      v2ParseAvailable();
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno == EAGAIN) io::watch(v2_.vfd, id_, v2_.gen, false);
    return;  // EAGAIN: more later; 0: the user closed its end
  }
}

void Device::v2ParseAvailable() {
  // The v1 record parser takes whole records: find how many the buffer holds.
  uint64_t scan = 0;
  while (v2_.len - scan >= sf::kRecHdr) {
    sf::RecHdr h;
    memcpy(&h, data_ + scan, sizeof h);
    uint64_t rl = sf::kRecHdr;
    if (h.tag == sf::kTagHeader) rl = sf::kHeaderRec;
    if (h.tag == sf::kTagPages) rl = h.b > dataAreaSize_ / kPage ? dataAreaSize_ + 1 : sf::kRecHdr + h.b * kPage;
    if (rl > dataAreaSize_) {  // cannot ever be complete: let the parser name what is wrong with it
      scan = v2_.len;
      break;
    }
    if (v2_.len - scan < rl) break;
    scan += rl;
  }
  if (scan == 0) return;
  if (parseChunk(data_, scan, res_.k++) != 0) {
    std::string why = res_.reason;
    v2Poison(why);
    return;
  }
  chunksConsumed_++;
  v2_.produced += scan;
  memmove(data_, data_ + scan, v2_.len - scan);
  v2_.len -= scan;
}

// ---- DMA logging (VFIO_DEVICE_FEATURE_DMA_LOGGING_*) ------------------------------------------------------------
uint64_t Device::v2DmaStart(uint64_t pageSize, const std::vector<Range>& ranges) {
  v2MigrationFlags();
  std::lock_guard<std::mutex> lk(logMu_);
  if (logging_) throw NativeError(EBUSY, "DMA_LOGGING_START: logging already started (one START until STOP)");
  if (ranges.empty()) throw NativeError(EINVAL, "DMA_LOGGING_START: no ranges");
  if (ranges.size() > 4096 / 16) throw NativeError(E2BIG, fmt("DMA_LOGGING_START: %zu ranges (at most 256)", ranges.size()));
  if (pageSize < kPage || (pageSize & (pageSize - 1))) throw NativeError(EINVAL, fmt("DMA_LOGGING_START: page size %llu", static_cast<ull>(pageSize)));
  std::vector<Range> sorted(ranges);
  std::sort(sorted.begin(), sorted.end(), [](const Range& a, const Range& b) { return a.iova < b.iova; });
  for (size_t i = 0; i < sorted.size(); i++) {
    const Range& r = sorted[i];
    if (r.length == 0 || r.iova % pageSize || r.length % pageSize)
      throw NativeError(EINVAL, fmt("DMA_LOGGING_START: range 0x%llx+0x%llx not aligned to the page size", static_cast<ull>(r.iova), static_cast<ull>(r.length)));
    if (i && sorted[i - 1].iova + sorted[i - 1].length > r.iova) throw NativeError(EINVAL, "DMA_LOGGING_START: ranges overlap");
  }
  dmaRanges_ = sorted;
  guestLog_.clear();
  logging_ = true;
  return kPage;  // the driver logs at 4 KiB granularity whatever the user asked
}

void Device::v2DmaStop() {
  v2MigrationFlags();
  std::lock_guard<std::mutex> lk(logMu_);
  logging_ = false;
  dmaRanges_.clear();
}

void Device::v2DmaReport(uint64_t iova, uint64_t length, uint64_t pageSize, uint8_t* bitmap, size_t bitmapLen) {
  v2MigrationFlags();
  std::lock_guard<std::mutex> lk(logMu_);
  if (!logging_) throw NativeError(EINVAL, "DMA_LOGGING_REPORT: logging not started");
  if (pageSize < kPage || (pageSize & (pageSize - 1))) throw NativeError(EINVAL, fmt("DMA_LOGGING_REPORT: page size %llu", static_cast<ull>(pageSize)));
  if (length == 0 || iova % pageSize || length % pageSize || !vm::fits(iova, length, ~0ull))
    throw NativeError(EINVAL, "DMA_LOGGING_REPORT: range not aligned to the page size");
  bool inside = false;
  for (const Range& r : dmaRanges_) inside = inside || (iova >= r.iova && iova + length <= r.iova + r.length);
  if (!inside) throw NativeError(EINVAL, fmt("DMA_LOGGING_REPORT: 0x%llx+0x%llx is not inside a started range", static_cast<ull>(iova), static_cast<ull>(length)));
  uint64_t bits = length / pageSize, per = pageSize / kPage, guestPages = cfg_.guestPages;
  if (bitmap == nullptr || bitmapLen < (bits + 63) / 64 * 8)
    throw NativeError(EINVAL, fmt("DMA_LOGGING_REPORT: bitmap of %zu bytes too small for %llu pages", bitmapLen, static_cast<ull>(bits)));
  if (guestLog_.empty()) return;
  for (uint64_t i = 0; i < bits; i++) {  // the kernel only sets bits, and clears its own log for the range
    uint64_t first = iova / kPage + i * per;
    for (uint64_t p = first; p < first + per && p < guestPages; p++) {
      uint64_t& w = guestLog_[p >> 6];
      if (w & (1ull << (p & 63))) {
        bitmap[i >> 3] |= static_cast<uint8_t>(1u << (i & 7));
        w &= ~(1ull << (p & 63));
      }
    }
  }
}

}  // namespace emu
