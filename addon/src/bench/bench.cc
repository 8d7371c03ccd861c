#include "bench/bench.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <exception>
#include <thread>

#include "common/error.h"

namespace bench {

using vm::fmt;
using vm::NativeError;

double copyLimit(region::Region& r, uint64_t off, uint64_t len, uint64_t chunk, uint64_t total, unsigned threads,
                 uint8_t* dst, size_t dstLen) {
  std::vector<std::exception_ptr> errs(threads);
  auto work = [&](unsigned t) {
    try {
      uint64_t half = dstLen / threads, bytes = total / threads + (t + 1 == threads ? total % threads : 0);
      uint8_t* d = dst + t * half;
      uint64_t src = 0, dpos = 0;  // both wrap: the source window [off, off+len), the destination half
      while (bytes > 0) {
        uint64_t n = std::min({chunk, bytes, len - src, half - dpos});
        region::copyOut(r, off + src, n, d + dpos);
        bytes -= n;
        src = src + n == len ? 0 : src + n;
        dpos = dpos + n == half ? 0 : dpos + n;
      }
    } catch (...) {
      errs[t] = std::current_exception();
    }
  };
  auto t0 = std::chrono::steady_clock::now();
  if (threads == 1) {
    work(0);
  } else {
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; t++) ts.emplace_back(work, t);
    for (auto& th : ts) th.join();
  }
  auto ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  for (auto& e : errs)
    if (e) std::rethrow_exception(e);
  return ns;
}

static void writeAll(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw NativeError(errno, fmt("write(fd=%d)", fd));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

static void putBe64(int fd, uint64_t v) {
  uint8_t b[8];
  for (int i = 0; i < 8; i++) b[i] = static_cast<uint8_t>(v >> (56 - 8 * i));
  writeAll(fd, b, 8);
}

static uint64_t reg(region::Region& r, uint64_t off, size_t width) {
  uint64_t v = 0;
  int rc = r.rw(false, off, &v, width);
  if (rc < 0) throw NativeError(-rc, fmt("read register at %llu: %s", static_cast<unsigned long long>(off), r.errorText().c_str()));
  return v;
}

static void setState(region::Region& r, uint32_t v) {
  int rc = r.rw(true, 0, &v, 4);
  if (rc < 0) throw NativeError(-rc, fmt("write device_state 0x%x: %s", v, r.errorText().c_str()));
}

uint64_t sequentialSave(const std::vector<std::shared_ptr<region::Region>>& regions, uint32_t profile, uint8_t* buf,
                        size_t bufLen, int outFd) {
  constexpr uint64_t kDataState = 0xffffffffef100004ull, kEndOfState = 0xffffffffef100001ull;
  const uint64_t hdrEnd = profile == 0 ? 64 : 32;
  uint64_t written = 0;
  for (const auto& rp : regions) {
    region::Region& r = *rp;
    uint32_t st = static_cast<uint32_t>(reg(r, 0, 4));
    setState(r, (st & ~7u) | 2u);  // RUNNING -> STOP-AND-COPY: the seed never pre-copies
    for (;;) {
      if (reg(r, 8, 8) == 0) break;
      uint64_t off = reg(r, 16, 8), size = reg(r, 24, 8);
      if (size == 0) break;  // nothing staged although pending > 0: stop rather than spin
      if (off < hdrEnd || !vm::fits(off, size, r.size()) || size > bufLen)
        throw NativeError(EINVAL, fmt("bad chunk: data_offset %llu data_size %llu", static_cast<unsigned long long>(off),
                                      static_cast<unsigned long long>(size)));
      region::copyOut(r, off, size, buf);
      putBe64(outFd, kDataState);
      putBe64(outFd, size);
      writeAll(outFd, buf, size);
      written += 16 + size;
    }
    putBe64(outFd, kEndOfState);
    written += 8;
    setState(r, st & ~7u);  // STOP
  }
  return written;
}

}  // namespace bench
