#include "mem.h"

#include <cerrno>
#include <cstdio>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "uapi.h"

namespace pm::sys {

static inline int neg_errno() { return -errno; }

int map(void** out, void* hint, size_t length, int prot, int flags, int fd, off_t offset) {
  void* p = ::mmap(hint, length, prot, flags, fd, offset);
  if (p == MAP_FAILED) return neg_errno();
  *out = p;
  return 0;
}

int unmap(void* addr, size_t length) { return ::munmap(addr, length) == 0 ? 0 : neg_errno(); }

int protect(void* addr, size_t length, int prot) {
  return ::mprotect(addr, length, prot) == 0 ? 0 : neg_errno();
}

int advise(void* addr, size_t length, int advice) {
  // MADV_POPULATE_* returns EINTR when a signal arrives mid-way; the call is restartable.
  for (;;) {
    if (::madvise(addr, length, advice) == 0) return 0;
    if (errno != EINTR) return neg_errno();
  }
}

int sync(void* addr, size_t length, int flags) {
  return ::msync(addr, length, flags) == 0 ? 0 : neg_errno();
}

int remap(void** out, void* old_addr, size_t old_length, size_t new_length, int flags, void* new_addr) {
  void* p = ::mremap(old_addr, old_length, new_length, flags, new_addr);
  if (p == MAP_FAILED) return neg_errno();
  *out = p;
  return 0;
}

int residency(void* addr, size_t length, unsigned char* vec) {
  return ::mincore(addr, length, vec) == 0 ? 0 : neg_errno();
}

int allocate(int fd, int mode, off_t offset, off_t length) {
  for (;;) {
    if (::fallocate(fd, mode, offset, length) == 0) return 0;
    if (errno != EINTR) return neg_errno();
  }
}

int cachestat(int fd, uint64_t offset, uint64_t length, CacheStat* out) {
  pm_cachestat_range range{offset, length};
  pm_cachestat cs{};
  if (::syscall(__NR_cachestat, fd, &range, &cs, 0) != 0) return neg_errno();
  *out = CacheStat{cs.nr_cache, cs.nr_dirty, cs.nr_writeback, cs.nr_evicted, cs.nr_recently_evicted};
  return 0;
}

int memfd(int* out, const char* name, unsigned flags) {
  int fd = ::memfd_create(name, flags);
  if (fd < 0) return neg_errno();
  *out = fd;
  return 0;
}

int open_file(int* out, const char* path, int flags, mode_t mode) {
  for (;;) {
    int fd = ::open(path, flags | O_CLOEXEC, mode);
    if (fd >= 0) {
      *out = fd;
      return 0;
    }
    if (errno != EINTR) return neg_errno();
  }
}

int file_size(int fd, uint64_t* out) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return neg_errno();
  *out = static_cast<uint64_t>(st.st_size);
  return 0;
}

int truncate_fd(int fd, uint64_t length) {
  for (;;) {
    if (::ftruncate(fd, static_cast<off_t>(length)) == 0) return 0;
    if (errno != EINTR) return neg_errno();
  }
}

int close_fd(int fd) { return ::close(fd) == 0 ? 0 : neg_errno(); }

size_t page_size() {
  static const size_t size = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  return size;
}

int memory_available(uint64_t* bytes) {
  FILE* f = ::fopen("/proc/meminfo", "re");
  if (!f) return -errno;
  char line[256];
  unsigned long long kb = 0, avail = 0, swap = 0;
  int seen = 0;
  while (::fgets(line, sizeof line, f)) {
    if (std::sscanf(line, "MemAvailable: %llu kB", &kb) == 1) avail = kb, seen |= 1;
    else if (std::sscanf(line, "SwapFree: %llu kB", &kb) == 1) swap = kb, seen |= 2;
  }
  ::fclose(f);
  if (!(seen & 1)) return -ENODATA;
  *bytes = (avail + swap) * 1024;
  return 0;
}

}  // namespace pm::sys
