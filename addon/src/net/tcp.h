// TCP keepalive and user timeout on a live-migration socket (Node's setKeepAlive sets only the idle time).
#pragma once

namespace tcp {

// SO_KEEPALIVE, TCP_KEEPIDLE / TCP_KEEPINTVL (seconds), TCP_KEEPCNT (probes), TCP_USER_TIMEOUT (ms).
struct Keepalive {
  int keepalive;
  int idleS;
  int intervalS;
  int count;
  unsigned userTimeoutMs;
};

// Set `set` (when non-null) on the TCP socket `fd`, then read every option back with getsockopt. Throws
// vm::NativeError: ENOTSOCK / EPROTONOSUPPORT for an fd that is not a TCP socket, or the failing call's errno.
Keepalive keepalive(int fd, const Keepalive* set);

}  // namespace tcp
