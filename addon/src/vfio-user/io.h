// Whole-message socket I/O with deadlines and SCM_RIGHTS, for the vfio-user client and server. Every function
// returns 0 or -errno (ETIMEDOUT at the deadline, EPIPE when the peer closed); nothing throws.
#pragma once
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace vfu {

// Milliseconds on CLOCK_MONOTONIC.
int64_t nowMs();

// Wait until `sock` is ready for `events` (or hung up): 0; -ETIMEDOUT at the deadline; -ECANCELED as soon as
// `stopFd` (or -1) is readable.
int waitFor(int sock, short events, int64_t deadlineMs, int stopFd);

// All of iov (then nothing else) with one sendmsg where the kernel takes it; `fds` ride on the first call.
int sendAll(int sock, iovec* iov, int niov, const int* fds, int nfds, int64_t deadlineMs);

// Exactly `len` bytes into buf. File descriptors that arrive are appended to `fds` (never dropped: the caller
// closes what it does not want); ancillary data that was cut off is an error (EPROTO) after closing what came.
// `stopFd` (or -1) aborts the wait with ECANCELED when readable.
int recvAll(int sock, void* buf, size_t len, std::vector<int>* fds, int64_t deadlineMs, int stopFd = -1);

void closeAll(std::vector<int>& fds);

}  // namespace vfu
