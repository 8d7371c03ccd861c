#include "vfio-user/io.h"

#include <poll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace vfu {

int64_t nowMs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

// Wait until `sock` is ready for `events` or the deadline passes (or stopFd becomes readable).
int waitFor(int sock, short events, int64_t deadlineMs, int stopFd) {
  for (;;) {
    int64_t left = deadlineMs - nowMs();
    if (left <= 0) return -ETIMEDOUT;
    pollfd p[2] = {{sock, events, 0}, {stopFd, POLLIN, 0}};
    int n = poll(p, stopFd >= 0 ? 2 : 1, static_cast<int>(std::min<int64_t>(left, 1 << 30)));
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) return -ETIMEDOUT;
    if (stopFd >= 0 && (p[1].revents & POLLIN)) return -ECANCELED;
    if (p[0].revents & (events | POLLHUP | POLLERR)) return 0;
  }
}

int sendAll(int sock, iovec* iov, int niov, const int* fds, int nfds, int64_t deadlineMs) {
  alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int) * 16)];
  if (nfds > 16) return -EINVAL;
  bool fdsSent = nfds == 0;
  int first = 0;
  while (first < niov) {
    msghdr m{};
    m.msg_iov = iov + first;
    m.msg_iovlen = static_cast<size_t>(niov - first);
    if (!fdsSent) {
      memset(ctl, 0, sizeof ctl);
      m.msg_control = ctl;
      m.msg_controllen = CMSG_SPACE(sizeof(int) * static_cast<size_t>(nfds));
      cmsghdr* c = CMSG_FIRSTHDR(&m);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * static_cast<size_t>(nfds));
      memcpy(CMSG_DATA(c), fds, sizeof(int) * static_cast<size_t>(nfds));
    }
    ssize_t n = sendmsg(sock, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        int rc = waitFor(sock, POLLOUT, deadlineMs, -1);
        if (rc < 0) return rc;
        continue;
      }
      return errno == ECONNRESET ? -EPIPE : -errno;
    }
    fdsSent = true;
    size_t left = static_cast<size_t>(n);
    while (first < niov && left >= iov[first].iov_len) left -= iov[first++].iov_len;
    if (left) {
      iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + left;
      iov[first].iov_len -= left;
    }
  }
  return 0;
}

int recvAll(int sock, void* buf, size_t len, std::vector<int>* fds, int64_t deadlineMs, int stopFd) {
  uint8_t* p = static_cast<uint8_t*>(buf);
  alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int) * 16)];
  for (size_t done = 0; done < len;) {
    int rc = waitFor(sock, POLLIN, deadlineMs, stopFd);
    if (rc < 0) return rc;
    iovec v{p + done, len - done};
    msghdr m{};
    m.msg_iov = &v;
    m.msg_iovlen = 1;
    m.msg_control = ctl;
    m.msg_controllen = sizeof ctl;
    ssize_t n = recvmsg(sock, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return errno == ECONNRESET ? -EPIPE : -errno;
    }
    for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < k; i++) {
        int fd;
        memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        fds->push_back(fd);
      }
    }
    if (m.msg_flags & MSG_CTRUNC) return -EPROTO;  // more descriptors than we take: refused
    if (n == 0) return -EPIPE;
    done += static_cast<size_t>(n);
  }
  return 0;
}

void closeAll(std::vector<int>& fds) {
  for (int fd : fds) close(fd);
  fds.clear();
}


}  // namespace vfu
