// Mirror: one device's page table over a range of a Region (HMM's mirror). One 8-byte entry per
// page, in blocks of 512 allocated on first use (page_table.h); device threads read entries without
// locks and pin the 2 MiB block they access, so an invalidation can clear entries and then wait for
// exactly the accesses in flight on its range.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "region.h"
#include "page_table.h"

namespace pm::engine {

class Device;

// What moved a page (the trace's migration trigger).
enum class Trigger : uint32_t { kExplicit, kDeviceFault, kCpuFault, kPrefetch, kEviction, kRelease, kFork, kCount };
const char* TriggerName(Trigger t);

// Entry bits. The slot (device memory page) sits above kSlotShift.
enum : uint64_t {
  kValid = 1ull << 0,
  kWrite = 1ull << 1,
  kAtomic = 1ull << 2,   // exclusive: any CPU access revokes it
  kDirty = 1ull << 3,    // the device wrote through this entry
  kOnDevice = 1ull << 4, // the data lives in device memory (slot), not in the host page
  kAccessed = 1ull << 5, // the device accessed the page since eviction last looked (LRU)
  kPinned = 1ull << 6,   // pin mode: the device kept its own page when the CPU side changed
  kSole = 1ull << 7,     // bounce: the file has no copy of this page (its host page was freed)
  // Moved into device memory as part of one whole 2 MiB unit (a THP, or a range never touched), in
  // consecutive slots: while the unit stays whole, snapshot() reports PMD, as the kernel's device
  // reports a THP it migrated whole.
  kUnit = 1ull << 16,
  kSlotShift = 20,
};

// How a mirror of a file's pages keeps the page cache, writeback and truncate right (the seeds'
// four answers). kNone: not a file strategy (anonymous memory, or a plain mirror).
enum class FileStrategy : uint8_t { kNone, kRemote, kCopy, kBounce, kPin };
const char* FileStrategyName(FileStrategy s);
// Where writeback takes the consistent image of a page the device keeps writing (copy, bounce).
// kPageCache: the page-cache page pwrite fills is the bounce page; the device's write access to the
// pages being written is held back while pwrite copies them. kBuffer: a private bounce buffer; the
// device waits only for a memcpy into it, then the buffer is written (one more copy). Pin always
// writes the shared page itself, held stable while the kernel writes it (see mirror_file.cc).
enum class SnapshotMode : uint8_t { kPageCache, kBuffer };

struct FileOptions {
  FileStrategy strategy = FileStrategy::kRemote;
  SnapshotMode snapshot = SnapshotMode::kPageCache;
  uint64_t writeback_interval_ms = 0;  // periodic writeback; 0 = only when asked
  uint64_t chunk_pages = 64;           // pages per snapshot/write step (bounds a device stall)
};

struct FileStats {
  std::atomic<uint64_t> loaded_pages{0};     // A copied to A' (copy, bounce)
  std::atomic<uint64_t> freed_pages{0};      // host pages given up after loading (bounce)
  std::atomic<uint64_t> pulled_back{0};      // device pages brought back by a CPU fault or library I/O
  std::atomic<uint64_t> shared_reads{0};     // CPU read faults served from A, write-protected, the device keeping its clean A'
  std::atomic<uint64_t> writebacks{0};       // writeback passes (periodic, fsync, msync, lease, close)
  std::atomic<uint64_t> written_pages{0};    // pages written to the file by the library
  std::atomic<uint64_t> snapshot_bytes{0};   // bytes copied into private bounce buffers (snapshot 'buffer')
  std::atomic<uint64_t> io_read_bytes{0};    // library read()
  std::atomic<uint64_t> io_write_bytes{0};   // library write()
  std::atomic<uint64_t> lease_breaks{0};
  std::atomic<uint64_t> writeback_ns{0};
  std::atomic<uint64_t> store_errors{0};     // a device copy could not be written to the file (it stayed on the device)
  std::atomic<uint64_t> write_errors{0};     // writeback errors the kernel reported to a wait (sync_file_range, fdatasync, msync)
};

// What is known about a write error: the page counts, the call that reported it, and runs of pages.
struct WriteErrorReport {
  int error = 0;                 // -errno of the cause
  const char* syscall = nullptr;  // the call that reported it
  uint64_t pages = 0;
  std::vector<std::pair<uint64_t, uint64_t>> runs;  // [first, last) page runs of the mirror
  void add(uint64_t i) {
    pages++;
    if (!runs.empty() && runs.back().second == i) runs.back().second++;
    else runs.push_back({i, i + 1});
  }
};

struct MirrorStats {
  std::atomic<uint64_t> invalidations{0};     // invalidate_start calls that hit this mirror
  std::atomic<uint64_t> invalidated_pages{0}; // valid entries cleared
  std::atomic<uint64_t> range_faults{0};
  std::atomic<uint64_t> retries{0};           // range faults retried because an invalidation raced
};

class Mirror : public RangeNotifier {
 public:
  static constexpr unsigned kBlockShift = PageTable::kBlockShift;  // 512 pages: one in-flight counter per 2 MiB (4 KiB pages)

  Mirror(Device* device, std::shared_ptr<Region> region, uint64_t offset, uint64_t length);
  ~Mirror() override;

  // Unhooks from the region and waits for in-flight accesses. Idempotent.
  void detach();
  // Users outside the owner (the engine's and a device's snapshots of their mirror lists) take a
  // reference under their list's lock; detach() waits until none is left before the mirror goes.
  void acquire() { users_.fetch_add(1, std::memory_order_acq_rel); }
  void release() { users_.fetch_sub(1, std::memory_order_acq_rel); }
  // detach() ran: by the mirror's own close, its mapping's close, or the environment's teardown.
  bool closed() const { return !attached_.load(std::memory_order_acquire); }
  // Detached, or its whole range unmapped (a mapping that moves takes its mirrors along: remapped()).
  bool dead() const { return dead_.load(std::memory_order_acquire); }

  Device* device() const { return device_; }
  Region* region() const { return region_.get(); }
  uint64_t start() const { return start_; }
  uint64_t npages() const { return npages_; }
  uint64_t page() const { return page_; }
  uint64_t entry(uint64_t i) const { return pt_[i].load(std::memory_order_acquire); }
  // What the page table really holds (blocks are allocated where entries were programmed).
  size_t table_bytes() const { return pt_.bytes(); }
  // False when even the table's top level could not be allocated: detach() and drop the mirror.
  bool table_ok() const { return pt_.ok(); }
  const MirrorStats& stats() const { return stats_; }

  // hmm_range_fault: makes the CPU side present for [first, last) with the permission asked for and
  // programs the entries, retrying while invalidations race it, up to timeout_ms (then -EBUSY).
  // Errors: -EPERM (write to a range without write permission), -EFAULT (no mapping, PROT_NONE,
  // mirror detached), -EBUSY.
  int range_fault(uint64_t first, uint64_t last, bool write, int timeout_ms);

  // The device-side access protocol: pin the page's block, check the entry, get a pointer.
  // Returns nullptr (and leaves nothing pinned) if the entry does not allow the access.
  void* pin(uint64_t i, bool write);
  void unpin(uint64_t i) { pt_.block(i)->inflight.fetch_sub(1, std::memory_order_release); }
  void mark_dirty(uint64_t i);

  // RangeNotifier
  void invalidate_start(uint64_t start, uint64_t end, InvalidateCause cause) override;
  void invalidate_end(uint64_t start, uint64_t end) override;
  // Invalidates every entry of the mirror wherever its mapping is when the change lock is taken:
  // a range computed from start() before that could name the old place of a mapping an mremap
  // just moved, and invalidate nothing.
  void invalidate_whole(InvalidateCause cause) {
    invalidate_start(0, UINT64_MAX, cause);
    invalidate_end(0, UINT64_MAX);
  }
  void remapped(uint64_t old_addr, uint64_t new_addr, uint64_t new_length, bool old_kept) override;

  // Pages in [first, last) still held exclusively.
  uint64_t count_exclusive(uint64_t first, uint64_t last) const;
  // Serialises with migrations and invalidations of this mirror (the engine's fault handler takes
  // it before deciding what a CPU fault on a mirrored page means).
  std::mutex& change_mutex() { return change_mu_; }
  bool covers(uint64_t addr) const { return addr >= start_ && addr < start_ + npages_ * page_; }
  // Single-writer mode: the device and the CPU never hold write access to a page at once. Device
  // write access write-protects the CPU's PTE (uffd-wp); a CPU write then faults and the engine
  // revokes the device's write access first. Registers the range with the engine. -errno on failure.
  int enable_single_writer();
  // Pin mode (long-term GUP): the whole range is faulted in for write now and never invalidated.
  // When the CPU side changes (discard, unmap, truncate, protect), the device keeps the page it
  // had, as a pinned page stays with its holder, in a page of device memory: from then on the CPU
  // and the device see different pages. That divergence is the hazard pin mode shows. (A move by
  // mremap takes the pinned page along: the entries are faulted again at the new address.)
  int enable_pin(int timeout_ms);

  // File strategies (mirror_file.cc). enable_file() once, before any access. Errors: -EINVAL (not a
  // shared file mapping), -EOPNOTSUPP (copy/bounce on hugetlbfs), those of dup/fstat/registration.
  int enable_file(const FileOptions& options);
  // Registers the range with the engine (MISSING | WP, and MINOR for a shmem file strategy).
  FileStrategy file_strategy() const { return file_ ? file_->options.strategy : FileStrategy::kNone; }
  // copy and bounce: the device's data is its own copy in device memory.
  bool file_copies() const {
    return file_ && (file_->options.strategy == FileStrategy::kCopy || file_->options.strategy == FileStrategy::kBounce);
  }
  const FileStats* file_stats() const { return file_ ? &file_->stats : nullptr; }
  // Whether page i is being filled into device memory by this mirror right now (its slot is taken,
  // its entry not set yet), or is the page a file fault is serving: eviction keeps it queued.
  bool loading(uint64_t i) const {
    return (i >= loading_first_.load(std::memory_order_acquire) && i < loading_last_.load(std::memory_order_acquire)) ||
           i == faulting_.load(std::memory_order_acquire);
  }
  // Whether CPU mmap accesses are intercepted (shmem: MINOR/MISSING faults pull device pages back).
  bool file_intercepts_cpu() const { return file_ && file_->shmem; }
  // The library's read()/write() of the file through the strategy, bytes [off, off + len) of the
  // mirror. Errors: -EFAULT (past end of file), -errno of pread/pwrite.
  int64_t file_read(uint64_t off, uint64_t len, uint8_t* out);  // bytes read (short at end of file)
  int file_write(uint64_t off, uint64_t len, const uint8_t* in);
  struct WritebackResult {
    uint64_t pages = 0;       // pages written (or, for remote/pin, made stable while the kernel wrote them)
    uint64_t bytes_copied = 0;
    uint64_t elapsed_ns = 0;
    // On error (copy, bounce): the device copies the file could not take, dirty on the device
    // again (the next writeback writes them anew), and the call that failed.
    WriteErrorReport kept;
  };
  // Writes back pages [first, last): each a consistent snapshot while the device keeps writing.
  // sync: and waits until the file has them (fdatasync). Errors: those of pwrite/sync_file_range/fdatasync.
  int writeback(uint64_t first, uint64_t last, bool sync, WritebackResult* out);
  // A lease on the file (F_SETLEASE F_WRLCK, broken by another process's open or truncate).
  // Errors: -EAGAIN (the file is open elsewhere), -EACCES/-EPERM (not the owner, no CAP_LEASE),
  // -EBADF (the mirror is closed: nothing would ever release the lease).
  int take_lease();
  // The lease-break path (lease.cc's thread): revoke, write back, give the device's copies up, release.
  void break_lease();
  bool lease_held() const { return file_ && file_->lease_held.load(); }
  // The mapping goes but a pinned mirror stays (its device keeps the pages it holds): its lease,
  // which nothing would release any more, goes now.
  void release_lease() {
    if (file_) file_release_lease();
  }
  // Data lost to a write error (the page cache held the only copy and the kernel marked it clean):
  // sticky until acknowledged. error 0: none. acknowledge: and clear it.
  WriteErrorReport file_loss(bool acknowledge = false);
  // Pages written to the page cache whose write no wait has confirmed yet.
  uint64_t file_unconfirmed();
  // Mapping.sync()'s msync failed: the error was reported on the file description this mirror
  // shares, so no later wait of ours would see it. Called inside the msync's invalidation.
  void writeback_error(uint64_t start, uint64_t end, int err) override;
  bool pinned() const { return pinned_; }
  uint64_t diverged() const { return diverged_.load(std::memory_order_relaxed); }
  bool single_writer() const { return single_writer_; }
  uint64_t index_of(uint64_t addr) const { return (addr - start_) / page_; }
  // The next run of pages in [from, last) whose data is not in device memory: [*a, *b). False when
  // there is none.
  bool next_host_run(uint64_t from, uint64_t last, uint64_t* a, uint64_t* b) const {
    uint64_t i = from;
    while (i < last && (pt_[i].load(std::memory_order_relaxed) & kOnDevice)) i++;
    if (i >= last) return false;
    uint64_t j = i;
    while (j < last && !(pt_[j].load(std::memory_order_relaxed) & kOnDevice)) j++;
    *a = i;
    *b = j;
    return true;
  }

  // The next run of pages in [from, last) whose data is in device memory: [*a, *b).
  bool next_device_run(uint64_t from, uint64_t last, uint64_t* a, uint64_t* b) const {
    uint64_t i = from;
    while (i < last && !(pt_[i].load(std::memory_order_relaxed) & kOnDevice)) i++;
    if (i >= last) return false;
    uint64_t j = i;
    while (j < last && (pt_[j].load(std::memory_order_relaxed) & kOnDevice)) j++;
    *a = i;
    *b = j;
    return true;
  }

  // The kernel test device's snapshot encoding, one byte per base page (sys::page_size(); pages
  // [first, last) of the mirrored range, so a hugetlb entry gives page_ / base of them, each with
  // the PMD or PUD flag), without faulting anything.
  void snapshot(uint64_t first, uint64_t last, uint8_t* out);
  // LRU: whether the device touched page i since the last call.
  bool test_and_clear_accessed(uint64_t i) {
    return pt_[i].fetch_and(~kAccessed, std::memory_order_relaxed) & kAccessed;
  }
  // Another device takes page i: our entry goes (unless the page is in our memory), our accesses in
  // flight drain, and no range fault of ours programs the page until release_page(): the change
  // is under way until then (the sequence-count protocol, as for an invalidation).
  void hold_page(uint64_t i, InvalidateCause cause = InvalidateCause::kCpuAccess);
  void release_page();

 private:
  void wait_inflight(uint64_t first, uint64_t last);
  void begin_change();
  void end_change();
  int fault_once(uint64_t first, uint64_t last, bool write, std::chrono::steady_clock::time_point deadline);
  bool raced(uint64_t gen0);  // an invalidation started or ended since gen0 was read
  bool fill_holes(uint64_t a, uint64_t b, uint64_t gen0);

  Device* const device_;
  const std::shared_ptr<Region> region_;
  const uint64_t offset_;  // within the region
  // Moves with the mapping (remapped(), between an invalidation's start and end): device threads
  // read it only through an entry programmed after the move.
  std::atomic<uint64_t> start_;
  const uint64_t npages_, page_;
  PageTable pt_;
  // Sequence-count protocol: gen_ moves on every invalidation start and end; active_ counts
  // invalidations between their start and end. A range fault that saw either change retries.
  std::mutex mu_;
  uint64_t gen_ = 0;
  unsigned active_ = 0;
  std::condition_variable idle_;
  std::atomic<bool> dead_{false};
  std::atomic<bool> attached_{false};
  // Held from invalidate_start to invalidate_end, for a whole migration, and by the engine while it
  // resolves a CPU fault on this mirror: these three must not interleave on one page.
  std::mutex change_mu_;
  bool engine_registered_ = false;
  uint64_t engine_len_ = 0;  // bytes from start_ registered with the engine (clipped by a shrink)
  bool single_writer_ = false;
  std::atomic<int> users_{0};
  bool pinned_ = false;
  std::atomic<uint64_t> diverged_{0};  // pin mode: pages the device kept when the CPU's changed
  void keep_pinned_page(uint64_t i);
  // Single-writer mode: the device's own view of the pages (a second shared mapping of the same
  // file), which the CPU mapping's write protection does not cover. Device threads are threads of
  // this process: through the CPU mapping they would meet the same uffd-wp as the CPU.
  uint64_t alias_ = 0;
  int ensure_engine();
  // A MAP_PRIVATE mapping of a file (its pages are the file's until the CPU writes them).
  bool private_file() const { return region_->kind != RegionKind::kAnonymous && !region_->shared; }
  // Whether that file is shmem (tmpfs, memfd): userfaultfd can register a private mapping of it.
  bool private_shmem() const;
  // What a migration (migrate.cc, which owns the sequence) asks of the page table: the host
  // address of a page, and a device entry for data now in slot (old: the entry it replaces, whose
  // dirty bit carries over; unit: part of a whole 2 MiB unit).
  friend class MigrateToDevice;
  friend class MigrateToHost;
  uint64_t host_address(uint64_t i) const { return start_ + i * page_; }
  void set_device_entry(uint64_t i, uint64_t slot, uint64_t old, bool write, bool atomic, bool unit);
  MirrorStats stats_;
  // The pages being filled into device memory and the page a fault is serving (under change_mu_):
  // eviction must not take them back meanwhile (a range larger than device memory would never get
  // its page), nor drop their queue entries as stale.
  std::atomic<uint64_t> loading_first_{0}, loading_last_{0}, faulting_{~0ull};
  struct Loading {
    Mirror* m;
    Loading(Mirror* mirror, uint64_t a, uint64_t b) : m(mirror) {
      m->loading_last_.store(b);
      m->loading_first_.store(a);
    }
    ~Loading() {
      m->loading_first_.store(0);
      m->loading_last_.store(0);
    }
  };

  struct FileState {
    FileOptions options;
    int fd = -1;             // our own descriptor (a dup of the mapping's)
    uint64_t file_offset = 0;  // of page 0 of the mirror
    bool shmem = false;      // tmpfs/memfd: userfaultfd can register it; the page cache is the file
    bool dax = false;        // stores reach the media through the mapping: no page cache to write back
    std::mutex wb_mu;        // one writeback at a time (two could write snapshots out of order)
    std::vector<uint8_t> bounce;  // chunk_pages bounce pages (snapshot 'buffer')
    FileStats stats;
    std::atomic<bool> lease_held{false};
    std::thread periodic;
    std::mutex periodic_mu;
    std::condition_variable periodic_cv;
    bool stopping = false;
    // Write confirmation (see "Write errors" in mirror_file.cc), under sync_mu (a leaf lock):
    // pages handed to the page cache and not yet confirmed by a wait, with their WriteState.
    std::mutex sync_mu;
    std::map<uint64_t, uint8_t> unsynced;
    std::set<uint64_t> lost;        // sticky until acknowledged, with the error that lost them
    int loss_error = 0;
    const char* loss_syscall = nullptr;
    int last_error = 0;             // the latest write error and the call that reported it
    const char* last_syscall = nullptr;
  };
  std::unique_ptr<FileState> file_;
  int file_fault(uint64_t first, uint64_t last, bool write, std::chrono::steady_clock::time_point deadline);
  // Caller holds change_mu_. Loads pages [a, b) (not on the device) into device memory.
  int file_load(uint64_t a, uint64_t b, uint64_t* loaded);
  // Caller holds change_mu_: writes page i's device copy to the file if the file lacks it.
  // size: the file's size if the caller has it (a flush of many pages asks once), else ~0.
  int file_store(uint64_t i, uint64_t e, uint64_t size = ~0ull);
  bool file_must_store(uint64_t e) const;
  // Caller holds change_mu_: device copies of [a, b) go back to the file where needed; slots freed.
  uint64_t file_flush_locked(uint64_t a, uint64_t b);
  bool file_cpu_fault(uint64_t i, uint64_t flags);
  bool file_evict(uint64_t i);
  int file_writeback_chunk(uint64_t a, uint64_t b, WritebackResult* out);
  int file_writeback_chunk_locked(uint64_t a, uint64_t b, WritebackResult* out);
  void file_stop_periodic();
  void file_release_lease();
  // Library I/O of [off, off + len) through the page cache (pages the device does not hold).
  int file_io_run(bool write, uint64_t off, uint64_t len, uint8_t* buf);
  int file_io(bool write, uint64_t off, uint64_t len, uint8_t* buf);
  uint64_t file_take(uint64_t i);
  bool file_release_page(uint64_t i, uint64_t e, int* err = nullptr);
  uint64_t file_size_pages(bool* ok);
  // Write errors (mirror_file.cc).
  void file_note_written(uint64_t a, uint64_t b);
  void file_lost_at_close(uint64_t i, uint64_t e);
  void file_note_error(int rc, const char* syscall);
  bool file_unsynced(uint64_t i);
  int file_wait(uint64_t a, uint64_t b, bool whole, bool locked, WriteErrorReport* kept = nullptr, bool only_ours = false);
  void file_wait_failed(int rc, const char* syscall);
  void file_resolve_failed(WriteErrorReport* kept);
  uint64_t file_release(std::vector<std::pair<uint64_t, uint64_t>>& pages, uint64_t size, int* err);
  void file_drop_cache(uint64_t off, uint64_t len);
};

}  // namespace pm::engine
