// The emulated devices' workload: a small shared pool of threads steps every device that has one (it dirties state
// pages and DMA-writes guest pages while RUNNING), instead of a thread per device; and the process's emulated guest
// RAM, which every device DMA-writes into, allocated only when the first DMA write happens.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <shared_mutex>
#include <thread>

#include "common/error.h"
#include "emu/device.h"

namespace emu {

// ---- one device's step ---------------------------------------------------------------------------------------------
void Device::workloadTick(std::chrono::steady_clock::time_point now) {
  std::unique_lock<std::mutex> lk(mu_, std::try_to_lock);
  if (!lk.owns_lock() || dead_) return;  // a vendor access is in progress: catch up next time (capped below)
  if (!(reg_ & kRunning)) {
    wlRunning_ = false;
    return;
  }
  if (!wlRunning_) {  // (re)started running: rates count from now
    wlRunning_ = true;
    wlLast_ = now;
    return;
  }
  // Cap the catch-up after a stall (e.g. the device was busy with a large chunk) so rates stay rates, not bursts.
  double dt = std::min(std::chrono::duration<double>(now - wlLast_).count(), 0.05);
  wlLast_ = now;
  owedState_ += cfg_.dirtyRate * dt;
  owedDma_ += cfg_.dmaRate * dt;
  auto next = [&] { return wlRng_ = splitmix64(wlRng_); };
  for (; owedState_ >= 1; owedState_ -= 1) {
    uint64_t page = next() % pages_, v = next();
    memcpy(state_ + page * kPage + (v % (kPage / 8)) * 8, &v, 8);
    setDirty(page);
    workloadWrites_++;
  }
  if (owedDma_ < 1) return;
  guest::Access ram(cfg_.guestPages);
  std::lock_guard<std::mutex> lg(logMu_);
  for (; owedDma_ >= 1; owedDma_ -= 1) {
    uint64_t page = next() % cfg_.guestPages;
    ram.write8(page, next());
    logDma(page);
    dmaWrites_++;
  }
}

// ---- the shared pool -----------------------------------------------------------------------------------------------
namespace workload {
namespace {

struct Shard {
  std::mutex mu;  // held while stepping its devices: remove() waits for the step in progress
  std::condition_variable cv;
  std::vector<Device*> devs;
  bool started = false;
};

constexpr unsigned kMaxThreads = 4;

unsigned shardCount() {
  static const unsigned n = std::min(kMaxThreads, std::max(1u, std::thread::hardware_concurrency()));
  return n;
}

Shard* shards() {
  static auto* s = new Shard[kMaxThreads];  // never freed: no static destructor while a pool thread runs
  return s;
}

std::atomic<unsigned> started{0};
std::atomic<uint64_t> nextShard{0};

void loop(Shard& s) {
  using namespace std::chrono;
  std::unique_lock<std::mutex> lk(s.mu);
  for (;;) {
    s.cv.wait(lk, [&] { return !s.devs.empty(); });
    auto now = steady_clock::now();
    for (Device* d : s.devs) d->workloadTick(now);
    // Each step is short (try_lock, a few writes); many devices per thread step less often, with the same rates.
    s.cv.wait_for(lk, s.devs.size() > 64 ? milliseconds(5) : milliseconds(1));
  }
}

}  // namespace

void add(Device* d) {
  Shard& s = shards()[nextShard++ % shardCount()];
  std::lock_guard<std::mutex> lk(s.mu);
  if (!s.started) {
    std::thread(loop, std::ref(s)).detach();  // throws std::system_error if no thread can be made (caller cleans up)
    s.started = true;
    started++;
  }
  s.devs.push_back(d);
  s.cv.notify_one();
}

void remove(Device* d) {
  for (unsigned i = 0; i < shardCount(); i++) {
    Shard& s = shards()[i];
    std::lock_guard<std::mutex> lk(s.mu);
    auto it = std::find(s.devs.begin(), s.devs.end(), d);
    if (it != s.devs.end()) {
      s.devs.erase(it);
      return;
    }
  }
}

unsigned threads() { return started.load(); }

}  // namespace workload

// ---- guest RAM ---------------------------------------------------------------------------------------------------
namespace guest {
namespace {
std::shared_mutex& mu() {
  static auto* m = new std::shared_mutex;
  return *m;
}
int fd = -1;
uint8_t* base = nullptr;
uint64_t bytes = 0;

// Caller holds mu() exclusively.
void grow(uint64_t want) {
  if (fd < 0) {
    fd = memfd_create("vfio-mig-guest", MFD_CLOEXEC);
    if (fd < 0) throw vm::NativeError(errno, "memfd_create(vfio-mig-guest)");
  }
  if (ftruncate(fd, static_cast<off_t>(want)) != 0) throw vm::NativeError(errno, vm::fmt("ftruncate(guest RAM, %llu)", static_cast<unsigned long long>(want)));
  void* p = mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
  if (p == MAP_FAILED) throw vm::NativeError(errno, vm::fmt("mmap(guest RAM, %llu)", static_cast<unsigned long long>(want)));
  if (base) munmap(base, bytes);  // nobody holds a shared lock: no writer uses the old mapping
  base = static_cast<uint8_t*>(p);
  bytes = want;
}
}  // namespace

Access::Access(uint64_t pages) {
  for (;;) {
    mu().lock_shared();
    if (bytes >= pages * kPage) return;
    mu().unlock_shared();
    std::unique_lock<std::shared_mutex> lk(mu());
    if (bytes < pages * kPage) grow(pages * kPage);
  }
}

Access::~Access() { mu().unlock_shared(); }

void Access::write8(uint64_t page, uint64_t v) { memcpy(base + page * kPage, &v, 8); }

uint64_t mappedBytes() {
  std::shared_lock<std::shared_mutex> lk(mu());
  return bytes;
}

}  // namespace guest
}  // namespace emu
