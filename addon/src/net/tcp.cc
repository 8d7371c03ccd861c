#include "net/tcp.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "common/error.h"

namespace tcp {
namespace {

int getInt(int fd, int level, int name, const char* what) {
  int v = 0;
  socklen_t n = sizeof v;
  if (getsockopt(fd, level, name, &v, &n) != 0) throw vm::NativeError(errno, vm::fmt("getsockopt(%s): %s", what, strerror(errno)));
  if (n != sizeof v) throw vm::NativeError(EINVAL, vm::fmt("getsockopt(%s): %u-byte value", what, static_cast<unsigned>(n)));
  return v;
}

void setInt(int fd, int level, int name, int v, const char* what) {
  if (setsockopt(fd, level, name, &v, sizeof v) != 0) throw vm::NativeError(errno, vm::fmt("setsockopt(%s, %d): %s", what, v, strerror(errno)));
}

}  // namespace

Keepalive keepalive(int fd, const Keepalive* set) {
  // Only a TCP stream socket: a UNIX socket or a file descriptor that is not a socket is refused, never touched.
  const int type = getInt(fd, SOL_SOCKET, SO_TYPE, "SO_TYPE");
  const int domain = getInt(fd, SOL_SOCKET, SO_DOMAIN, "SO_DOMAIN");
  const int proto = getInt(fd, SOL_SOCKET, SO_PROTOCOL, "SO_PROTOCOL");
  if (type != SOCK_STREAM || (domain != AF_INET && domain != AF_INET6) || proto != IPPROTO_TCP) {
    throw vm::NativeError(EPROTONOSUPPORT, vm::fmt("fd %d is not a TCP socket (domain %d, type %d, protocol %d)", fd, domain, type, proto));
  }
  if (set) {
    setInt(fd, IPPROTO_TCP, TCP_KEEPIDLE, set->idleS, "TCP_KEEPIDLE");
    setInt(fd, IPPROTO_TCP, TCP_KEEPINTVL, set->intervalS, "TCP_KEEPINTVL");
    setInt(fd, IPPROTO_TCP, TCP_KEEPCNT, set->count, "TCP_KEEPCNT");
    setInt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, static_cast<int>(set->userTimeoutMs), "TCP_USER_TIMEOUT");
    setInt(fd, SOL_SOCKET, SO_KEEPALIVE, set->keepalive ? 1 : 0, "SO_KEEPALIVE");
  }
  Keepalive r{};
  r.keepalive = getInt(fd, SOL_SOCKET, SO_KEEPALIVE, "SO_KEEPALIVE");
  r.idleS = getInt(fd, IPPROTO_TCP, TCP_KEEPIDLE, "TCP_KEEPIDLE");
  r.intervalS = getInt(fd, IPPROTO_TCP, TCP_KEEPINTVL, "TCP_KEEPINTVL");
  r.count = getInt(fd, IPPROTO_TCP, TCP_KEEPCNT, "TCP_KEEPCNT");
  r.userTimeoutMs = static_cast<unsigned>(getInt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT"));
  return r;
}

}  // namespace tcp
