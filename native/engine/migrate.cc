#include "migrate.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <new>
#include <stdexcept>
#include <sys/mman.h>

#include "../sys/file.h"
#include "../sys/mem.h"
#include "../sys/pagemap.h"
#include "../sys/uapi.h"
#include "../sys/uffd.h"
#include "device.h"

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

bool Present(uint64_t pm_entry) { return pm_entry >> 63 & 1; }
}  // namespace

MigrateToDevice::MigrateToDevice(Mirror& m, uint64_t first, uint64_t last, const MigrateOptions& options, MigrateResult* out)
    : m_(m), device_(*m.device_), first_(first), last_(last), options_(options), out_(out) {}

void MigrateToDevice::run(Mirror* mirror, uint64_t first, uint64_t last, const MigrateOptions& options, MigrateResult* out) {
  *out = MigrateResult{};
  MigrateToDevice mig(*mirror, first, last, options, out);
  if (mig.refuse()) return;
  // Every mirror of these pages (ours included) holds still while they move: two migrations of one
  // page, or a migration and the engine's CPU-fault handler, take turns. Held until finalize ends.
  Engine::Holding holding = Engine::get().lock_pages(mirror, first, last);
  if (!mig.setup()) return;
  mirror->begin_change();
  const uint64_t g = std::max<uint64_t>(1, options.granule_pages);
  for (uint64_t i = first; i < last;) {
    const uint64_t chunk_end = std::min(last, (i / g + 1) * g);
    if (chunk_end - i > 1) i += mig.migrate_chunk(i, chunk_end);
    for (; i < chunk_end; i++) mig.migrate_page(i);
  }
  mirror->end_change();
  mig.finalize();
}

// The kernel's argument checks of migrate_vma_setup, and the ranges that never move as a whole.
bool MigrateToDevice::refuse() {
  Region& region = *m_.region_;
  const uint64_t page = m_.page_;
  if (m_.dead() || region.closed.load() || m_.offset_ + last_ * page > region.length) {
    out_->error = -EFAULT;
    return true;
  }
  if (region.hugetlb) {
    out_->error = -EINVAL;
    return true;
  }
  if (int rc = m_.pt_.ensure(first_, last_)) {
    out_->error = rc;
    return true;
  }
  if (m_.file_copies()) {
    // copy/bounce: migration is the load the device's faults do (A read into A').
    int rc = m_.file_fault(first_, last_, false, std::chrono::steady_clock::now());
    for (uint64_t i = first_; i < last_; i++)
      if (m_.pt_[i].load(std::memory_order_relaxed) & kOnDevice) out_->resident++;
    out_->moved = out_->moved_by_copy = out_->resident;
    if (rc) out_->error = rc == -ENOMEM ? -ENOENT : rc;
    if (rc == -ENOMEM)
      for (uint64_t i = first_; i < last_; i++)
        if (!(m_.pt_[i].load(std::memory_order_relaxed) & kOnDevice)) out_->skipped.push_back({i, MigrateSkip::kNoMemory});
    return true;
  }
  if (m_.pinned_) {
    for (uint64_t i = first_; i < last_; i++) out_->skipped.push_back({i, MigrateSkip::kPinned});
    out_->error = -ENOENT;
    return true;
  }
  const uint64_t off = m_.offset_ + first_ * page, len = (last_ - first_) * page;
  // The kernel refuses a range with no access at all.
  if (!(region.prot_over(off, len) & PROT_READ)) {
    out_->error = -EINVAL;
    return true;
  }
  if (region.fd >= 0) {
    // DAX: the file's pages are the device-addressable memory itself; there is no page cache page
    // to move. Mirroring works; migration is refused, per page, with that reason.
    sys::StatxInfo sx;
    if (sys::statx_fd(region.fd, &sx) == 0 && sx.dax) {
      for (uint64_t i = first_; i < last_; i++) out_->skipped.push_back({i, MigrateSkip::kDax});
      out_->error = -ENOENT;
      return true;
    }
  }
  if (m_.private_file() && !m_.private_shmem()) {
    refuse_private_file();
    return true;
  }
  if (region.shared) {
    // Shared memory never moves (other mappings of the file see its pages): nothing needs the
    // engine, whose registration would only make the range fault's populate depend on it.
    for (uint64_t i = first_; i < last_; i++) out_->skipped.push_back({i, MigrateSkip::kShared});
    out_->error = -ENOENT;
    return true;
  }
  return false;
}

// A private mapping of ext4/xfs (or of tmpfs on a kernel without MINOR faults for it): the kernel
// moves its copied-on-write pages, but userfaultfd cannot register this mapping, so the hole a
// moved page leaves would read the file again on the CPU's next touch. Each page says which of the
// two it is.
void MigrateToDevice::refuse_private_file() {
  std::vector<uint64_t> pm(last_ - first_);
  const bool have_pm = sys::pagemap_read(m_.host_address(first_), last_ - first_, pm.data()) == 0;
  for (uint64_t i = first_; i < last_; i++)
    out_->skipped.push_back(
        {i, have_pm && sys::pagemap_anon_present(pm[i - first_]) ? MigrateSkip::kUnregistrable : MigrateSkip::kFileBacked});
  out_->error = -ENOENT;
}

bool MigrateToDevice::setup() {
  if (m_.offset_ + last_ * m_.page_ > m_.region_->length) {  // a shrinking remap got there first
    out_->error = -EFAULT;
    return false;
  }
  // Registered under the change mutex, which a remap holds while it moves the mirror: the range
  // registered is the one the mirror covers.
  if (int rc = m_.ensure_engine()) {
    if (rc == -EINVAL && m_.private_file()) refuse_private_file();
    else out_->error = rc;
    return false;
  }
  try {
    // Sized by the caller's range; one skip per page at the most, reserved now so that no
    // allocation can fail half-way through the migration (nor can a chunk's buffers).
    pm_.resize(last_ - first_);
    out_->skipped.reserve(last_ - first_);
    const uint64_t chunk = std::min(std::max<uint64_t>(1, options_.granule_pages), last_ - first_);
    src_.resize(chunk);
    pfn_.resize(chunk);
  } catch (const std::bad_alloc&) {
    out_->error = -ENOMEM;
    return false;
  } catch (const std::length_error&) {
    out_->error = -ENOMEM;
    return false;
  }
  // Which pages are present, read under the change mutex: the range is registered with the engine
  // by now, so a CPU touch of a hole waits in the engine for this mutex and cannot populate a page
  // we think is absent (a zero-filled device page would later overwrite the CPU's data).
  if (int rc = sys::pagemap_read(m_.host_address(first_), last_ - first_, pm_.data())) {
    out_->error = rc;
    return false;
  }
  return true;
}

// collect: one page, at the moment it is about to move (not for the whole range up front, as the
// kernel can with its pages locked): making room for an earlier page may have evicted this one, or
// another mirror's copy of it, since.
MigrateToDevice::Page MigrateToDevice::collect(uint64_t i, uint64_t pm_entry) {
  Page p;
  p.entry = m_.pt_[i].load(std::memory_order_relaxed);
  if (p.entry & kOnDevice) {
    p.pfn = kPfnResident;
    return p;
  }
  if (m_.region_->shared) {
    p.reason = MigrateSkip::kShared;
    return p;
  }
  // A private file mapping (tmpfs here): only a page the CPU copied on write is the mapping's own;
  // the others are the file's page cache, as in the kernel.
  if (m_.private_file() && !sys::pagemap_anon_present(pm_entry)) {
    p.reason = MigrateSkip::kFileBacked;
    return p;
  }
  const uint64_t host = m_.host_address(i);
  if (Engine::get().owned_by_other(&m_, host)) {
    p.reason = MigrateSkip::kOtherDevice;
    return p;
  }
  if (Engine::get().pinned_by_other(&m_, host)) {
    p.reason = MigrateSkip::kPinned;
    return p;
  }
  p.pfn = kPfnMigrate | (Present(pm_entry) ? kPfnValid : 0);
  if (m_.region_->prot_over(m_.offset_ + i * m_.page_, m_.page_) & PROT_WRITE) p.pfn |= kPfnWrite;
  return p;
}

// A whole aligned chunk in one ioctl, when it can be: every page movable, all present or all never
// touched, and a run of contiguous slots free. Returns the pages it handled (0: none, the caller
// goes page by page).
uint64_t MigrateToDevice::migrate_chunk(uint64_t a, uint64_t b) {
  const uint64_t n = b - a;
  // UFFDIO_MOVE takes anonymous VMAs only, and a private file mapping's pages are copied one by one.
  if (m_.region_->shared || m_.private_file()) return 0;
  // collect
  const bool present = Present(pagemap(a));
  for (uint64_t k = 0; k < n; k++) {
    if (Present(pagemap(a + k)) != present) return 0;
    const Page p = collect(a + k, pagemap(a + k));
    if (!(p.pfn & kPfnMigrate)) return 0;
    pfn_[k] = p.pfn;
  }
  // The driver's allocation of destination pages: no eviction for a run (a single page may evict).
  uint64_t slot;
  if (!device_.alloc_run(n, &slot, &m_, a)) return 0;
  // A whole PMD-sized unit that the CPU maps huge (or that was never touched) moves as one huge
  // page would; asked before it moves.
  const bool unit = n * m_.page_ == PmdSize() && (!present || MappedHuge(m_.host_address(a), m_.host_address(b)));
  // unmap: other devices' entries go and stay gone until the data has moved (they will fault and
  // pull it back); ours are cleared and our accesses in flight drained.
  std::vector<Mirror*> held;
  for (uint64_t k = 0; k < n; k++) {
    auto h = Engine::get().hold_others(&m_, m_.host_address(a + k));
    held.insert(held.end(), h.begin(), h.end());
    src_[k] = m_.pt_[a + k].exchange(0, std::memory_order_seq_cst);
  }
  m_.wait_inflight(a, b);
  const uint64_t done = copy(m_.host_address(a), slot, n, present, options_.use_move);
  // finalize
  Engine::release_others(held);
  for (uint64_t k = 0; k < n; k++) {
    if (k < done) {
      m_.set_device_entry(a + k, slot + k, src_[k], pfn_[k] & kPfnWrite, options_.atomic, unit && done == n);
    } else {
      device_.free_slot(slot + k);
      m_.pt_[a + k].store(src_[k] & ~(kValid | kWrite | kAtomic), std::memory_order_release);  // refaults
    }
  }
  out_->moved += done;
  out_->resident += done;
  return done;
}

// One page of a migration, through every phase.
void MigrateToDevice::migrate_page(uint64_t i) {
  uint64_t pm_entry = pagemap(i);
  const Page p = collect(i, pm_entry);
  if (p.pfn & kPfnResident) {
    if (options_.atomic) m_.pt_[i].fetch_or(kAtomic | kValid, std::memory_order_release);
    out_->resident++;
    return;
  }
  if (!(p.pfn & kPfnMigrate)) {
    out_->skipped.push_back({i, p.reason});
    return;
  }
  const uint64_t host = m_.host_address(i);
  uint64_t slot;
  Mirror::Loading loading(&m_, i, i + 1);  // its queue entry is not stale while the data moves
  const uint64_t evicted = device_.counters().to_host[static_cast<unsigned>(Trigger::kEviction)].load();
  if (!device_.alloc_slot(&slot, &m_, i)) {
    out_->skipped.push_back({i, MigrateSkip::kNoMemory});
    return;
  }
  if (device_.counters().to_host[static_cast<unsigned>(Trigger::kEviction)].load() != evicted) {
    // Making room evicted pages home: this one may be among them, so the presence read at the
    // start is stale for it.
    sys::pagemap_read(host, 1, &pm_entry);
  }
  // unmap, as for a chunk
  auto held = Engine::get().hold_others(&m_, host);
  // Exchanged, as a chunk's entries are: a device write since collect() may have marked it dirty.
  const uint64_t old = p.entry | (m_.pt_[i].exchange(0, std::memory_order_seq_cst) & kDirty);
  m_.wait_inflight(i, i + 1);
  // UFFDIO_MOVE takes anonymous VMAs only: a copied-on-write page of a file's VMA is copied.
  const uint64_t filled = copy(host, slot, 1, Present(pm_entry), options_.use_move && !m_.private_file());
  // finalize
  Engine::release_others(held);
  if (filled == 1) {
    m_.set_device_entry(i, slot, old, p.pfn & kPfnWrite, options_.atomic, false);
    out_->moved++;
    out_->resident++;
  } else {
    device_.free_slot(slot);
    out_->skipped.push_back({i, MigrateSkip::kError});
  }
}

// copy: n host pages at host into slots [slot, slot + n): UFFDIO_ZEROPAGE for never-touched pages,
// UFFDIO_MOVE where allowed, else the copy path under write protection. The pool is registered
// with the engine's userfaultfd, so slots are filled by these ioctls and never by touching them.
// Returns the pages filled (a prefix).
uint64_t MigrateToDevice::copy(uint64_t host, uint64_t slot, uint64_t n, bool present, bool use_move) {
  Engine& engine = Engine::get();
  const int fd = engine.fd();
  const uint64_t page = m_.page_;
  const uint64_t dst = reinterpret_cast<uint64_t>(device_.slot_address(slot));
  const uint64_t len = n * page;
  // Slots that have their pages (preallocated device memory) are filled by plain copies; holes in
  // the pool (registered with the engine's userfaultfd) only by the resolve ioctls.
  const bool populated = device_.slots_populated(slot, n);
  int64_t done = 0;
  if (!present) {
    uint64_t pages;
    if (populated) {
      std::memset(reinterpret_cast<void*>(dst), 0, len);
      pages = n;
    } else {
      int rc = sys::uffd_zeropage(fd, dst, len, UFFDIO_ZEROPAGE_MODE_DONTWAKE, &done);
      pages = rc == 0 ? n : static_cast<uint64_t>(done) / page;
      device_.set_populated(slot, pages, true);
    }
    out_->zero_filled += pages;
    return pages;
  }
  uint64_t moved = 0;
  if (use_move && !populated && engine.has_move()) {
    int rc = sys::uffd_move(fd, dst, host, len, UFFDIO_MOVE_MODE_DONTWAKE, &done);
    moved = rc == 0 ? n : static_cast<uint64_t>(done) / page;
    device_.set_populated(slot, moved, true);
    out_->moved_by_move += moved;
    if (moved == n) return n;
  }
  // The copy path for the rest (or MOVE refused: a page shared after fork, or slots that already
  // have pages). Write-protect first so no CPU write slips between the copy and the zap; a writer
  // waits in the engine until the page is gone, then its retried access pulls the page back.
  const uint64_t h = host + moved * page, d = dst + moved * page, l = len - moved * page;
  sys::uffd_writeprotect(fd, h, l, UFFDIO_WRITEPROTECT_MODE_WP);
  uint64_t copied;
  if (populated) {
    std::memcpy(reinterpret_cast<void*>(d), reinterpret_cast<void*>(h), l);
    copied = l / page;
  } else {
    int rc = sys::uffd_copy(fd, d, h, l, UFFDIO_COPY_MODE_DONTWAKE, &done);
    copied = rc == 0 ? l / page : static_cast<uint64_t>(done) / page;
    device_.set_populated(slot + moved, copied, true);
  }
  if (copied) sys::advise(reinterpret_cast<void*>(h), copied * page, MADV_DONTNEED);
  if (copied < l / page) sys::uffd_writeprotect(fd, h + copied * page, l - copied * page, 0);  // left on the host
  out_->moved_by_copy += copied;
  return moved + copied;
}

// finalize, for the whole range (still under the locks): accounting, the watermark, the wake.
void MigrateToDevice::finalize() {
  device_.on_migrate(&m_, true, first_, out_->moved, options_.trigger);
  device_.enforce_watermark(&m_);
  // A CPU writer that waited on the copy path's write protection is woken to fault again.
  sys::uffd_wake(Engine::get().fd(), m_.host_address(first_), (last_ - first_) * m_.page_);
  if (out_->resident == 0 && out_->error == 0) out_->error = -ENOENT;
}

// One page home: unmap (the device's entry cleared, its accesses drained), copy (MOVE from the
// slot, else COPY), finalize (slot freed, the entry `after` says). Caller holds the change mutex.
// wake: also wake CPU faulters on the page.
bool MigrateToHost::move_page(Mirror& m, uint64_t i, uint64_t e, bool wake, After after) {
  Engine& engine = Engine::get();
  Device& device = *m.device_;
  const int fd = engine.fd();
  const uint64_t slot = e >> kSlotShift;
  const uint64_t host = m.host_address(i);
  const uint64_t page = m.page_;
  // Exchanged, not stored: a device write may have marked the page dirty since the caller read e
  // (Mirror::access sets kDirty by compare-and-swap on a valid entry), and the host entry keeps it.
  e |= m.pt_[i].exchange(0, std::memory_order_seq_cst) & kDirty;
  m.wait_inflight(i, i + 1);
  void* src = device.slot_address(slot);
  int64_t done = 0;
  const uint64_t mode = wake ? 0 : UFFDIO_MOVE_MODE_DONTWAKE;
  int rc = -EOPNOTSUPP;
  // The page itself goes home (no copy); its slot becomes a hole (refilled by an ioctl next time).
  // (MOVE takes anonymous VMAs only: a private file mapping's page comes home by COPY.)
  if (engine.has_move() && !m.private_file()) rc = sys::uffd_move(fd, host, reinterpret_cast<uint64_t>(src), page, mode, &done);
  const bool moved = rc == 0;  // the slot is a hole again: nothing to give back
  if (rc) rc = sys::uffd_copy(fd, host, reinterpret_cast<uint64_t>(src), page, wake ? 0 : UFFDIO_COPY_MODE_DONTWAKE, &done);
  if (rc == -EEXIST) {
    // The host page is present although the device owned the data (something mapped it behind the
    // library's back): the device copy is the newer data.
    std::memcpy(reinterpret_cast<void*>(host), src, page);
    rc = 0;
    if (wake) sys::uffd_wake(fd, host, page);
  }
  device.free_slot(slot, !moved);
  const uint64_t host_entry = kValid | (e & (kWrite | kDirty));
  m.pt_[i].store(rc == 0 && after == After::kHostEntry ? host_entry : 0, std::memory_order_release);
  return rc == 0;
}

// Pages [a, b) sit in consecutive slots: one UFFDIO_MOVE brings them home. False (nothing done)
// if the kernel refuses; the caller then goes page by page.
bool MigrateToHost::move_run(Mirror& m, uint64_t a, uint64_t b) {
  Engine& engine = Engine::get();
  if (!engine.has_move() || m.private_file()) return false;
  Device& device = *m.device_;
  const uint64_t n = b - a;
  // unmap
  std::vector<uint64_t> old(n);
  for (uint64_t k = 0; k < n; k++) old[k] = m.pt_[a + k].exchange(0, std::memory_order_seq_cst);
  m.wait_inflight(a, b);
  // copy
  const uint64_t slot = old[0] >> kSlotShift;
  int64_t done = 0;
  const uint64_t src = reinterpret_cast<uint64_t>(device.slot_address(slot));
  int rc = sys::uffd_move(engine.fd(), m.host_address(a), src, n * m.page_, 0, &done);
  const uint64_t ok = rc == 0 ? n : static_cast<uint64_t>(done) / m.page_;
  // finalize
  for (uint64_t k = 0; k < n; k++) {
    if (k < ok) {
      device.free_slot(slot + k, false);
      m.pt_[a + k].store(kValid | (old[k] & (kWrite | kDirty)), std::memory_order_release);
    } else {
      m.pt_[a + k].store(old[k], std::memory_order_release);  // still on the device; retried one by one
    }
  }
  if (ok == n) return true;
  for (uint64_t k = ok; k < n; k++) move_page(m, a + k, old[k], true, After::kHostEntry);
  return true;
}

uint64_t MigrateToHost::range(Mirror* mirror, uint64_t first, uint64_t last, Trigger trigger) {
  Mirror& m = *mirror;
  if (m.file_copies()) {
    std::unique_lock<std::mutex> change(m.change_mu_, std::defer_lock);
    if (!Engine::holds(mirror)) change.lock();
    return m.file_flush_locked(first, last);
  }
  if (!m.engine_registered_) return 0;
  std::lock_guard<std::mutex> change(m.change_mu_);
  m.begin_change();
  uint64_t moved = 0;
  for (uint64_t i = m.pt_.next_present(first, last); i < last; i = m.pt_.next_present(i, last)) {
    // collect: a pinned page kept by the device has no home to go to.
    const uint64_t e = m.pt_[i].load(std::memory_order_relaxed);
    if (!(e & kOnDevice) || (e & kPinned)) {
      i++;
      continue;
    }
    // A run of pages in consecutive slots goes home in one UFFDIO_MOVE.
    uint64_t j = i + 1;
    while (j < last && j - i < 512) {
      const uint64_t f = m.pt_.peek(j, std::memory_order_relaxed);
      if (!(f & kOnDevice) || (f & kPinned) || (f >> kSlotShift) != (e >> kSlotShift) + (j - i)) break;
      j++;
    }
    if (j - i > 1 && move_run(m, i, j)) {
      moved += j - i;
      i = j;
      continue;
    }
    if (move_page(m, i, e, true, After::kHostEntry)) moved++;
    i++;
  }
  m.end_change();
  m.device_->on_migrate(mirror, false, first, moved, trigger);
  return moved;
}

bool MigrateToHost::cpu_fault(Mirror* mirror, uint64_t i, uint64_t flags) {
  Mirror& m = *mirror;
  if (m.file_copies()) return m.file_cpu_fault(i, flags);
  const uint64_t e = m.pt_.peek(i);
  if (!(e & kOnDevice) || (e & kPinned)) return false;
  m.begin_change();
  // The faulter is woken only after the bookkeeping (slot freed, counters), so whoever waits for
  // the access sees it complete. The CPU took the page back: this device's entry goes (it will
  // fault and find the host page).
  move_page(m, i, e, false, After::kNoEntry);
  m.end_change();
  m.device_->on_invalidate(mirror, i, i + 1, InvalidateCause::kCpuAccess, 1);
  m.device_->on_migrate(mirror, false, i, 1, Trigger::kCpuFault);
  sys::uffd_wake(Engine::get().fd(), m.host_address(i), m.page_);
  return true;
}

bool MigrateToHost::evict(Mirror* mirror, uint64_t i) {
  Mirror& m = *mirror;
  if (m.file_copies()) return m.file_evict(i);
  const uint64_t e = m.pt_.peek(i);
  if (!(e & kOnDevice) || (e & kPinned)) return false;
  m.begin_change();
  // An evicted page is no longer mapped by the device (as unified-memory drivers unmap it): the
  // next device access faults and brings it back, which is what oversubscription costs.
  const bool ok = move_page(m, i, e, true, After::kNoEntry);
  m.end_change();
  if (ok) m.device_->on_migrate(mirror, false, i, 1, Trigger::kEviction);
  return ok;
}

}  // namespace pm::engine
