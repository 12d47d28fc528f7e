// A user-space pager: the pages of a region are filled on demand from a file (or a fill rule),
// the resident set is bounded, and dirty pages go back to the file before they are dropped. The
// fault service calls resolve() on its thread(s) for every fault in the region (a handler rule);
// flush() and prefetch() run on native job threads. Plain C++ over native/sys, no Node-API.
//
// Modes:
//   private   the region is private anonymous memory registered MISSING|WP. A MISSING fault
//             preads the granule from the file and installs it write-protected (UFFDIO_COPY with
//             MODE_WP); the first write to a clean granule is a WP fault that marks it dirty and
//             lifts the protection. Dirty granules are written to the file (pwrite) on eviction,
//             flush() and close(); with a swap_fd (write-back off) to that memfd on eviction only.
//             A fill that reads short (the file was truncated) poisons the pages past its end, and
//             write-back never writes past the file's current end (see docs/pager.md).
//   shared    (tmpfs, memfd) the region maps the file itself, registered MISSING|MINOR: a MINOR
//             fault maps the page cache's pages (UFFDIO_CONTINUE), a MISSING fault (a hole)
//             allocates a zeroed page in the file. Writes land in the file's own pages, so
//             eviction only unmaps (MADV_DONTNEED) and there is nothing to write back.
//   anonymous private mode over an internal memfd: a granule never written back is filled by the
//             rule (zeros, or the word pattern seed + word index) or by the caller's callback.
//
// The eviction protocol (why no write is lost to a concurrent writer): see pager.cc, evict_batch().
#pragma once

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "../sys/fault_service.h"

namespace pm::engine {

enum class PagerMode { kPrivate, kShared, kAnonymous };
enum class EvictPolicy { kFifo, kClock };
enum class FillRule { kZero, kPattern, kCallback };

struct PagerConfig {
  uint64_t base = 0;            // region start (granule aligned in private/anonymous mode)
  uint64_t length = 0;          // region bytes (a multiple of the granule)
  uint64_t data_length = 0;     // bytes backed by the file: writes past it are not written back
  uint64_t granule = 4096;
  uint64_t page = 4096;
  int fd = -1;                  // owned: the file, or the anonymous mode's memfd
  // Owned; private mode with write-back off: dirty granules are evicted to this memfd and filled
  // back from it, so writes never reach the file (MAP_PRIVATE). -1: write-back to fd.
  int swap_fd = -1;
  uint64_t file_offset = 0;
  PagerMode mode = PagerMode::kPrivate;
  uint64_t resident_limit = 0;  // granules; 0 = unbounded
  EvictPolicy policy = EvictPolicy::kFifo;
  uint64_t prefetch_max = 0;    // granules of sequential read-ahead at most; 0 = none
  FillRule fill = FillRule::kZero;
  uint64_t seed = 0;
  bool confirm_writes = true;   // a written granule is clean only after a sync_file_range wait
  std::string path;             // for errors
};

struct PagerStats {
  uint64_t faults = 0, missing = 0, wp = 0, minor = 0;
  uint64_t fills = 0, fill_bytes = 0, prefetched = 0;  // granules installed; of them, read ahead
  uint64_t evictions = 0, evict_aborts = 0;            // granules dropped; evictions undone by a write
  uint64_t writebacks = 0, writeback_bytes = 0, waits = 0;
  uint64_t resident = 0, dirty = 0, limit = 0;
  uint64_t write_errors = 0, fill_errors = 0;
  uint64_t short_fills = 0;  // fills that found the file shorter than at pager() (pages past its end poisoned)
  uint64_t discarded = 0;    // dirty granules given up by acknowledge_loss()
  uint64_t lost = 0;         // 'pagecache': evicted granules whose write flush()'s fdatasync found failed
  uint64_t fill_ns = 0, writeback_ns = 0;
};

// A write that no wait confirmed: the granules stay resident and dirty.
struct PagerWriteError {
  int err = 0;                  // -errno
  const char* syscall = "";
  std::vector<uint64_t> granules;
  // Set when the granules hold data past the end of a file truncated under the pager (err is
  // -ENXIO): write-back does not grow the file back over a truncation. The file's size then.
  uint64_t file_size = UINT64_MAX;
  // writeback 'pagecache': granules written back and evicted before flush()'s fdatasync found
  // that the kernel's write of them failed. No copy is left in the pager (the kernel marks the
  // pages clean after a failed writeback): the file may not hold what was written to them.
  std::vector<uint64_t> lost;
};

class Pager : public sys::FaultHandler {
 public:
  // Resolving handler error: the fault goes to JavaScript (the fill callback).
  static constexpr int kForward = -ENOEXEC;

  explicit Pager(PagerConfig cfg);
  ~Pager() override;
  Pager(const Pager&) = delete;
  Pager& operator=(const Pager&) = delete;

  void set_uffd(int uffd) { uffd_.store(uffd); }
  const PagerConfig& config() const { return cfg_; }

  // sys::FaultHandler: called on the fault service's thread(s).
  int resolve(int uffd, const sys::FaultMsg& msg, uint64_t* pages) override;

  // Installs data (one granule, from the fill callback) at granule g, as a fill would.
  int install(uint64_t g, const uint8_t* data);
  // Poisons the page at addr (a fill that could not be done): the access gets SIGBUS, not zeros.
  int poison(uint64_t addr);
  // Writes every dirty granule back and waits for it, after the dirty fills in progress end (a
  // fill wakes its writer before it marks the granule resident). 0, or -errno with *out filled.
  int flush(PagerWriteError* out);
  // Fills the absent granules of [g0, g1) (a hint): returns granules filled, or -errno.
  int64_t prefetch(uint64_t g0, uint64_t g1);
  PagerStats stats();
  // The first write error not yet reported by flush() (sticky until a flush succeeds).
  bool last_error(PagerWriteError* out);
  // Gives up the granules the sticky error kept dirty (dropped: their next access reads the file)
  // and clears it, so that close() can succeed. false when there is no error.
  bool acknowledge_loss(PagerWriteError* out);
  // Closes the descriptor; later faults are forwarded (the binding closes the userfaultfd first).
  void close();

 private:
  enum : uint8_t { kAbsent = 0, kFilling = 1, kResident = 2, kBusy = 3, kStateMask = 3,
                   kDirty = 4, kRef = 8, kBacked = 16, kShort = 32,
                   // writeback 'pagecache': written back to the page cache since the last flush()
                   // whose fdatasync succeeded, so not yet known to be on disk
                   kUnconfirmed = 64 };
  uint8_t st(uint64_t g) const { return state_[g] & kStateMask; }
  void set_st(uint64_t g, uint8_t s) { state_[g] = static_cast<uint8_t>((state_[g] & ~kStateMask) | s); }
  uint64_t addr_of(uint64_t g) const { return cfg_.base + g * cfg_.granule; }
  // Calls fn(first, count) for each run of adjacent granules of sorted gs: one ioctl or madvise
  // per run instead of per granule (each is a page-table walk and a TLB flush).
  template <typename Fn>
  static void for_each_run(const std::vector<uint64_t>& gs, Fn fn) {
    for (size_t i = 0; i < gs.size();) {
      size_t j = i + 1;
      while (j < gs.size() && gs[j] == gs[j - 1] + 1) j++;
      fn(gs[i], j - i);
      i = j;
    }
  }
  void protect_runs(int uffd, const std::vector<uint64_t>& sorted);
  static void forget_failed_pages(int fd, uint64_t off, uint64_t len);
  // The state bits an absent granule keeps: kBacked, and kShort with it when the copy is in the
  // swap memfd (its refill poisons past the end it found again); from the file, a refill finds it.
  uint8_t absent(uint8_t s) const {
    return static_cast<uint8_t>(s & ((cfg_.swap_fd >= 0 && (s & kBacked) ? kBacked | kShort : kBacked) | kUnconfirmed));
  }

  int resolve_missing(int uffd, uint64_t g, uint64_t page_addr, bool write);
  int resolve_wp(int uffd, uint64_t g, uint64_t page_addr);
  int resolve_shared_page(int uffd, uint64_t page_addr);
  // Fills granule g (state already kFilling) from the file, the rule or `data`. 0, 1 (shared
  // mode: some pages were holes and stay unmapped), or -errno (the granule is absent again).
  int fill(int uffd, uint64_t g, const uint8_t* data, bool prefetched);
  void unfill(int uffd, uint64_t g);
  void count_fill(bool prefetched, int64_t n);
  int64_t prefetch_range(int uffd, uint64_t g0, uint64_t g1, bool stream);
  // false when it could not get under the limit (every resident granule pinned, being filled or
  // written by others, or the file refuses writes).
  bool make_room(int uffd);
  int evict_batch(int uffd, size_t want);
  bool pick_victims(int uffd, size_t want, std::vector<uint64_t>* out);
  int write_back(const std::vector<uint64_t>& gs, PagerWriteError* err);
  void read_ahead(int uffd, uint64_t g);
  uint8_t* buffer();
  // Progress guarantee (mu_ held): the granule each faulting thread last faulted on is not evicted
  // until that thread faults again or exits. See docs/pager.md, "Progress".
  void pin(uint32_t tid, uint64_t g);
  bool pinned(uint64_t g);

  PagerConfig cfg_;
  std::atomic<int> uffd_{-1};
  std::atomic<bool> closed_{false};
  const uint64_t ngran_;

  // mu_ guards the granule states, the FIFO, the clock hand, stats and the stream. It is held
  // across the few ioctls that must be atomic with a state change (unprotect with dirty, the
  // drop with its re-check), never across file I/O.
  std::mutex mu_;
  std::vector<uint8_t> state_;
  std::deque<uint64_t> fifo_;
  uint64_t hand_ = 0;
  uint64_t resident_ = 0, filling_ = 0, dirty_ = 0;
  PagerStats stats_;
  uint64_t next_expected_ = UINT64_MAX, window_ = 0;
  PagerWriteError sticky_;
  // Granules filled from a file shorter than at pager() (kShort): the file's bytes in them then.
  // Write-back never writes past that (the pages past it are poisoned). Filled on that rare path only.
  std::map<uint64_t, uint64_t> short_;
  bool has_error_ = false;
  // Signalled (under mu_) when a fill ends: flush() waits on it for fills whose faulter may
  // already have written (see flush()).
  std::condition_variable filled_;
  // The pins: at most kMaxPins threads (the oldest pin gives way to a new thread past that).
  // Reserved up front: a fault service worker must not allocate.
  static constexpr size_t kMaxPins = 64;
  struct Pin {
    uint32_t tid;
    uint64_t g, seq;
  };
  std::vector<Pin> pins_;
  uint64_t pin_seq_ = 0;

  // Held by whoever writes back (evictions, flush): one writer at a time, so a granule that one
  // has taken for writing is never dropped or written by another.
  std::mutex wb_mu_;
};

}  // namespace pm::engine
