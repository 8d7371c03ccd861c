// The vfio-user client side of one socket (one device): strictly one outstanding request, replies read fully and
// trusted in nothing (msg_id, cmd, type and sizes checked against the request; file descriptors only where asked
// for), a deadline per request. After any failure that could leave the byte stream out of step (timeout, EOF, a
// malformed reply) the connection is marked broken and every later request fails at once with the first reason.
// A mutex makes it safe to share between the main thread and workers; the engine's region lock already orders them.
// The main thread can release a request that waits for a stalled server without waiting for its deadline:
// interrupt() wakes it (an eventfd in its poll) and it fails with ECANCELED; if its request had been sent whole and no
// byte of the reply had come, the connection stays in step (the reply is owed: the next request reads and drops it
// first, bounded by its own deadline); otherwise the connection is broken. closeNow() interrupts and shuts the socket
// down (shutdown(2), never close(2) while a pool thread may use the descriptor: the last owner closes it).
#pragma once
#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "region/region.h"

namespace vfu {

struct Limits {
  uint32_t maxXfer = 1u << 20;      // the server's max_data_xfer_size (REGION_READ/WRITE count)
  uint32_t writeBound = 32u << 10;  // data bytes per write-type request (libvfio-user issue #306)
  uint32_t timeoutMs = 5000;        // per request
};

class Conn {
 public:
  Conn(int sock, std::string name);
  ~Conn();
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;

  // Connects to a UNIX socket path, retrying while the listener's backlog is full, bounded by timeoutMs (a pool job:
  // vfuConnect). Throws vm::NativeError.
  static std::shared_ptr<Conn> open(const std::string& path, uint32_t timeoutMs);

  void setLimits(const Limits& l);
  Limits limits();

  // One request and its reply. The reply payload (header excluded) goes to `reply`; it must be between minReply and
  // maxReply bytes. Up to maxFds descriptors are accepted into `fds` (more, or any with maxFds 0: closed, error).
  // An error reply throws vm::NativeError(server errno). Throws vm::NativeError.
  // `gen`: interrupts() when the caller decided to make the request (an interrupt since then cancels it before it is
  // sent); UINT64_MAX: now.
  void request(uint16_t cmd, const uint8_t* body, size_t len, std::vector<uint8_t>* reply, size_t minReply,
               size_t maxReply, std::vector<int>* fds, size_t maxFds, uint64_t gen = UINT64_MAX);

  // REGION_READ/REGION_WRITE of exactly `count` bytes (count <= maxXfer; writes <= writeBound: caller splits).
  void regionRead(uint32_t region, uint64_t off, void* dst, uint32_t count);
  void regionWrite(uint32_t region, uint64_t off, const void* src, uint32_t count);

  // Release the request in flight (and one queued by a RequestWorker before this call) with ECANCELED. Any thread.
  void interrupt();
  // interrupt(), then shut the socket down: every request from now on fails with ECANCELED ("closed"). Any thread.
  void closeNow();
  uint64_t interrupts() const { return interrupts_.load(); }
  const std::string& name() const { return name_; }
  uint64_t requests() const { return requests_; }

 private:
  // Sends header + iov and reads the reply header; returns the payload length. `lock` is held.
  uint32_t exchange(uint16_t cmd, iovec* body, int nbody, size_t bodyLen, size_t maxReply, int64_t deadline,
                    std::vector<int>* fds, uint64_t gen);
  // Reads and drops the reply an interrupted request left owed. `lock` is held.
  void dropOwed(uint16_t cmd, int64_t deadline, uint64_t gen);
  // Waits for the first byte of a reply; -ECANCELED if interrupted since `gen`. `lock` is held.
  int awaitReply(int64_t deadline, uint64_t gen);
  void readBody(uint16_t cmd, void* dst, size_t len, int64_t deadline, std::vector<int>* fds);
  [[noreturn]] void broken(int err, const std::string& why);
  // broken() for a failed socket call `rc` while doing `what`; ECANCELED ("closed by this client") after closeNow().
  [[noreturn]] void failIo(int rc, uint16_t cmd, const std::string& what);
  void checkUsable();

  std::mutex mu_;
  int sock_;
  int wakeFd_;                        // eventfd: written by interrupt(), polled by a waiting request
  std::atomic<uint64_t> interrupts_{0};
  std::atomic<bool> closed_{false};
  bool owed_ = false;                 // a reply to (owedId_, owedCmd_) is still to come
  uint16_t owedId_ = 0, owedCmd_ = 0;
  std::string name_;
  Limits lim_;
  uint16_t nextId_ = 0;
  uint64_t requests_ = 0;
  int brokenErr_ = 0;
  std::string brokenWhy_;
};

// A migration (or other) region of a vfio-user device: trapped accesses become REGION_READ/WRITE, split into
// requests of at most maxXfer bytes (writes: writeBound); the sparse areas are mapped from the descriptor the server
// passed with DEVICE_GET_REGION_INFO (area at fd offset regionOffset + area.offset).
class UserRegion : public region::Region {
 public:
  UserRegion(std::shared_ptr<Conn> c, uint32_t index, uint64_t size, int fd, uint64_t fdOffset,
             const std::vector<region::AreaSpec>& areas);
  ~UserRegion() override;
  int rw(bool write, uint64_t off, void* buf, size_t len) override;
  std::string errorText() const override;

 private:
  std::shared_ptr<Conn> conn_;
  uint32_t index_;
};

}  // namespace vfu
