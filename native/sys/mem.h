// Plain wrappers over the memory-management system calls. No Node-API here: each call returns
// 0 (or a non-negative value) on success and -errno on failure, so the binding layer decides how
// to report it and the benchmarks can call the same code without a JavaScript engine.
#pragma once

#include <cstddef>
#include <cstdint>
#include <sys/types.h>

namespace pm::sys {

// mmap; returns the address through *out. Errors: -EINVAL (bad flags/length/offset), -ENOMEM,
// -EACCES (fd opened without the access asked for), -ENODEV (fs cannot mmap), -EOPNOTSUPP
// (MAP_SYNC on a non-DAX file).
int map(void** out, void* hint, size_t length, int prot, int flags, int fd, off_t offset);
int unmap(void* addr, size_t length);
// -EINVAL (unaligned), -ENOMEM (range not mapped), -EACCES (file opened read-only, PROT_WRITE).
int protect(void* addr, size_t length, int prot);
// -EINVAL (advice not supported for this mapping), -ENOMEM, -EAGAIN, -EPERM, -EFAULT
// (POPULATE on PROT_NONE / failing fault), -EHWPOISON.
int advise(void* addr, size_t length, int advice);
int sync(void* addr, size_t length, int flags);
// mremap; the new address through *out.
int remap(void** out, void* old_addr, size_t old_length, size_t new_length, int flags, void* new_addr);
// mincore; vec must hold one byte per page.
int residency(void* addr, size_t length, unsigned char* vec);
int allocate(int fd, int mode, off_t offset, off_t length);
// What more memory the system can give before the OOM killer must: MemAvailable + SwapFree of
// /proc/meminfo, in bytes. Errors: those of reading it, -ENODATA if it lacks them.
int memory_available(uint64_t* bytes);

struct CacheStat {
  uint64_t cache, dirty, writeback, evicted, recently_evicted;
};
// cachestat(2) (6.5+); -ENOSYS where the kernel lacks it.
int cachestat(int fd, uint64_t offset, uint64_t length, CacheStat* out);

// memfd_create; the fd through *out. flags are MFD_*.
int memfd(int* out, const char* name, unsigned flags);
int open_file(int* out, const char* path, int flags, mode_t mode);
int file_size(int fd, uint64_t* out);
int truncate_fd(int fd, uint64_t length);
int close_fd(int fd);

size_t page_size();

}  // namespace pm::sys
