// /proc/self/pagemap, the PAGEMAP_SCAN ioctl and statx: how the kernel sees our pages and files.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pm::sys {

// Raw 64-bit pagemap entries, one per page of [addr, addr + npages * page). Bits: 63 present,
// 62 swapped, 61 file/shared-anon, 57 uffd-wp, 56 exclusively mapped, 55 soft-dirty; the PFN
// (bits 0-54) reads as zero without CAP_SYS_ADMIN.
int pagemap_read(uint64_t addr, size_t npages, uint64_t* out);
// The same through a descriptor of /proc/self/pagemap the caller opened: takes no lock (a forked
// child must not wait for a lock another thread of its parent held at fork time).
int pagemap_read_fd(int fd, uint64_t addr, size_t npages, uint64_t* out);

struct ScanRegion {
  uint64_t start, end, categories;
};
struct ScanRequest {
  uint64_t start = 0, end = 0;
  uint64_t flags = 0;  // PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
  uint64_t max_pages = 0;
  uint64_t category_inverted = 0, category_mask = 0, category_anyof_mask = 0, return_mask = 0;
  size_t max_regions = 0;
};
// PAGEMAP_SCAN (6.7+). Returns the number of regions found (>= 0) and fills *regions and
// *walk_end (where the walk stopped: the end, or earlier when max_pages/max_regions ran out).
// Errors: -ENOTTY (kernel lacks the ioctl), -EINVAL (bad masks, or WP_MATCHING on memory not
// registered for uffd-wp), -EFAULT, -EPERM.
long pagemap_scan(const ScanRequest& req, std::vector<ScanRegion>* regions, uint64_t* walk_end);
// The same on a pagemap the caller opened (/proc/PID/pagemap of another process), into regions
// the caller sized (at least req.max_regions): allocates nothing.
long pagemap_scan_fd(int fd, const ScanRequest& req, ScanRegion* regions, uint64_t* walk_end);

struct StatxInfo {
  uint64_t size = 0, blocks = 0, attributes = 0, attributes_mask = 0;
  uint32_t blksize = 0, mode = 0, dev_major = 0, dev_minor = 0;
  bool dax = false;
};
int statx_path(const char* path, StatxInfo* out);
int statx_fd(int fd, StatxInfo* out);
// statfs f_type (TMPFS_MAGIC, EXT4_SUPER_MAGIC...).
int fs_type(const char* path, uint64_t* out);
int fs_type_fd(int fd, uint64_t* out);
// Pagemap entry bits the engine decides by.
constexpr uint64_t kPagemapPresent = 1ull << 63;
constexpr uint64_t kPagemapFile = 1ull << 61;  // a page-cache page or shared anonymous memory
// Present and anonymous: in a MAP_PRIVATE file mapping, a page the CPU copied on write.
inline bool pagemap_anon_present(uint64_t e) { return (e & kPagemapPresent) && !(e & kPagemapFile); }

}  // namespace pm::sys
