#include "fault_service.h"

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <poll.h>
#include <sys/eventfd.h>
#include <thread>
#include <unistd.h>

#include "access.h"
#include "uapi.h"
#include "uffd.h"

namespace pm::sys {

namespace {

uint32_t kind_of(uint64_t flags) {
  if (flags & UFFD_PAGEFAULT_FLAG_MINOR) return kFaultMinor;
  if (flags & UFFD_PAGEFAULT_FLAG_WP) return kFaultWp;
  return kFaultMissing;
}

// Rules are few (one per mirrored or served range) and may overlap when they serve different
// kinds, so a linear scan is both the simplest and, at this size, the fastest lookup.
const Rule* find_rule(const std::vector<Rule>& rules, uint64_t addr, uint32_t kind) {
  for (const Rule& r : rules)
    if (addr >= r.start && addr < r.end && (r.kinds & kind)) return &r;
  return nullptr;
}

}  // namespace

FaultService::FaultService(int uffd, uint64_t page_size)
    : uffd_(uffd), page_(page_size), rules_(std::make_shared<const std::vector<Rule>>()) {}

FaultService::~FaultService() { stop(); }

int FaultService::start(FaultSink* sink, unsigned max_batch) {
  if (running_.load()) return -EBUSY;
  stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0) return -errno;
  sink_ = sink;
  max_batch_ = std::max(1u, std::min(max_batch, 4096u));
  static_assert(sizeof(uffd_msg_storage) == sizeof(uffd_msg), "uffd_msg is 32 bytes");
  // Everything the loop needs, allocated here, on the caller's thread.
  msgs_.assign(max_batch_, uffd_msg_storage{});
  work_.reserve(4 * max_batch_);
  retry_.reserve(4 * max_batch_);
  forward_.reserve(4 * max_batch_);
  events_.reserve(max_batch_);
  {
    std::lock_guard<std::mutex> lock(outstanding_mu_);
    outstanding_.reserve(kOutstandingCapacity);
  }
  running_.store(true);
  try {
    thread_ = std::thread(&FaultService::loop, this);
  } catch (...) {
    running_.store(false);
    ::close(stop_fd_);
    stop_fd_ = -1;
    return -EAGAIN;
  }
  return 0;
}

void FaultService::stop() {
  if (!thread_.joinable()) return;
  uint64_t one = 1;
  (void)!::write(stop_fd_, &one, sizeof(one));
  thread_.join();
  running_.store(false);
  retired_.clear();  // the service thread is gone: nobody else holds these
  ::close(stop_fd_);
  stop_fd_ = -1;
}

void FaultService::set_rules(std::vector<Rule> rules) {
  std::sort(rules.begin(), rules.end(), [](const Rule& a, const Rule& b) { return a.start < b.start; });
  auto next = std::make_shared<const std::vector<Rule>>(std::move(rules));
  std::shared_ptr<const std::vector<Rule>> old;
  {
    std::lock_guard<std::mutex> lock(rules_mu_);
    old.swap(rules_);
    rules_ = std::move(next);
  }
  if (running_.load()) retired_.push_back(std::move(old));  // the service may hold it: never its last ref
}

bool FaultService::wait_rules_quiescent(int timeout_ms) {
  const uint64_t e = rules_epoch_.load(std::memory_order_seq_cst);
  if (!(e & 1)) return true;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (rules_epoch_.load(std::memory_order_seq_cst) == e) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::yield();
  }
  return true;
}

std::shared_ptr<const std::vector<Rule>> FaultService::rules_snapshot() const {
  std::lock_guard<std::mutex> lock(rules_mu_);
  return rules_;
}

ServiceStats FaultService::stats() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  return stats_;
}

void FaultService::resolved(uint64_t start, uint64_t len) {
  std::lock_guard<std::mutex> lock(outstanding_mu_);
  const uint64_t first = start & ~(page_ - 1);
  const uint64_t end = start + len;
  for (size_t i = 0; i < outstanding_.size();) {
    const uint64_t a = outstanding_[i].address & ~(page_ - 1);
    if (a >= first && a < end) {
      outstanding_[i] = outstanding_.back();
      outstanding_.pop_back();
    } else {
      i++;
    }
  }
}

std::vector<FaultMsg> FaultService::outstanding() {
  // Allocate before taking the lock the service thread needs (see FaultSink::on_batch).
  std::vector<FaultMsg> out;
  out.reserve(kOutstandingCapacity);
  std::lock_guard<std::mutex> lock(outstanding_mu_);
  out.assign(outstanding_.begin(), outstanding_.end());
  return out;
}

std::vector<FaultMsg> FaultService::drain() {
  std::vector<FaultMsg> out;
  uffd_msg msgs[64];
  for (;;) {
    pollfd p{uffd_, POLLIN, 0};
    if (::poll(&p, 1, 0) <= 0 || !(p.revents & POLLIN)) break;
    ssize_t n = ::read(uffd_, msgs, sizeof(msgs));
    if (n <= 0) break;
    for (ssize_t i = 0; i < n / static_cast<ssize_t>(sizeof(uffd_msg)); i++) {
      // Reading a fork event installed the child's descriptor here; nobody will adopt it now:
      // closing it wakes the child's faults instead of leaving the child asleep.
      if (msgs[i].event == UFFD_EVENT_FORK) ::close(static_cast<int>(msgs[i].arg.fork.ufd));
      if (msgs[i].event == UFFD_EVENT_PAGEFAULT) {
        out.push_back({msgs[i].arg.pagefault.address & ~(page_ - 1),
                       static_cast<uint32_t>(msgs[i].arg.pagefault.flags),
                       msgs[i].arg.pagefault.feat.ptid});
      }
    }
  }
  return out;
}

// Resolves one fault by the rule. Fault-around resolves the aligned block of rule.granule bytes
// around the fault, clamped to the rule's range; pages of the block that are already present make
// the kernel stop with EEXIST, and then the faulting page alone is resolved.
bool FaultService::resolve_fast(const Rule& rule, const FaultMsg& msg, int* err, uint64_t* pages) {
  const uint64_t page_addr = msg.address & ~(page_ - 1);
  uint64_t start = page_addr, len = page_;
  if (rule.granule > page_) {
    start = std::max(rule.start, page_addr & ~(rule.granule - 1));
    len = std::min(rule.end, (page_addr & ~(rule.granule - 1)) + rule.granule) - start;
  }
  // Counted before the ioctl wakes the faulter: whoever waits for the access and then reads
  // stats() must find this fault in them. Taken back below if the resolve fails.
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    stats_.fast_resolved++;
    stats_.fast_pages += len / page_;
  }
  auto unpublish = [&] {
    std::lock_guard<std::mutex> lock(stats_mu_);
    stats_.fast_resolved--;
    stats_.fast_pages -= len / page_;
  };
  if (rule.action == RuleAction::kHandler) {
    *err = rule.handler->resolve(uffd_, msg, pages);
    if (*err) unpublish();
    else if (*pages != len / page_) {
      std::lock_guard<std::mutex> lock(stats_mu_);
      stats_.fast_pages = stats_.fast_pages - len / page_ + *pages;
    }
    return *err == 0;
  }
  int64_t done = 0;
  int rc = 0;
  auto apply = [&](uint64_t s, uint64_t l) -> int {
    switch (rule.action) {
      case RuleAction::kCopy:
        return uffd_copy(uffd_, s, rule.source + (s - rule.start), l, rule.mode, &done);
      case RuleAction::kZero:
        return uffd_zeropage(uffd_, s, l, rule.mode, &done);
      case RuleAction::kContinue:
        return uffd_continue(uffd_, s, l, rule.mode, &done);
      case RuleAction::kMove:
        return uffd_move(uffd_, s, rule.source + (s - rule.start), l, rule.mode, &done);
      case RuleAction::kPoison:
        return uffd_poison(uffd_, s, l, 0, &done);
      case RuleAction::kUnprotect:
        done = static_cast<int64_t>(l);
        return uffd_writeprotect(uffd_, s, l, 0);
    }
    return -EINVAL;
  };
  rc = apply(start, len);
  if (rc == -EEXIST && len > page_) {
    // Part of the block was present. Installed pages before `done` are in; the faulting page may
    // be among the rest.
    if (page_addr >= start + static_cast<uint64_t>(done)) rc = apply(page_addr, page_);
    else rc = 0;
  }
  if (rc == -EEXIST) {
    // Someone else installed the page without waking us; make sure the faulter runs on.
    uffd_wake(uffd_, page_addr, page_);
    *err = -EEXIST;
    *pages = 0;
    std::lock_guard<std::mutex> lock(stats_mu_);
    stats_.fast_pages -= len / page_;  // resolved, but not by installing pages here
    return true;
  }
  *err = rc;
  if (rc == 0) *pages = len / page_;
  else unpublish();
  return rc == 0;
}

void FaultService::loop() {
  // No allocation in here (see FaultSink::on_batch): every buffer was sized by start().
  uffd_msg* msgs = reinterpret_cast<uffd_msg*>(msgs_.data());
  const size_t cap = work_.capacity();
  pollfd fds[2] = {{uffd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
  for (;;) {
    // With faults waiting for an unread event (EAGAIN), do not sleep: the event is already queued.
    int pr = ::poll(fds, 2, retry_.empty() ? -1 : 0);
    if (pr < 0 && errno != EINTR) break;
    if (fds[1].revents & POLLIN) break;
    if (fds[0].revents & (POLLERR | POLLHUP | POLLNVAL)) break;

    forward_.clear();
    events_.clear();
    ServiceStats delta;
    work_.clear();
    work_.swap(retry_);

    if (fds[0].revents & POLLIN) {
      // Read no more than the work buffer can take beside the retries it already holds.
      const size_t room = std::min<size_t>(max_batch_, cap - work_.size());
      ssize_t n = room ? ::read(uffd_, msgs, room * sizeof(uffd_msg)) : 0;
      if (n < 0 && errno != EAGAIN && errno != EINTR) break;
      size_t count = n > 0 ? static_cast<size_t>(n) / sizeof(uffd_msg) : 0;
      if (count) {
        delta.reads = 1;
        delta.messages = count;
        delta.max_batch = count;
      }
      for (size_t i = 0; i < count; i++) {
        const uffd_msg& m = msgs[i];
        switch (m.event) {
          case UFFD_EVENT_PAGEFAULT:
            delta.faults++;
            work_.push_back({m.arg.pagefault.address, static_cast<uint32_t>(m.arg.pagefault.flags),
                             m.arg.pagefault.feat.ptid});
            break;
          case UFFD_EVENT_FORK:
            events_.push_back({EventKind::kFork, m.arg.fork.ufd, 0, 0});
            break;
          case UFFD_EVENT_REMAP:
            events_.push_back({EventKind::kRemap, m.arg.remap.from, m.arg.remap.to, m.arg.remap.len});
            break;
          case UFFD_EVENT_REMOVE:
            events_.push_back({EventKind::kRemove, m.arg.remove.start, m.arg.remove.end, 0});
            break;
          case UFFD_EVENT_UNMAP:
            events_.push_back({EventKind::kUnmap, m.arg.remove.start, m.arg.remove.end, 0});
            break;
          default:
            break;
        }
      }
      delta.events = events_.size();
      // The faults are counted before any of them is resolved (see resolve_fast).
      std::lock_guard<std::mutex> lock(stats_mu_);
      stats_.reads += delta.reads;
      stats_.messages += delta.messages;
      stats_.faults += delta.faults;
      stats_.events += delta.events;
      stats_.max_batch = std::max(stats_.max_batch, delta.max_batch);
    }

    if (!work_.empty()) {
      rules_epoch_.fetch_add(1, std::memory_order_seq_cst);  // odd: a snapshot in use
      struct EpochEnd {
        std::atomic<uint64_t>& e;
        ~EpochEnd() { e.fetch_add(1, std::memory_order_seq_cst); }
      } epoch_end{rules_epoch_};
      auto rules = rules_snapshot();
      const uint64_t t0 = rules->empty() ? 0 : now_ns();
      for (const FaultMsg& f : work_) {
        const Rule* rule = rules->empty() ? nullptr : find_rule(*rules, f.address, kind_of(f.flags));
        if (rule) {
          int err = 0;
          uint64_t pages = 0;
          if (resolve_fast(*rule, f, &err, &pages)) {  // counts itself in stats_
            if (err == -EEXIST) delta.eexist++;
            continue;
          }
          if (err == -EAGAIN) {
            delta.eagain++;
            retry_.push_back(f);
            continue;
          }
          delta.errors++;
        }
        forward_.push_back(f);
      }
      if (t0) delta.service_ns = now_ns() - t0;
    }

    if (!forward_.empty()) {
      std::lock_guard<std::mutex> lock(outstanding_mu_);
      for (const FaultMsg& f : forward_)
        if (outstanding_.size() < outstanding_.capacity()) outstanding_.push_back(f);
    }
    delta.forwarded = forward_.size();
    const bool deliver = !forward_.empty() || !events_.empty();
    if (deliver) delta.batches = 1;
    {
      // Publish the counts before handing the batch over: JavaScript may resolve the faults, the
      // accesses finish and stats() be read before this thread runs again.
      std::lock_guard<std::mutex> lock(stats_mu_);
      stats_.forwarded += delta.forwarded;
      stats_.batches += delta.batches;
      stats_.eexist += delta.eexist;
      stats_.eagain += delta.eagain;
      stats_.errors += delta.errors;
      stats_.service_ns += delta.service_ns;
    }
    if (deliver && sink_) sink_->on_batch(forward_.data(), forward_.size(), events_.data(), events_.size());
  }
}

}  // namespace pm::sys
