// Mirror: one device's page table over a range of a Region (HMM's mirror). One 8-byte entry per
// page; device threads read entries without locks and pin the 2 MiB block they access, so an
// invalidation can clear entries and then wait for exactly the accesses in flight on its range.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "../binding/region.h"

namespace pm::engine {

class Device;

// Entry bits. The slot (device memory page) sits above kSlotShift.
enum : uint64_t {
  kValid = 1ull << 0,
  kWrite = 1ull << 1,
  kAtomic = 1ull << 2,   // exclusive: any CPU access revokes it
  kDirty = 1ull << 3,    // the device wrote through this entry
  kOnDevice = 1ull << 4, // the data lives in device memory (slot), not in the host page
  kSlotShift = 20,
};

struct MirrorStats {
  std::atomic<uint64_t> invalidations{0};     // invalidate_start calls that hit this mirror
  std::atomic<uint64_t> invalidated_pages{0}; // valid entries cleared
  std::atomic<uint64_t> range_faults{0};
  std::atomic<uint64_t> retries{0};           // range faults retried because an invalidation raced
};

class Mirror : public RangeNotifier {
 public:
  static constexpr unsigned kBlockShift = 9;  // 512 pages: one in-flight counter per 2 MiB (4 KiB pages)

  Mirror(Device* device, std::shared_ptr<Region> region, uint64_t offset, uint64_t length);
  ~Mirror() override;

  // Unhooks from the region and waits for in-flight accesses. Idempotent.
  void detach();
  bool dead() const { return dead_.load(std::memory_order_acquire); }

  Device* device() const { return device_; }
  Region* region() const { return region_.get(); }
  uint64_t start() const { return start_; }
  uint64_t npages() const { return npages_; }
  uint64_t page() const { return page_; }
  uint64_t entry(uint64_t i) const { return pt_[i].load(std::memory_order_acquire); }
  size_t table_bytes() const { return npages_ * sizeof(uint64_t); }
  const MirrorStats& stats() const { return stats_; }

  // hmm_range_fault: makes the CPU side present for [first, last) with the permission asked for and
  // programs the entries, retrying while invalidations race it, up to timeout_ms (then -EBUSY).
  // Errors: -EPERM (write to a range without write permission), -EFAULT (no mapping, PROT_NONE,
  // mirror detached), -EBUSY.
  int range_fault(uint64_t first, uint64_t last, bool write, int timeout_ms);

  // The device-side access protocol: pin the page's block, check the entry, get a pointer.
  // Returns nullptr (and leaves nothing pinned) if the entry does not allow the access.
  void* pin(uint64_t i, bool write);
  void unpin(uint64_t i) { inflight_[i >> kBlockShift].fetch_sub(1, std::memory_order_release); }
  void mark_dirty(uint64_t i);

  // RangeNotifier
  void invalidate_start(uint64_t start, uint64_t end, InvalidateCause cause) override;
  void invalidate_end(uint64_t start, uint64_t end) override;

 private:
  void wait_inflight(uint64_t first, uint64_t last);
  int fault_once(uint64_t first, uint64_t last, bool write, std::chrono::steady_clock::time_point deadline);

  Device* const device_;
  const std::shared_ptr<Region> region_;
  const uint64_t offset_;  // within the region
  const uint64_t start_, npages_, page_;
  std::unique_ptr<std::atomic<uint64_t>[]> pt_;
  std::unique_ptr<std::atomic<uint32_t>[]> inflight_;
  // Sequence-count protocol: gen_ moves on every invalidation start and end; active_ counts
  // invalidations between their start and end. A range fault that saw either change retries.
  std::mutex mu_;
  uint64_t gen_ = 0;
  unsigned active_ = 0;
  std::condition_variable idle_;
  std::atomic<bool> dead_{false};
  bool attached_ = false;
  MirrorStats stats_;
};

}  // namespace pm::engine
