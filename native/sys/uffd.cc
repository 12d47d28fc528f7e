#include "uffd.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "mem.h"
#include "pagemap.h"
#include "uapi.h"

namespace pm::sys {

namespace {

int try_device(int flags, bool* ioctl_failed = nullptr) {
  int dev = ::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev < 0) return -errno;
  int fd = ::ioctl(dev, USERFAULTFD_IOC_NEW, flags);
  int err = fd < 0 ? -errno : 0;
  ::close(dev);
  if (ioctl_failed) *ioctl_failed = fd < 0;
  return fd < 0 ? err : fd;
}

int try_syscall(int flags) {
  long fd = ::syscall(SYS_userfaultfd, flags);
  return fd < 0 ? -errno : static_cast<int>(fd);
}

// A resolve ioctl: on failure the kernel stores partial progress (>0) or -errno in the result
// field. Report progress separately so callers can retry from where it stopped.
template <typename Arg>
int resolve(int fd, unsigned long request, Arg* arg, __s64* field, int64_t* done) {
  *field = 0;
  int rc = ::ioctl(fd, request, arg);
  int err = rc == 0 ? 0 : -errno;
  if (done) *done = *field > 0 ? *field : 0;
  return err;
}

}  // namespace

int uffd_is_userfaultfd(int fd, char* what, size_t what_len) {
  if (::fcntl(fd, F_GETFD) < 0) return -errno;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  ssize_t n = ::readlink(path, what, what_len - 1);
  if (n < 0) return -errno;
  what[n] = 0;
  return std::strcmp(what, "anon_inode:[userfaultfd]") == 0 ? 1 : 0;
}

int uffd_open(bool nonblocking, bool force_user_mode_only, UffdOpenResult* out) {
  const int base = O_CLOEXEC | (nonblocking ? O_NONBLOCK : 0);
  *out = UffdOpenResult{};
  int fd;
  if (!force_user_mode_only) {
    fd = try_device(base);
    if (fd >= 0) {
      out->fd = fd;
      out->opened_by = UffdOpenedBy::kDevice;
      return 0;
    }
    out->device_error = fd;
    fd = try_syscall(base);
    if (fd >= 0) {
      out->fd = fd;
      out->opened_by = UffdOpenedBy::kSyscall;
      return 0;
    }
    out->syscall_error = fd;
  }
  // The kernel-fault variants were refused (vm.unprivileged_userfaultfd=0 and no access to the
  // device node). User-mode-only faults are still allowed to anyone.
  fd = try_device(base | UFFD_USER_MODE_ONLY);
  if (fd >= 0) {
    out->fd = fd;
    out->opened_by = UffdOpenedBy::kDevice;
    out->user_mode_only = true;
    return 0;
  }
  if (!out->device_error) out->device_error = fd;
  fd = try_syscall(base | UFFD_USER_MODE_ONLY);
  if (fd >= 0) {
    out->fd = fd;
    out->opened_by = UffdOpenedBy::kSyscall;
    out->user_mode_only = true;
    return 0;
  }
  if (!out->syscall_error) out->syscall_error = fd;
  return fd;
}

int uffd_open_via(UffdVia via, bool nonblocking, bool user_mode_only, UffdOpenResult* out) {
  if (via == UffdVia::kAuto) return uffd_open(nonblocking, user_mode_only, out);
  const int flags = O_CLOEXEC | (nonblocking ? O_NONBLOCK : 0) | (user_mode_only ? UFFD_USER_MODE_ONLY : 0);
  *out = UffdOpenResult{};
  out->user_mode_only = user_mode_only;
  const bool device = via == UffdVia::kDevice;
  out->opened_by = device ? UffdOpenedBy::kDevice : UffdOpenedBy::kSyscall;
  const int fd = device ? try_device(flags, &out->device_ioctl_failed) : try_syscall(flags);
  if (fd >= 0) {
    out->fd = fd;
    return 0;
  }
  (device ? out->device_error : out->syscall_error) = fd;
  return fd;
}

int uffd_api(int fd, uint64_t features, uint64_t* out_features, uint64_t* out_ioctls) {
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = features;
  if (::ioctl(fd, UFFDIO_API, &api) != 0) return -errno;
  if (out_features) *out_features = api.features;
  if (out_ioctls) *out_ioctls = api.ioctls;
  return 0;
}

int uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t* out_ioctls) {
  uffdio_register reg{};
  reg.range.start = start;
  reg.range.len = len;
  reg.mode = mode;
  if (::ioctl(fd, UFFDIO_REGISTER, &reg) != 0) return -errno;
  if (out_ioctls) *out_ioctls = reg.ioctls;
  return 0;
}

int uffd_unregister(int fd, uint64_t start, uint64_t len) {
  uffdio_range range{start, len};
  if (::ioctl(fd, UFFDIO_UNREGISTER, &range) != 0) return -errno;
  // The kernel's own wake (a MISSING range only) runs before the VMA is write-locked, so a fault
  // taken under the per-VMA lock (Linux 6.6 on) can queue after it and sleep for good. Once
  // UNREGISTER returned, the write lock has waited that fault out: it is queued, and this wakes it.
  ::ioctl(fd, UFFDIO_WAKE, &range);
  return 0;
}

int uffd_wake(int fd, uint64_t start, uint64_t len) {
  uffdio_range range{start, len};
  return ::ioctl(fd, UFFDIO_WAKE, &range) == 0 ? 0 : -errno;
}

int uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t* done) {
  uffdio_copy arg{};
  arg.dst = dst;
  arg.src = src;
  arg.len = len;
  arg.mode = mode;
  return resolve(fd, UFFDIO_COPY, &arg, &arg.copy, done);
}

int uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t* done) {
  uffdio_zeropage arg{};
  arg.range = {start, len};
  arg.mode = mode;
  return resolve(fd, UFFDIO_ZEROPAGE, &arg, &arg.zeropage, done);
}

const void* zero_source() {
  alignas(kZeroSourceBytes) static const char zeros[kZeroSourceBytes] = {};
  return zeros;
}

int uffd_zero_fill(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t* done, uint64_t* markers) {
  const uint64_t page = page_size();
  const uint64_t src = reinterpret_cast<uint64_t>(zero_source());
  uint64_t filled = 0;
  if (markers) *markers = 0;
  for (;;) {
    int64_t d = 0;
    int rc = uffd_zeropage(fd, start + filled, len - filled, mode, &d);
    if (rc != -EEXIST) {
      if (done) *done = static_cast<int64_t>(rc == 0 ? len : filled + static_cast<uint64_t>(d));
      return rc;
    }
    filled += static_cast<uint64_t>(d);
    int64_t c = 0;
    rc = page > kZeroSourceBytes ? -EINVAL
         : uffd_copy(fd, start + filled, src, page, (mode & UFFDIO_ZEROPAGE_MODE_DONTWAKE) | UFFDIO_COPY_MODE_WP, &c);
    if (rc == -EINVAL) rc = -EEXIST;  // no WP registration, so no marker: the page is present
    if (rc) {
      if (done) *done = static_cast<int64_t>(filled);
      return rc;
    }
    filled += page;
    if (markers) ++*markers;
    if (filled >= len) {
      if (done) *done = static_cast<int64_t>(len);
      return 0;
    }
  }
}

int uffd_zero_fill_shmem(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t* done, uint64_t* markers) {
  constexpr uint64_t kUffdWpBit = 1ull << 57;
  const uint64_t page = page_size();
  const uint64_t src = reinterpret_cast<uint64_t>(zero_source());
  const uint64_t copy_mode = (mode & UFFDIO_ZEROPAGE_MODE_DONTWAKE) | UFFDIO_COPY_MODE_WP;
  if (len % page || start % page) return uffd_zero_fill(fd, start, len, mode, done, markers);  // the kernel's EINVAL
  uint64_t entries[64];  // on the stack: the fault service calls this and must not allocate
  uint64_t filled = 0, found = 0;
  int rc = 0;
  while (filled < len && rc == 0) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>((len - filled) / page, 64));
    rc = pagemap_read(start + filled, n, entries);
    auto is_marker = [&](size_t k) { return (entries[k] & kUffdWpBit) && !(entries[k] & kPagemapPresent); };
    for (size_t i = 0; i < n && rc == 0;) {
      const bool marker = is_marker(i);
      size_t j = i + 1;
      while (j < n && is_marker(j) == marker) j++;
      const uint64_t at = start + filled, run = (j - i) * page;
      int64_t d = 0;
      uint64_t m = 0;
      if (marker) {
        rc = uffd_copy(fd, at, src, page, copy_mode, &d);
        if (rc == 0) {
          found++;
          filled += page;
          i++;
          continue;
        }
      } else {
        rc = uffd_zero_fill(fd, at, run, mode, &d, &m);
        found += m;
      }
      filled += rc == 0 ? run : static_cast<uint64_t>(d);
      i = j;
    }
  }
  if (markers) *markers = found;
  if (done) *done = static_cast<int64_t>(rc == 0 ? len : filled);
  return rc;
}

int uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t* done) {
  uffdio_continue arg{};
  arg.range = {start, len};
  arg.mode = mode;
  return resolve(fd, UFFDIO_CONTINUE, &arg, &arg.mapped, done);
}

int uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t* done) {
  uffdio_move arg{};
  arg.dst = dst;
  arg.src = src;
  arg.len = len;
  arg.mode = mode;
  return resolve(fd, UFFDIO_MOVE, &arg, &arg.move, done);
}

int uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t* done) {
  uffdio_poison arg{};
  arg.range = {start, len};
  arg.mode = mode;
  return resolve(fd, UFFDIO_POISON, &arg, &arg.updated, done);
}

int uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode) {
  uffdio_writeprotect arg{};
  arg.range = {start, len};
  arg.mode = mode;
  return ::ioctl(fd, UFFDIO_WRITEPROTECT, &arg) == 0 ? 0 : -errno;
}

}  // namespace pm::sys
