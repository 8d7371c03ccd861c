// vfio-mig's vfio-user device server: one emulated device (addon/src/emu) served on a UNIX socket by one thread,
// one client at a time (others are accepted and closed at once). Strict to the specification: VERSION first and
// once, every size checked before anything is read or allocated, register accesses at their exact size and offset
// (the emulated vendor refuses anything else), commands fenced while the device is stopped, an error reply (header
// alone, errno) for every refused request, and a client that breaks framing is dropped with the device untouched.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace emu { class Device; }

namespace vfu {

struct ServerOptions {
  uint32_t maxXfer = 1u << 20;     // max_data_xfer_size offered in VERSION
  uint32_t msgTimeoutMs = 5000;    // a started message must be complete within this
};

struct ServerStats {
  uint64_t clients = 0, refused = 0, requests = 0, errorReplies = 0, dropped = 0;
  uint32_t largestWrite = 0;  // data bytes of the largest REGION_WRITE accepted
  bool connected = false;
  std::string lastError;
};

class Server {
 public:
  // Binds and listens (the path must not exist: nothing is clobbered). Throws vm::NativeError.
  Server(std::shared_ptr<emu::Device> dev, const std::string& path, const ServerOptions& o);
  ~Server();
  void stop();
  ServerStats stats();

 private:
  struct Reply {
    int err = 0;
    std::vector<uint8_t> body;
    int fd = -1;  // passed with SCM_RIGHTS (not owned)
  };
  void loop();
  bool serveOne();  // false: drop the client
  Reply dispatch(uint16_t cmd, std::vector<uint8_t>& in, std::vector<int>& fds);
  Reply version(const std::vector<uint8_t>& in);
  Reply regionInfo(const std::vector<uint8_t>& in);
  Reply regionRead(const std::vector<uint8_t>& in);
  Reply regionWrite(const std::vector<uint8_t>& in);
  Reply dirtyPages(const std::vector<uint8_t>& in);
  Reply feature(const std::vector<uint8_t>& in);   // v2: DEVICE_FEATURE
  Reply dmaLogging(const std::vector<uint8_t>& in, uint32_t feat);  // v2: DMA logging START / STOP / REPORT
  Reply migDataRead(const std::vector<uint8_t>& in);
  Reply migDataWrite(const std::vector<uint8_t>& in);
  void dropSession();
  void digest(uint8_t out[32]);
  void note(const std::string& s);

  std::shared_ptr<emu::Device> dev_;
  std::string path_;
  ServerOptions o_;
  int listen_ = -1, client_ = -1, stopPipe_[2] = {-1, -1};
  uint64_t ino_ = 0;
  bool versioned_ = false;
  bool v2_ = false;      // the device speaks v2 (DEVICE_FEATURE, MIG_DATA_READ/WRITE) instead of the v1 region
  int v2fd_ = -1;        // v2: the vendor's data fd of the current session (stays on this side of the socket)
  std::thread th_;
  std::atomic<bool> stopped_{false};
  std::mutex mu_;  // stats
  ServerStats st_;
};

// Handle registry for the bindings (ids from 1).
uint32_t addServer(std::shared_ptr<Server> s);
std::shared_ptr<Server> getServer(uint32_t id);
std::shared_ptr<Server> takeServer(uint32_t id);

uint32_t addConn(std::shared_ptr<class Conn> c);
std::shared_ptr<Conn> getConn(uint32_t id);
std::shared_ptr<Conn> takeConn(uint32_t id);

}  // namespace vfu
