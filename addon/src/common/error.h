// Errors raised by native modules; addon.cc turns them into JS Error objects (code, errno, message).
#pragma once
#include <cstdarg>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace vm {

// A failure with an errno (syscall or vendor errno). `detail` is the human text (e.g. the device's lastError).
struct NativeError : std::runtime_error {
  int err;
  NativeError(int e, const std::string& detail) : std::runtime_error(detail), err(e) {}
};

// A bad JS argument (code 'ERR_ARG').
struct ArgError : std::runtime_error {
  explicit ArgError(const std::string& msg) : std::runtime_error(msg) {}
};

inline std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
inline std::string fmt(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  int n = vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return n < 0 ? std::string() : std::string(buf);
}

// Overflow-safe "a + b <= limit".
inline bool fits(unsigned long long a, unsigned long long b, unsigned long long limit) {
  unsigned long long s;
  return !__builtin_add_overflow(a, b, &s) && s <= limit;
}

}  // namespace vm
