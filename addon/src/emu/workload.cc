// The device's workload thread: dirties state pages and DMA-writes guest pages while RUNNING is set.
#include <chrono>
#include <cstring>

#include "emu/device.h"

namespace emu {

void Device::workloadLoop() {
  using clock = std::chrono::steady_clock;
  std::unique_lock<std::mutex> lk(mu_);
  uint64_t rng = splitmix64(cfg_.seed ^ 0x5EEDull ^ (static_cast<uint64_t>(id_) << 40));
  auto next = [&] { return rng = splitmix64(rng); };
  double owedState = 0, owedDma = 0;
  auto last = clock::now();
  while (!stop_) {
    if (!(reg_ & kRunning)) {
      cv_.wait(lk, [&] { return stop_ || (reg_ & kRunning); });
      last = clock::now();
      continue;
    }
    auto now = clock::now();
    // Cap the catch-up after a stall (e.g. the lock was busy with a large chunk) so rates stay rates, not bursts.
    double dt = std::min(std::chrono::duration<double>(now - last).count(), 0.05);
    last = now;
    owedState += cfg_.dirtyRate * dt;
    owedDma += cfg_.dmaRate * dt;
    for (; owedState >= 1; owedState -= 1) {
      uint64_t page = next() % pages_, v = next();
      memcpy(state_ + page * kPage + (v % (kPage / 8)) * 8, &v, 8);
      setDirty(page);
      workloadWrites_++;
    }
    for (; owedDma >= 1; owedDma -= 1) {
      uint64_t page = next() % cfg_.guestPages, v = next();
      memcpy(guest_ + page * kPage, &v, 8);
      logDma(page);
      dmaWrites_++;
    }
    // Sleep without holding the device lock; wake at once on destroy.
    cv_.wait_for(lk, std::chrono::milliseconds(1), [&] { return stop_; });
  }
}

}  // namespace emu
