#include "pagemap.h"

#include <cerrno>
#include <fcntl.h>
#include <mutex>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include "mem.h"
#include "uapi.h"

namespace pm::sys {

namespace {

// One descriptor per process: /proc/self is resolved at open time, so a forked child must
// reopen rather than read its parent's page table.
int pagemap_fd() {
  static std::mutex mu;
  static int fd = -1;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lock(mu);
  pid_t me = ::getpid();
  if (fd >= 0 && owner == me) return fd;
  if (fd >= 0) ::close(fd);
  fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  owner = me;
  return fd >= 0 ? fd : -errno;
}

}  // namespace

int pagemap_read(uint64_t addr, size_t npages, uint64_t* out) {
  int fd = pagemap_fd();
  if (fd < 0) return fd;
  return pagemap_read_fd(fd, addr, npages, out);
}

int pagemap_read_fd(int fd, uint64_t addr, size_t npages, uint64_t* out) {
  const uint64_t page = page_size();
  size_t want = npages * sizeof(uint64_t);
  off_t off = static_cast<off_t>(addr / page * sizeof(uint64_t));
  char* dst = reinterpret_cast<char*>(out);
  while (want > 0) {
    ssize_t n = ::pread(fd, dst, want, off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) return -EIO;
    dst += n;
    want -= static_cast<size_t>(n);
    off += n;
  }
  return 0;
}

long pagemap_scan(const ScanRequest& req, std::vector<ScanRegion>* regions, uint64_t* walk_end) {
  int fd = pagemap_fd();
  if (fd < 0) return fd;
  regions->resize(req.max_regions ? req.max_regions : 1);
  long n = pagemap_scan_fd(fd, req, regions->data(), walk_end);
  regions->resize(n < 0 ? 0 : static_cast<size_t>(n));
  return n;
}

long pagemap_scan_fd(int fd, const ScanRequest& req, ScanRegion* regions, uint64_t* walk_end) {
  static_assert(sizeof(ScanRegion) == sizeof(page_region), "ScanRegion is the kernel's page_region");
  pm_scan_arg arg{};
  arg.size = sizeof(arg);
  arg.flags = req.flags;
  arg.start = req.start;
  arg.end = req.end;
  arg.vec = reinterpret_cast<uint64_t>(regions);
  arg.vec_len = req.max_regions;
  arg.max_pages = req.max_pages;
  arg.category_inverted = req.category_inverted;
  arg.category_mask = req.category_mask;
  arg.category_anyof_mask = req.category_anyof_mask;
  arg.return_mask = req.return_mask;
  long n;
  do {
    n = ::ioctl(fd, PAGEMAP_SCAN, &arg);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return -errno;
  if (walk_end) *walk_end = arg.walk_end;
  return n;
}

static void fill(const struct statx& sx, StatxInfo* out) {
  out->size = sx.stx_size;
  out->blocks = sx.stx_blocks;
  out->attributes = sx.stx_attributes;
  out->attributes_mask = sx.stx_attributes_mask;
  out->blksize = sx.stx_blksize;
  out->mode = sx.stx_mode;
  out->dev_major = sx.stx_dev_major;
  out->dev_minor = sx.stx_dev_minor;
  out->dax = (sx.stx_attributes & STATX_ATTR_DAX) != 0;
}

int statx_path(const char* path, StatxInfo* out) {
  struct statx sx{};
  if (::statx(AT_FDCWD, path, 0, STATX_BASIC_STATS, &sx) != 0) return -errno;
  fill(sx, out);
  return 0;
}

int statx_fd(int fd, StatxInfo* out) {
  struct statx sx{};
  if (::statx(fd, "", AT_EMPTY_PATH, STATX_BASIC_STATS, &sx) != 0) return -errno;
  fill(sx, out);
  return 0;
}

int fs_type(const char* path, uint64_t* out) {
  struct statfs sf{};
  if (::statfs(path, &sf) != 0) return -errno;
  *out = static_cast<uint64_t>(sf.f_type);
  return 0;
}

int fs_type_fd(int fd, uint64_t* out) {
  struct statfs sf{};
  if (::fstatfs(fd, &sf) != 0) return -errno;
  *out = static_cast<uint64_t>(sf.f_type);
  return 0;
}

}  // namespace pm::sys
