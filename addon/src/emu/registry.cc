// Process-global device registry. Heap-allocated and never freed: no static destructors run at exit while
// workload threads may still be alive, and the library is linked -z nodelete so worker threads share it.
#include <cerrno>
#include <map>

#include "common/error.h"
#include "emu/device.h"

namespace emu {

namespace {
struct Registry {
  std::mutex mu;
  std::map<uint32_t, std::shared_ptr<Device>> devices;
  uint32_t nextId = 1;
};
Registry& reg() {
  static Registry* r = new Registry;
  return *r;
}
}  // namespace

uint32_t create(const Config& cfg) {
  uint32_t id;
  {
    std::lock_guard<std::mutex> lk(reg().mu);
    id = reg().nextId++;
  }
  auto dev = std::make_shared<Device>(id, cfg);  // the initial fill can take seconds: outside the registry lock
  std::lock_guard<std::mutex> lk(reg().mu);
  reg().devices[id] = std::move(dev);
  return id;
}

void destroy(uint32_t id) {
  std::shared_ptr<Device> dev;
  {
    std::lock_guard<std::mutex> lk(reg().mu);
    auto it = reg().devices.find(id);
    if (it == reg().devices.end()) throw vm::NativeError(ENOENT, vm::fmt("no emulated device %u", id));
    dev = std::move(it->second);
    reg().devices.erase(it);
  }
  dev->shutdown();  // open regions keep the memory alive; their accesses now fail ENODEV
}

std::shared_ptr<Device> get(uint32_t id) {
  std::lock_guard<std::mutex> lk(reg().mu);
  auto it = reg().devices.find(id);
  if (it == reg().devices.end()) throw vm::NativeError(ENOENT, vm::fmt("no emulated device %u", id));
  return it->second;
}

}  // namespace emu
