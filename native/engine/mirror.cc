#include "mirror.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <linux/magic.h>
#include <sys/mman.h>
#include <thread>

#include "../sys/access.h"
#include "../sys/file.h"
#include "../sys/mem.h"
#include "../sys/uapi.h"
#include "device.h"
#include "engine.h"
#include "migrate.h"
#include "../sys/pagemap.h"
#include "../sys/uffd.h"
#include <cstring>
#include <vector>

namespace pm::engine {

Mirror::Mirror(Device* device, std::shared_ptr<Region> region, uint64_t offset, uint64_t length)
    : device_(device),
      region_(std::move(region)),
      offset_(offset),
      start_(region_->addr + offset),
      npages_(length / region_->page),
      page_(region_->page),
      pt_(npages_) {
  region_->add_notifier(this);
  attached_ = true;
  device_->add_mirror(this);
  Engine::get().track(this);
}

Mirror::~Mirror() {
  detach();
  // Closed here, not in detach(): library I/O started before close() holds the mirror and may
  // still be using the descriptor (the number must not be reused under it).
  if (file_ && file_->fd >= 0) sys::close_fd(file_->fd);
}

void Mirror::detach() {
  if (!attached_) return;
  if (file_) {
    // A file's data must not go with the mirror. No fault may load anything from here on (dead),
    // the device's copies are written back, and only then is the lease given up.
    file_stop_periodic();
    {
      std::lock_guard<std::mutex> change(change_mu_);
      std::lock_guard<std::mutex> lock(mu_);
      dead_.store(true, std::memory_order_release);
      gen_++;
    }
    if (file_copies()) MigrateToHost::range(this, 0, npages_, Trigger::kRelease);
    file_release_lease();
    if (file_copies() && !file_->shmem) region_->cpu_via_library.fetch_sub(1);
  }
  attached_ = false;
  Engine::get().untrack(this);
  device_->remove_mirror(this);
  region_->remove_notifier(this);
  if (engine_registered_) {
    // Device-resident pages come home first: closing a mirror must not lose data.
    MigrateToHost::range(this, 0, npages_, Trigger::kRelease);
    Engine::get().remove_mirror(this);
    Engine::get().unregister_range(start_, engine_len_, region_->id);
    region_->registered.fetch_sub(1);
  }
  // Off every list now; wait for those who took us from one before (engine handler, eviction).
  while (users_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  std::lock_guard<std::mutex> change(change_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    dead_.store(true, std::memory_order_release);
    gen_++;
  }
  for (uint64_t i = pt_.next_present(0, npages_); i < npages_; i = pt_.next_present(i + 1, npages_)) {
    uint64_t old = pt_[i].exchange(0, std::memory_order_seq_cst);
    if (file_copies() && (old & kOnDevice)) file_lost_at_close(i, old);
    if (old & kOnDevice) device_->free_slot(old >> kSlotShift);
  }
  wait_inflight(0, npages_);
  if (alias_) {
    sys::unmap(reinterpret_cast<void*>(alias_), npages_ * page_);
    alias_ = 0;
  }
}

void* Mirror::pin(uint64_t i, bool write) {
  // No block: no entry was ever programmed there (a miss). A block, once there, stays while the
  // mirror lives, so the counter taken below is the one an invalidation waits on.
  PageTable::Block* block = pt_.block(i);
  if (!block) return nullptr;
  std::atomic<uint32_t>& b = block->inflight;
  std::atomic<uint64_t>& entry = block->e[i & (PageTable::kBlockEntries - 1)];
  // seq_cst on both sides (here: count then entry; invalidation: entry then count) guarantees that
  // either the invalidation sees this access in flight, or this access sees the cleared entry.
  b.fetch_add(1, std::memory_order_seq_cst);
  uint64_t e = entry.load(std::memory_order_seq_cst);
  for (;;) {
    if (!(e & kValid) || (write && !(e & kWrite))) {
      b.fetch_sub(1, std::memory_order_release);
      return nullptr;
    }
    // A write access marks the page dirty before it writes, atomically with finding the entry
    // writable: whoever clears the entry from now on sees the bit (a writeback or flush that read
    // a clean entry could otherwise let a write slip past it).
    if (!write || (e & kDirty) || entry.compare_exchange_weak(e, e | kDirty, std::memory_order_seq_cst)) break;
  }
  if (e & kOnDevice) {
    if (!(e & kAccessed)) entry.fetch_or(kAccessed, std::memory_order_relaxed);
    return device_->slot_address(e >> kSlotShift);
  }
  return reinterpret_cast<void*>((alias_ ? alias_ : start_.load(std::memory_order_relaxed)) + i * page_);
}

void Mirror::mark_dirty(uint64_t i) {
  uint64_t e = pt_[i].load(std::memory_order_relaxed);
  // Only while the entry is still the one we accessed through: an invalidation that cleared it
  // must not see a resurrected bit.
  while ((e & kValid) && !(e & kDirty) && !pt_[i].compare_exchange_weak(e, e | kDirty)) {
  }
}

// The sequence-count protocol's two halves: while a change is under way no range fault programs
// entries, and one that started before it retries.
void Mirror::begin_change() {
  std::lock_guard<std::mutex> lock(mu_);
  active_++;
  gen_++;
}

void Mirror::end_change() {
  std::lock_guard<std::mutex> lock(mu_);
  active_--;
  gen_++;
  idle_.notify_all();
}

void Mirror::wait_inflight(uint64_t first, uint64_t last) {
  if (first >= last) return;
  // Absent blocks have no entries, so no access can be in flight there.
  for (uint64_t i = pt_.next_present(first, last); i < last; i = pt_.next_present(((i >> kBlockShift) + 1) << kBlockShift, last)) {
    std::atomic<uint32_t>& inflight = pt_.block(i)->inflight;
    unsigned spins = 0;
    while (inflight.load(std::memory_order_seq_cst) != 0) {
      if (++spins < 64) continue;
      std::this_thread::yield();
    }
  }
}

namespace {
// The mirrors whose invalidation this thread started and has not ended: invalidate_end() releases
// exactly those, even if the mirror moved (remapped()) in between.
thread_local std::vector<const Mirror*> tl_invalidating;
}  // namespace

void Mirror::invalidate_start(uint64_t start, uint64_t end, InvalidateCause cause) {
  uint64_t first = 0, last = 0;
  auto overlap = [&](uint64_t at) {
    const uint64_t s = std::max(start, at), e = std::min(end, at + npages_ * page_);
    first = (s - at) / page_;
    last = (e - at + page_ - 1) / page_;
    return s < e;
  };
  const uint64_t at = start_.load();
  if (!overlap(at)) return;
  change_mu_.lock();  // released by invalidate_end(), on this thread (Region::Invalidation's scope)
  // start_ moves only under change_mu_: read again now that it cannot.
  if (start_.load() != at && !overlap(start_.load())) {
    change_mu_.unlock();
    return;
  }
  tl_invalidating.push_back(this);
  begin_change();
  // The data of a device-resident page survives an invalidation that leaves the memory in place
  // (protect, writeback); it goes with an unmap, a discard or a truncate.
  const bool drops_data = !file_copies() && (cause == InvalidateCause::kUnmap || cause == InvalidateCause::kDiscard ||
                                             cause == InvalidateCause::kTruncate || cause == InvalidateCause::kUffdEvent);
  uint64_t cleared = 0;
  if (file_copies()) {
    // The device's copies of a file's pages belong to the file, not to this mapping. msync writes
    // them back (they stay); an unmap, a discard, a remap, a truncate or a hole punch writes them
    // back and lets them go: what the truncate or punch then cuts is cut from the file itself, and
    // what survives it (the head of a page cut in the middle) is not lost.
    if (cause == InvalidateCause::kWriteback) {
      WritebackResult r;
      file_writeback_chunk_locked(first, last, &r);
    } else if (cause != InvalidateCause::kProtect && cause != InvalidateCause::kAdvise) {
      file_flush_locked(first, last);
    }
  }
  if (pinned_ && cause != InvalidateCause::kRemap) {
    // A pinned page is not the CPU's to take: the device keeps a page of its own. (One that only
    // moves, by mremap, stays the same page: its entries go below and are faulted at the new address.)
    if (cause != InvalidateCause::kFork && cause != InvalidateCause::kWriteback)
      for (uint64_t i = pt_.next_present(first, last); i < last; i = pt_.next_present(i + 1, last)) keep_pinned_page(i);
    stats_.invalidations.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  for (uint64_t i = pt_.next_present(first, last); i < last; i = pt_.next_present(i + 1, last)) {
    uint64_t old = pt_[i].load(std::memory_order_relaxed);
    uint64_t keep = (old & kOnDevice) && !drops_data ? (old & ~(kValid | kWrite | kAtomic)) : 0;
    old = pt_[i].exchange(keep, std::memory_order_seq_cst);
    // The device's write is in the page cache only from here on (remote): unconfirmed.
    if (file_ && (old & kDirty) && !(old & kOnDevice)) file_note_written(i, i + 1);
    if (old & kValid) cleared++;
    if ((old & kOnDevice) && !keep) device_->free_slot(old >> kSlotShift);
  }
  wait_inflight(first, last);
  stats_.invalidations.fetch_add(1, std::memory_order_relaxed);
  stats_.invalidated_pages.fetch_add(cleared, std::memory_order_relaxed);
  device_->on_invalidate(this, first, last, cause, cleared);
  if (cause == InvalidateCause::kUnmap && first == 0 && last == npages_) dead_.store(true, std::memory_order_release);
}

// Caller: Region::Invalidation, between this mirror's invalidate_start and invalidate_end, so the
// entries are cleared, no device access is in flight and no range fault can program an entry: none
// can have computed an address from the old start. Device pages stay in device memory (their
// holes moved with the page tables), as device-private pages do in the kernel.
void Mirror::remapped(uint64_t, uint64_t new_addr, uint64_t new_length, bool old_kept) {
  const uint64_t old_start = start_.load(), new_start = new_addr + offset_;
  {
    std::lock_guard<std::mutex> lock(mu_);
    start_.store(new_start);
    gen_++;
  }
  if (!engine_registered_) return;
  // The kernel drops a moved range's userfaultfd registration unless the descriptor asked for REMAP
  // events (the engine's asks for none: mremap would then wait for the engine's thread). Register
  // the new range before the change ends, or a CPU touch of a device page's hole would map zeros.
  const uint64_t len = offset_ >= new_length ? 0 : std::min(npages_ * page_, new_length - offset_);
  const bool minor = file_ && file_->shmem && file_copies();
  const int rc = len ? Engine::get().register_range(new_start, len, region_->id, minor) : 0;
  Engine::get().unregister_range(old_start, engine_len_, region_->id, old_kept || old_start == new_start);
  engine_len_ = rc ? 0 : len;
  const uint64_t n = len / page_;
  if (rc == 0) {
    // Until the registration, a range fault that had computed an address here before (a mapping
    // moving back to where it was) could populate a device page's hole with a zero page. Nobody
    // used it (every range fault since the move retries), and none can appear now: zap those.
    for (uint64_t a, b, from = 0; next_device_run(from, n, &a, &b); from = b) {
      std::vector<uint64_t> pm(b - a);
      if (sys::pagemap_read(new_start + a * page_, b - a, pm.data()) != 0) continue;
      for (uint64_t k = 0; k < b - a; k++)
        if (pm[k] >> 63 & 1) sys::advise(reinterpret_cast<void*>(new_start + (a + k) * page_), page_, MADV_DONTNEED);
    }
    return;
  }
  // Cannot happen short of ENOMEM; the data must still not be lost: copy it into the new range.
  for (uint64_t i = 0; i < n; i++) {
    const uint64_t e = pt_[i].exchange(0, std::memory_order_seq_cst);
    if (!(e & kOnDevice)) continue;
    sys::guarded_copy(reinterpret_cast<void*>(new_start + i * page_), device_->slot_address(e >> kSlotShift), page_, nullptr);
    device_->free_slot(e >> kSlotShift);
  }
}

void Mirror::invalidate_end(uint64_t, uint64_t) {
  auto it = std::find(tl_invalidating.begin(), tl_invalidating.end(), this);
  if (it == tl_invalidating.end()) return;
  tl_invalidating.erase(it);
  end_change();
  change_mu_.unlock();
}

// One attempt of a range fault: 0 done, 1 raced (retry), or -errno.
int Mirror::fault_once(uint64_t first, uint64_t last, bool write, std::chrono::steady_clock::time_point deadline) {
  if (dead() || region_->closed.load()) return -EFAULT;
  // Pages a shrinking remap cut off have no CPU side, until the mapping grows back over them.
  if (offset_ + last * page_ > region_->length) return -EFAULT;
  uint64_t gen0;
  {
    std::unique_lock<std::mutex> lock(mu_);
    // An invalidation in progress: the CPU side is changing under us; wait for its end.
    if (!idle_.wait_until(lock, deadline, [&] { return active_ == 0; })) return -EBUSY;
    gen0 = gen_;
  }
  const uint64_t off = offset_ + first * page_, len = (last - first) * page_;
  const int prot = region_->prot_over(off, len);
  if (!(prot & PROT_READ)) return -EFAULT;
  if (write && !(prot & PROT_WRITE)) return -EPERM;
  // Make the CPU side present: the user-space hmm_range_fault. Device-resident pages are holes on
  // the CPU side and stay so; populate the runs between them. A single-writer mirror populates
  // through its own view: the same pages, but not registered, so no write-protect fault is raised
  // inside the kernel (which a user-mode-only engine descriptor would never see).
  auto populate = [&](uint64_t a, uint64_t b) {
    const uint64_t base = alias_ ? alias_ : start_.load(std::memory_order_relaxed);
    return sys::advise(reinterpret_cast<void*>(base + a * page_), (b - a) * page_,
                       write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ);
  };
  for (uint64_t i, j, from = first; next_host_run(from, last, &i, &j); from = j) {
    int rc = populate(i, j);
    if (rc == -EFAULT && region_->fd >= 0 && !region_->hugetlb) {
      // Past the end of the file (truncated, perhaps by another process) the CPU would take a
      // SIGBUS: entries stop at the end of file, and a fault that starts past it fails. Asked only
      // here, so a fault inside the file costs no fstat.
      uint64_t size = 0;
      if (sys::file_size(region_->fd, &size) == 0) {
        const uint64_t base = region_->file_offset + offset_;
        const uint64_t eof = size <= base ? 0 : (size - base + page_ - 1) / page_;
        if (eof <= first) return -EFAULT;
        if (eof < j) {
          last = j = std::max(i, eof);
          rc = i < j ? populate(i, j) : 0;
        }
      }
    }
    if (rc == -EFAULT && !raced(gen0) && fill_holes(i, j, gen0)) rc = populate(i, j);
    if (rc == -EFAULT || rc == -ENOMEM) {
      // The mapping changed between the checks above and here: an invalidation is under way or
      // done, so retry and let the checks decide. Otherwise the CPU side itself could not be made
      // present, and retrying would only wait out the timeout: say why now.
      if (raced(gen0)) return 1;
      if (rc == -EFAULT && region_->fd >= 0 && sys::fs_full(region_->fd, write) == 1) return -ENOSPC;
      return rc;
    }
    if (rc == -EINVAL) {
      // Incompatible memory (PROT_NONE) although the protection allows the access: the address
      // was computed before a remap moved the mapping (it may now be the next move's reserved
      // destination). If a change ran meanwhile, retry at the new address.
      if (raced(gen0)) return 1;
    }
    if (rc) return rc == -EINVAL ? -EFAULT : rc;
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (gen_ != gen0 || active_ != 0) return 1;
  if (write && single_writer_) {
    // The CPU loses write access before the device gains it: a CPU write from now on is a WP fault
    // that revokes the device's write access first. Device-resident pages are holes: nothing to do.
    int rc = sys::uffd_writeprotect(Engine::get().fd(), start_ + first * page_, (last - first) * page_,
                                    UFFDIO_WRITEPROTECT_MODE_WP);
    if (rc) return rc;
  }
  for (uint64_t k = first; k < last; k++) {
    const uint64_t e = pt_[k].load(std::memory_order_relaxed);
    const uint64_t kept = e & (kOnDevice | kPinned | kDirty | kUnit | (~0ull << kSlotShift));
    pt_[k].store(kept | kValid | (write ? kWrite : (e & kWrite)), std::memory_order_release);
  }
  return 0;
}

bool Mirror::raced(uint64_t gen0) {
  std::lock_guard<std::mutex> lock(mu_);
  return gen_ != gen0 || active_ != 0;
}

// With a user-mode-only engine descriptor, a populate meets the holes of a registered private
// range as SIGBUS (EFAULT): the engine never hears of the faults it raises. Each such page is
// resolved here as the engine would resolve a CPU fault on it (home from whichever device holds
// it, else a zero page, or for a private tmpfs mapping, where a hole over a page-cache page is a
// MINOR fault, the file's page mapped read-only; decided under the covering mirrors' change
// mutexes, so no caller lock may be held). Returns whether it did (the caller populates again, once).
bool Mirror::fill_holes(uint64_t a, uint64_t b, uint64_t gen0) {
  // The range may be registered by another device's mirror of it: ask the engine, not ourselves.
  Engine& e = Engine::get();
  if (e.fd() < 0 || !e.user_mode_only() || region_->shared) return false;
  if (region_->kind != RegionKind::kAnonymous && !private_file()) return false;
  if (raced(gen0)) return false;
  const uint32_t flags = private_file() ? UFFD_PAGEFAULT_FLAG_MINOR : 0;
  for (uint64_t i, j, from = a; next_host_run(from, b, &i, &j); from = j)
    for (uint64_t k = i; k < j; k++) e.resolve_cpu_fault(start_ + k * page_, flags);
  return true;
}

int Mirror::range_fault(uint64_t first, uint64_t last, bool write, int timeout_ms) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  stats_.range_faults.fetch_add(1, std::memory_order_relaxed);
  // The entries this fault programs get their blocks now, outside every lock, where running out of
  // memory can still be reported.
  if (int rc = pt_.ensure(first, last)) return rc;
  if (file_copies()) return file_fault(first, last, write, deadline);
  for (;;) {
    int rc = fault_once(first, last, write, deadline);
    if (rc <= 0) return rc;
    stats_.retries.fetch_add(1, std::memory_order_relaxed);
    if (std::chrono::steady_clock::now() > deadline) return -EBUSY;
  }
}


bool Mirror::private_shmem() const {
  uint64_t type = 0;
  return region_->kind == RegionKind::kMemfd || (sys::fs_type_fd(region_->fd, &type) == 0 && type == TMPFS_MAGIC);
}

int Mirror::ensure_engine() {
  if (engine_registered_) return 0;
  Engine& e = Engine::get();
  int rc = e.ensure();
  if (rc) return rc;
  rc = device_->register_pool();
  if (rc) return rc;
  // Listed before registering: a CPU fault on the range must find this mirror from the first one.
  e.add_mirror(this);
  // A private tmpfs mapping: a moved copied-on-write page leaves a hole over a page-cache page, and
  // touching that is a MINOR fault, not a MISSING one.
  rc = e.register_range(start_, npages_ * page_, region_->id, private_file());
  if (rc) {
    e.remove_mirror(this);
    return rc;
  }
  engine_len_ = npages_ * page_;
  region_->registered.fetch_add(1);
  engine_registered_ = true;
  return 0;
}

void Mirror::set_device_entry(uint64_t i, uint64_t slot, uint64_t old, bool write, bool atomic, bool unit) {
  const uint64_t w = write ? static_cast<uint64_t>(kWrite) : 0ull;
  const uint64_t a = atomic ? static_cast<uint64_t>(kAtomic) : 0ull;
  const uint64_t u = unit ? static_cast<uint64_t>(kUnit) : 0ull;
  pt_[i].store((slot << kSlotShift) | kOnDevice | kValid | w | a | u | (old & kDirty), std::memory_order_release);
}

int Mirror::enable_single_writer() {
  std::lock_guard<std::mutex> change(change_mu_);
  // Needs a file to map a second time (memfd, tmpfs) that userfaultfd can write-protect (shmem).
  // Private anonymous memory has no second view: exclusive access (migration) is its equivalent.
  if (!region_->shared || region_->fd < 0) return -EOPNOTSUPP;
  void* alias = nullptr;
  int rc = sys::map(&alias, nullptr, npages_ * page_, PROT_READ | PROT_WRITE, MAP_SHARED, region_->fd,
                    static_cast<off_t>(region_->file_offset + offset_));
  if (rc) return rc;
  rc = ensure_engine();
  if (rc) {
    sys::unmap(alias, npages_ * page_);
    return rc;
  }
  alias_ = reinterpret_cast<uint64_t>(alias);
  single_writer_ = true;
  return 0;
}

int Mirror::enable_pin(int timeout_ms) {
  {
    std::lock_guard<std::mutex> change(change_mu_);
    // Device memory receives the kept pages; its pool is filled through the engine's descriptor.
    int rc = Engine::get().ensure();
    if (rc == 0) rc = device_->register_pool();
    if (rc) return rc;
  }
  int rc = range_fault(0, npages_, true, timeout_ms);  // get_user_pages(FOLL_WRITE | FOLL_LONGTERM)
  if (rc) return rc;
  pinned_ = true;
  return 0;
}

// Caller holds change_mu_ (invalidate_start). The page is still mapped: the CPU-side change comes
// after. Copy it into a slot and point the entry there.
void Mirror::keep_pinned_page(uint64_t i) {
  uint64_t e = pt_.peek(i, std::memory_order_relaxed);
  if (!(e & kValid) || (e & (kOnDevice | kPinned))) return;
  uint64_t slot;
  if (!device_->alloc_slot(&slot)) return;  // no room: the device loses the page (counted nowhere)
  e |= pt_[i].exchange(0, std::memory_order_seq_cst) & kDirty;  // a write since the peek marked it
  wait_inflight(i, i + 1);
  const uint64_t host = start_ + i * page_;
  const uint64_t dst = reinterpret_cast<uint64_t>(device_->slot_address(slot));
  int64_t done = 0;
  int rc = 0;
  // Guarded: a file truncated behind the library's back has no page here any more (SIGBUS).
  if (device_->slots_populated(slot, 1)) rc = sys::guarded_copy(reinterpret_cast<void*>(dst), reinterpret_cast<void*>(host), page_, nullptr);
  else rc = sys::uffd_copy(Engine::get().fd(), dst, host, page_, UFFDIO_COPY_MODE_DONTWAKE, &done);
  if (rc) {
    device_->free_slot(slot);
    return;
  }
  device_->set_populated(slot, 1, true);
  pt_[i].store((slot << kSlotShift) | kOnDevice | kPinned | kValid | (e & (kWrite | kDirty)), std::memory_order_release);
  diverged_.fetch_add(1, std::memory_order_relaxed);
}

uint64_t Mirror::count_exclusive(uint64_t first, uint64_t last) const {
  uint64_t n = 0;
  for (uint64_t i = pt_.next_present(first, last); i < last; i = pt_.next_present(i + 1, last))
    if (pt_.peek(i) & kAtomic) n++;
  return n;
}

void Mirror::hold_page(uint64_t i, InvalidateCause cause) {
  begin_change();  // until release_page(): a range fault of ours in progress must not program the page
  uint64_t old = pt_.peek(i, std::memory_order_relaxed);
  if (old & kOnDevice) return;
  if (pt_.block(i)) pt_[i].store(0, std::memory_order_seq_cst);  // no block: no entry, no access
  wait_inflight(i, i + 1);
  if (old & kValid) device_->on_invalidate(this, i, i + 1, cause, 1);
}

void Mirror::release_page() { end_change(); }

void Mirror::snapshot(uint64_t first, uint64_t last, uint8_t* out) {
  // [first, last) in base pages: a hugetlb entry stands for page_ / base of them, each reported
  // with the size the CPU maps it by (PMD or PUD), as the kernel's hmm_range_fault reports it.
  const uint64_t base = sys::page_size(), ratio = page_ / base;
  const uint64_t pmd = base * (base / sizeof(uint64_t)), pud = pmd * (base / sizeof(uint64_t));
  const uint8_t hugetlb_size = !region_->hugetlb ? 0 : page_ >= pud ? 0x08 : page_ >= pmd ? 0x04 : 0;
  // A device page that moved as part of a 2 MiB unit is mapped huge while the unit is whole: all
  // of it still on the device, in the consecutive slots it moved into (one page pulled back by a
  // CPU fault splits it, as the kernel splits a device-private THP). One answer per unit.
  const uint64_t unit_pages = pmd / page_;
  uint64_t unit_seen = ~0ull;
  bool unit_whole = false;
  auto whole_unit = [&](uint64_t i) {
    const uint64_t u = i / unit_pages * unit_pages;
    if (u == unit_seen) return unit_whole;
    unit_seen = u;
    unit_whole = u + unit_pages <= npages_;
    const uint64_t e0 = pt_.peek(u);
    for (uint64_t k = 0; unit_whole && k < unit_pages; k++) {
      const uint64_t e = pt_.peek(u + k);
      unit_whole = (e & (kOnDevice | kUnit)) == (kOnDevice | kUnit) && (e >> kSlotShift) == (e0 >> kSlotShift) + k;
    }
    return unit_whole;
  };
  // In chunks, so the buffers here stay small whatever the range, and one PAGEMAP_SCAN of a chunk
  // cannot find more regions than it has room for (two pages per region at the most).
  constexpr uint64_t kChunk = 8192;
  std::vector<uint64_t> pm(std::min(kChunk, last - first));
  std::vector<uint8_t> zero(pm.size()), huge(pm.size());
  std::vector<sys::ScanRegion> regions;
  for (uint64_t c = first; c < last; c += kChunk) {
    const uint64_t c_end = std::min(last, c + kChunk), n = c_end - c;
    const bool have_pm = sys::pagemap_read(start_ + c * base, n, pm.data()) == 0;
    // The zero page is not visible in /proc/self/pagemap without CAP_SYS_ADMIN: ask PAGEMAP_SCAN.
    std::fill(zero.begin(), zero.end(), 0);
    std::fill(huge.begin(), huge.end(), 0);
    sys::ScanRequest req;
    req.start = start_ + c * base;
    req.end = start_ + c_end * base;
    req.category_anyof_mask = PAGE_IS_PFNZERO | PAGE_IS_HUGE;
    req.return_mask = PAGE_IS_PFNZERO | PAGE_IS_HUGE;
    req.max_regions = kChunk / 2 + 1;
    regions.clear();
    if (sys::pagemap_scan(req, &regions, nullptr) > 0) {
      for (const auto& r : regions)
        for (uint64_t a = r.start; a < r.end; a += base) {
          uint64_t k = (a - req.start) / base;
          if (r.categories & PAGE_IS_PFNZERO) zero[k] = 1;
          if (r.categories & PAGE_IS_HUGE) huge[k] = 1;
        }
    }
    for (uint64_t p = c; p < c_end; p++) {
      const uint64_t k = p - c, i = p / ratio;
      const int prot = region_->prot_over(offset_ + i * page_, page_);
      const uint64_t e = pt_.peek(i);
      uint8_t b;
      if (region_->closed.load() || !(prot & PROT_READ)) {
        b = 0xFF;  // ERROR
      } else if (e & kOnDevice) {
        b = 0x20 | ((prot & PROT_WRITE) ? 0x02 : 0x01);  // DEV_PRIVATE_LOCAL
        if ((e & kUnit) && whole_unit(i)) b |= 0x04;
      } else if (!have_pm || !(pm[k] >> 63 & 1)) {
        b = 0x00;  // NONE: not present, or in another device's memory (not ours to describe)
      } else if (zero[k]) {
        b = 0x10 | 0x01;  // ZERO | READ
      } else {
        b = (prot & PROT_WRITE) ? 0x02 : 0x01;
        if (hugetlb_size) b |= hugetlb_size;
        else if (huge[k]) b |= 0x04;  // a THP mapped by a PMD
      }
      out[p - first] = b;
    }
  }
}

}  // namespace pm::engine
