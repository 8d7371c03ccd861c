// read()/write() on a VFIO v2 migration data fd, the one native path for every reach that has a real fd (the
// kernel's anon-inode file, the emulated vendor's pipe). Positionless: data fds cannot seek.
#pragma once
#include <cstddef>
#include <cstdint>

namespace datafd {
// One read of up to n bytes: > 0 bytes read, 0 at end of file, -1 "nothing more for now" (ENOMSG, or EAGAIN after
// waiting up to timeoutMs for data). Other errors throw vm::NativeError.
long readSome(int fd, uint8_t* p, size_t n, int timeoutMs);
// Writes up to n bytes, waiting up to timeoutMs whenever the fd is full; returns the bytes accepted (fewer than n
// only on timeout). A refusal (EFAULT, EPIPE, EINVAL...) throws vm::NativeError with the count accepted before it.
size_t writeSome(int fd, const uint8_t* p, size_t n, int timeoutMs);
}  // namespace datafd
