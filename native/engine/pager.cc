#include "pager.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <sys/mman.h>
#include <unistd.h>

#include "../sys/access.h"
#include "../sys/file.h"
#include "../sys/mem.h"
#include "../sys/uapi.h"
#include "../sys/uffd.h"

namespace pm::engine {

namespace {

// Installs [addr, addr + len) from src; a page already present (EEXIST: a poisoned page left by a
// failed fill, or a race) is skipped page by page instead of failing the whole granule.
int copy_in(int uffd, uint64_t addr, const uint8_t* src, uint64_t len, uint64_t page, uint64_t mode) {
  int64_t done = 0;
  int rc;
  do rc = sys::uffd_copy(uffd, addr, reinterpret_cast<uint64_t>(src), len, mode, &done);
  while (rc == -EAGAIN && done == 0);
  if (rc == 0) return 0;
  if (rc != -EEXIST && rc != -EAGAIN) return rc;
  for (uint64_t o = static_cast<uint64_t>(std::max<int64_t>(done, 0)) & ~(page - 1); o < len; o += page) {
    do rc = sys::uffd_copy(uffd, addr + o, reinterpret_cast<uint64_t>(src + o), page, mode, &done);
    while (rc == -EAGAIN);
    if (rc && rc != -EEXIST) return rc;
  }
  sys::uffd_wake(uffd, addr, len);
  return 0;
}

// Whether a write-back error keeps granule g dirty: a failed pwrite or wait names its whole batch,
// a truncation only the granules with data past the file's end.
bool names(const PagerWriteError& e, uint64_t g) {
  return std::find(e.granules.begin(), e.granules.end(), g) != e.granules.end();
}

}  // namespace

Pager::Pager(PagerConfig cfg) : cfg_(std::move(cfg)), ngran_(cfg_.length / cfg_.granule), state_(ngran_, kAbsent) {
  stats_.limit = cfg_.resident_limit;
  pins_.reserve(kMaxPins);
}

Pager::~Pager() { close(); }

void Pager::close() {
  if (closed_.exchange(true)) return;
  std::lock_guard<std::mutex> wb(wb_mu_);
  if (cfg_.fd >= 0) ::close(cfg_.fd);
  if (cfg_.swap_fd >= 0) ::close(cfg_.swap_fd);
  cfg_.fd = cfg_.swap_fd = -1;
}

uint8_t* Pager::buffer() {
  // One granule per thread that fills (service workers, prefetch jobs): at most 2 MiB each.
  thread_local std::vector<uint8_t> buf;
  if (buf.size() < cfg_.granule) buf.resize(cfg_.granule);
  return buf.data();
}

int Pager::resolve(int uffd, const sys::FaultMsg& msg, uint64_t* pages) {
  const uint64_t page_addr = msg.address & ~(cfg_.page - 1);
  if (page_addr < cfg_.base || page_addr >= cfg_.base + cfg_.length) return -EFAULT;
  if (closed_.load()) return -EBADF;
  const uint64_t g = (page_addr - cfg_.base) / cfg_.granule;
  const bool wp = msg.flags & UFFD_PAGEFAULT_FLAG_WP, minor = msg.flags & UFFD_PAGEFAULT_FLAG_MINOR;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.faults++;
    (wp ? stats_.wp : minor ? stats_.minor : stats_.missing)++;
    pin(msg.tid, g);
  }
  *pages = 0;
  if (wp) return resolve_wp(uffd, g, page_addr);
  if (minor && cfg_.mode != PagerMode::kShared) return -EINVAL;
  int rc = resolve_missing(uffd, g, page_addr, msg.flags & UFFD_PAGEFAULT_FLAG_WRITE);
  if (rc == 0) *pages = cfg_.granule / cfg_.page;
  return rc;
}

int Pager::resolve_wp(int uffd, uint64_t g, uint64_t page_addr) {
  std::lock_guard<std::mutex> lock(mu_);
  if (st(g) == kAbsent) {
    // Dropped since the fault: the retried write faults MISSING and refills from the file.
    sys::uffd_wake(uffd, page_addr, cfg_.page);
    return 0;
  }
  // The write is recorded and the protection lifted in one critical section: a writer of a
  // granule that the evictor has protected can never write unrecorded (see evict_batch).
  if (!(state_[g] & kDirty)) {
    state_[g] |= kDirty;
    dirty_++;
  }
  state_[g] |= kRef;
  return sys::uffd_writeprotect(uffd, addr_of(g), cfg_.granule, 0);
}

int Pager::resolve_missing(int uffd, uint64_t g, uint64_t page_addr, bool write) {
  const bool shared = cfg_.mode == PagerMode::kShared;
  bool present = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const uint8_t s = st(g);
    if (s == kFilling) return 0;  // the filler's resolve wakes this faulter too
    if (s != kAbsent) {
      state_[g] |= kRef;
      // Present already: a stale message (wake it), or in shared mode a page of a mapped granule
      // that was a hole of the file when the granule was mapped (resolve that page alone).
      if (!shared) return sys::uffd_wake(uffd, page_addr, cfg_.page);
      present = true;
    } else {
      if (cfg_.mode == PagerMode::kAnonymous && cfg_.fill == FillRule::kCallback && !(state_[g] & kBacked))
        return kForward;
      set_st(g, kFilling);
      filling_++;
      // A write fault: the granule is dirty as soon as it is in, so it goes in writable (no WP
      // round trip for the write that is waiting). Marked before it is writable: clean granules
      // are always write-protected (see evict_batch).
      if (write && !shared && !(state_[g] & kDirty)) {
        state_[g] |= kDirty;
        dirty_++;
      }
    }
  }
  if (present) return resolve_shared_page(uffd, page_addr);
  make_room(uffd);
  int rc = fill(uffd, g, nullptr, false);
  if (rc == 1) rc = resolve_shared_page(uffd, page_addr);  // shared: the granule was partly a hole
  if (rc < 0) {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.fill_errors++;
    if (!has_error_) sticky_ = {rc, cfg_.mode == PagerMode::kShared ? "ioctl" : "pread", {g}};
    has_error_ = true;
    // Nobody may sleep on it, and zeros would be silent corruption: the access gets SIGBUS.
    int64_t done = 0;
    if (sys::uffd_poison(uffd, page_addr, cfg_.page, 0, &done) != 0) sys::uffd_wake(uffd, page_addr, cfg_.page);
    return 0;
  }
  read_ahead(uffd, g);
  return 0;
}

// Shared mode, one page: MINOR when the file has the page (map it), MISSING when it is a hole
// (allocate a zeroed page in the file). Whichever the kernel refuses as present, it already is.
int Pager::resolve_shared_page(int uffd, uint64_t page_addr) {
  int64_t done = 0;
  int rc = sys::uffd_continue(uffd, page_addr, cfg_.page, 0, &done);
  if (rc == -EFAULT || rc == -ENOENT) rc = sys::uffd_zero_fill(uffd, page_addr, cfg_.page, 0, &done, nullptr);
  if (rc == -EEXIST) rc = sys::uffd_wake(uffd, page_addr, cfg_.page);
  return rc;
}

int Pager::fill(int uffd, uint64_t g, const uint8_t* data, bool prefetched) {
  const uint64_t t0 = sys::now_ns();
  const uint64_t addr = addr_of(g);
  int rc = 0;
  bool partial = false;
  uint64_t eof = UINT64_MAX;  // the file's end within the granule, when it is shorter than at pager()
  if (cfg_.mode == PagerMode::kShared) {
    // The file's own pages: map the granule; pages that are holes stay unmapped (their access
    // faults MISSING and is resolved alone).
    int64_t done = 0;
    count_fill(prefetched, 1);  // before the wake, as below
    rc = sys::uffd_continue(uffd, addr, cfg_.granule, 0, &done);
    if (rc) {
      partial = true;
      rc = 0;
      for (uint64_t o = 0; o < cfg_.granule; o += cfg_.page) {
        int r = sys::uffd_continue(uffd, addr + o, cfg_.page, UFFDIO_CONTINUE_MODE_DONTWAKE, &done);
        if (r && r != -EEXIST && r != -EFAULT && r != -ENOENT) rc = r;
      }
      sys::uffd_wake(uffd, addr, cfg_.granule);
      if (rc) count_fill(prefetched, -1);
    }
  } else {
    bool backed, swapped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      backed = cfg_.mode == PagerMode::kPrivate || (state_[g] & kBacked);
      swapped = cfg_.swap_fd >= 0 && (state_[g] & kBacked);
      // A granule filled short and evicted to the memfd: past the end it found, it stays poisoned.
      if (swapped && (state_[g] & kShort)) eof = short_[g];
    }
    const uint8_t* src = data;
    if (!src) {
      uint8_t* buf = buffer();
      const uint64_t off = g * cfg_.granule;
      const uint64_t in_file = off >= cfg_.data_length ? 0 : std::min(cfg_.granule, cfg_.data_length - off);
      if (swapped) {
        rc = sys::pread_full(cfg_.swap_fd, buf, cfg_.granule, off);
      } else if (backed) {
        // A read that comes back short is the only sign of a file truncated under the pager: the
        // common case costs no system call more than the pread.
        const int64_t n = in_file ? sys::pread_upto(cfg_.fd, buf, in_file, cfg_.file_offset + off) : 0;
        if (n < 0) rc = static_cast<int>(n);
        else {
          if (static_cast<uint64_t>(n) < in_file) eof = static_cast<uint64_t>(n);
          std::memset(buf + n, 0, cfg_.granule - n);
        }
      } else if (cfg_.fill == FillRule::kPattern) {
        uint64_t* w = reinterpret_cast<uint64_t*>(buf);
        for (uint64_t i = 0; i < cfg_.granule / 8; i++) w[i] = cfg_.seed + off / 8 + i;
      } else {
        std::memset(buf, 0, cfg_.granule);
      }
      src = buf;
    }
    if (rc == 0) {
      // Counted before the copy wakes the faulter: whoever waits for its access and then reads
      // stats() finds this fill in them. Taken back below if the copy fails.
      count_fill(prefetched, 1);
      // Installed write-protected unless already dirty (a write fault's fill): the first write to
      // a clean granule is a WP fault, which is how it becomes dirty.
      bool dirty;
      {
        std::lock_guard<std::mutex> lock(mu_);
        dirty = state_[g] & kDirty;
      }
      const uint64_t mode = dirty ? 0 : UFFDIO_COPY_MODE_WP;
      // Pages wholly past the end of a truncated file are poisoned: their access gets SIGBUS, as
      // a mapping's access past EOF does, rather than zeros the file does not hold.
      const uint64_t len = eof == UINT64_MAX ? cfg_.granule : (eof + cfg_.page - 1) & ~(cfg_.page - 1);
      rc = len ? copy_in(uffd, addr, src, len, cfg_.page, mode) : 0;
      if (rc == 0 && len < cfg_.granule) {
        int64_t done = 0;
        if (sys::uffd_poison(uffd, addr + len, cfg_.granule - len, 0, &done) != 0)
          rc = copy_in(uffd, addr + len, src + len, cfg_.granule - len, cfg_.page, mode);  // no POISON: zeros
      }
      if (rc) count_fill(prefetched, -1);
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (rc) {
    unfill(uffd, g);
    return rc;
  }
  filling_--;
  filled_.notify_all();
  set_st(g, kResident);  // a write during the fill (a WP fault) has already set kDirty
  state_[g] |= kRef;
  if (eof != UINT64_MAX && !(state_[g] & kShort)) {
    state_[g] |= kShort;
    short_[g] = eof;
    stats_.short_fills++;
  }
  resident_++;
  if (cfg_.policy == EvictPolicy::kFifo) fifo_.push_back(g);  // the clock never pops it: it would only grow
  stats_.fill_ns += sys::now_ns() - t0;
  return partial ? 1 : 0;
}

// A fill given up (failed, or read-ahead with no room): the granule is absent again. Faults that
// found it filling were left asleep for this fill's wake: wake them, so that each faults again and
// gets a fill (or its own SIGBUS) instead of sleeping forever. mu_ held.
void Pager::unfill(int uffd, uint64_t g) {
  filling_--;
  filled_.notify_all();
  if (state_[g] & kDirty) dirty_--;
  state_[g] = absent(state_[g]);
  sys::uffd_wake(uffd, addr_of(g), cfg_.granule);
}

void Pager::count_fill(bool prefetched, int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.fills += n;
  stats_.fill_bytes += n * static_cast<int64_t>(cfg_.granule);
  if (prefetched) stats_.prefetched += n;
}

int Pager::install(uint64_t g, const uint8_t* data) {
  const int uffd = uffd_.load();
  if (g >= ngran_) return -EINVAL;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (st(g) != kAbsent) return st(g) == kFilling ? 0 : sys::uffd_wake(uffd, addr_of(g), cfg_.granule);
    set_st(g, kFilling);
    filling_++;
  }
  make_room(uffd);
  return std::min(fill(uffd, g, data, false), 0);
}

int Pager::poison(uint64_t addr) {
  const int uffd = uffd_.load();
  const uint64_t page_addr = addr & ~(cfg_.page - 1);
  if (page_addr < cfg_.base || page_addr >= cfg_.base + cfg_.length) return -EINVAL;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.fill_errors++;
  }
  int64_t done = 0;
  int rc = sys::uffd_poison(uffd, page_addr, cfg_.page, 0, &done);
  if (rc == -EEXIST) rc = sys::uffd_wake(uffd, page_addr, cfg_.page);
  return rc;
}

bool Pager::make_room(int uffd) {
  if (cfg_.resident_limit == 0) return true;
  const size_t batch = std::max<uint64_t>(1, cfg_.resident_limit / 8);
  for (;;) {
    size_t over;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (resident_ + filling_ <= cfg_.resident_limit) return true;
      over = resident_ + filling_ - cfg_.resident_limit;
    }
    // Nothing could be evicted (every resident granule is pinned, being filled or written by
    // others, or the file refuses writes): a fault's fill goes over the limit rather than make
    // the faulter wait forever.
    if (evict_batch(uffd, std::max(over, batch)) <= 0) return false;
  }
}

// The livelock this prevents: with room for fewer granules than threads fault at once (a 25 %
// limit of an 8 MiB file at 2 MiB granules is one granule; two threads), the fill for one thread
// evicted the granule just filled for the other, which had been woken but not yet run: on an idle
// machine the wake-up of a sleeping thread (tens of µs) is slower than the next eviction, and each
// thread's retry evicted the other's granule again, forever, at full CPU. A granule stays until
// its thread either faults again (its access went on, or needs another granule) or exits: every
// fault's fill is used at least once, at the cost of one granule per such thread over the limit.
void Pager::pin(uint32_t tid, uint64_t g) {
  if (tid == 0) return;  // no thread ids (UFFD_FEATURE_THREAD_ID): no pins
  Pin* oldest = nullptr;
  for (Pin& p : pins_) {
    if (p.tid == tid) {
      p.g = g;
      p.seq = ++pin_seq_;
      return;
    }
    if (!oldest || p.seq < oldest->seq) oldest = &p;
  }
  if (pins_.size() < kMaxPins) pins_.push_back({tid, g, ++pin_seq_});
  else *oldest = {tid, g, ++pin_seq_};
}

bool Pager::pinned(uint64_t g) {
  for (size_t i = 0; i < pins_.size();) {
    if (pins_[i].g != g) {
      i++;
      continue;
    }
    // A thread that exited never comes back for its granule (its id may be reused: then the pin
    // lasts until that thread's next fault, which is harmless).
    char path[48];
    std::snprintf(path, sizeof(path), "/proc/self/task/%u", pins_[i].tid);
    if (::access(path, F_OK) == 0) return true;
    pins_[i] = pins_.back();
    pins_.pop_back();
  }
  return false;
}

// Victims, under mu_, marked busy. FIFO: in fill order. Clock: a granule whose reference bit is
// set (set by its fill and by write faults) is passed over once, its bit cleared; a dirty one is
// write-protected again on the way, so that its next write faults and sets the bit. Reads of a
// present page cannot be seen from user space on this kernel (see docs/pager.md).
bool Pager::pick_victims(int uffd, size_t want, std::vector<uint64_t>* out) {
  if (cfg_.policy == EvictPolicy::kFifo) {
    for (size_t n = fifo_.size(); n > 0 && out->size() < want; n--) {
      const uint64_t g = fifo_.front();
      fifo_.pop_front();
      if (st(g) != kResident) continue;  // stale: evicted and maybe refilled (pushed again then)
      if (pinned(g)) {
        fifo_.push_back(g);  // its thread has not come back: after the others
        continue;
      }
      set_st(g, kBusy);
      out->push_back(g);
    }
  } else {
    for (uint64_t steps = 0; out->size() < want && steps < 2 * ngran_; steps++) {
      const uint64_t g = hand_;
      hand_ = hand_ + 1 == ngran_ ? 0 : hand_ + 1;
      if (st(g) != kResident || pinned(g)) continue;
      if (state_[g] & kRef) {
        state_[g] &= static_cast<uint8_t>(~kRef);
        if ((state_[g] & kDirty) && cfg_.mode != PagerMode::kShared)
          sys::uffd_writeprotect(uffd, addr_of(g), cfg_.granule, UFFDIO_WRITEPROTECT_MODE_WP);
        continue;
      }
      set_st(g, kBusy);
      out->push_back(g);
    }
  }
  return !out->empty();
}

// After a failed writeback the kernel keeps the file's pages, marked clean, and on ext4 a page
// whose blocks were allocated for that write keeps buffers mapped to an extent still marked
// unwritten: a later pwrite of the same page is written to the disk and its wait succeeds, but the
// extent is never converted, so after the page cache lets it go the file reads zeros there (seen on
// 6.18: "failed to convert unwritten extents", then fsync 0 and zeros after a remount). Dropping
// the failed range's pages (clean now, so they go) makes the next pwrite start from fresh pages,
// which map the extent again and are converted when written. Nothing of the pager's is lost: the
// granules it keeps dirty are in its memory, and an evicted one reported lost reads, from now on,
// what the disk has.
void Pager::forget_failed_pages(int fd, uint64_t off, uint64_t len) {
  sys::drop_cache(fd, off, len);
}

void Pager::protect_runs(int uffd, const std::vector<uint64_t>& sorted) {
  for_each_run(sorted, [&](uint64_t g, uint64_t n) {
    sys::uffd_writeprotect(uffd, addr_of(g), n * cfg_.granule, UFFDIO_WRITEPROTECT_MODE_WP);
  });
}

// The eviction protocol. A granule leaves memory only when the file holds everything written to
// it, even while other threads keep writing:
//   1. under mu_: mark it busy and clear its dirty bit (remembering it was dirty);
//   2. write-protect it (UFFDIO_WRITEPROTECT): from here on every write faults, and the fault
//      handler sets the dirty bit and lifts the protection in one mu_ critical section. A write
//      that landed between 1 and 2 found the page writable and is in memory before 3 reads it;
//   3. pwrite the granule from the region to the file, then wait for it (sync_file_range);
//   4. under mu_: if the dirty bit is set again, a write came after 2 and may be missing from the
//      file: the granule stays (resident, dirty). Otherwise drop it (MADV_DONTNEED) while still
//      holding mu_, so no handler can lift the protection between this check and the drop.
// A failed write or wait leaves every granule of the batch resident and dirty, and the error sticky.
int Pager::evict_batch(int uffd, size_t want) {
  std::lock_guard<std::mutex> wb(wb_mu_);
  std::vector<uint64_t> victims, to_write;
  std::vector<bool> was_dirty;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (resident_ + filling_ <= cfg_.resident_limit) return 1;  // someone else made room meanwhile
    if (!pick_victims(uffd, want, &victims)) return 0;
    for (uint64_t g : victims) {
      const bool d = cfg_.mode != PagerMode::kShared && (state_[g] & kDirty);
      was_dirty.push_back(d);
      if (d) {
        state_[g] &= static_cast<uint8_t>(~kDirty);  // step 1
        dirty_--;
        to_write.push_back(g);
      }
    }
  }
  std::sort(to_write.begin(), to_write.end());
  protect_runs(uffd, to_write);  // 2
  PagerWriteError err;
  const int rc = to_write.empty() ? 0 : write_back(to_write, &err);  // 3
  size_t dropped = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);  // 4
    std::vector<uint64_t> drop;
    for (size_t i = 0; i < victims.size(); i++) {
      const uint64_t g = victims[i];
      if (rc && was_dirty[i] && names(err, g) && !(state_[g] & kDirty)) {
        state_[g] |= kDirty;
        dirty_++;
      }
      if (state_[g] & kDirty) {
        set_st(g, kResident);
        if (cfg_.policy == EvictPolicy::kFifo) fifo_.push_back(g);
        if (!rc) stats_.evict_aborts++;
        continue;
      }
      drop.push_back(g);
      state_[g] = absent(static_cast<uint8_t>(state_[g] | (was_dirty[i] ? kBacked : 0)));
      resident_--;
      stats_.evictions++;
      dropped++;
    }
    // Still under mu_ (see 4): a granule marked absent above is refilled only after its pages
    // are gone, since a fill first takes mu_ to mark it filling.
    std::sort(drop.begin(), drop.end());
    for_each_run(drop, [&](uint64_t g, uint64_t n) {
      sys::advise(reinterpret_cast<void*>(addr_of(g)), n * cfg_.granule, MADV_DONTNEED);
    });
    if (rc) {
      stats_.write_errors++;
      if (!has_error_) sticky_ = err;
      has_error_ = true;
      return -1;
    }
  }
  return dropped ? static_cast<int>(dropped) : 1;  // aborted ones are progress too: retry the pick
}

int Pager::write_back(const std::vector<uint64_t>& gs, PagerWriteError* err) {
  const uint64_t t0 = sys::now_ns();
  const bool swap = cfg_.swap_fd >= 0;
  const int fd = swap ? cfg_.swap_fd : cfg_.fd;
  const uint64_t at = swap ? 0 : cfg_.file_offset;
  // The bytes of the pager the file holds now: write-back never grows a file back over a
  // truncation made under the pager. One fstat per batch, never on the fault path (a batch's
  // pwrite and wait cost far more).
  uint64_t file_end = cfg_.data_length;
  int64_t size = 0;
  if (!swap) {
    size = sys::file_size(fd);
    if (size < 0) {
      *err = {static_cast<int>(size), "fstat", gs};
      return static_cast<int>(size);
    }
    file_end = std::min(cfg_.data_length, static_cast<uint64_t>(size) > at ? static_cast<uint64_t>(size) - at : 0);
  }
  // [begin, end) of the pager to write for each granule, in order; adjacent ones merge into one
  // pwrite (adjacent in the region and in the file). A granule filled short holds nothing of the
  // file past the end it found (its pages past that are poisoned).
  std::vector<uint64_t> sorted(gs), past;
  std::sort(sorted.begin(), sorted.end());
  std::vector<std::pair<uint64_t, uint64_t>> runs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (uint64_t g : sorted) {
      const uint64_t off = g * cfg_.granule;
      uint64_t end = std::min(off + cfg_.granule, cfg_.data_length);
      if (state_[g] & kShort) end = std::min(end, off + short_[g]);  // past it: poisoned, never written
      if (end > std::max(off, file_end)) {
        past.push_back(g);  // kept dirty: only the part within the file is written
        end = file_end;
      }
      if (off >= end) continue;
      if (!runs.empty() && runs.back().second == off) runs.back().second = end;
      else runs.emplace_back(off, end);
    }
  }
  uint64_t lo = UINT64_MAX, hi = 0, bytes = 0;
  for (const auto& [off, end] : runs) {
    int rc = sys::pwrite_full(fd, reinterpret_cast<const void*>(cfg_.base + off), end - off, at + off);
    if (rc) {
      *err = {rc, "pwrite", gs};
      return rc;
    }
    lo = std::min(lo, off);
    hi = std::max(hi, end);
    bytes += end - off;
  }
  if (cfg_.confirm_writes && hi > lo) {
    int rc = sys::sync_range(fd, at + lo, hi - lo, true);
    if (rc) {
      forget_failed_pages(fd, at + lo, hi - lo);
      *err = {rc, "sync_file_range", gs};
      return rc;
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (!cfg_.confirm_writes && !swap)
    for (uint64_t g : gs) state_[g] |= kUnconfirmed;  // flush()'s fdatasync confirms them
  stats_.writebacks += gs.size() - past.size();
  stats_.writeback_bytes += bytes;
  if (cfg_.confirm_writes && hi > lo) stats_.waits++;
  stats_.writeback_ns += sys::now_ns() - t0;
  if (!past.empty()) {
    *err = {-ENXIO, "pwrite", past, static_cast<uint64_t>(size)};
    return -ENXIO;
  }
  return 0;
}

int Pager::flush(PagerWriteError* out) {
  if (cfg_.swap_fd >= 0) return 0;  // write-back off: writes stay in memory, the file is not written
  if (cfg_.mode == PagerMode::kShared) {
    // The region maps the file's own pages: nothing to copy. A memory file has no writeback, so
    // this wait is only for the record.
    int rc = sys::datasync(cfg_.fd);
    if (rc) *out = {rc, "fdatasync", {}};
    return rc;
  }
  const int uffd = uffd_.load();
  {
    // A fill wakes its faulter (the copy ioctl) before it marks the granule resident, so a write
    // that completed before this flush may sit in a granule still marked filling, which the scan
    // below would skip: wait for every fill that is dirty now (a write fault's fill, or a WP fault
    // taken during the fill) to end. Not under wb_mu_: a fill may be evicting (make_room) and
    // needs it. A fill dirtied after this point holds a write concurrent with the flush, which
    // the flush does not promise.
    std::unique_lock<std::mutex> lock(mu_);
    std::vector<uint64_t> pending;
    for (uint64_t g = 0; g < ngran_; g++)
      if (st(g) == kFilling && (state_[g] & kDirty)) pending.push_back(g);
    filled_.wait(lock, [&] {
      return std::none_of(pending.begin(), pending.end(), [&](uint64_t g) { return st(g) == kFilling; });
    });
  }
  std::lock_guard<std::mutex> wb(wb_mu_);
  std::vector<uint64_t> gs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (uint64_t g = 0; g < ngran_; g++)
      if (st(g) == kResident && (state_[g] & kDirty)) {
        state_[g] &= static_cast<uint8_t>(~kDirty);  // as eviction's steps 1-3 (no drop)
        dirty_--;
        set_st(g, kBusy);
        gs.push_back(g);
      }
  }
  protect_runs(uffd, gs);
  PagerWriteError err;
  int rc = gs.empty() ? 0 : write_back(gs, &err);
  if (rc == 0 && cfg_.confirm_writes && gs.empty()) {
    // Nothing dirty here; still report an error the file recorded since the last wait.
    rc = sys::sync_range(cfg_.fd, 0, 0, true);
    if (rc) err = {rc, "sync_file_range", {}};
  }
  // 'pagecache': evictions and the writes above reached only the page cache, and the kernel's
  // writeback of them may have failed since (EIO from the disk, ENOSPC from a thin device); the
  // file's error sequence holds it. flush() is where the pager says the file has what was
  // written, so it asks: without this, such an error was never reported to anyone.
  const bool unconfirmed = rc == 0 && !cfg_.confirm_writes && cfg_.swap_fd < 0;
  if (unconfirmed) {
    rc = sys::datasync(cfg_.fd);
    if (rc) {
      forget_failed_pages(cfg_.fd, cfg_.file_offset, cfg_.data_length);  // the error names no range
      err = {rc, "fdatasync", {}};
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (uint64_t g : gs) {
    set_st(g, kResident);
    const bool kept = rc && names(err, g);
    if (kept && !(state_[g] & kDirty)) {
      state_[g] |= kDirty;
      dirty_++;
    }
    if (!kept) state_[g] |= kBacked;
  }
  if (unconfirmed) {
    for (uint64_t g = 0; g < ngran_; g++) {
      if (!(state_[g] & kUnconfirmed)) continue;
      state_[g] &= static_cast<uint8_t>(~kUnconfirmed);
      if (!rc) continue;
      // The error names no page: every granule written since the last good fdatasync is suspect.
      // One still in memory is written again by the next flush(); one evicted is gone.
      if (st(g) == kResident) {
        if (!(state_[g] & kDirty)) {
          state_[g] |= kDirty;
          dirty_++;
        }
        err.granules.push_back(g);
      } else {
        err.lost.push_back(g);
      }
    }
    stats_.lost += err.lost.size();
  }
  if (rc) {
    stats_.write_errors++;
    sticky_ = err;
    has_error_ = true;
    // Granules an earlier failed eviction kept are dirty too: name them all.
    for (uint64_t g = 0; g < ngran_; g++)
      if ((state_[g] & kDirty) && std::find(sticky_.granules.begin(), sticky_.granules.end(), g) == sticky_.granules.end())
        sticky_.granules.push_back(g);
    std::sort(sticky_.granules.begin(), sticky_.granules.end());
    *out = sticky_;
    return rc;
  }
  has_error_ = false;  // every granule an earlier error kept was dirty, and is confirmed now
  sticky_ = {};
  return 0;
}

void Pager::read_ahead(int uffd, uint64_t g) {
  if (cfg_.prefetch_max == 0) return;
  uint64_t from, to;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // A stream: this fault is where the last one (and its read-ahead) ended. The window doubles
    // with each fault of the stream, up to prefetch_max; any other fault ends the stream.
    if (g == next_expected_) window_ = window_ ? std::min(window_ * 2, cfg_.prefetch_max) : std::min<uint64_t>(2, cfg_.prefetch_max);
    else window_ = 0;
    from = g + 1;
    to = std::min(ngran_, from + window_);
    next_expected_ = to;
  }
  prefetch_range(uffd, from, to, true);
}

int64_t Pager::prefetch_range(int uffd, uint64_t g0, uint64_t g1, bool stream) {
  int64_t n = 0;
  for (uint64_t g = g0; g < g1 && !closed_.load(); g++) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (st(g) != kAbsent) continue;
      if (cfg_.mode == PagerMode::kAnonymous && cfg_.fill == FillRule::kCallback && !(state_[g] & kBacked)) continue;
      set_st(g, kFilling);
      filling_++;
    }
    if (!make_room(uffd)) {
      // Read-ahead never takes the set past the limit (a fault's fill may, see pin()).
      std::lock_guard<std::mutex> lock(mu_);
      unfill(uffd, g);
      break;
    }
    int rc = fill(uffd, g, nullptr, true);
    if (rc < 0) {
      if (!stream) return rc;
      break;
    }
    n++;
  }
  return n;
}

int64_t Pager::prefetch(uint64_t g0, uint64_t g1) {
  if (g0 >= g1 || g1 > ngran_) return -EINVAL;
  // A hint never evicts what it just read: at most the resident limit.
  if (cfg_.resident_limit) g1 = std::min(g1, g0 + cfg_.resident_limit);
  return prefetch_range(uffd_.load(), g0, g1, false);
}

PagerStats Pager::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  PagerStats s = stats_;
  s.resident = resident_;
  s.dirty = dirty_;
  return s;
}

bool Pager::last_error(PagerWriteError* out) {
  std::lock_guard<std::mutex> lock(mu_);
  if (has_error_) *out = sticky_;
  return has_error_;
}

bool Pager::acknowledge_loss(PagerWriteError* out) {
  std::lock_guard<std::mutex> wb(wb_mu_);  // no write-back holds a granule busy meanwhile
  std::lock_guard<std::mutex> lock(mu_);
  if (!has_error_) return false;
  *out = sticky_;
  for (uint64_t g : sticky_.granules) {
    if (g >= ngran_ || st(g) != kResident || !(state_[g] & kDirty)) continue;
    // Dropped as an eviction drops (under mu_, so no write fault lifts a protection meanwhile):
    // the next access faults and reads the file.
    sys::advise(reinterpret_cast<void*>(addr_of(g)), cfg_.granule, MADV_DONTNEED);
    state_[g] = absent(state_[g]);
    dirty_--;
    resident_--;
    stats_.discarded++;
  }
  has_error_ = false;
  sticky_ = {};
  return true;
}

}  // namespace pm::engine
