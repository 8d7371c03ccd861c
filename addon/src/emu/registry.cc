// Process-global device registry. Heap-allocated and never freed: no static destructors run at exit while
// workload threads may still be alive, and the library is linked -z nodelete so worker threads share it.
#include <cerrno>

#include "common/registry.h"
#include "emu/device.h"

namespace emu {

namespace {
vm::Registry<Device>& reg() {
  static auto* r = new vm::Registry<Device>(ENOENT, "emulated device");
  return *r;
}
}  // namespace

uint32_t create(const Config& cfg) {
  uint32_t id = reg().reserve();
  reg().put(id, std::make_shared<Device>(id, cfg));  // the initial fill can take seconds: outside the table lock
  return id;
}

void destroy(uint32_t id) {
  reg().take(id)->shutdown();  // open regions keep the memory alive; their accesses now fail ENODEV
}

std::shared_ptr<Device> get(uint32_t id) { return reg().get(id); }

}  // namespace emu
