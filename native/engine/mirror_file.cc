// File strategies: how a device's use of a file's pages stays right with the page cache,
// writeback, fsync and truncate (the seeds' four answers), on real files.
//
//   remote  the device maps the page-cache page. Writeback through the library invalidates the
//           device's entries over the pages it writes (writeback cleaning): the device cannot write
//           them while the kernel writes them, and its next write faults again (page_mkwrite).
//   copy    A stays in the page cache; the device works on A' in its memory. On tmpfs/memfd the
//           CPU mapping is registered (MINOR): a CPU touch of a page the device holds faults, and
//           A' comes back into A first. Elsewhere the CPU reaches the file through read()/write().
//   bounce  as copy, but A is freed once A' is loaded (hole punched on tmpfs; written and dropped
//           from the page cache elsewhere): the device holds the only copy, and the page comes back
//           (a MISSING fault on tmpfs, read()/write(), writeback) through bounce pages.
//
// Writeback of copy/bounce: in user space the file is reached through pwrite, whose destination
// page-cache page is a bounce page already (the kernel writes it to disk while the device goes on
// writing its own page). So by default the device's write access to the pages being written is
// held back only while pwrite copies them: one copy, a consistent image. snapshot 'buffer' copies
// into a private buffer first (the device waits only for the memcpy; one copy more).
//   pin     the device maps the page-cache page for good (long-term GUP): never invalidated.
//           Writeback keeps the device's write access revoked while the kernel writes the pages
//           (stable pages) and gives it back; the device never refaults.
//
// Why pin does not write bounce copies of its pages: user space can only reach a file's blocks
// through the page cache, or with O_DIRECT, which falls back to a buffered write over the very page
// the device is writing when that page is mapped and dirty. A bounce copy written through the page
// cache would overwrite the device's newer writes. So pin's snapshot is the page itself, held still.
//
// Write errors. pwrite returning says only that the page cache took the data; the write to the
// media may fail later, and the kernel then marks the page clean and records the error in the file
// (errseq: reported once to each open file description, by whichever wait on it comes first,
// whatever range that wait asked for). So every page the library hands to the page cache is
// unconfirmed (FileState::unsynced) until a wait on our descriptor that covered it (sync_file_range
// with WAIT_AFTER over it, or fdatasync) returned 0. When any wait reports an error, every
// unconfirmed page of the mirror may be the one that failed: a page the device holds a copy of is
// dirty again and written anew by the next writeback (after its failed page-cache page is dropped,
// so the file system maps its blocks afresh: ext4 otherwise leaves an unwritten extent that reads
// zeros); a page that only the page cache held (remote, pin, library writes of pages the device
// does not hold) is lost, and the loss is sticky until the user acknowledges it. No device copy is
// freed before its write is confirmed. On tmpfs/memfd the page cache is the file: pwrite's return
// is the whole story, and nothing is tracked.
//
// Locking: change_mu_ (through Engine::lock_covering where device memory may be allocated, so
// eviction can take our own pages) serialises loads, CPU pull-backs, library I/O and writeback
// chunks; file_->wb_mu orders whole writebacks (snapshots are written in the order they were
// taken). Order: wb_mu, then change_mu_, then sync_mu. The engine's fault handler never takes wb_mu.
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/statfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include "../sys/file.h"
#include "../sys/mem.h"
#include "../sys/pagemap.h"
#include "../sys/uapi.h"
#include "../sys/uffd.h"
#include "device.h"
#include "engine.h"
#include "lease.h"
#include "migrate.h"
#include "mirror.h"

namespace pm::engine {

const char* FileStrategyName(FileStrategy s) {
  switch (s) {
    case FileStrategy::kRemote: return "remote";
    case FileStrategy::kCopy: return "copy";
    case FileStrategy::kBounce: return "bounce";
    case FileStrategy::kPin: return "pin";
    default: return "none";
  }
}

int Mirror::enable_file(const FileOptions& o) {
  {
    std::lock_guard<std::mutex> change(change_mu_);
    if (file_) return -EBUSY;
    if (region_->fd < 0 || !region_->shared) return -EINVAL;
    const bool copies = o.strategy == FileStrategy::kCopy || o.strategy == FileStrategy::kBounce;
    if (copies && region_->hugetlb) return -EOPNOTSUPP;
    auto f = std::make_unique<FileState>();
    f->options = o;
    if (f->options.chunk_pages == 0) f->options.chunk_pages = 64;
    f->fd = ::fcntl(region_->fd, F_DUPFD_CLOEXEC, 0);
    if (f->fd < 0) return -errno;
    f->file_offset = region_->file_offset + offset_;
    struct statfs fs;
    if (::fstatfs(f->fd, &fs) == 0) f->shmem = fs.f_type == TMPFS_MAGIC;
    sys::StatxInfo sx;
    f->dax = sys::statx_fd(f->fd, &sx) == 0 && sx.dax;
    if (copies && f->dax) {
      // DAX: the file's pages are the device-addressable memory; nothing to copy into device memory.
      ::close(f->fd);
      return -EOPNOTSUPP;
    }
    if (copies && o.snapshot == SnapshotMode::kBuffer) f->bounce.resize(f->options.chunk_pages * page_);
    // Bounce on a disk file reads pages only to drop them from the page cache: no readahead.
    if (o.strategy == FileStrategy::kBounce && !f->shmem) ::posix_fadvise(f->fd, 0, 0, POSIX_FADV_RANDOM);
    if (copies) {
      // Device memory is filled by pread into slots: they need pages first (an ioctl per run).
      int rc = Engine::get().ensure();
      if (rc == 0) rc = device_->register_pool();
      if (rc == 0 && f->shmem) {
        Engine& e = Engine::get();
        e.add_mirror(this);
        rc = e.register_range(start_, npages_ * page_, region_->id, true);
        if (rc) e.remove_mirror(this);
        else {
          engine_registered_ = true;  // CPU faults on the mapping now come to the engine
          engine_len_ = npages_ * page_;
          region_->registered.fetch_add(1);
        }
      }
      if (rc) {
        ::close(f->fd);
        return rc;
      }
      if (!f->shmem) region_->cpu_via_library.fetch_add(1);  // the CPU mapping would read stale A
    }
    file_ = std::move(f);
  }
  if (o.strategy == FileStrategy::kPin) {
    int rc = enable_pin(device_->config().timeout_ms);
    if (rc) return rc;
  }
  if (o.writeback_interval_ms) {
    file_->periodic = std::thread([this] {
      std::unique_lock<std::mutex> lock(file_->periodic_mu);
      const auto every = std::chrono::milliseconds(file_->options.writeback_interval_ms);
      while (!file_->stopping) {
        if (file_->periodic_cv.wait_for(lock, every, [this] { return file_->stopping; })) break;
        lock.unlock();
        WritebackResult r;
        writeback(0, npages_, false, &r);
        lock.lock();
      }
    });
  }
  return 0;
}

void Mirror::file_stop_periodic() {
  {
    std::lock_guard<std::mutex> lock(file_->periodic_mu);
    file_->stopping = true;
  }
  file_->periodic_cv.notify_all();
  if (file_->periodic.joinable()) file_->periodic.join();
}

void Mirror::file_release_lease() {
  Leases::remove(this);
  if (file_->lease_held.exchange(false)) ::fcntl(file_->fd, F_SETLEASE, F_UNLCK);
}

// Pages of the mirror that lie (at least partly) before end of file.
uint64_t Mirror::file_size_pages(bool* ok) {
  uint64_t size = 0;
  *ok = sys::file_size(file_->fd, &size) == 0;
  if (!*ok || size <= file_->file_offset) return 0;
  return std::min(npages_, (size - file_->file_offset + page_ - 1) / page_);
}

// The page cache may hold a file's pages in large folios (ext4 does, since 6.16), and
// POSIX_FADV_DONTNEED leaves a folio that reaches past the range: drop whole 2 MiB-aligned windows
// (the largest folio a page-cache page can be in), within the mirror. Clean pages only go, so pages
// of the window the device does not hold cost at most a read from disk again.
void Mirror::file_drop_cache(uint64_t off, uint64_t len) {
  constexpr uint64_t kWindow = 2ull << 20;
  const uint64_t lo = std::max(file_->file_offset, off / kWindow * kWindow);
  const uint64_t hi = std::min(file_->file_offset + npages_ * page_, (off + len + kWindow - 1) / kWindow * kWindow);
  if (hi > lo) sys::drop_cache(file_->fd, lo, hi - lo);
}

namespace {
enum WriteState : uint8_t { kWsUnsynced = 1, kWsFlushing = 2, kWsFailed = 3 };
}

// Pages [a, b) are in the page cache now, not yet on the media.
void Mirror::file_note_written(uint64_t a, uint64_t b) {
  if (file_->shmem || a >= b) return;
  std::lock_guard<std::mutex> g(file_->sync_mu);
  for (uint64_t i = a; i < b; i++) {
    auto [it, fresh] = file_->unsynced.emplace(i, kWsUnsynced);
    // A failed page waits for whoever saw the error to resolve it (a new write of part of a page
    // would carry the rest of it, which the kernel may have reclaimed already).
    if (!fresh && it->second != kWsFailed) it->second = kWsUnsynced;
  }
}

void Mirror::file_note_error(int rc, const char* syscall) {
  std::lock_guard<std::mutex> g(file_->sync_mu);
  file_->last_error = rc;
  file_->last_syscall = syscall;
}

bool Mirror::file_unsynced(uint64_t i) {
  std::lock_guard<std::mutex> g(file_->sync_mu);
  return file_->unsynced.count(i) != 0;
}

// A wait reported rc: every unconfirmed page of the mirror may be the one that failed, and so may
// every page the device dirtied in the page cache (remote, pin: the kernel's flusher may have
// written it). Nothing of ours in flight: the error is another writer's on the file description
// we share, and it is lost to them too: sticky, with no pages to name.
void Mirror::file_wait_failed(int rc, const char* syscall) {
  file_->stats.write_errors.fetch_add(1, std::memory_order_relaxed);
  file_note_error(rc, syscall);
  std::lock_guard<std::mutex> g(file_->sync_mu);
  if (!file_copies())
    for (uint64_t i = 0; i < npages_; i++) {
      const uint64_t e = pt_[i].load(std::memory_order_relaxed);
      if ((e & kDirty) && !(e & kOnDevice)) file_->unsynced[i] = kWsFailed;
    }
  for (auto& [i, w] : file_->unsynced) w = kWsFailed;
  if (file_->unsynced.empty() && !file_->loss_error) {
    file_->loss_error = rc;
    file_->loss_syscall = syscall;
  }
}

// Caller holds change_mu_ if the mirror keeps copies. Failed pages: a device copy is dirty again
// (kept: listed); a page only the page cache held is lost.
void Mirror::file_resolve_failed(WriteErrorReport* kept) {
  WriteErrorReport redirtied;
  {
    std::lock_guard<std::mutex> g(file_->sync_mu);
    for (auto it = file_->unsynced.begin(); it != file_->unsynced.end();) {
      if (it->second != kWsFailed) {
        ++it;
        continue;
      }
      const uint64_t i = it->first;
      if (file_copies() && (pt_[i].load(std::memory_order_relaxed) & kOnDevice)) {
        pt_[i].fetch_or(kDirty, std::memory_order_release);
        redirtied.add(i);
      } else {
        file_->lost.insert(i);
        if (!file_->loss_error) {
          file_->loss_error = file_->last_error;
          file_->loss_syscall = file_->last_syscall;
        }
      }
      it = file_->unsynced.erase(it);
    }
    redirtied.error = file_->last_error;
    redirtied.syscall = file_->last_syscall;
  }
  for (auto [a, b] : redirtied.runs) file_drop_cache(file_->file_offset + a * page_, (b - a) * page_);
  if (kept && !redirtied.runs.empty()) {
    if (!kept->error) {
      kept->error = redirtied.error;
      kept->syscall = redirtied.syscall;
    }
    for (auto [a, b] : redirtied.runs)
      for (uint64_t i = a; i < b; i++) kept->add(i);
  }
}

// A wait on our descriptor that confirms the writes of [a, b) (whole: fdatasync, for the file).
// locked: the caller holds change_mu_ (needed to resolve failed copies; taken here otherwise).
// only_ours: no wait where nothing of ours is unconfirmed in the range (a release of clean pages).
int Mirror::file_wait(uint64_t a, uint64_t b, bool whole, bool locked, WriteErrorReport* kept, bool only_ours) {
  if (file_->shmem) return whole ? sys::datasync(file_->fd) : 0;
  if (whole) {
    a = 0;
    b = npages_;
  }
  {
    std::lock_guard<std::mutex> g(file_->sync_mu);
    auto it = file_->unsynced.lower_bound(a);
    if (only_ours && !whole && (it == file_->unsynced.end() || it->first >= b)) return 0;
    for (; it != file_->unsynced.end() && it->first < b; ++it)
      if (it->second == kWsUnsynced) it->second = kWsFlushing;
  }
  const char* syscall = whole ? "fdatasync" : "sync_file_range";
  int rc = whole ? sys::datasync(file_->fd) : sys::sync_range(file_->fd, file_->file_offset + a * page_, (b - a) * page_, true);
  if (rc == 0) {
    // Pages written again since the wait began are Unsynced again, and a failure another wait saw
    // meanwhile made them Failed: only those still Flushing are confirmed.
    std::lock_guard<std::mutex> g(file_->sync_mu);
    for (auto it = file_->unsynced.lower_bound(a); it != file_->unsynced.end() && it->first < b;)
      it = it->second == kWsFlushing ? file_->unsynced.erase(it) : std::next(it);
    return 0;
  }
  file_wait_failed(rc, syscall);
  std::unique_lock<std::mutex> change(change_mu_, std::defer_lock);
  if (!locked && file_copies()) change.lock();
  file_resolve_failed(kept);
  return rc;
}

void Mirror::writeback_error(uint64_t start, uint64_t end, int err) {
  if (!file_ || file_->shmem) return;
  // Inside the msync's invalidation: change_mu_ is held if the range overlaps ours.
  const uint64_t at = start_.load(std::memory_order_relaxed);
  const bool held = std::max(start, at) < std::min(end, at + npages_ * page_);
  std::unique_lock<std::mutex> change(change_mu_, std::defer_lock);
  if (!held && file_copies()) change.lock();
  file_wait_failed(err, "msync");
  file_resolve_failed(nullptr);
}

// detach(), after every copy was flushed: a copy still on the device now is one the file could
// not take (or whose write no wait confirmed); its data goes with the mirror.
void Mirror::file_lost_at_close(uint64_t i, uint64_t e) {
  std::lock_guard<std::mutex> g(file_->sync_mu);
  if (!file_must_store(e) && !file_->unsynced.count(i)) return;
  file_->lost.insert(i);
  if (!file_->loss_error) {
    file_->loss_error = file_->last_error ? file_->last_error : -EIO;
    file_->loss_syscall = file_->last_syscall ? file_->last_syscall : "close";
  }
}

uint64_t Mirror::file_unconfirmed() {
  if (!file_) return 0;
  std::lock_guard<std::mutex> g(file_->sync_mu);
  return file_->unsynced.size();
}

WriteErrorReport Mirror::file_loss(bool acknowledge) {
  WriteErrorReport r;
  if (!file_) return r;
  std::lock_guard<std::mutex> g(file_->sync_mu);
  r.error = file_->loss_error;
  r.syscall = file_->loss_syscall;
  for (uint64_t i : file_->lost) r.add(i);
  if (acknowledge) {
    file_->lost.clear();
    file_->loss_error = 0;
    file_->loss_syscall = nullptr;
  }
  return r;
}

bool Mirror::file_must_store(uint64_t e) const { return (e & kOnDevice) && (e & (kDirty | kSole)); }

int Mirror::file_load(uint64_t a, uint64_t b, uint64_t* loaded) {
  *loaded = 0;
  const int ufd = Engine::get().fd();
  Loading loading(this, a, b);
  std::vector<uint64_t> slots;
  slots.reserve(b - a);
  for (uint64_t i = a; i < b; i++) {
    uint64_t slot;
    if (!device_->alloc_slot(&slot, this, i)) break;
    slots.push_back(slot);
  }
  const uint64_t n = slots.size();
  if (n == 0) return -ENOMEM;
  b = a + n;
  // The CPU's view goes first: from here a CPU touch faults and waits for us (change_mu_), so no
  // CPU write can land in A after it was read into A'.
  sys::advise(reinterpret_cast<void*>(start_ + a * page_), n * page_, MADV_DONTNEED);
  int rc = 0;
  uint64_t k = 0;
  while (k < n && rc == 0) {
    uint64_t r = k + 1;  // a run of consecutive slots: one ioctl and one pread
    while (r < n && slots[r] == slots[k] + (r - k)) r++;
    const uint64_t run = r - k;
    void* dst = device_->slot_address(slots[k]);
    if (!device_->slots_populated(slots[k], run)) {
      // Holes in the pool are registered with the engine: give them pages with an ioctl, never a
      // touch (which would fault into the engine).
      int64_t done = 0;
      rc = sys::uffd_zeropage(ufd, reinterpret_cast<uint64_t>(dst), run * page_, UFFDIO_ZEROPAGE_MODE_DONTWAKE, &done);
      if (rc == -EEXIST) rc = 0;
      if (rc) break;
      device_->set_populated(slots[k], run, true);
    }
    rc = sys::pread_full(file_->fd, dst, run * page_, file_->file_offset + (a + k) * page_);
    if (rc) break;
    k = r;
  }
  for (uint64_t j = k; j < n; j++) device_->free_slot(slots[j]);
  if (k == 0) return rc ? rc : -EIO;
  b = a + k;
  const bool bounce = file_->options.strategy == FileStrategy::kBounce;
  const uint64_t off = file_->file_offset + a * page_, len = k * page_;
  uint64_t sole = 0;
  if (bounce) {
    // tmpfs: the page cache is the file; the device's copy becomes the only one.
    if (file_->shmem && sys::punch_hole(file_->fd, off, len) == 0) sole = kSole;
    file_->stats.freed_pages.fetch_add(k, std::memory_order_relaxed);
  }
  for (uint64_t j = 0; j < k; j++) {
    const uint64_t old = pt_[a + j].load(std::memory_order_relaxed);
    pt_[a + j].store((slots[j] << kSlotShift) | kOnDevice | sole | (old & kDirty), std::memory_order_release);
  }
  if (bounce && !file_->shmem) {
    // A disk file keeps its blocks: write A if dirty, then drop it from the page cache. A' was
    // read from A, so if that write fails A' is dirty again (the entries are set first).
    file_wait(a, b, false, true);
    file_drop_cache(off, len);
  }
  file_->stats.loaded_pages.fetch_add(k, std::memory_order_relaxed);
  device_->on_migrate(this, true, a, k, Trigger::kDeviceFault);
  *loaded = k;
  return 0;
}

int Mirror::file_fault(uint64_t first, uint64_t last, bool write, std::chrono::steady_clock::time_point) {
  if (dead() || region_->closed.load()) return -EFAULT;
  Engine::Holding holding = Engine::get().lock_covering(this, start_ + first * page_, start_ + last * page_);
  // Checked under the lock: a protect or a truncate through the library holds it from before the
  // change to after it, so what is seen here stays true until the entries are programmed.
  if (dead() || region_->closed.load()) return -EFAULT;
  const int prot = region_->prot_over(offset_ + first * page_, (last - first) * page_);
  if (!(prot & PROT_READ)) return -EFAULT;
  if (write && !(prot & PROT_WRITE)) return -EPERM;
  bool ok;
  const uint64_t eof = file_size_pages(&ok);
  if (!ok) return -EIO;
  if (first >= eof) return -EFAULT;  // past end of file: the CPU would take a SIGBUS
  last = std::min(last, eof);
  // Making room may evict, but never the faulting page or the run being loaded: a range larger
  // than device memory loads what fits instead of evicting what it needs.
  faulting_.store(first);
  struct Done {
    Mirror* m;
    ~Done() { m->faulting_.store(~0ull); }
  } done{this};
  for (uint64_t i, j, from = first; next_host_run(from, last, &i, &j); from = j) {
    uint64_t loaded = 0;
    int rc = file_load(i, j, &loaded);
    if (rc == -ENOMEM && i > first) break;  // memory full: what is loaded is served
    if (rc) return rc;
    if (loaded < j - i) break;
  }
  if (write && engine_registered_) {
    // Write access to pages the CPU may be reading (shared read-only, see file_cpu_fault): the
    // CPU's mapping goes first, so its next access faults and pulls the new data back.
    for (uint64_t i = first; i < last;) {
      const uint64_t e = pt_[i].load(std::memory_order_relaxed);
      if (!(e & kOnDevice) || (e & kWrite)) {
        i++;
        continue;
      }
      uint64_t j = i + 1;
      while (j < last && (pt_[j].load(std::memory_order_relaxed) & (kOnDevice | kWrite)) == kOnDevice) j++;
      sys::advise(reinterpret_cast<void*>(start_ + i * page_), (j - i) * page_, MADV_DONTNEED);
      i = j;
    }
  }
  // Only pages that are on the device get entries: loading may have evicted some of this range
  // again (device memory smaller than the range); the device faults for those once more.
  for (uint64_t i = first; i < last; i++) {
    const uint64_t e = pt_[i].load(std::memory_order_relaxed);
    if (e & kOnDevice) pt_[i].store(e | kValid | (write ? static_cast<uint64_t>(kWrite) : 0ull), std::memory_order_release);
  }
  return 0;
}

// Caller holds change_mu_ and has cleared page i's entry (no device access in flight).
int Mirror::file_store(uint64_t i, uint64_t e, uint64_t size) {
  if (size == ~0ull)
    if (int rc = sys::file_size(file_->fd, &size)) return rc;
  const uint64_t off = file_->file_offset + i * page_;
  if (off >= size) return 0;  // truncated away: nothing past the end is ever written
  int rc = sys::pwrite_full(file_->fd, device_->slot_address(e >> kSlotShift), std::min(page_, size - off), off);
  if (rc == 0) {
    file_->stats.written_pages.fetch_add(1, std::memory_order_relaxed);
    file_note_written(i, i + 1);
  }
  return rc;
}

// Takes page i's entry away from the device (no access in flight afterwards) and returns what it
// was: a write that raced the clearing is in the returned dirty bit (pin() marks before writing).
uint64_t Mirror::file_take(uint64_t i) {
  const uint64_t e = pt_[i].exchange(0, std::memory_order_seq_cst);
  wait_inflight(i, i + 1);
  return e;
}

// Caller holds change_mu_ and took the entries of pages ({index, entry}, ascending). Each device
// copy goes back to the file where the file lacks it, and its slot is freed once a wait confirmed
// the write. A copy the file could not take (pwrite failed, or the kernel reported a writeback
// error) stays on the device, unmapped, dirty: nothing is lost, and a later writeback retries.
// Returns the slots freed; *err: the first error.
uint64_t Mirror::file_release(std::vector<std::pair<uint64_t, uint64_t>>& pages, uint64_t size, int* err) {
  if (pages.empty()) return 0;
  int first_error = 0;
  if (size == ~0ull) first_error = sys::file_size(file_->fd, &size);
  for (auto& [i, e] : pages) {
    if (first_error == 0 && file_must_store(e)) {
      int rc = file_store(i, e, size);
      if (rc) {
        file_->stats.store_errors.fetch_add(1, std::memory_order_relaxed);
        file_note_error(rc, "pwrite");
        first_error = rc;
      } else {
        e &= ~(kDirty | kSole);
      }
    }
    // Back, unmapped, until the write is confirmed: a failed wait finds it on the device.
    pt_[i].store(e & ~(kValid | kWrite | kAtomic), std::memory_order_release);
  }
  const uint64_t a = pages.front().first, b = pages.back().first + 1;
  if (int rc = file_wait(a, b, false, true, nullptr, true)) first_error = first_error ? first_error : rc;
  uint64_t n = 0;
  for (auto [i, e] : pages) {
    const uint64_t now = pt_[i].load(std::memory_order_relaxed);
    if (file_must_store(now) || file_unsynced(i)) continue;
    pt_[i].store(0, std::memory_order_release);
    device_->free_slot(now >> kSlotShift);
    n++;
  }
  if (err) *err = first_error;
  return n;
}

bool Mirror::file_release_page(uint64_t i, uint64_t e, int* err) {
  std::vector<std::pair<uint64_t, uint64_t>> one{{i, e}};
  return file_release(one, ~0ull, err) == 1;
}

uint64_t Mirror::file_flush_locked(uint64_t a, uint64_t b) {
  std::vector<std::pair<uint64_t, uint64_t>> gone;
  for (uint64_t i = pt_.next_present(a, b); i < b; i = pt_.next_present(i + 1, b)) {
    if (!(pt_.peek(i, std::memory_order_relaxed) & kOnDevice)) continue;
    gone.push_back({i, pt_[i].exchange(0, std::memory_order_seq_cst)});
  }
  if (gone.empty()) return 0;
  wait_inflight(a, b);
  const uint64_t n = file_release(gone, ~0ull, nullptr);
  device_->on_migrate(this, false, a, n, Trigger::kRelease);
  return n;
}

// The engine's thread, holding change_mu_: a CPU touch of a page (shmem copy/bounce).
bool Mirror::file_cpu_fault(uint64_t i, uint64_t flags) {
  const uint64_t e0 = pt_[i].load(std::memory_order_acquire);
  if (!(e0 & kOnDevice)) return false;  // an ordinary first touch: the engine maps the page
  const int ufd = Engine::get().fd();
  const uint64_t addr = start_ + i * page_;
  int64_t done = 0;
  if (!(flags & (UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_WP)) && !(e0 & (kWrite | kDirty | kSole))) {
    // Jan Kara's scheme: while the device only reads A' and A is current, the CPU reads A itself,
    // write-protected; the device keeps A'. A CPU write then faults (WP) and A' goes first; a
    // device write zaps the CPU's mapping first (file_fault), so a CPU read faults again.
    // Counted before the faulter wakes: whoever waits for the access sees it counted.
    file_->stats.shared_reads.fetch_add(1, std::memory_order_relaxed);
    int rc = sys::uffd_continue(ufd, addr, page_, UFFDIO_CONTINUE_MODE_WP, &done);
    if (rc == 0 || rc == -EEXIST) {
      if (rc) sys::uffd_wake(ufd, addr, page_);
      return true;
    }
    file_->stats.shared_reads.fetch_sub(1, std::memory_order_relaxed);
  }
  const uint64_t e = file_take(i);
  // A' back into A (bounce: A exists again). If the file cannot take it (ENOSPC, EIO), the device
  // keeps the data and the CPU access gets a SIGBUS (UFFDIO_POISON), as a read of a page the kernel
  // cannot read does: a stale or zero page mapped instead would be read, or written over and lost.
  if (!file_release_page(i, e)) {
    if (sys::uffd_poison(ufd, addr, page_, 0, &done) != 0) sys::uffd_wake(ufd, addr, page_);
    return true;
  }
  file_->stats.pulled_back.fetch_add(1, std::memory_order_relaxed);
  device_->on_invalidate(this, i, i + 1, InvalidateCause::kCpuAccess, (e & kValid) ? 1 : 0);
  device_->on_migrate(this, false, i, 1, Trigger::kCpuFault);
  if (flags & UFFD_PAGEFAULT_FLAG_WP) {
    // A CPU write to a page it shared for reading: A' is gone now, A becomes writable.
    sys::uffd_writeprotect(ufd, addr, page_, 0);
    return true;
  }
  // The page is in the page cache now: map it (a MISSING fault too: the page exists by now).
  int rc = sys::uffd_continue(ufd, addr, page_, 0, &done);
  if (rc == -EEXIST) sys::uffd_wake(ufd, addr, page_);
  else if (rc) {
    rc = sys::uffd_zero_fill(ufd, addr, page_, 0, &done, nullptr);  // no page (truncated meanwhile): a hole reads zeros
    if (rc) sys::uffd_wake(ufd, addr, page_);
  }
  return true;
}

bool Mirror::file_evict(uint64_t i) {
  if (!(pt_[i].load(std::memory_order_acquire) & kOnDevice)) return false;
  if (loading(i)) return false;  // this fault's own pages
  if (!file_release_page(i, file_take(i))) return false;
  device_->on_migrate(this, false, i, 1, Trigger::kEviction);
  return true;
}

int Mirror::file_writeback_chunk(uint64_t a, uint64_t b, WritebackResult* out) {
  const FileStrategy s = file_->options.strategy;
  const uint64_t off = file_->file_offset + a * page_, len = (b - a) * page_;
  if (s == FileStrategy::kRemote) {
    uint64_t dirty = 0;
    for (uint64_t i = a; i < b; i++)
      if (pt_.peek(i, std::memory_order_relaxed) & kDirty) dirty++;
    if (dirty == 0) return 0;
    // Writeback cleaning: every mirror of these pages loses them while the kernel writes them.
    // The invalidation notes the device's dirty pages as written (mirror.cc); the wait confirms them.
    Region::Invalidation inv(region_.get(), offset_ + a * page_, len, InvalidateCause::kWriteback);
    int rc = file_->shmem ? sys::sync_range(file_->fd, off, len, true) : file_wait(a, b, false, true, &out->kept);
    if (rc == 0) out->pages += dirty;
    return rc;
  }
  Engine::Holding holding = Engine::get().lock_covering(this, start_ + a * page_, start_ + b * page_);
  if (dead()) return -EBADF;
  return file_writeback_chunk_locked(a, b, out);
}

// Caller holds change_mu_ (remote is not handled here: its writeback is an invalidation).
int Mirror::file_writeback_chunk_locked(uint64_t a, uint64_t b, WritebackResult* out) {
  const FileStrategy s = file_->options.strategy;
  const uint64_t off = file_->file_offset + a * page_, len = (b - a) * page_;
  if (s == FileStrategy::kRemote) return 0;
  if (b - a > file_->options.chunk_pages) {
    // The bounce buffer holds one chunk.
    for (uint64_t c = a; c < b; c += file_->options.chunk_pages)
      if (int rc = file_writeback_chunk_locked(c, std::min(b, c + file_->options.chunk_pages), out)) return rc;
    return 0;
  }
  if (s == FileStrategy::kPin) {
    std::vector<uint64_t> had;
    uint64_t dirty = 0;
    // The device's write faults wait for the end of this chunk (up to the device's timeoutMs, then
    // EBUSY: chunks are small so the kernel's write of one is quick).
    begin_change();
    for (uint64_t i = a; i < b; i++) {
      // A page the pin kept as its own (diverged: truncate, lease break) is not the file's.
      if (pt_[i].load(std::memory_order_relaxed) & kOnDevice) {
        had.push_back(0);
        continue;
      }
      const uint64_t old = pt_[i].fetch_and(~(kWrite | kDirty), std::memory_order_seq_cst);
      if (old & kDirty) {
        dirty++;
        file_note_written(i, i + 1);
      }
      had.push_back(old & kWrite);
    }
    wait_inflight(a, b);
    int rc = !dirty ? 0 : file_->shmem ? sys::sync_range(file_->fd, off, len, true) : file_wait(a, b, false, true, &out->kept);
    for (uint64_t i = a; i < b; i++)
      if (had[i - a]) pt_[i].fetch_or(kWrite, std::memory_order_release);
    end_change();
    if (rc == 0) out->pages += dirty;
    return rc;
  }
  // copy, bounce: the device's own copies, written by the library.
  uint64_t size = 0;
  if (int rc = sys::file_size(file_->fd, &size)) return rc;
  struct Page {
    uint64_t i, e;
  };
  std::vector<Page> pages;
  for (uint64_t i = a; i < b; i++) {
    const uint64_t e = pt_.peek(i, std::memory_order_relaxed);
    if (!file_must_store(e)) continue;
    // Write access goes (and the dirty bit with it): a device write from here on sets it again.
    pages.push_back({i, pt_[i].fetch_and(~(kWrite | kDirty | kSole), std::memory_order_seq_cst)});
  }
  if (pages.empty()) return 0;
  wait_inflight(a, b);
  const bool stable = file_->options.snapshot == SnapshotMode::kPageCache;
  std::vector<struct iovec> iov(pages.size());
  for (size_t k = 0; k < pages.size(); k++) {
    void* src = device_->slot_address(pages[k].e >> kSlotShift);
    if (!stable) {
      void* dst = file_->bounce.data() + (pages[k].i - a) * page_;
      std::memcpy(dst, src, page_);
      src = dst;
    }
    iov[k] = {src, page_};
  }
  if (!stable) {
    // The snapshot is taken: the device writes again while the bounce pages go to the file.
    for (const Page& p : pages)
      if (p.e & kWrite) pt_[p.i].fetch_or(kWrite, std::memory_order_release);
    out->bytes_copied += pages.size() * page_;
    file_->stats.snapshot_bytes.fetch_add(pages.size() * page_, std::memory_order_relaxed);
  }
  int rc = 0;
  for (size_t k = 0; k < pages.size() && rc == 0;) {
    size_t r = k + 1;  // consecutive file pages: one pwritev
    while (r < pages.size() && pages[r].i == pages[r - 1].i + 1) r++;
    const uint64_t at = file_->file_offset + pages[k].i * page_;
    if (at < size) {
      const uint64_t n = std::min<uint64_t>(r - k, (size - at + page_ - 1) / page_);
      const uint64_t bytes = std::min(n * page_, size - at);  // nothing past the end of the file
      if (bytes < n * page_) iov[k + n - 1].iov_len = page_ - (n * page_ - bytes);
      rc = sys::pwritev_full(file_->fd, iov.data() + k, static_cast<int>(n), at);
      if (rc == 0) {
        // The device's copies cross the link to reach the file: one transfer per run written.
        device_->charge_transfer(bytes, LinkDir::kToHost, LinkCategory::kWriteback);
        out->pages += n;
        file_->stats.written_pages.fetch_add(n, std::memory_order_relaxed);
        file_note_written(pages[k].i, pages[k].i + n);
      }
    }
    k = r;
  }
  if (rc) {
    // Not written: the pages stay dirty (and sole), so nothing is lost and a later pass retries.
    for (const Page& p : pages) {
      pt_[p.i].fetch_or(p.e & (kDirty | kSole), std::memory_order_release);
      out->kept.add(p.i);
    }
    if (!out->kept.error) {
      out->kept.error = rc;
      out->kept.syscall = "pwrite";
    }
    file_->stats.store_errors.fetch_add(pages.size(), std::memory_order_relaxed);
    file_note_error(rc, "pwrite");
  }
  if (stable)
    for (const Page& p : pages)
      if (p.e & kWrite) pt_[p.i].fetch_or(kWrite, std::memory_order_release);
  return rc;
}

int Mirror::writeback(uint64_t first, uint64_t last, bool sync, WritebackResult* out) {
  *out = WritebackResult{};
  if (!file_) return -EINVAL;
  std::lock_guard<std::mutex> wb(file_->wb_mu);
  if (dead()) return -EBADF;
  const uint64_t t0 = sys::now_ns();
  int rc = 0;
  if (!file_->dax) {  // DAX: stores reach the media through the mapping; there is no page cache to write back
    // A chunk that fails does not stop the others: what can be written is written, and the first
    // error is reported (with every page kept in out->kept).
    const uint64_t step = file_->options.chunk_pages;
    for (uint64_t a = first; a < last && rc != -EBADF; a += step) {
      int r = file_writeback_chunk(a, std::min(last, a + step), out);
      if (rc == 0) rc = r;
    }
    const uint64_t off = file_->file_offset + first * page_, len = (last - first) * page_;
    const bool drop = file_->options.strategy == FileStrategy::kBounce && !file_->shmem;
    if (rc != -EBADF && drop) {
      // Bounce on a disk file: what was written leaves the page cache again once it is on disk.
      int r = file_wait(first, last, false, false, &out->kept);
      if (r == 0) file_drop_cache(off, len);
      if (rc == 0) rc = r;
    }
    if (rc != -EBADF && sync) {
      int r = file_wait(0, npages_, true, false, &out->kept);
      if (rc == 0) rc = r;
    }
    // copy and bounce pwrite into the page cache: start the I/O, as the flusher does (remote and
    // pin chunks were written and waited for already).
    else if (rc == 0 && !drop && file_copies() && out->pages) rc = sys::sync_range(file_->fd, off, len, false);
  }
  out->elapsed_ns = sys::now_ns() - t0;
  file_->stats.writebacks.fetch_add(1, std::memory_order_relaxed);
  file_->stats.writeback_ns.fetch_add(out->elapsed_ns, std::memory_order_relaxed);
  return rc;
}

// Library read()/write() of pages the device does not hold, under change_mu_ (re-checked there):
// a device fault cannot load a page between the check and the I/O (reading A into A' and then
// missing the write, or punching the hole the read would read).
int Mirror::file_io_run(bool write, uint64_t off, uint64_t len, uint8_t* buf) {
  const uint64_t at = file_->file_offset + off;
  if (!write) return sys::pread_full(file_->fd, buf, len, at);
  int rc = sys::pwrite_full(file_->fd, buf, len, at);
  // Data only the page cache holds: its loss is reported if its writeback fails.
  if (rc == 0 && len) file_note_written(off / page_, (off + len + page_ - 1) / page_);
  return rc;
}

int64_t Mirror::file_read(uint64_t off, uint64_t len, uint8_t* out) {
  if (!file_) return -EINVAL;
  uint64_t size = 0;
  if (int rc = sys::file_size(file_->fd, &size)) return rc;
  const uint64_t foff = file_->file_offset + off;
  if (foff >= size) return 0;
  len = std::min(len, size - foff);
  if (int rc = file_io(false, off, len, out)) return rc;
  file_->stats.io_read_bytes.fetch_add(len, std::memory_order_relaxed);
  return static_cast<int64_t>(len);
}

int Mirror::file_write(uint64_t off, uint64_t len, const uint8_t* in) {
  if (!file_) return -EINVAL;
  if (file_->options.strategy == FileStrategy::kBounce && len) {
    // A write past end of file extends it, as pwrite(2) would; writes into the device's pages do
    // not reach the file until writeback, which clips to the size, so the size is set first.
    uint64_t size = 0;
    if (int rc = sys::file_size(file_->fd, &size)) return rc;
    if (file_->file_offset + off + len > size)
      if (int rc = sys::truncate_fd(file_->fd, file_->file_offset + off + len)) return rc;
  }
  if (int rc = file_io(true, off, len, const_cast<uint8_t*>(in))) return rc;
  file_->stats.io_write_bytes.fetch_add(len, std::memory_order_relaxed);
  return 0;
}

int Mirror::file_io(bool write, uint64_t off, uint64_t len, uint8_t* buf) {
  const bool copies = file_copies();
  const bool copy = file_->options.strategy == FileStrategy::kCopy;
  uint64_t done = 0;
  while (done < len) {
    std::lock_guard<std::mutex> change(change_mu_);
    if (dead()) return -EBADF;
    const uint64_t at = off + done;
    const uint64_t i = at / page_, in_page = at % page_;
    const uint64_t n = std::min(page_ - in_page, len - done);
    const uint64_t e = pt_[i].load(std::memory_order_acquire);
    if (!copies || !(e & kOnDevice)) {
      // Through the page cache: this page and the following ones the device does not hold, up
      // to 2 MiB at a time (the lock is held for the I/O).
      uint64_t m = n;
      while (done + m < len && m < (2u << 20) && !(copies && (pt_[(off + done + m) / page_].load(std::memory_order_acquire) & kOnDevice)))
        m += std::min(page_, len - done - m);
      if (int rc = file_io_run(write, at, m, buf + done)) return rc;
      done += m;
      continue;
    }
    uint8_t* slot = static_cast<uint8_t*>(device_->slot_address(e >> kSlotShift)) + in_page;
    if (copy && write) {
      // Jan Kara's scheme: the device's copy comes back into A first and goes; the write lands in
      // A, and the device's next access loads the new A.
      const uint64_t old = file_take(i);
      int err = 0;
      if (!file_release_page(i, old, &err)) return err ? err : -EIO;
      device_->charge_transfer(page_, LinkDir::kToHost, LinkCategory::kToHost);
      device_->on_invalidate(this, i, i + 1, InvalidateCause::kCpuWrite, (old & kValid) ? 1 : 0);
      file_->stats.pulled_back.fetch_add(1, std::memory_order_relaxed);
      if (int rc = file_io_run(true, at, n, buf + done)) return rc;
    } else if (copy) {
      // A read: A' comes back into A first (if the device wrote it); then A is read like any page.
      if (e & kDirty) {
        const uint64_t old = pt_[i].fetch_and(~(kWrite | kDirty), std::memory_order_seq_cst);
        wait_inflight(i, i + 1);
        int rc = file_store(i, old);
        pt_[i].fetch_or((old & kWrite) | (rc ? (old & kDirty) : 0), std::memory_order_release);
        if (rc) return rc;
        device_->charge_transfer(page_, LinkDir::kToHost, LinkCategory::kWriteback);
        file_->stats.pulled_back.fetch_add(1, std::memory_order_relaxed);
      }
      if (int rc = file_io_run(false, at, n, buf + done)) return rc;
    } else {
      // Bounce: the device's page is the only copy: a snapshot of it is read, or the write goes
      // into it, with the device's write access held back meanwhile.
      if (write) {
        // The CPU may be reading A (shared read-only once written back): its view goes first.
        if (engine_registered_) sys::advise(reinterpret_cast<void*>(start_ + i * page_), page_, MADV_DONTNEED);
      }
      const uint64_t old = pt_[i].fetch_and(~kWrite, std::memory_order_seq_cst);
      wait_inflight(i, i + 1);
      if (write) std::memcpy(slot, buf + done, n);
      else std::memcpy(buf + done, slot, n);
      // The device's only copy is read or written across the link.
      device_->charge_transfer(n, write ? LinkDir::kToDevice : LinkDir::kToHost,
                               write ? LinkCategory::kToDevice : LinkCategory::kToHost);
      pt_[i].fetch_or((old & kWrite) | (write ? static_cast<uint64_t>(kDirty) : 0ull), std::memory_order_release);
    }
    done += n;
  }
  return 0;
}

int Mirror::take_lease() {
  if (!file_) return -EINVAL;
  if (closed() || dead() || region_->closed.load()) return -EBADF;
  // Held before the kernel may break it: a break that comes at once must find it so.
  if (file_->lease_held.exchange(true)) return 0;
  int rc = Leases::add(this, file_->fd);
  if (rc) file_->lease_held.store(false);
  return rc;
}

// Another process opened or truncated the file: revoke, write back, release, well within the
// lease-break time (the kernel waits for us; past /proc/sys/fs/lease-break-time it breaks the lease).
void Mirror::break_lease() {
  if (!file_ || !file_->lease_held.load()) return;
  file_->stats.lease_breaks.fetch_add(1, std::memory_order_relaxed);
  WritebackResult r;
  writeback(0, npages_, false, &r);
  if (dead()) return;
  const FileStrategy s = file_->options.strategy;
  if (s == FileStrategy::kCopy || s == FileStrategy::kBounce) {
    MigrateToHost::range(this, 0, npages_, Trigger::kRelease);  // the device's copies go back into the file
  } else if (s == FileStrategy::kRemote) {
    // This mirror's entries go (other mirrors of the mapping hold no lease): a device access
    // faults again and sees the file as it is then (past a new end of file: EFAULT). A truncate
    // that lands after that fault is what no lease covers any more: see docs/file-strategies.md.
    invalidate_whole(InvalidateCause::kTruncate);
  } else {
    // A long-term pin cannot be revoked: the device keeps its pages as its own (as pinned pages
    // outlive a truncate), detached from the file from now on.
    std::lock_guard<std::mutex> change(change_mu_);
    for (uint64_t i = 0; i < npages_; i++) keep_pinned_page(i);
  }
  if (file_->lease_held.exchange(false)) ::fcntl(file_->fd, F_SETLEASE, F_UNLCK);
}

}  // namespace pm::engine
