// File I/O for the file-backed strategies: whole transfers (short counts and EINTR retried),
// writeback ranges, page-cache advice. Every call returns 0 or -errno.
#pragma once

#include <cstddef>
#include <cstdint>
#include <sys/uio.h>

namespace pm::sys {

// Reads len bytes at off; bytes past end of file read as zeros (a page that straddles EOF).
int pread_full(int fd, void* buf, size_t len, uint64_t off);
// Reads up to len bytes at off, stopping only at end of file: the bytes read, or -errno.
int64_t pread_upto(int fd, void* buf, size_t len, uint64_t off);
// The file's size in bytes (fstat), or -errno.
int64_t file_size(int fd);
int pwrite_full(int fd, const void* buf, size_t len, uint64_t off);
// One pwritev per call where the kernel takes it all; iov is consumed (modified) on short writes.
int pwritev_full(int fd, struct iovec* iov, int iovcnt, uint64_t off);
// sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER) when wait, else WRITE only (start writeback).
int sync_range(int fd, uint64_t off, uint64_t len, bool wait);
int datasync(int fd);
// POSIX_FADV_DONTNEED: clean, unmapped pages leave the page cache.
int drop_cache(int fd, uint64_t off, uint64_t len);
int punch_hole(int fd, uint64_t off, uint64_t len);
// Whether a fault on fd's pages failed for want of space: the file system has no block left for
// an unprivileged writer, and the fault allocates (a write, or any fault on tmpfs, which has no
// shared zero page for a file). 1 yes, 0 no, or -errno. A page fault that could not allocate
// reaches user space only as SIGBUS/EFAULT; this names the cause.
int fs_full(int fd, bool write);
// Whether fd's file lives in memory (tmpfs, memfd): its blocks are RAM or swap. 1, 0 or -errno.
int on_tmpfs(int fd);

}  // namespace pm::sys
