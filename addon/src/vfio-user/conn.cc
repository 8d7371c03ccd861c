#include "vfio-user/conn.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/error.h"
#include "vfio-user/io.h"
#include "vfio-user/proto.h"

namespace vfu {

using vm::fmt;
using vm::NativeError;

const char* cmdName(uint16_t cmd) {
  static const char* const names[] = {
    "?", "VERSION", "DMA_MAP", "DMA_UNMAP", "DEVICE_GET_INFO", "DEVICE_GET_REGION_INFO", "DEVICE_GET_REGION_IO_FDS",
    "DEVICE_GET_IRQ_INFO", "DEVICE_SET_IRQS", "REGION_READ", "REGION_WRITE", "DMA_READ", "DMA_WRITE", "DEVICE_RESET",
    "DIRTY_PAGES", "REGION_WRITE_MULTI", "DEVICE_FEATURE", "MIG_DATA_READ", "MIG_DATA_WRITE"};
  return cmd < sizeof names / sizeof names[0] ? names[cmd] : "UNKNOWN";
}

Conn::Conn(int sock, std::string name) : sock_(sock), wakeFd_(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)), name_(std::move(name)) {
  if (wakeFd_ < 0) {
    int e = errno;
    close(sock_);
    throw NativeError(e, "eventfd");
  }
}
Conn::~Conn() {
  if (sock_ >= 0) close(sock_);
  close(wakeFd_);
}

std::shared_ptr<Conn> Conn::open(const std::string& path, uint32_t timeoutMs) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof a.sun_path)
    throw NativeError(ENAMETOOLONG, fmt("socket path of %zu bytes (at most %zu)", path.size(), sizeof a.sun_path - 1));
  memcpy(a.sun_path, path.data(), path.size());
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (s < 0) throw NativeError(errno, "socket(AF_UNIX)");
  const int64_t deadline = nowMs() + timeoutMs;
  while (connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    int e = errno;
    if (e == EINTR) continue;
    // AF_UNIX: EAGAIN is a listener whose backlog is full (a server not accepting). Nothing is in progress (the socket
    // would poll writable at once and then not be connected): try again until the deadline. This runs on the pool.
    if (e == EAGAIN && nowMs() < deadline) {
      poll(nullptr, 0, 10);
      continue;
    }
    close(s);
    if (e == EAGAIN) throw NativeError(ETIMEDOUT, fmt("connect(%s): the server did not accept within %u ms (its backlog is full)", path.c_str(), timeoutMs));
    throw NativeError(e, fmt("connect(%s): %s", path.c_str(), strerror(e)));
  }
  return std::make_shared<Conn>(s, path);
}

void Conn::setLimits(const Limits& l) {
  std::lock_guard<std::mutex> lk(mu_);
  lim_ = l;
}
Limits Conn::limits() {
  std::lock_guard<std::mutex> lk(mu_);
  return lim_;
}

static std::string ioText(int rc, uint16_t cmd, uint32_t timeoutMs, const char* what);

void Conn::interrupt() {
  interrupts_.fetch_add(1);  // before the wake-up: a waiter that sees the wake-up sees the new count
  uint64_t one = 1;
  (void)!write(wakeFd_, &one, sizeof one);
}

void Conn::closeNow() {
  closed_.store(true);
  interrupt();
  ::shutdown(sock_, SHUT_RDWR);  // a send blocked on a full socket returns too; the descriptor stays open until ~Conn
}

int Conn::awaitReply(int64_t deadline, uint64_t gen) {
  for (;;) {
    int rc = waitFor(sock_, POLLIN, deadline, wakeFd_);
    if (rc != -ECANCELED) return rc;
    uint64_t n;
    (void)!read(wakeFd_, &n, sizeof n);  // consumed; a wake-up from an interrupt older than this request is ignored
    if (interrupts_.load() != gen) return -ECANCELED;
  }
}

[[noreturn]] void Conn::failIo(int rc, uint16_t cmd, const std::string& what) {
  if (closed_.load()) broken(ECANCELED, fmt("%s: the connection was closed by this client while %s", cmdName(cmd), what.c_str()));
  broken(-rc, ioText(rc, cmd, lim_.timeoutMs, what.c_str()));
}

void Conn::broken(int err, const std::string& why) {
  brokenErr_ = err;
  brokenWhy_ = why;
  ::shutdown(sock_, SHUT_RDWR);  // the stream may be out of step: nothing more is read or written on it
  throw NativeError(err, why);
}

void Conn::checkUsable() {
  if (closed_.load()) throw NativeError(ECANCELED, "the connection was closed by this client");
  if (brokenErr_) throw NativeError(brokenErr_, "connection unusable after an earlier failure: " + brokenWhy_);
}

static std::string ioText(int rc, uint16_t cmd, uint32_t timeoutMs, const char* what) {
  if (rc == -ETIMEDOUT) return fmt("%s: no reply within %u ms (server stalled)", cmdName(cmd), timeoutMs);
  if (rc == -EPIPE) return fmt("%s: server closed the connection while %s", cmdName(cmd), what);
  if (rc == -EPROTO) return fmt("%s: reply carried more file descriptors than a message may", cmdName(cmd));
  return fmt("%s: %s: %s", cmdName(cmd), what, strerror(-rc));
}

void Conn::dropOwed(uint16_t cmd, int64_t deadline, uint64_t gen) {
  const std::string what = fmt("waiting for the reply to an earlier interrupted %s", cmdName(owedCmd_));
  int rc = awaitReply(deadline, gen);
  if (rc == -ECANCELED && !closed_.load()) throw NativeError(ECANCELED, fmt("%s: interrupted while %s", cmdName(cmd), what.c_str()));
  if (rc < 0) failIo(rc, cmd, what);
  Header r{};
  std::vector<int> got;
  rc = recvAll(sock_, &r, sizeof r, &got, deadline);
  closeAll(got);  // no reply that is dropped keeps a descriptor
  if (rc < 0) failIo(rc, cmd, what);
  if ((r.flags & kTypeMask) != kTypeReply || r.msgId != owedId_ || r.cmd != owedCmd_ || r.size < kHeaderSize || r.size > kMaxMessage ||
      ((r.flags & kErrorFlag) && r.size != kHeaderSize))
    broken(EPROTO, fmt("%s: the reply owed to an interrupted %s does not match it (msg_id %u cmd %u size %u flags 0x%x)", cmdName(cmd),
                       cmdName(owedCmd_), r.msgId, r.cmd, r.size, r.flags));
  uint8_t sink[4096];
  for (size_t left = r.size - kHeaderSize; left;) {
    size_t n = std::min(left, sizeof sink);
    rc = recvAll(sock_, sink, n, &got, deadline);
    closeAll(got);
    if (rc < 0) failIo(rc, cmd, what);
    left -= n;
  }
  owed_ = false;
}

uint32_t Conn::exchange(uint16_t cmd, iovec* body, int nbody, size_t bodyLen, size_t maxReply, int64_t deadline,
                        std::vector<int>* fds, uint64_t gen) {
  checkUsable();
  if (bodyLen > kMaxMessage - kHeaderSize) throw NativeError(E2BIG, fmt("%s: request of %zu bytes", cmdName(cmd), bodyLen));
  if (gen == UINT64_MAX) gen = interrupts_.load();
  else if (interrupts_.load() != gen) throw NativeError(ECANCELED, fmt("%s: interrupted before it was sent", cmdName(cmd)));
  if (owed_) dropOwed(cmd, deadline, gen);
  Header h{};
  h.msgId = nextId_++;
  h.cmd = cmd;
  h.size = static_cast<uint32_t>(kHeaderSize + bodyLen);
  h.flags = kTypeCommand;
  iovec iov[4];
  iov[0] = {&h, sizeof h};
  for (int i = 0; i < nbody; i++) iov[1 + i] = body[i];
  requests_++;
  int rc = sendAll(sock_, iov, 1 + nbody, nullptr, 0, deadline);
  if (rc < 0) failIo(rc, cmd, "sending");
  // Sent whole: until the first byte of the reply, an interrupt leaves the stream in step (the reply is owed).
  rc = awaitReply(deadline, gen);
  if (rc == -ECANCELED && !closed_.load()) {
    owed_ = true;
    owedId_ = h.msgId;
    owedCmd_ = cmd;
    throw NativeError(ECANCELED, fmt("%s: interrupted while waiting for the reply (dropped when it comes)", cmdName(cmd)));
  }
  if (rc < 0) failIo(rc, cmd, "waiting for the reply");
  Header r{};
  rc = recvAll(sock_, &r, sizeof r, fds, deadline);
  if (rc < 0) failIo(rc, cmd, "reading the reply header");
  if ((r.flags & kTypeMask) != kTypeReply || r.msgId != h.msgId || r.cmd != cmd)
    broken(EPROTO, fmt("%s: reply does not match the request (msg_id %u cmd %u flags 0x%x, expected msg_id %u cmd %u reply)",
                       cmdName(cmd), r.msgId, r.cmd, r.flags, h.msgId, cmd));
  if (r.size < kHeaderSize) broken(EPROTO, fmt("%s: reply size %u is smaller than its header", cmdName(cmd), r.size));
  uint32_t payload = r.size - static_cast<uint32_t>(kHeaderSize);
  if (r.flags & kErrorFlag) {
    // An error reply is the header alone; a body would be a protocol violation we could not bound safely.
    if (payload) broken(EPROTO, fmt("%s: error reply with a %u-byte body", cmdName(cmd), payload));
    int e = r.errorNo ? static_cast<int>(r.errorNo) : EIO;
    if (!fds->empty()) broken(EPROTO, fmt("%s: error reply carried file descriptors", cmdName(cmd)));
    throw NativeError(e, fmt("server error reply to %s: errno %u (%s)", cmdName(cmd), r.errorNo, strerror(e)));
  }
  if (payload > maxReply)
    broken(EPROTO, fmt("%s: reply of %u bytes, more than the %zu this request allows", cmdName(cmd), payload, maxReply));
  return payload;
}

void Conn::readBody(uint16_t cmd, void* dst, size_t len, int64_t deadline, std::vector<int>* fds) {
  int rc = recvAll(sock_, dst, len, fds, deadline);
  if (rc < 0) failIo(rc, cmd, "reading the reply body");
}

void Conn::request(uint16_t cmd, const uint8_t* body, size_t len, std::vector<uint8_t>* reply, size_t minReply,
                   size_t maxReply, std::vector<int>* fds, size_t maxFds, uint64_t gen) {
  std::lock_guard<std::mutex> lk(mu_);
  int64_t deadline = nowMs() + lim_.timeoutMs;
  std::vector<int> got;
  iovec b{const_cast<uint8_t*>(body), len};
  try {
    uint32_t payload = exchange(cmd, &b, len ? 1 : 0, len, maxReply, deadline, &got, gen);
    reply->assign(payload, 0);  // bounded by maxReply, which the caller derived from its request
    if (payload) readBody(cmd, reply->data(), payload, deadline, &got);
    if (payload < minReply) broken(EPROTO, fmt("%s: reply of %u bytes, at least %zu expected", cmdName(cmd), payload, minReply));
    if (got.size() > maxFds)
      broken(EPROTO, fmt("%s: reply carried %zu file descriptor(s), %zu expected at most", cmdName(cmd), got.size(), maxFds));
  } catch (...) {
    closeAll(got);
    throw;
  }
  fds->insert(fds->end(), got.begin(), got.end());
}

void Conn::regionRead(uint32_t region, uint64_t off, void* dst, uint32_t count) {
  std::lock_guard<std::mutex> lk(mu_);
  if (count > lim_.maxXfer) throw NativeError(EINVAL, fmt("REGION_READ of %u bytes exceeds max_data_xfer_size %u", count, lim_.maxXfer));
  int64_t deadline = nowMs() + lim_.timeoutMs;
  RegionAccess a{off, region, count};
  iovec b{&a, sizeof a};
  std::vector<int> got;
  try {
    uint32_t payload = exchange(kRegionRead, &b, 1, sizeof a, sizeof a + count, deadline, &got, UINT64_MAX);
    if (payload != sizeof a + count) {
      broken(EPROTO, fmt("REGION_READ: reply of %u bytes for a %u-byte read", payload, count));
    }
    RegionAccess e{};
    readBody(kRegionRead, &e, sizeof e, deadline, &got);
    readBody(kRegionRead, dst, count, deadline, &got);  // straight into the caller's buffer
    if (e.offset != off || e.region != region || e.count != count)
      broken(EPROTO, fmt("REGION_READ: reply names region %u offset %llu count %u, asked region %u offset %llu count %u", e.region,
                         static_cast<unsigned long long>(e.offset), e.count, region, static_cast<unsigned long long>(off), count));
    if (!got.empty()) broken(EPROTO, "REGION_READ: reply carried file descriptors");
  } catch (...) {
    closeAll(got);
    throw;
  }
}

void Conn::regionWrite(uint32_t region, uint64_t off, const void* src, uint32_t count) {
  std::lock_guard<std::mutex> lk(mu_);
  if (count > lim_.maxXfer || count > lim_.writeBound)
    throw NativeError(EINVAL, fmt("REGION_WRITE of %u bytes exceeds the bound (%u)", count, std::min(lim_.maxXfer, lim_.writeBound)));
  int64_t deadline = nowMs() + lim_.timeoutMs;
  RegionAccess a{off, region, count};
  iovec b[2] = {{&a, sizeof a}, {const_cast<void*>(src), count}};
  std::vector<int> got;
  try {
    uint32_t payload = exchange(kRegionWrite, b, 2, sizeof a + count, sizeof a, deadline, &got, UINT64_MAX);
    RegionAccess e{};
    if (payload != 0 && payload != sizeof e) broken(EPROTO, fmt("REGION_WRITE: reply of %u bytes", payload));
    if (payload) {
      readBody(kRegionWrite, &e, sizeof e, deadline, &got);
      if (e.offset != off || e.region != region || e.count != count)
        broken(EPROTO, fmt("REGION_WRITE: reply names region %u offset %llu count %u", e.region,
                           static_cast<unsigned long long>(e.offset), e.count));
    }
    if (!got.empty()) broken(EPROTO, "REGION_WRITE: reply carried file descriptors");
  } catch (...) {
    closeAll(got);
    throw;
  }
}

// ---- UserRegion --------------------------------------------------------------------------------------------------
static thread_local std::string tlsText;

UserRegion::UserRegion(std::shared_ptr<Conn> c, uint32_t index, uint64_t size, int fd, uint64_t fdOffset,
                       const std::vector<region::AreaSpec>& areas)
    : conn_(std::move(c)), index_(index) {
  size_ = size;
  if (fd < 0) return;
  for (const region::AreaSpec& a : areas) {
    uint64_t at;
    if (a.size == 0 || __builtin_add_overflow(fdOffset, a.offset, &at) || at % kPageSize) continue;
    void* p = mmap(nullptr, a.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, static_cast<off_t>(at));
    if (p != MAP_FAILED) areas_.push_back({a.offset, a.size, static_cast<uint8_t*>(p)});
  }
  std::sort(areas_.begin(), areas_.end(), [](const region::MappedArea& x, const region::MappedArea& y) { return x.offset < y.offset; });
}

UserRegion::~UserRegion() {
  for (const region::MappedArea& a : areas_) munmap(a.ptr, a.size);
}

int UserRegion::rw(bool write, uint64_t off, void* buf, size_t len) {
  tlsText.clear();
  Limits l = conn_->limits();
  size_t step = write ? std::min(l.maxXfer, l.writeBound) : l.maxXfer;
  uint8_t* p = static_cast<uint8_t*>(buf);
  try {
    for (size_t done = 0; done < len;) {
      uint32_t n = static_cast<uint32_t>(std::min(step, len - done));
      if (write) conn_->regionWrite(index_, off + done, p + done, n);
      else conn_->regionRead(index_, off + done, p + done, n);
      done += n;
    }
  } catch (const NativeError& e) {
    tlsText = "vfio-user " + conn_->name() + ": " + e.what();
    return -e.err;
  }
  return 0;
}

std::string UserRegion::errorText() const { return tlsText; }

}  // namespace vfu
