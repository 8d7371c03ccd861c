// A process-global table of shared objects by id, visible from every thread of the process (emulated devices,
// open regions). Instances are created with `new` and never freed: no static destructor may run at exit while a
// worker thread still uses the table (the library is linked -z nodelete for the same reason).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

#include "common/error.h"

namespace vm {

template <typename T>
class Registry {
 public:
  // `missingErrno` and `what` make the error for an unknown id, e.g. (ENOENT, "emulated device").
  Registry(int missingErrno, const char* what) : errno_(missingErrno), what_(what) {}

  uint32_t reserve() {
    std::lock_guard<std::mutex> lk(mu_);
    return next_++;
  }
  void put(uint32_t id, std::shared_ptr<T> v) {
    std::lock_guard<std::mutex> lk(mu_);
    map_[id] = std::move(v);
  }
  uint32_t add(std::shared_ptr<T> v) {
    uint32_t id = reserve();
    put(id, std::move(v));
    return id;
  }
  // Removes and returns the object, so the caller releases it outside the lock (unmapping may be slow).
  std::shared_ptr<T> take(uint32_t id) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = find(id);
    std::shared_ptr<T> v = std::move(it->second);
    map_.erase(it);
    return v;
  }
  std::shared_ptr<T> get(uint32_t id) {
    std::lock_guard<std::mutex> lk(mu_);
    return find(id)->second;
  }

 private:
  typename std::map<uint32_t, std::shared_ptr<T>>::iterator find(uint32_t id) {
    auto it = map_.find(id);
    if (it == map_.end()) throw NativeError(errno_, fmt("no %s %u", what_, id));
    return it;
  }

  std::mutex mu_;
  std::map<uint32_t, std::shared_ptr<T>> map_;
  uint32_t next_ = 1;
  int errno_;
  const char* what_;
};

}  // namespace vm
