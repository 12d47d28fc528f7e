// PageTable: a device page table that costs memory only where it maps something, as the kernel's
// page tables do. Entries live in blocks of 512 (one 2 MiB stretch of 4 KiB pages), allocated on
// first write; a middle level points to 512 blocks (1 GiB), and the top level, the one array sized
// by the range, has one pointer per middle page: 512 KiB for a 2^46-byte range. Reading an absent
// block sees entry 0 and allocates nothing (peek(), next_present(), the const operator[]).
//
// Blocks and middle pages are published with a release CAS and read with acquire loads, and are
// never freed while the table lives: a device thread that found a block may keep using it without
// a lock. Each block carries the in-flight counter of the device access protocol (see Mirror::pin).
#pragma once

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace pm::engine {

class PageTable {
 public:
  static constexpr unsigned kBlockShift = 9;
  static constexpr uint64_t kBlockEntries = 1ull << kBlockShift;
  static constexpr unsigned kMidShift = 9;
  static constexpr uint64_t kMidBlocks = 1ull << kMidShift;

  struct Block {
    std::atomic<uint32_t> inflight{0};
    std::atomic<uint64_t> e[kBlockEntries] = {};
  };

  explicit PageTable(uint64_t entries)
      : entries_(entries), nmid_((((entries + kBlockEntries - 1) >> kBlockShift) + kMidBlocks - 1) >> kMidShift) {
    // calloc: a large top level is mapped lazily by the allocator, zero (null pointers) until used.
    top_ = static_cast<std::atomic<Mid*>*>(std::calloc(nmid_ ? nmid_ : 1, sizeof(std::atomic<Mid*>)));
    if (top_) bytes_.store(nmid_ * sizeof(std::atomic<Mid*>), std::memory_order_relaxed);
  }
  ~PageTable() {
    if (!top_) return;
    for (uint64_t m = 0; m < nmid_; m++) {
      Mid* mid = top_[m].load(std::memory_order_acquire);
      if (!mid) continue;
      for (auto& b : mid->b) delete b.load(std::memory_order_acquire);
      delete mid;
    }
    std::free(top_);
  }
  PageTable(const PageTable&) = delete;
  PageTable& operator=(const PageTable&) = delete;

  // False when even the top level could not be allocated: the mirror must not be used.
  bool ok() const { return top_ != nullptr; }
  uint64_t size() const { return entries_; }
  // What the table really holds: the top level, middle pages and blocks allocated so far.
  uint64_t bytes() const { return bytes_.load(std::memory_order_relaxed); }

  // Entry i, its block allocated if absent. Call ensure() first where entries are programmed: that
  // is where a failed allocation can be reported (-ENOMEM). Should an allocation fail here all the
  // same, the caller gets a scratch entry reading 0, which is what the absent entry holds.
  std::atomic<uint64_t>& operator[](uint64_t i) {
    if (Block* b = block(i)) return b->e[i & (kBlockEntries - 1)];
    if (Block* b = allocate(i)) return b->e[i & (kBlockEntries - 1)];
    thread_local std::atomic<uint64_t> scratch;
    scratch.store(0, std::memory_order_relaxed);
    return scratch;
  }
  // Read-only access (const users: scans): an absent block reads as zeros.
  const std::atomic<uint64_t>& operator[](uint64_t i) const {
    static const std::atomic<uint64_t> zero{0};
    const Block* b = block(i);
    return b ? b->e[i & (kBlockEntries - 1)] : zero;
  }
  uint64_t peek(uint64_t i, std::memory_order order = std::memory_order_acquire) const {
    const Block* b = block(i);
    return b ? b->e[i & (kBlockEntries - 1)].load(order) : 0;
  }

  // The block holding entry i, or nullptr if none was allocated.
  Block* block(uint64_t i) const {
    if (!top_) return nullptr;
    Mid* mid = top_[i >> (kBlockShift + kMidShift)].load(std::memory_order_acquire);
    return mid ? mid->b[(i >> kBlockShift) & (kMidBlocks - 1)].load(std::memory_order_acquire) : nullptr;
  }

  // Allocates the blocks of [first, last). 0, or -ENOMEM.
  int ensure(uint64_t first, uint64_t last) {
    for (uint64_t i = first; i < last; i = ((i >> kBlockShift) + 1) << kBlockShift)
      if (!block(i) && !allocate(i)) return -ENOMEM;
    return 0;
  }

  // The first index in [i, last) whose block exists, or last: scans skip what was never mapped
  // (a whole absent middle page at a time).
  uint64_t next_present(uint64_t i, uint64_t last) const {
    while (i < last) {
      if (!top_) return last;
      Mid* mid = top_[i >> (kBlockShift + kMidShift)].load(std::memory_order_acquire);
      if (!mid) {
        i = ((i >> (kBlockShift + kMidShift)) + 1) << (kBlockShift + kMidShift);
        continue;
      }
      if (mid->b[(i >> kBlockShift) & (kMidBlocks - 1)].load(std::memory_order_acquire)) return i;
      i = ((i >> kBlockShift) + 1) << kBlockShift;
    }
    return last;
  }

 private:
  struct Mid {
    std::atomic<Block*> b[kMidBlocks] = {};
  };

  // Publishes a zeroed block for entry i (the middle page too, if needed). Another thread may win
  // the race: its block is used and ours freed. nullptr when memory is exhausted.
  Block* allocate(uint64_t i) {
    if (!top_) return nullptr;
    std::atomic<Mid*>& slot = top_[i >> (kBlockShift + kMidShift)];
    Mid* mid = slot.load(std::memory_order_acquire);
    if (!mid) {
      Mid* fresh = new (std::nothrow) Mid();
      if (!fresh) return nullptr;
      if (slot.compare_exchange_strong(mid, fresh, std::memory_order_acq_rel, std::memory_order_acquire)) {
        mid = fresh;
        bytes_.fetch_add(sizeof(Mid), std::memory_order_relaxed);
      } else {
        delete fresh;
      }
    }
    std::atomic<Block*>& bslot = mid->b[(i >> kBlockShift) & (kMidBlocks - 1)];
    Block* b = bslot.load(std::memory_order_acquire);
    if (b) return b;
    Block* fresh = new (std::nothrow) Block();
    if (!fresh) return nullptr;
    if (bslot.compare_exchange_strong(b, fresh, std::memory_order_acq_rel, std::memory_order_acquire)) {
      bytes_.fetch_add(sizeof(Block), std::memory_order_relaxed);
      return fresh;
    }
    delete fresh;
    return b;
  }

  const uint64_t entries_;
  const uint64_t nmid_;  // top-level pointers
  std::atomic<Mid*>* top_ = nullptr;
  std::atomic<uint64_t> bytes_{0};
};

}  // namespace pm::engine
