// A Region is one mapping's memory, owned once. The Mapping object, the ArrayBuffer handed to
// JavaScript and nothing else hold it; the memory is unmapped by Mapping.close() or, if the user
// never closes, when the last holder is collected. Native users that must not see the memory
// vanish (access jobs, fault rules that copy from it) take a pin: close() refuses while pinned.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace pm {

// Why device mappings of a range are being invalidated (the mmu notifier's event).
enum class InvalidateCause : uint32_t {
  kUnmap,        // munmap (Mapping.close)
  kRemap,        // mremap
  kProtect,      // mprotect
  kDiscard,      // madvise DONTNEED/REMOVE/FREE/PAGEOUT: the pages' contents may go
  kTruncate,     // ftruncate / fallocate punch hole on the backing file
  kWriteback,    // msync: writeback cleaning write-protects the pages
  kUffdEvent,    // an UNMAP/REMAP/REMOVE event the library observed after the fact
  kFork,         // fork: private pages become copy-on-write
  kCpuWrite,     // a CPU write fault on a page a device holds writable
  kCpuAccess,    // any CPU access to a page a device holds exclusively or in its memory
  kRelease,      // the device released its memory
  kAdvise,       // madvise that keeps the contents (PAGEOUT, COLLAPSE): entries go, data stays
};

const char* InvalidateCauseName(InvalidateCause c);

// Something that mirrors part of a Region (a device page table) and must drop its entries before
// the CPU side changes: the user-space mmu notifier.
class RangeNotifier {
 public:
  virtual ~RangeNotifier() = default;
  // invalidate_range_start: [start, end) in absolute addresses. Returns only when every entry for
  // the range is gone and no device access to it is in flight; until the matching end() no range
  // fault may program entries (the sequence-count protocol).
  virtual void invalidate_start(uint64_t start, uint64_t end, InvalidateCause cause) = 0;
  virtual void invalidate_end(uint64_t start, uint64_t end) = 0;
  // A writeback (msync) of [start, end) failed with -errno, between start() and end().
  virtual void writeback_error(uint64_t, uint64_t, int) {}
  // mremap, between invalidate_start and invalidate_end: the mapping now starts at new_addr and is
  // new_length bytes long (old_kept: MREMAP_DONTUNMAP left the old range mapped, empty or, for
  // shared memory, mapping the same pages). A mirror follows the mapping, as the kernel's mirror of
  // an address space sees the pages at their new address.
  virtual void remapped(uint64_t old_addr, uint64_t new_addr, uint64_t new_length, bool old_kept) {}
};

enum class RegionKind { kAnonymous, kMemfd, kFile };

struct Region {
  uint64_t id = 0;             // unique for the process's lifetime (addresses are reused; ids are not)
  uint64_t addr = 0;
  uint64_t length = 0;
  uint64_t page = 4096;        // the mapping's page size (2 MiB or 1 GiB for hugetlb)
  RegionKind kind = RegionKind::kAnonymous;
  bool shared = false;
  bool hugetlb = false;
  int fd = -1;                 // owned; -1 for anonymous memory
  uint64_t file_offset = 0;
  std::string path;            // for file mappings: the path as given (errors name it)
  std::string name;            // memfd name

  std::atomic<bool> closed{false};
  std::atomic<int> pins{0};         // access jobs and fault rules using this memory
  // The byte ranges those pins cover (under mu): a change to other parts need not wait for them.
  std::vector<std::pair<uint64_t, uint64_t>> pin_ranges;
  bool pinned_over(uint64_t off, uint64_t len);
  std::atomic<int> registered{0};   // userfaultfd registrations covering part of it
  // Those of them made through a Userfaultfd object, whose faults may need JavaScript to resolve
  // (the engine's are resolved by its native thread): a populate on the JavaScript thread must not
  // meet them (Mapping::CheckNoJsFault).
  std::atomic<int> js_registered{0};
  // Mirrors whose device holds its own copies of this file's pages on a file system userfaultfd
  // cannot register (ext4, xfs): the CPU's mapping would read stale pages, so JavaScript gets no
  // view of it; the CPU reaches the file through the mirror's read()/write().
  std::atomic<int> cpu_via_library{0};

  // Protection by segment: key = segment start offset, value = prot; a segment runs to the next
  // key. Few entries in practice (one per protect() boundary).
  std::mutex mu;
  std::map<uint64_t, int> prot;
  std::vector<std::pair<uint64_t, uint64_t>> holes;  // unmap()ed parts: offset, length

  // Mirrors of this memory, told before every CPU-side change the library makes.
  std::mutex notifiers_mu;
  std::vector<RangeNotifier*> notifiers;
  void add_notifier(RangeNotifier* n);
  void remove_notifier(RangeNotifier* n);
  // Invalidates [addr + off, addr + off + len) in every mirror until the returned scope ends (after
  // the CPU-side change). No-op without mirrors.
  class Invalidation {
   public:
    Invalidation(Region* r, uint64_t off, uint64_t len, InvalidateCause cause);
    ~Invalidation();
    Invalidation(const Invalidation&) = delete;
    Invalidation& operator=(const Invalidation&) = delete;
    void writeback_error(int err) {
      for (RangeNotifier* n : told_) n->writeback_error(start_, end_, err);
    }
    // After mremap: every notifier told at the start follows the move, and the end is reported at
    // the new address.
    void moved(uint64_t old_addr, uint64_t new_addr, uint64_t new_length, bool old_kept);
   private:
    std::vector<RangeNotifier*> told_;
    uint64_t start_, end_;
  };

  ~Region();
  void unmap_now();  // idempotent
  // The intersection of the protections over [off, off + len).
  int prot_over(uint64_t off, uint64_t len);
  void set_prot(uint64_t off, uint64_t len, int p);
  bool contains(uint64_t off, uint64_t len) const { return off <= length && len <= length - off; }
  // Whether the kernel lets this mapping ever be written (VM_MAYWRITE), which userfaultfd
  // registration requires: a shared mapping of a file opened read-only may not.
  bool may_write() const;
  // The EPERM hint for a registration refused because of that; nullptr when the mapping may be written.
  const char* not_writable_hint() const;
};

// RAII pin: keeps close() and shrinking operations away while native threads use the memory.
class RegionPin {
 public:
  // Pins [off, off + len) of the region (the whole of it by default).
  explicit RegionPin(std::shared_ptr<Region> r, uint64_t off = 0, uint64_t len = UINT64_MAX) : r_(std::move(r)) {
    std::lock_guard<std::mutex> lock(r_->mu);
    range_ = {off, len == UINT64_MAX ? r_->length - off : len};
    r_->pin_ranges.push_back(range_);
    r_->pins.fetch_add(1);
  }
  ~RegionPin() {
    if (!r_) return;
    std::lock_guard<std::mutex> lock(r_->mu);
    for (auto it = r_->pin_ranges.begin(); it != r_->pin_ranges.end(); ++it)
      if (*it == range_) {
        r_->pin_ranges.erase(it);
        break;
      }
    r_->pins.fetch_sub(1);
  }
  RegionPin(RegionPin&& o) noexcept : r_(std::move(o.r_)), range_(o.range_) {}
  RegionPin(const RegionPin&) = delete;
  RegionPin& operator=(const RegionPin&) = delete;
  Region* get() const { return r_.get(); }
 private:
  std::shared_ptr<Region> r_;
  std::pair<uint64_t, uint64_t> range_;
};

}  // namespace pm
