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
#include "../sys/pagemap.h"
#include "../sys/uffd.h"
#include <cstring>
#include <vector>

namespace pm::engine {

namespace {
// The size a PMD maps: 2 MiB with 4 KiB pages (512 entries of 8 bytes per page-table page).
uint64_t PmdSize() { return sys::page_size() * (sys::page_size() / sizeof(uint64_t)); }

// Whether the CPU maps all of [start, end) with huge pages (PAGEMAP_SCAN's PAGE_IS_HUGE).
bool MappedHuge(uint64_t start, uint64_t end) {
  sys::ScanRequest req;
  req.start = start;
  req.end = end;
  req.category_mask = PAGE_IS_HUGE;
  req.return_mask = PAGE_IS_HUGE;
  req.max_regions = 2;
  std::vector<sys::ScanRegion> regions;
  return sys::pagemap_scan(req, &regions, nullptr) == 1 && regions[0].start == start && regions[0].end == end;
}
}  // namespace

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
    if (file_copies()) migrate_to_host(0, npages_, Trigger::kRelease);
    file_release_lease();
    if (file_copies() && !file_->shmem) region_->cpu_via_library.fetch_sub(1);
  }
  attached_ = false;
  Engine::get().untrack(this);
  device_->remove_mirror(this);
  region_->remove_notifier(this);
  if (engine_registered_) {
    // Device-resident pages come home first: closing a mirror must not lose data.
    migrate_to_host(0, npages_, Trigger::kRelease);
    Engine::get().remove_mirror(this);
    Engine::get().unregister_range(start_, npages_ * page_, region_->id);
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
  return reinterpret_cast<void*>((alias_ ? alias_ : start_) + i * page_);
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

void Mirror::invalidate_start(uint64_t start, uint64_t end, InvalidateCause cause) {
  const uint64_t s = std::max(start, start_), e = std::min(end, start_ + npages_ * page_);
  if (s >= e) return;
  const uint64_t first = (s - start_) / page_, last = (e - start_ + page_ - 1) / page_;
  change_mu_.lock();  // released by invalidate_end(), on this thread (Region::Invalidation's scope)
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
  if (pinned_) {
    // A pinned page is not the CPU's to take: the device keeps a page of its own.
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

void Mirror::invalidate_end(uint64_t start, uint64_t end) {
  const uint64_t s = std::max(start, start_), e = std::min(end, start_ + npages_ * page_);
  if (s >= e) return;
  end_change();
  change_mu_.unlock();
}

// One attempt of a range fault: 0 done, 1 raced (retry), or -errno.
int Mirror::fault_once(uint64_t first, uint64_t last, bool write, std::chrono::steady_clock::time_point deadline) {
  if (dead() || region_->closed.load()) return -EFAULT;
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
  const uint64_t base = alias_ ? alias_ : start_;
  auto populate = [&](uint64_t a, uint64_t b) {
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
    const uint64_t kept = e & (kOnDevice | kDirty | kUnit | (~0ull << kSlotShift));
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
  region_->registered.fetch_add(1);
  engine_registered_ = true;
  return 0;
}

void Mirror::migrate_to_device(uint64_t first, uint64_t last, bool use_move, MigrateResult* out, bool atomic,
                               Trigger trigger, uint64_t granule_pages) {
  *out = MigrateResult{};
  if (dead() || region_->closed.load()) {
    out->error = -EFAULT;
    return;
  }
  if (region_->hugetlb) {
    out->error = -EINVAL;
    return;
  }
  if (int rc = pt_.ensure(first, last)) {
    out->error = rc;
    return;
  }
  if (file_copies()) {
    // copy/bounce: migration is the load the device's faults do (A read into A').
    int rc = file_fault(first, last, false, std::chrono::steady_clock::now());
    for (uint64_t i = first; i < last; i++)
      if (pt_[i].load(std::memory_order_relaxed) & kOnDevice) out->resident++;
    out->moved = out->moved_by_copy = out->resident;
    if (rc) out->error = rc == -ENOMEM ? -ENOENT : rc;
    if (rc == -ENOMEM)
      for (uint64_t i = first; i < last; i++)
        if (!(pt_[i].load(std::memory_order_relaxed) & kOnDevice)) out->skipped.push_back({i, Skip::kNoMemory});
    return;
  }
  if (pinned_) {
    for (uint64_t i = first; i < last; i++) out->skipped.push_back({i, Skip::kPinned});
    out->error = -ENOENT;
    return;
  }
  const uint64_t off = offset_ + first * page_, len = (last - first) * page_;
  // The kernel refuses a range with no access at all.
  if (!(region_->prot_over(off, len) & PROT_READ)) {
    out->error = -EINVAL;
    return;
  }
  if (region_->fd >= 0) {
    // DAX: the file's pages are the device-addressable memory itself; there is no page cache page
    // to move. Mirroring works; migration is refused, per page, with that reason.
    sys::StatxInfo sx;
    if (sys::statx_fd(region_->fd, &sx) == 0 && sx.dax) {
      for (uint64_t i = first; i < last; i++) out->skipped.push_back({i, Skip::kDax});
      out->error = -ENOENT;
      return;
    }
  }
  // A private mapping of ext4/xfs (or of tmpfs on a kernel without MINOR faults for it): the
  // kernel moves its copied-on-write pages, but userfaultfd cannot register this mapping, so the
  // hole a moved page leaves would read the file again on the CPU's next touch. Each page says
  // which of the two it is.
  auto refuse_private = [&] {
    std::vector<uint64_t> pm(last - first);
    const bool have_pm = sys::pagemap_read(start_ + first * page_, last - first, pm.data()) == 0;
    for (uint64_t i = first; i < last; i++)
      out->skipped.push_back({i, have_pm && sys::pagemap_anon_present(pm[i - first]) ? Skip::kUnregistrable : Skip::kFileBacked});
    out->error = -ENOENT;
  };
  if (private_file() && !private_shmem()) return refuse_private();
  if (region_->shared) {
    // Shared memory never moves (other mappings of the file see its pages): nothing needs the
    // engine, whose registration would only make the range fault's populate depend on it.
    for (uint64_t i = first; i < last; i++) out->skipped.push_back({i, Skip::kShared});
    out->error = -ENOENT;
    return;
  }
  if (int rc = ensure_engine()) {
    if (rc == -EINVAL && private_file()) return refuse_private();
    out->error = rc;
    return;
  }
  // Every mirror of these pages (ours included) holds still while they move: two migrations of one
  // page, or a migration and the engine's CPU-fault handler, take turns.
  Engine::Holding holding = Engine::get().lock_covering(this, start_ + first * page_, start_ + last * page_);
  // Which pages are present, read under the change mutex: the range is registered with the engine
  // by now, so a CPU touch of a hole waits in the engine for this mutex and cannot populate a page
  // we think is absent (a zero-filled device page would later overwrite the CPU's data).
  std::vector<uint64_t> pm;
  try {
    // Sized by the caller's range; one skip per page at the most, reserved now so that no
    // allocation can fail half-way through the migration.
    pm.resize(last - first);
    out->skipped.reserve(last - first);
  } catch (const std::bad_alloc&) {
    out->error = -ENOMEM;
    return;
  } catch (const std::length_error&) {
    out->error = -ENOMEM;
    return;
  }
  if (int rc = sys::pagemap_read(start_ + first * page_, last - first, pm.data())) {
    out->error = rc;
    return;
  }
  begin_change();
  const uint64_t g = std::max<uint64_t>(1, granule_pages);
  for (uint64_t i = first; i < last;) {
    const uint64_t chunk_end = std::min(last, (i / g + 1) * g);
    if (chunk_end - i > 1) i += migrate_run(i, chunk_end, pm.data() + (i - first), use_move, atomic, out);
    for (; i < chunk_end; i++) migrate_page(i, pm[i - first], use_move, atomic, out);
  }
  end_change();
  device_->on_migrate(this, true, first, out->moved, trigger);
  device_->enforce_watermark(this);
  // A CPU writer that waited on the copy path's write protection is woken to fault again.
  sys::uffd_wake(Engine::get().fd(), start_ + first * page_, (last - first) * page_);
  if (out->resident == 0 && out->error == 0) out->error = -ENOENT;
}

// One page of a migration (caller holds change_mu_ and has raised active_).
void Mirror::migrate_page(uint64_t i, uint64_t pm_entry, bool use_move, bool atomic, MigrateResult* out) {
  const uint64_t e = pt_[i].load(std::memory_order_relaxed);
  if (e & kOnDevice) {
    if (atomic) pt_[i].fetch_or(kAtomic | kValid, std::memory_order_release);
    out->resident++;
    return;
  }
  if (region_->shared) {
    out->skipped.push_back({i, Skip::kShared});
    return;
  }
  // A private file mapping (tmpfs here): only a page the CPU copied on write is the mapping's own;
  // the others are the file's page cache, as in the kernel.
  const bool cow = private_file();
  if (cow && !sys::pagemap_anon_present(pm_entry)) {
    out->skipped.push_back({i, Skip::kFileBacked});
    return;
  }
  const uint64_t host = start_ + i * page_;
  if (Engine::get().owned_by_other(this, host)) {
    out->skipped.push_back({i, Skip::kOtherDevice});
    return;
  }
  if (Engine::get().pinned_by_other(this, host)) {
    out->skipped.push_back({i, Skip::kPinned});
    return;
  }
  uint64_t slot;
  Loading loading(this, i, i + 1);  // its queue entry is not stale while the data moves
  const uint64_t evicted = device_->counters().to_host[static_cast<unsigned>(Trigger::kEviction)].load();
  if (!device_->alloc_slot(&slot, this, i)) {
    out->skipped.push_back({i, Skip::kNoMemory});
    return;
  }
  if (device_->counters().to_host[static_cast<unsigned>(Trigger::kEviction)].load() != evicted) {
    // Making room evicted pages home: this one may be among them, so the presence read at the
    // start is stale for it.
    sys::pagemap_read(host, 1, &pm_entry);
  }
  // Other devices' entries for this page go, and stay gone until the data has moved (they will
  // fault and pull it back); ours is cleared and our accesses in flight drained first.
  auto held = Engine::get().hold_others(this, host);
  pt_[i].store(0, std::memory_order_seq_cst);
  wait_inflight(i, i + 1);
  const bool present = pm_entry >> 63 & 1;
  // UFFDIO_MOVE takes anonymous VMAs only: a copied-on-write page of a file's VMA is copied.
  const uint64_t filled = fill_slots(host, slot, 1, present, use_move && !cow, out);
  Engine::release_others(held);
  if (filled == 1) {
    set_device_entry(i, slot, e, atomic);
    out->moved++;
    out->resident++;
  } else {
    device_->free_slot(slot);
    out->skipped.push_back({i, Skip::kError});
  }
}

// A whole aligned chunk in one ioctl, when it can be: every page movable, all present or all
// never touched, and a run of contiguous slots free. Returns the pages it handled (0: none, the
// caller goes page by page).
uint64_t Mirror::migrate_run(uint64_t a, uint64_t b, const uint64_t* pm, bool use_move, bool atomic, MigrateResult* out) {
  const uint64_t n = b - a;
  if (region_->shared || private_file()) return 0;
  const bool present = pm[0] >> 63 & 1;
  for (uint64_t k = 0; k < n; k++) {
    if ((pt_[a + k].load(std::memory_order_relaxed) & kOnDevice) || (pm[k] >> 63 & 1) != present) return 0;
    if (Engine::get().owned_by_other(this, start_ + (a + k) * page_)) return 0;
    if (Engine::get().pinned_by_other(this, start_ + (a + k) * page_)) return 0;
  }
  uint64_t slot;
  if (!device_->alloc_run(n, &slot, this, a)) return 0;
  // A whole PMD-sized unit that the CPU maps huge (or that was never touched) moves as one huge
  // page would; asked before it moves.
  const bool unit = n * page_ == PmdSize() && (!present || MappedHuge(start_ + a * page_, start_ + b * page_));
  std::vector<uint64_t> old(n);
  std::vector<Mirror*> held;
  for (uint64_t k = 0; k < n; k++) {
    auto h = Engine::get().hold_others(this, start_ + (a + k) * page_);
    held.insert(held.end(), h.begin(), h.end());
    old[k] = pt_[a + k].exchange(0, std::memory_order_seq_cst);
  }
  wait_inflight(a, b);
  const uint64_t done = fill_slots(start_ + a * page_, slot, n, present, use_move, out);
  Engine::release_others(held);
  for (uint64_t k = 0; k < n; k++) {
    if (k < done) {
      set_device_entry(a + k, slot + k, old[k], atomic);
      if (unit && done == n) pt_[a + k].fetch_or(kUnit, std::memory_order_release);
    } else {
      device_->free_slot(slot + k);
      pt_[a + k].store(old[k] & ~(kValid | kWrite | kAtomic), std::memory_order_release);  // refaults
    }
  }
  out->moved += done;
  out->resident += done;
  return done;
}

// Moves n host pages at host into slots [slot, slot + n): UFFDIO_ZEROPAGE for never-touched pages,
// UFFDIO_MOVE where allowed, else the copy path under write protection. The pool is registered
// with the engine's userfaultfd, so slots are filled by these ioctls and never by touching them.
// Returns the pages filled (a prefix).
uint64_t Mirror::fill_slots(uint64_t host, uint64_t slot, uint64_t n, bool present, bool use_move, MigrateResult* out) {
  const int fd = Engine::get().fd();
  const uint64_t dst = reinterpret_cast<uint64_t>(device_->slot_address(slot));
  const uint64_t len = n * page_;
  // Slots that have their pages (preallocated device memory) are filled by plain copies; holes in
  // the pool (registered with the engine's userfaultfd) only by the resolve ioctls.
  const bool populated = device_->slots_populated(slot, n);
  int64_t done = 0;
  if (!present) {
    uint64_t pages;
    if (populated) {
      std::memset(reinterpret_cast<void*>(dst), 0, len);
      pages = n;
    } else {
      int rc = sys::uffd_zeropage(fd, dst, len, UFFDIO_ZEROPAGE_MODE_DONTWAKE, &done);
      pages = rc == 0 ? n : static_cast<uint64_t>(done) / page_;
      device_->set_populated(slot, pages, true);
    }
    out->zero_filled += pages;
    return pages;
  }
  uint64_t moved = 0;
  if (use_move && !populated && Engine::get().has_move()) {
    int rc = sys::uffd_move(fd, dst, host, len, UFFDIO_MOVE_MODE_DONTWAKE, &done);
    moved = rc == 0 ? n : static_cast<uint64_t>(done) / page_;
    device_->set_populated(slot, moved, true);
    out->moved_by_move += moved;
    if (moved == n) return n;
  }
  // The copy path for the rest (or MOVE refused: a page shared after fork, or slots that already
  // have pages). Write-protect first so no CPU write slips between the copy and the zap; a writer
  // waits in the engine until the page is gone, then its retried access pulls the page back.
  const uint64_t h = host + moved * page_, d = dst + moved * page_, l = len - moved * page_;
  sys::uffd_writeprotect(fd, h, l, UFFDIO_WRITEPROTECT_MODE_WP);
  uint64_t copied;
  if (populated) {
    std::memcpy(reinterpret_cast<void*>(d), reinterpret_cast<void*>(h), l);
    copied = l / page_;
  } else {
    int rc = sys::uffd_copy(fd, d, h, l, UFFDIO_COPY_MODE_DONTWAKE, &done);
    copied = rc == 0 ? l / page_ : static_cast<uint64_t>(done) / page_;
    device_->set_populated(slot + moved, copied, true);
  }
  if (copied) sys::advise(reinterpret_cast<void*>(h), copied * page_, MADV_DONTNEED);
  if (copied < l / page_) sys::uffd_writeprotect(fd, h + copied * page_, l - copied * page_, 0);  // left on the host
  out->moved_by_copy += copied;
  return moved + copied;
}

void Mirror::set_device_entry(uint64_t i, uint64_t slot, uint64_t old, bool atomic) {
  const uint64_t w = (region_->prot_over(offset_ + i * page_, page_) & PROT_WRITE) ? static_cast<uint64_t>(kWrite) : 0ull;
  const uint64_t a = atomic ? static_cast<uint64_t>(kAtomic) : 0ull;
  pt_[i].store((slot << kSlotShift) | kOnDevice | kValid | w | a | (old & kDirty), std::memory_order_release);
}

// Puts page i's data back at its host address (MOVE from the slot, else COPY), frees the slot and
// leaves a valid host entry. Caller holds change_mu_. wake: also wake CPU faulters on the page.
bool Mirror::move_back(uint64_t i, uint64_t e, bool wake) {
  const int fd = Engine::get().fd();
  const uint64_t slot = e >> kSlotShift;
  const uint64_t host = start_ + i * page_;
  pt_[i].store(0, std::memory_order_seq_cst);
  wait_inflight(i, i + 1);
  void* src = device_->slot_address(slot);
  int64_t done = 0;
  const uint64_t mode = wake ? 0 : UFFDIO_MOVE_MODE_DONTWAKE;
  int rc = -EOPNOTSUPP;
  // The page itself goes home (no copy); its slot becomes a hole (refilled by an ioctl next time).
  // (MOVE takes anonymous VMAs only: a private file mapping's page comes home by COPY.)
  if (Engine::get().has_move() && !private_file()) rc = sys::uffd_move(fd, host, reinterpret_cast<uint64_t>(src), page_, mode, &done);
  const bool moved = rc == 0;  // the slot is a hole again: nothing to give back
  if (rc) rc = sys::uffd_copy(fd, host, reinterpret_cast<uint64_t>(src), page_, wake ? 0 : UFFDIO_COPY_MODE_DONTWAKE, &done);
  if (rc == -EEXIST) {
    // The host page is present although the device owned the data (something mapped it behind the
    // library's back): the device copy is the newer data.
    std::memcpy(reinterpret_cast<void*>(host), src, page_);
    rc = 0;
    if (wake) sys::uffd_wake(fd, host, page_);
  }
  device_->free_slot(slot, !moved);
  const uint64_t keep = e & kWrite;
  pt_[i].store(rc == 0 ? (kValid | keep | (e & kDirty)) : 0, std::memory_order_release);
  return rc == 0;
}

// Pages [a, b) sit in consecutive slots: one UFFDIO_MOVE brings them home. False (nothing done)
// if the kernel refuses; the caller then goes page by page.
bool Mirror::move_back_run(uint64_t a, uint64_t b) {
  if (!Engine::get().has_move() || private_file()) return false;
  const uint64_t n = b - a;
  std::vector<uint64_t> old(n);
  for (uint64_t k = 0; k < n; k++) old[k] = pt_[a + k].exchange(0, std::memory_order_seq_cst);
  wait_inflight(a, b);
  const uint64_t slot = old[0] >> kSlotShift;
  int64_t done = 0;
  const uint64_t src = reinterpret_cast<uint64_t>(device_->slot_address(slot));
  int rc = sys::uffd_move(Engine::get().fd(), start_ + a * page_, src, n * page_, 0, &done);
  const uint64_t ok = rc == 0 ? n : static_cast<uint64_t>(done) / page_;
  for (uint64_t k = 0; k < n; k++) {
    if (k < ok) {
      device_->free_slot(slot + k, false);
      pt_[a + k].store(kValid | (old[k] & (kWrite | kDirty)), std::memory_order_release);
    } else {
      pt_[a + k].store(old[k], std::memory_order_release);  // still on the device; retried one by one
    }
  }
  if (ok == n) return true;
  for (uint64_t k = ok; k < n; k++) move_back(a + k, old[k], true);
  return true;
}

uint64_t Mirror::migrate_to_host(uint64_t first, uint64_t last, Trigger trigger) {
  if (file_copies()) {
    std::unique_lock<std::mutex> change(change_mu_, std::defer_lock);
    if (!Engine::holds(this)) change.lock();
    return file_flush_locked(first, last);
  }
  if (!engine_registered_) return 0;
  std::lock_guard<std::mutex> change(change_mu_);
  begin_change();
  uint64_t moved = 0;
  for (uint64_t i = pt_.next_present(first, last); i < last; i = pt_.next_present(i, last)) {
    const uint64_t e = pt_[i].load(std::memory_order_relaxed);
    if (!(e & kOnDevice) || (e & kPinned)) {  // a pinned page kept by the device has no home to go to
      i++;
      continue;
    }
    // A run of pages in consecutive slots goes home in one UFFDIO_MOVE.
    uint64_t j = i + 1;
    while (j < last && j - i < 512) {
      const uint64_t f = pt_.peek(j, std::memory_order_relaxed);
      if (!(f & kOnDevice) || (f & kPinned) || (f >> kSlotShift) != (e >> kSlotShift) + (j - i)) break;
      j++;
    }
    if (j - i > 1 && move_back_run(i, j)) {
      moved += j - i;
      i = j;
      continue;
    }
    if (move_back(i, e, true)) moved++;
    i++;
  }
  end_change();
  device_->on_migrate(this, false, first, moved, trigger);
  return moved;
}

bool Mirror::cpu_fault(uint64_t i, uint64_t flags) {
  // Caller (the engine) holds change_mu_.
  if (file_copies()) return file_cpu_fault(i, flags);
  uint64_t e = pt_.peek(i);
  if (!(e & kOnDevice) || (e & kPinned)) return false;
  begin_change();
  // The faulter is woken only after the bookkeeping (slot freed, counters), so whoever waits for
  // the access sees it complete.
  move_back(i, e, false);
  // The CPU took the page back: this device's entry goes (it will fault and find the host page).
  pt_[i].store(0, std::memory_order_release);
  end_change();
  device_->on_invalidate(this, i, i + 1, InvalidateCause::kCpuAccess, 1);
  device_->on_migrate(this, false, i, 1, Trigger::kCpuFault);
  sys::uffd_wake(Engine::get().fd(), start_ + i * page_, page_);
  return true;
}

bool Mirror::evict(uint64_t i) {
  if (file_copies()) return file_evict(i);
  const uint64_t e = pt_.peek(i);
  if (!(e & kOnDevice) || (e & kPinned)) return false;
  begin_change();
  const bool ok = move_back(i, e, true);
  // An evicted page is no longer mapped by the device (as unified-memory drivers unmap it): the
  // next device access faults and brings it back, which is what oversubscription costs.
  pt_[i].store(0, std::memory_order_release);
  end_change();
  if (ok) device_->on_migrate(this, false, i, 1, Trigger::kEviction);
  return ok;
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
  const uint64_t e = pt_.peek(i, std::memory_order_relaxed);
  if (!(e & kValid) || (e & (kOnDevice | kPinned))) return;
  uint64_t slot;
  if (!device_->alloc_slot(&slot)) return;  // no room: the device loses the page (counted nowhere)
  pt_[i].store(0, std::memory_order_seq_cst);
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
