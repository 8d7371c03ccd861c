#include "datafd/datafd.h"

#include <poll.h>
#include <unistd.h>

#include <cerrno>

#include "common/error.h"

namespace datafd {

using vm::fmt;
using vm::NativeError;

static bool waitFor(int fd, short ev, int timeoutMs) {
  pollfd p{fd, ev, 0};
  for (;;) {
    int rc = poll(&p, 1, timeoutMs);
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) throw NativeError(errno, "poll on the data fd");
    return rc > 0;  // readable/writable, or an error/hangup the next call reports
  }
}

long readSome(int fd, uint8_t* p, size_t n, int timeoutMs) {
  for (bool waited = false;;) {
    ssize_t r = read(fd, p, n);
    if (r >= 0) return static_cast<long>(r);
    if (errno == EINTR) continue;
    if (errno == ENOMSG) return -1;
    if (errno == EAGAIN && !waited && timeoutMs > 0) {
      waited = true;
      if (waitFor(fd, POLLIN, timeoutMs)) continue;
      return -1;
    }
    if (errno == EAGAIN) return -1;
    throw NativeError(errno, fmt("read of %zu bytes from the data fd", n));
  }
}

size_t writeSome(int fd, const uint8_t* p, size_t n, int timeoutMs) {
  size_t done = 0;
  while (done < n) {
    ssize_t w = write(fd, p + done, n - done);
    if (w > 0) {
      done += static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN) {
      if (timeoutMs > 0 && waitFor(fd, POLLOUT, timeoutMs)) continue;
      return done;
    }
    int e = w == 0 ? EIO : errno;
    throw NativeError(e, fmt("write to the data fd refused after %zu of %zu bytes", done, n));
  }
  return done;
}

}  // namespace datafd
