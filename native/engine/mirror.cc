#include "mirror.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <sys/mman.h>
#include <thread>

#include "../sys/mem.h"
#include "../sys/uapi.h"
#include "device.h"

namespace pm::engine {

Mirror::Mirror(Device* device, std::shared_ptr<Region> region, uint64_t offset, uint64_t length)
    : device_(device),
      region_(std::move(region)),
      offset_(offset),
      start_(region_->addr + offset),
      npages_(length / region_->page),
      page_(region_->page),
      pt_(new std::atomic<uint64_t>[npages_]()),
      inflight_(new std::atomic<uint32_t>[(npages_ >> kBlockShift) + 1]()) {
  region_->add_notifier(this);
  attached_ = true;
}

Mirror::~Mirror() { detach(); }

void Mirror::detach() {
  if (!attached_) return;
  attached_ = false;
  region_->remove_notifier(this);
  {
    std::lock_guard<std::mutex> lock(mu_);
    dead_.store(true, std::memory_order_release);
    gen_++;
  }
  for (uint64_t i = 0; i < npages_; i++) {
    uint64_t old = pt_[i].exchange(0, std::memory_order_seq_cst);
    if (old & kOnDevice) device_->free_slot(old >> kSlotShift);
  }
  wait_inflight(0, npages_);
}

void* Mirror::pin(uint64_t i, bool write) {
  std::atomic<uint32_t>& b = inflight_[i >> kBlockShift];
  // seq_cst on both sides (here: count then entry; invalidation: entry then count) guarantees that
  // either the invalidation sees this access in flight, or this access sees the cleared entry.
  b.fetch_add(1, std::memory_order_seq_cst);
  uint64_t e = pt_[i].load(std::memory_order_seq_cst);
  if (!(e & kValid) || (write && !(e & kWrite))) {
    b.fetch_sub(1, std::memory_order_release);
    return nullptr;
  }
  if (e & kOnDevice) return device_->slot_address(e >> kSlotShift);
  return reinterpret_cast<void*>(start_ + i * page_);
}

void Mirror::mark_dirty(uint64_t i) {
  uint64_t e = pt_[i].load(std::memory_order_relaxed);
  // Only while the entry is still the one we accessed through: an invalidation that cleared it
  // must not see a resurrected bit.
  while ((e & kValid) && !(e & kDirty) && !pt_[i].compare_exchange_weak(e, e | kDirty)) {
  }
}

void Mirror::wait_inflight(uint64_t first, uint64_t last) {
  if (first >= last) return;
  for (uint64_t b = first >> kBlockShift; b <= (last - 1) >> kBlockShift; b++) {
    unsigned spins = 0;
    while (inflight_[b].load(std::memory_order_seq_cst) != 0) {
      if (++spins < 64) continue;
      std::this_thread::yield();
    }
  }
}

void Mirror::invalidate_start(uint64_t start, uint64_t end, InvalidateCause cause) {
  const uint64_t s = std::max(start, start_), e = std::min(end, start_ + npages_ * page_);
  if (s >= e) return;
  const uint64_t first = (s - start_) / page_, last = (e - start_ + page_ - 1) / page_;
  {
    std::lock_guard<std::mutex> lock(mu_);
    active_++;
    gen_++;
  }
  // The data of a device-resident page survives an invalidation that leaves the memory in place
  // (protect, writeback); it goes with an unmap, a discard or a truncate.
  const bool drops_data = cause == InvalidateCause::kUnmap || cause == InvalidateCause::kDiscard ||
                          cause == InvalidateCause::kTruncate || cause == InvalidateCause::kRemap ||
                          cause == InvalidateCause::kUffdEvent;
  uint64_t cleared = 0;
  for (uint64_t i = first; i < last; i++) {
    uint64_t old = pt_[i].load(std::memory_order_relaxed);
    uint64_t keep = (old & kOnDevice) && !drops_data ? (old & ~(kValid | kWrite | kAtomic)) : 0;
    old = pt_[i].exchange(keep, std::memory_order_seq_cst);
    if (old & kValid) cleared++;
    if ((old & kOnDevice) && !keep) device_->free_slot(old >> kSlotShift);
  }
  wait_inflight(first, last);
  stats_.invalidations.fetch_add(1, std::memory_order_relaxed);
  stats_.invalidated_pages.fetch_add(cleared, std::memory_order_relaxed);
  device_->on_invalidate(this, first, last, cause, cleared);
  if (cause == InvalidateCause::kUnmap || cause == InvalidateCause::kRemap) {
    if (first == 0 && last == npages_) dead_.store(true, std::memory_order_release);
  }
}

void Mirror::invalidate_end(uint64_t start, uint64_t end) {
  const uint64_t s = std::max(start, start_), e = std::min(end, start_ + npages_ * page_);
  if (s >= e) return;
  std::lock_guard<std::mutex> lock(mu_);
  active_--;
  gen_++;
  idle_.notify_all();
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
  // the CPU side and stay so; populate the runs between them.
  for (uint64_t i = first; i < last;) {
    if (pt_[i].load(std::memory_order_relaxed) & kOnDevice) {
      i++;
      continue;
    }
    uint64_t j = i;
    while (j < last && !(pt_[j].load(std::memory_order_relaxed) & kOnDevice)) j++;
    int rc = sys::advise(reinterpret_cast<void*>(start_ + i * page_), (j - i) * page_,
                         write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ);
    // EFAULT/ENOMEM: the mapping changed between the check above and here; an invalidation is
    // under way or done, so retry and let the checks decide.
    if (rc == -EFAULT || rc == -ENOMEM) return 1;
    if (rc) return rc == -EINVAL ? -EFAULT : rc;
    i = j;
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (gen_ != gen0 || active_ != 0) return 1;
  for (uint64_t k = first; k < last; k++) {
    const uint64_t e = pt_[k].load(std::memory_order_relaxed);
    const uint64_t kept = e & (kOnDevice | kDirty | (~0ull << kSlotShift));
    pt_[k].store(kept | kValid | (write ? kWrite : (e & kWrite)), std::memory_order_release);
  }
  return 0;
}

int Mirror::range_fault(uint64_t first, uint64_t last, bool write, int timeout_ms) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  stats_.range_faults.fetch_add(1, std::memory_order_relaxed);
  for (;;) {
    int rc = fault_once(first, last, write, deadline);
    if (rc <= 0) return rc;
    stats_.retries.fetch_add(1, std::memory_order_relaxed);
    if (std::chrono::steady_clock::now() > deadline) return -EBUSY;
  }
}

}  // namespace pm::engine
