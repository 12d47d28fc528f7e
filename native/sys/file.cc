#include "file.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

namespace pm::sys {

namespace {
int neg_errno() { return errno ? -errno : -EIO; }
}  // namespace

int pread_full(int fd, void* buf, size_t len, uint64_t off) {
  auto* p = static_cast<uint8_t*>(buf);
  while (len) {
    ssize_t n = ::pread(fd, p, len, static_cast<off_t>(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return neg_errno();
    }
    if (n == 0) {
      std::memset(p, 0, len);
      return 0;
    }
    p += n;
    off += static_cast<uint64_t>(n);
    len -= static_cast<size_t>(n);
  }
  return 0;
}

int64_t pread_upto(int fd, void* buf, size_t len, uint64_t off) {
  auto* p = static_cast<uint8_t*>(buf);
  size_t got = 0;
  while (got < len) {
    ssize_t n = ::pread(fd, p + got, len - got, static_cast<off_t>(off + got));
    if (n < 0) {
      if (errno == EINTR) continue;
      return neg_errno();
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  return static_cast<int64_t>(got);
}

int64_t file_size(int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return neg_errno();
  return st.st_size;
}

int pwrite_full(int fd, const void* buf, size_t len, uint64_t off) {
  auto* p = static_cast<const uint8_t*>(buf);
  while (len) {
    ssize_t n = ::pwrite(fd, p, len, static_cast<off_t>(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return neg_errno();
    }
    if (n == 0) return -EIO;
    p += n;
    off += static_cast<uint64_t>(n);
    len -= static_cast<size_t>(n);
  }
  return 0;
}

int pwritev_full(int fd, struct iovec* iov, int iovcnt, uint64_t off) {
  while (iovcnt > 0) {
    ssize_t n = ::pwritev(fd, iov, iovcnt > 1024 ? 1024 : iovcnt, static_cast<off_t>(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return neg_errno();
    }
    if (n == 0) return -EIO;
    off += static_cast<uint64_t>(n);
    auto left = static_cast<size_t>(n);
    while (iovcnt > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      iov++;
      iovcnt--;
    }
    if (left) {
      iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return 0;
}

int sync_range(int fd, uint64_t off, uint64_t len, bool wait) {
  const unsigned flags = wait ? SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
                              : SYNC_FILE_RANGE_WRITE;
  for (;;) {
    if (::sync_file_range(fd, static_cast<off_t>(off), static_cast<off_t>(len), flags) == 0) return 0;
    if (errno != EINTR) return neg_errno();
  }
}

int datasync(int fd) {
  for (;;) {
    if (::fdatasync(fd) == 0) return 0;
    if (errno != EINTR) return neg_errno();
  }
}

int drop_cache(int fd, uint64_t off, uint64_t len) {
  int rc = ::posix_fadvise(fd, static_cast<off_t>(off), static_cast<off_t>(len), POSIX_FADV_DONTNEED);
  return rc ? -rc : 0;
}

int punch_hole(int fd, uint64_t off, uint64_t len) {
  for (;;) {
    if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off), static_cast<off_t>(len)) == 0)
      return 0;
    if (errno != EINTR) return neg_errno();
  }
}

int on_tmpfs(int fd) {
  struct statfs fs;
  if (::fstatfs(fd, &fs) != 0) return -errno;
  return fs.f_type == TMPFS_MAGIC ? 1 : 0;
}

int fs_full(int fd, bool write) {
  struct statfs fs;
  if (::fstatfs(fd, &fs) != 0) return -errno;
  if (!write && fs.f_type != TMPFS_MAGIC) return 0;
  return fs.f_blocks != 0 && fs.f_bavail == 0 ? 1 : 0;
}

}  // namespace pm::sys
