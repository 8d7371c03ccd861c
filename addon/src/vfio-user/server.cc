#include "vfio-user/server.h"

#include <fcntl.h>
#include <linux/vfio.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/error.h"
#include "common/registry.h"
#include "common/sha256.h"
#include "emu/device.h"
#include "vfio-user/conn.h"
#include "vfio-user/io.h"
#include "vfio-user/proto.h"

namespace vfu {

using vm::fmt;
using vm::NativeError;
using ull = unsigned long long;

namespace {
constexpr uint32_t kConfigIndex = VFIO_PCI_CONFIG_REGION_INDEX;  // 7
constexpr uint32_t kMigIndex = emu::kRegionIndex;                // 9
constexpr uint32_t kDigestIndex = emu::kNumRegions;              // 10: the server's own digest region
constexpr uint32_t kNumRegions = emu::kNumRegions + 1;
constexpr uint32_t kMaxFds = 8;

template <typename T>
T get(const std::vector<uint8_t>& v, size_t at) {
  T x;
  memcpy(&x, v.data() + at, sizeof x);
  return x;
}
template <typename T>
void put(std::vector<uint8_t>& v, size_t at, const T& x) {
  memcpy(v.data() + at, &x, sizeof x);
}
}  // namespace

Server::Server(std::shared_ptr<emu::Device> dev, const std::string& path, const ServerOptions& o)
    : dev_(std::move(dev)), path_(path), o_(o) {
  if (o_.maxXfer < 4096 || o_.maxXfer > (1u << 20)) throw NativeError(EINVAL, fmt("max_data_xfer_size %u (4 KiB .. 1 MiB)", o_.maxXfer));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof a.sun_path) throw NativeError(ENAMETOOLONG, fmt("socket path of %zu bytes", path.size()));
  memcpy(a.sun_path, path.data(), path.size());
  if (pipe2(stopPipe_, O_CLOEXEC) != 0) throw NativeError(errno, "pipe2");
  listen_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (listen_ < 0 || bind(listen_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(listen_, 4) != 0) {
    int e = errno;
    if (listen_ >= 0) close(listen_);
    close(stopPipe_[0]);
    close(stopPipe_[1]);
    throw NativeError(e, fmt("listen on %s: %s", path.c_str(), e == EADDRINUSE ? "the path exists (not replaced)" : strerror(e)));
  }
  struct stat sb{};
  if (stat(path.c_str(), &sb) == 0) ino_ = sb.st_ino;
  v2_ = dev_->config().profile == emu::kV2;
  th_ = std::thread([this] { loop(); });
}

Server::~Server() { stop(); }

void Server::stop() {
  if (stopped_.exchange(true)) return;
  char c = 1;
  if (write(stopPipe_[1], &c, 1) < 0) { /* the loop also polls the pipe's other end; nothing else to do */ }
  if (th_.joinable()) th_.join();
  if (client_ >= 0) close(client_);
  dropSession();
  close(listen_);
  close(stopPipe_[0]);
  close(stopPipe_[1]);
  // Remove the socket only if it is still the one this server created.
  struct stat sb{};
  if (ino_ && stat(path_.c_str(), &sb) == 0 && sb.st_ino == ino_ && S_ISSOCK(sb.st_mode)) unlink(path_.c_str());
}

ServerStats Server::stats() {
  std::lock_guard<std::mutex> lk(mu_);
  ServerStats s = st_;
  s.connected = client_ >= 0;
  return s;
}

void Server::note(const std::string& s) {
  std::lock_guard<std::mutex> lk(mu_);
  st_.lastError = s;
}

void Server::loop() {
  for (;;) {
    pollfd p[3] = {{stopPipe_[0], POLLIN, 0}, {listen_, POLLIN, 0}, {client_, POLLIN, 0}};
    int n = poll(p, client_ >= 0 ? 3 : 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (p[0].revents) return;
    if (p[1].revents & POLLIN) {
      int c = accept4(listen_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (c >= 0) {
        std::lock_guard<std::mutex> lk(mu_);
        if (client_ >= 0) {
          close(c);  // one client at a time
          st_.refused++;
        } else {
          client_ = c;
          versioned_ = false;
          st_.clients++;
        }
      }
    }
    if (client_ >= 0 && (p[2].revents & (POLLIN | POLLHUP | POLLERR))) {
      if (!serveOne()) {
        std::lock_guard<std::mutex> lk(mu_);
        close(client_);
        client_ = -1;
      }
    }
  }
}

bool Server::serveOne() {
  Header h{};
  std::vector<int> fds;
  int64_t deadline = nowMs() + o_.msgTimeoutMs;
  int rc = recvAll(client_, &h, sizeof h, &fds, deadline, stopPipe_[0]);
  auto drop = [&](const std::string& why) {
    closeAll(fds);
    note(why);
    std::lock_guard<std::mutex> lk(mu_);
    st_.dropped++;
    return false;
  };
  if (rc == -EPIPE) { closeAll(fds); return false; }  // the client left
  if (rc < 0) return drop(fmt("reading a header: %s", strerror(-rc)));
  {
    std::lock_guard<std::mutex> lk(mu_);
    st_.requests++;
  }
  Reply r;
  std::vector<uint8_t> in;
  const bool firstVersion = h.cmd == kVersion && !versioned_;
  auto send = [&](const Reply& rep) {
    Header out{};
    out.msgId = h.msgId;
    out.cmd = h.cmd;
    out.flags = kTypeReply | (rep.err ? kErrorFlag : 0);
    out.errorNo = static_cast<uint32_t>(rep.err);
    out.size = static_cast<uint32_t>(kHeaderSize + (rep.err ? 0 : rep.body.size()));
    iovec iov[2] = {{&out, sizeof out}, {const_cast<uint8_t*>(rep.body.data()), rep.err ? 0 : rep.body.size()}};
    if (rep.err) {
      std::lock_guard<std::mutex> lk(mu_);
      st_.errorReplies++;
    }
    return sendAll(client_, iov, 2, &rep.fd, rep.fd >= 0 && !rep.err ? 1 : 0, nowMs() + o_.msgTimeoutMs) == 0;
  };
  // Framing first: a size we cannot trust means we cannot find the next message.
  if (h.size < kHeaderSize || h.size > kMaxMessage) {
    Reply e;
    e.err = h.size < kHeaderSize ? EINVAL : E2BIG;
    send(e);
    return drop(fmt("message size %u outside [16, %u]", h.size, kMaxMessage));
  }
  in.resize(h.size - kHeaderSize);  // bounded by kMaxMessage
  if (!in.empty()) {
    rc = recvAll(client_, in.data(), in.size(), &fds, deadline, stopPipe_[0]);
    if (rc < 0) return drop(fmt("%s: body of %zu bytes incomplete: %s", cmdName(h.cmd), in.size(), strerror(-rc)));
  }
  if ((h.flags & kTypeMask) != kTypeCommand) {
    r.err = EINVAL;
    note(fmt("message type %u is not a command", h.flags & kTypeMask));
  } else if (fds.size() > kMaxFds) {
    r.err = EINVAL;
    note("too many file descriptors");
  } else if (!versioned_ && h.cmd != kVersion) {
    r.err = EINVAL;
    note(fmt("%s before VERSION", cmdName(h.cmd)));
  } else if (versioned_ && h.cmd == kVersion) {
    r.err = EINVAL;
    note("a second VERSION");
  } else {
    try {
      r = dispatch(h.cmd, in, fds);
    } catch (const NativeError& e) {
      r = Reply{};
      r.err = e.err ? e.err : EIO;
      note(fmt("%s: %s", cmdName(h.cmd), e.what()));
    } catch (const std::bad_alloc&) {
      r = Reply{};
      r.err = ENOMEM;
    }
    if (h.cmd == kVersion && !r.err) versioned_ = true;
  }
  closeAll(fds);  // no command this server implements keeps a descriptor
  // A failed initial VERSION ends the connection, as on the common server library.
  if (h.flags & kNoReply) return !(firstVersion && r.err);
  if (!send(r)) return drop(fmt("%s: reply could not be sent", cmdName(h.cmd)));
  return !(firstVersion && r.err);
}

Server::Reply Server::dispatch(uint16_t cmd, std::vector<uint8_t>& in, std::vector<int>& fds) {
  Reply r;
  auto refuse = [&](int e, const std::string& why) {
    note(fmt("%s: %s", cmdName(cmd), why.c_str()));
    r.err = e;
    return r;
  };
  // Descriptors come only with DMA_MAP (unsupported here) and SET_IRQS: anything else carrying one is refused.
  if (!fds.empty() && cmd != kDmaMap && cmd != kSetIrqs) return refuse(EINVAL, "unexpected file descriptors");
  // Fencing: with the device stopped (STOP or stop-and-copy) only region I/O, dirty pages (v1), DEVICE_FEATURE and
  // MIG_DATA_READ (v2) and reset run (the v1 bits mirror the v2 state on a v2 device).
  uint32_t st = dev_->info().deviceState & emu::kStateMask;
  bool stopped = st == 0 || st == emu::kSaving;
  if (stopped && cmd != kRegionRead && cmd != kRegionWrite && cmd != kDirtyPages && cmd != kReset && cmd != kVersion &&
      cmd != kDeviceFeature && cmd != kMigDataRead)
    return refuse(EBUSY, "the device is stopped");
  if (v2_ && (cmd == kDirtyPages)) return refuse(ENOTSUP, "DIRTY_PAGES is v1; this device speaks v2");
  if (!v2_ && (cmd == kDeviceFeature || cmd == kMigDataRead || cmd == kMigDataWrite)) return refuse(ENOTSUP, "this device speaks v1 (migration region)");
  switch (cmd) {
    case kVersion: return version(in);
    case kGetInfo: {
      if (in.size() < 16 || get<uint32_t>(in, 0) < 16) return refuse(EINVAL, "DEVICE_GET_INFO needs argsz >= 16");
      r.body.resize(16);
      put<uint32_t>(r.body, 0, 16);
      put<uint32_t>(r.body, 4, emu::kDeviceFlags);
      put<uint32_t>(r.body, 8, kNumRegions);
      put<uint32_t>(r.body, 12, emu::kNumIrqs);
      return r;
    }
    case kGetRegionInfo: return regionInfo(in);
    case kRegionRead: return regionRead(in);
    case kRegionWrite: return regionWrite(in);
    case kReset:
      if (!in.empty()) return refuse(EINVAL, "DEVICE_RESET takes no body");
      dev_->reset();
      dropSession();
      return r;
    case kDirtyPages: return dirtyPages(in);
    case kDeviceFeature: return feature(in);
    case kMigDataRead: return migDataRead(in);
    case kMigDataWrite: return migDataWrite(in);
    default: return refuse(ENOTSUP, fmt("command %u not supported", cmd));
  }
}

// VERSION: u16 major, u16 minor, optional NUL-terminated JSON. Only the migration page size matters to this server.
Server::Reply Server::version(const std::vector<uint8_t>& in) {
  Reply r;
  if (in.size() < 4) { r.err = EINVAL; note("VERSION: body shorter than 4 bytes"); return r; }
  uint16_t major = get<uint16_t>(in, 0);
  if (major != 0) { r.err = ENOTSUP; note(fmt("VERSION: major %u (0 spoken)", major)); return r; }
  if (in.size() > 4) {
    std::string json(reinterpret_cast<const char*>(in.data() + 4), in.size() - 4);
    if (json.back() != '\0' || json.find('\0') != json.size() - 1) { r.err = EINVAL; note("VERSION: JSON not NUL-terminated"); return r; }
    size_t at = json.find("\"pgsize\"");
    if (at != std::string::npos) {
      at = json.find(':', at);
      unsigned long long pg = at == std::string::npos ? 0 : strtoull(json.c_str() + at + 1, nullptr, 10);
      if (pg != kPageSize) { r.err = EINVAL; note(fmt("VERSION: migration pgsize %llu (4096 only)", pg)); return r; }
    }
  }
  std::string caps = fmt("{\"capabilities\":{\"max_msg_fds\":%u,\"max_data_xfer_size\":%u,\"migration\":{\"pgsize\":%u}}}",
                         kMaxFds, o_.maxXfer, kPageSize);
  r.body.resize(4 + caps.size() + 1, 0);
  put<uint16_t>(r.body, 0, 0);
  put<uint16_t>(r.body, 2, 2);
  memcpy(r.body.data() + 4, caps.data(), caps.size());
  return r;
}

// DEVICE_GET_REGION_INFO: the emulated device's kernel-format bytes, with vfio-user's meaning of `offset` (the fd
// offset to mmap at: 0, the data memfd is laid out like the region) and the fd for a mappable region.
Server::Reply Server::regionInfo(const std::vector<uint8_t>& in) {
  Reply r;
  if (in.size() < sizeof(vfio_region_info)) { r.err = EINVAL; note("DEVICE_GET_REGION_INFO: body shorter than 32 bytes"); return r; }
  uint32_t argsz = get<uint32_t>(in, 0), index = get<uint32_t>(in, 8);
  if (argsz < sizeof(vfio_region_info)) { r.err = EINVAL; note("DEVICE_GET_REGION_INFO: argsz < 32"); return r; }
  if (index >= kNumRegions) { r.err = EINVAL; note(fmt("DEVICE_GET_REGION_INFO: index %u of %u", index, kNumRegions)); return r; }
  std::vector<uint8_t> info;
  vfio_region_info ri{};
  if (index == kDigestIndex) {
    vfio_region_info_cap_type ct{};
    ct.header.id = VFIO_REGION_INFO_CAP_TYPE;
    ct.header.version = 1;
    ct.type = kDigestRegionType;
    ct.subtype = kDigestRegionSubtype;
    ri.argsz = sizeof ri + sizeof ct;
    ri.flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_CAPS;
    ri.index = index;
    ri.cap_offset = sizeof ri;
    ri.size = 32;
    info.resize(ri.argsz);
    memcpy(info.data(), &ri, sizeof ri);
    memcpy(info.data() + sizeof ri, &ct, sizeof ct);
  } else {
    info = dev_->regionInfo(index);
    memcpy(&ri, info.data(), sizeof ri);
    ri.offset = 0;
    if (index == kConfigIndex) {
      ri.flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
      ri.size = 256;
    } else if (index != kMigIndex || v2_) {
      ri.flags = 0;
      ri.size = 0;  // the emulated device implements no BARs
    }
    memcpy(info.data(), &ri, sizeof ri);
  }
  if (argsz < info.size()) {
    // Too small for the capabilities: say how much is needed (kernel semantics), no chain, no fd.
    ri.argsz = static_cast<uint32_t>(info.size());
    ri.cap_offset = 0;
    r.body.resize(sizeof ri);
    memcpy(r.body.data(), &ri, sizeof ri);
    return r;
  }
  r.body = std::move(info);
  if (index == kMigIndex && (ri.flags & VFIO_REGION_INFO_FLAG_MMAP)) r.fd = dev_->dataFd();
  return r;
}

void Server::digest(uint8_t out[32]) {
  vm::Sha256 h;
  uint8_t cfg[256];
  dev_->configRead(cfg);
  h.update(cfg, sizeof cfg);
  std::vector<uint8_t> buf(4u << 20);
  uint64_t size = dev_->config().stateSize;
  for (uint64_t off = 0; off < size; off += buf.size()) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), size - off));
    dev_->readState(off, buf.data(), n);
    h.update(buf.data(), n);
  }
  h.final(out);
}

Server::Reply Server::regionRead(const std::vector<uint8_t>& in) {
  Reply r;
  if (in.size() != sizeof(RegionAccess)) { r.err = EINVAL; note(fmt("REGION_READ: body of %zu bytes (16)", in.size())); return r; }
  RegionAccess a = get<RegionAccess>(in, 0);
  if (a.count > o_.maxXfer) { r.err = EINVAL; note(fmt("REGION_READ: count %u > max_data_xfer_size %u", a.count, o_.maxXfer)); return r; }
  r.body.resize(sizeof a + a.count);
  put(r.body, 0, a);
  uint8_t* dst = r.body.data() + sizeof a;
  if (a.region == kMigIndex) {
    int rc = dev_->access(false, a.offset, dst, a.count);
    if (rc < 0) { r.err = -rc; note("REGION_READ: " + emu::threadErrorText()); }
  } else if (a.region == kConfigIndex) {
    if (!vm::fits(a.offset, a.count, 256)) { r.err = EINVAL; note("REGION_READ: beyond config space"); return r; }
    uint8_t cfg[256];
    dev_->configRead(cfg);
    memcpy(dst, cfg + a.offset, a.count);
  } else if (a.region == kDigestIndex) {
    if (a.offset != 0 || a.count != 32) { r.err = EINVAL; note("REGION_READ: the digest region is read whole (32 bytes at 0)"); return r; }
    digest(dst);
  } else {
    r.err = EINVAL;
    note(fmt("REGION_READ: region %u is not accessible", a.region));
  }
  return r;
}

Server::Reply Server::regionWrite(const std::vector<uint8_t>& in) {
  Reply r;
  if (in.size() < sizeof(RegionAccess)) { r.err = EINVAL; note("REGION_WRITE: body shorter than 16 bytes"); return r; }
  RegionAccess a = get<RegionAccess>(in, 0);
  if (a.count != in.size() - sizeof a) { r.err = EINVAL; note(fmt("REGION_WRITE: count %u but %zu data bytes", a.count, in.size() - sizeof a)); return r; }
  if (a.count > o_.maxXfer) { r.err = EINVAL; note("REGION_WRITE: count > max_data_xfer_size"); return r; }
  uint8_t* src = const_cast<uint8_t*>(in.data()) + sizeof a;
  if (a.region == kMigIndex) {
    int rc = dev_->access(true, a.offset, src, a.count);
    if (rc < 0) { r.err = -rc; note("REGION_WRITE: " + emu::threadErrorText()); return r; }
  } else if (a.region == kConfigIndex) {
    if (!vm::fits(a.offset, a.count, 256)) { r.err = EINVAL; note("REGION_WRITE: beyond config space"); return r; }
    uint8_t cfg[256];
    dev_->configRead(cfg);
    memcpy(cfg + a.offset, src, a.count);
    dev_->configWrite(cfg);
  } else {
    r.err = EINVAL;
    note(fmt("REGION_WRITE: region %u is not writable", a.region));
    return r;
  }
  r.body.resize(sizeof a);
  put(r.body, 0, a);
  std::lock_guard<std::mutex> lk(mu_);
  st_.largestWrite = std::max(st_.largestWrite, a.count);
  return r;
}

// DIRTY_PAGES (v1): START / STOP, or GET_BITMAP of one range of the device's guest memory (IOVA 0 up).
Server::Reply Server::dirtyPages(const std::vector<uint8_t>& in) {
  Reply r;
  if (in.size() < 8) { r.err = EINVAL; note("DIRTY_PAGES: body shorter than 8 bytes"); return r; }
  uint32_t argsz = get<uint32_t>(in, 0), flags = get<uint32_t>(in, 4);
  if (flags == kDirtyStart || flags == kDirtyStop) {
    if (in.size() != 8) { r.err = EINVAL; note("DIRTY_PAGES: START/STOP carry no range"); return r; }
    dev_->dirtyPages(flags, 0, 0, 0, nullptr, 0);
    return r;
  }
  if (flags != kDirtyGetBitmap || in.size() != 8 + sizeof(DirtyRange)) { r.err = EINVAL; note(fmt("DIRTY_PAGES: flags 0x%x / %zu bytes", flags, in.size())); return r; }
  DirtyRange d = get<DirtyRange>(in, 8);
  if (d.pgsize != kPageSize || d.size == 0 || d.size % kPageSize) { r.err = EINVAL; note("DIRTY_PAGES: bad page size or range"); return r; }
  uint64_t need = (d.size / kPageSize + 63) / 64 * 8;
  if (d.bitmapSize != need || need > o_.maxXfer || argsz < 8 + sizeof d + need) {
    r.err = EINVAL;
    note(fmt("DIRTY_PAGES: bitmap of %llu bytes (needs %llu, at most %u, argsz %u)", static_cast<ull>(d.bitmapSize),
             static_cast<ull>(need), o_.maxXfer, argsz));
    return r;
  }
  r.body.assign(8 + sizeof d + need, 0);
  put<uint32_t>(r.body, 0, static_cast<uint32_t>(r.body.size()));
  put<uint32_t>(r.body, 4, flags);
  put(r.body, 8, d);
  dev_->dirtyPages(flags, d.iova, d.size, d.pgsize, r.body.data() + 8 + sizeof d, need);
  return r;
}

// ---- v2 ---------------------------------------------------------------------------------------------------------
void Server::dropSession() {
  if (v2fd_ >= 0) close(v2fd_);
  v2fd_ = -1;
}

namespace {
constexpr uint32_t kFeatGet = 1u << 16, kFeatSet = 1u << 17, kFeatProbe = 1u << 18;
constexpr uint32_t kStPreCopy = 6, kStPreCopyP2P = 7, kStStopCopy = 3, kStResuming = 4;
}  // namespace

// DEVICE_FEATURE {argsz, flags, data}: MIGRATION (GET), MIG_DEVICE_STATE (GET / SET; the data fd stays here: 0xffffffff
// on the wire), DMA logging START / STOP (SET) and REPORT (GET) in the vfio-user layout (ranges and the bitmap inline
// in the message). MIG_DATA_SIZE is not offered over vfio-user (PROBE says so).
Server::Reply Server::feature(const std::vector<uint8_t>& in) {
  Reply r;
  auto refuse = [&](int e, const std::string& why) { note("DEVICE_FEATURE: " + why); r.err = e; return r; };
  if (in.size() < 8) return refuse(EINVAL, "body shorter than 8 bytes");
  uint32_t argsz = get<uint32_t>(in, 0), flags = get<uint32_t>(in, 4), feat = flags & 0xffff;
  uint32_t dir = flags & (kFeatGet | kFeatSet);
  if (flags & ~(0xffffu | kFeatGet | kFeatSet | kFeatProbe)) return refuse(EINVAL, fmt("unknown flags 0x%x", flags));
  // The directions each feature supports (as the kernel's vfio_check_feature sees them).
  uint32_t ops = feat == VFIO_DEVICE_FEATURE_MIGRATION ? kFeatGet
               : feat == VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE ? (kFeatGet | kFeatSet)
               : feat == VFIO_DEVICE_FEATURE_DMA_LOGGING_START || feat == VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP ? kFeatSet
               : feat == VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT ? kFeatGet : 0;
  if (flags & kFeatProbe) {
    if (!ops) return refuse(ENOTTY, fmt("feature %u not offered", feat));
    if (dir & ~ops) return refuse(EINVAL, fmt("feature %u does not support that direction", feat));
    r.body.assign(in.begin(), in.begin() + 8);
    return r;
  }
  if (dir != kFeatGet && dir != kFeatSet) return refuse(EINVAL, "exactly one of GET and SET");
  if (!ops) return refuse(ENOTTY, fmt("feature %u not offered", feat));
  if (!(dir & ops)) return refuse(EINVAL, fmt("feature %u does not support that direction", feat));
  if (feat >= VFIO_DEVICE_FEATURE_DMA_LOGGING_START) return dmaLogging(in, feat);
  r.body.assign(16, 0);
  put<uint32_t>(r.body, 0, 16);
  put<uint32_t>(r.body, 4, flags);
  if (feat == VFIO_DEVICE_FEATURE_MIGRATION) {
    if (dir != kFeatGet || argsz < 16) return refuse(EINVAL, "MIGRATION is GET with argsz >= 16");
    put<uint64_t>(r.body, 8, dev_->v2MigrationFlags());
    return r;
  }
  if (argsz < 16) return refuse(EINVAL, "MIG_DEVICE_STATE needs argsz >= 16");
  if (dir == kFeatSet) {
    if (in.size() < 16) return refuse(EINVAL, "SET MIG_DEVICE_STATE without its 8 bytes");
    int fd = dev_->v2SetState(get<uint32_t>(in, 8));  // the vendor walks every arc; throws with the kernel's errno
    if (fd >= 0) {
      dropSession();
      v2fd_ = fd;
    }
  }
  uint32_t st = dev_->v2GetState();
  if (st != kStPreCopy && st != kStPreCopyP2P && st != kStStopCopy && st != kStResuming) dropSession();
  put<uint32_t>(r.body, 8, st);
  put<uint32_t>(r.body, 12, 0xffffffffu);
  return r;
}

// DMA logging over messages. START {u64 page_size, u32 num_ranges, u32 reserved, {u64 iova, u64 length}*}: the reply
// echoes it with the page size the device chose. STOP: no data. REPORT {u64 iova, u64 length, u64 page_size}: the reply
// is those 24 bytes and the bitmap (one bit per page, u64 words), within argsz and the message limit. The emulated
// vendor validates the ranges (inside its guest memory, started, page aligned) with the kernel's errnos.
Server::Reply Server::dmaLogging(const std::vector<uint8_t>& in, uint32_t feat) {
  Reply r;
  auto refuse = [&](int e, const std::string& why) { note("DEVICE_FEATURE DMA logging: " + why); r.err = e; return r; };
  uint32_t argsz = get<uint32_t>(in, 0);
  if (feat == VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP) {
    if (in.size() != 8) return refuse(EINVAL, fmt("STOP with a %zu-byte body", in.size()));
    dev_->v2DmaStop();
    r.body.assign(in.begin(), in.end());
    return r;
  }
  if (feat == VFIO_DEVICE_FEATURE_DMA_LOGGING_START) {
    if (in.size() < 24) return refuse(EINVAL, "START shorter than its 16-byte control");
    uint64_t pageSize = get<uint64_t>(in, 8);
    uint32_t n = get<uint32_t>(in, 16);
    if (n == 0 || n > 256 || in.size() != 24 + static_cast<size_t>(n) * 16) return refuse(EINVAL, fmt("START with %u ranges in %zu bytes", n, in.size()));
    std::vector<emu::Device::Range> ranges(n);
    for (uint32_t i = 0; i < n; i++) ranges[i] = {get<uint64_t>(in, 24 + i * 16), get<uint64_t>(in, 32 + i * 16)};
    uint64_t chosen = dev_->v2DmaStart(pageSize, ranges);
    r.body.assign(in.begin(), in.end());
    put<uint64_t>(r.body, 8, chosen);
    return r;
  }
  if (in.size() != 32) return refuse(EINVAL, fmt("REPORT body of %zu bytes (32)", in.size()));
  uint64_t iova = get<uint64_t>(in, 8), length = get<uint64_t>(in, 16), pageSize = get<uint64_t>(in, 24);
  if (pageSize < 4096 || (pageSize & (pageSize - 1)) || length == 0 || length % pageSize) return refuse(EINVAL, "REPORT page size or length");
  uint64_t bytes = (length / pageSize + 63) / 64 * 8;
  // Bounded before anything is allocated: the reply must fit one message and the client's argsz.
  if (bytes > kMaxMessage - kHeaderSize - 32 || argsz < 32 + bytes) return refuse(EINVAL, fmt("REPORT of a %llu-byte bitmap (argsz %u)", static_cast<unsigned long long>(bytes), argsz));
  r.body.assign(32 + bytes, 0);
  memcpy(r.body.data(), in.data(), 32);
  dev_->v2DmaReport(iova, length, pageSize, r.body.data() + 32, static_cast<size_t>(bytes));
  return r;
}

// MIG_DATA_READ {argsz, size}: up to `size` bytes of the saving stream; fewer means "nothing more for now" in
// PRE_COPY and "the end" in STOP_COPY, so in STOP_COPY this waits (bounded) for the vendor rather than reply short.
Server::Reply Server::migDataRead(const std::vector<uint8_t>& in) {
  Reply r;
  auto refuse = [&](int e, const std::string& why) { note("MIG_DATA_READ: " + why); r.err = e; return r; };
  if (in.size() != 8) return refuse(EINVAL, fmt("body of %zu bytes (8)", in.size()));
  uint32_t argsz = get<uint32_t>(in, 0), size = get<uint32_t>(in, 4);
  if (size > o_.maxXfer || static_cast<uint64_t>(argsz) < 8ull + size) return refuse(EINVAL, fmt("size %u argsz %u (max %u)", size, argsz, o_.maxXfer));
  uint32_t st = dev_->v2GetState();
  if ((st != kStPreCopy && st != kStPreCopyP2P && st != kStStopCopy) || v2fd_ < 0) return refuse(EINVAL, "not in a saving state");
  r.body.resize(8 + size);
  size_t n = 0;
  int64_t deadline = nowMs() + o_.msgTimeoutMs;
  while (n < size) {
    ssize_t k = read(v2fd_, r.body.data() + 8 + n, size - n);
    if (k > 0) { n += static_cast<size_t>(k); continue; }
    if (k == 0) break;  // end of the stream
    if (errno == EINTR) continue;
    if (errno != EAGAIN) return refuse(errno, fmt("read: %s", strerror(errno)));
    if (st != kStStopCopy) break;  // pre-copy: nothing more for now
    int64_t left = deadline - nowMs();
    pollfd p{v2fd_, POLLIN, 0};
    if (left <= 0 || poll(&p, 1, static_cast<int>(left)) == 0) return refuse(EIO, "the vendor produced nothing in time");
  }
  r.body.resize(8 + n);
  put<uint32_t>(r.body, 0, static_cast<uint32_t>(8 + n));
  put<uint32_t>(r.body, 4, static_cast<uint32_t>(n));
  return r;
}

// MIG_DATA_WRITE {argsz, size, data}: all of it to the resuming session, or an error (the vendor refused the stream).
Server::Reply Server::migDataWrite(const std::vector<uint8_t>& in) {
  Reply r;
  auto refuse = [&](int e, const std::string& why) { note("MIG_DATA_WRITE: " + why); r.err = e; return r; };
  if (in.size() < 8) return refuse(EINVAL, "body shorter than 8 bytes");
  uint32_t argsz = get<uint32_t>(in, 0), size = get<uint32_t>(in, 4);
  if (in.size() != 8ull + size || static_cast<uint64_t>(argsz) < 8ull + size) return refuse(EINVAL, fmt("size %u argsz %u with %zu bytes", size, argsz, in.size()));
  if (dev_->v2GetState() != kStResuming || v2fd_ < 0) return refuse(EINVAL, "not RESUMING");
  int64_t deadline = nowMs() + o_.msgTimeoutMs;
  for (size_t n = 0; n < size;) {
    ssize_t k = write(v2fd_, in.data() + 8 + n, size - n);
    if (k > 0) { n += static_cast<size_t>(k); continue; }
    if (k < 0 && errno == EINTR) continue;
    if (k < 0 && errno != EAGAIN) return refuse(errno, fmt("the vendor refused the stream: %s", strerror(errno)));
    int64_t left = deadline - nowMs();
    pollfd p{v2fd_, POLLOUT, 0};
    if (left <= 0 || poll(&p, 1, static_cast<int>(left)) == 0) return refuse(EIO, "the vendor took no data in time");
  }
  std::lock_guard<std::mutex> lk(mu_);
  st_.largestWrite = std::max(st_.largestWrite, size);
  return r;
}

// ---- registries ----------------------------------------------------------------------------------------------------
namespace {
vm::Registry<Server>& servers() {
  static auto* r = new vm::Registry<Server>(EBADF, "vfio-user server");
  return *r;
}
vm::Registry<Conn>& conns() {
  static auto* r = new vm::Registry<Conn>(EBADF, "vfio-user connection");
  return *r;
}
}  // namespace
uint32_t addServer(std::shared_ptr<Server> s) { return servers().add(std::move(s)); }
std::shared_ptr<Server> getServer(uint32_t id) { return servers().get(id); }
std::shared_ptr<Server> takeServer(uint32_t id) { return servers().take(id); }
uint32_t addConn(std::shared_ptr<Conn> c) { return conns().add(std::move(c)); }
std::shared_ptr<Conn> getConn(uint32_t id) { return conns().get(id); }
std::shared_ptr<Conn> takeConn(uint32_t id) { return conns().take(id); }

}  // namespace vfu
