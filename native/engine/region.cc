// The Region's own behaviour: notifier fan-out, protection bookkeeping, unmapping. Engine code
// (mirrors, the engine's fault handler) depends on it, so it lives here and not in the binding.
#include "region.h"

#include <fcntl.h>
#include <sys/mman.h>

#include <algorithm>
#include <iterator>

#include "../sys/mem.h"

namespace pm {

const char* InvalidateCauseName(InvalidateCause c) {
  switch (c) {
    case InvalidateCause::kUnmap: return "unmap";
    case InvalidateCause::kRemap: return "remap";
    case InvalidateCause::kProtect: return "protect";
    case InvalidateCause::kDiscard: return "discard";
    case InvalidateCause::kTruncate: return "truncate";
    case InvalidateCause::kWriteback: return "writeback";
    case InvalidateCause::kUffdEvent: return "uffd-event";
    case InvalidateCause::kFork: return "fork";
    case InvalidateCause::kCpuWrite: return "cpu-write";
    case InvalidateCause::kCpuAccess: return "cpu-access";
    case InvalidateCause::kRelease: return "release";
    case InvalidateCause::kAdvise: return "advise";
  }
  return "unknown";
}

void Region::add_notifier(RangeNotifier* n) {
  std::lock_guard<std::mutex> lock(notifiers_mu);
  notifiers.push_back(n);
}

void Region::remove_notifier(RangeNotifier* n) {
  std::lock_guard<std::mutex> lock(notifiers_mu);
  notifiers.erase(std::remove(notifiers.begin(), notifiers.end(), n), notifiers.end());
}

Region::Invalidation::Invalidation(Region* r, uint64_t off, uint64_t len, InvalidateCause cause)
    : start_(r->addr + off), end_(r->addr + off + len) {
  {
    std::lock_guard<std::mutex> lock(r->notifiers_mu);
    told_ = r->notifiers;
  }
  // Mirrors lock their change mutex from start to end; taking them in address order (as the
  // engine's fault handler does) keeps two parties from waiting on each other's mirror.
  std::sort(told_.begin(), told_.end());
  for (RangeNotifier* n : told_) n->invalidate_start(start_, end_, cause);
}

void Region::Invalidation::moved(uint64_t old_addr, uint64_t new_addr, uint64_t new_length, bool old_kept) {
  for (RangeNotifier* n : told_) n->remapped(old_addr, new_addr, new_length, old_kept);
  start_ = start_ - old_addr + new_addr;
  end_ = end_ - old_addr + new_addr;
}

Region::Invalidation::~Invalidation() {
  for (RangeNotifier* n : told_) n->invalidate_end(start_, end_);
}

Region::~Region() {
  unmap_now();
  if (fd >= 0) sys::close_fd(fd);
}

void Region::unmap_now() {
  bool expected = false;
  if (closed.compare_exchange_strong(expected, true) && addr) sys::unmap(reinterpret_cast<void*>(addr), length);
}

bool Region::may_write() const {
  if (!shared || fd < 0) return true;
  const int fl = ::fcntl(fd, F_GETFL);
  return fl < 0 || (fl & O_ACCMODE) != O_RDONLY;
}

const char* Region::not_writable_hint() const {
  return may_write() ? nullptr
                     : "userfaultfd registers only mappings that may be written (VM_MAYWRITE), and this shared "
                       "mapping's file is open read-only: map it with prot 'rw' (or pass a descriptor opened for "
                       "writing)";
}

bool Region::pinned_over(uint64_t off, uint64_t len) {
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& p : pin_ranges)
    if (off < p.first + p.second && p.first < off + len) return true;
  return false;
}

int Region::prot_over(uint64_t off, uint64_t len) {
  std::lock_guard<std::mutex> lock(mu);
  int p = PROT_READ | PROT_WRITE | PROT_EXEC;
  auto it = prot.upper_bound(off);
  if (it != prot.begin()) --it;
  for (; it != prot.end() && it->first < off + (len ? len : 1); ++it) p &= it->second;
  return p;
}

void Region::set_prot(uint64_t off, uint64_t len, int p) {
  std::lock_guard<std::mutex> lock(mu);
  const uint64_t end = off + len;
  // Value in force at `end`, so the tail after the change keeps its protection.
  auto at_end = prot.upper_bound(end);
  int tail = std::prev(at_end)->second;
  prot.erase(prot.lower_bound(off), prot.upper_bound(end));
  prot[off] = p;
  if (end < length) prot[end] = tail;
  // Merge neighbours with equal protection.
  for (auto it = prot.begin(); it != prot.end();) {
    auto next = std::next(it);
    if (next != prot.end() && next->second == it->second) prot.erase(next);
    else it = next;
  }
}

}  // namespace pm
