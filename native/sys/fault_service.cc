#include "fault_service.h"

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <sys/epoll.h>
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

int FaultService::start(FaultSink* sink, unsigned max_batch, unsigned workers, PollOptions poll) {
  if (running_.load()) return -EBUSY;
  if (workers < 1 || workers > kMaxWorkers || poll.spin_us > kMaxSpinUs) return -EINVAL;
  stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0) return -errno;
  sink_ = sink;
  max_batch_ = std::max(1u, std::min(max_batch, 4096u));
  nworkers_ = workers;
  poll_ = poll;
  static_assert(sizeof(uffd_msg_storage) == sizeof(uffd_msg), "uffd_msg is 32 bytes");
  // Everything the loops need, allocated here, on the caller's thread.
  workers_.clear();
  for (unsigned i = 0; i < workers; i++) {
    auto w = std::make_unique<Worker>();
    w->index = i;
    w->msgs.assign(max_batch_, uffd_msg_storage{});
    w->work.reserve(4 * max_batch_);
    w->retry.reserve(4 * max_batch_);
    w->forward.reserve(4 * max_batch_);
    w->events.reserve(max_batch_);
    // Adaptive starts at a quarter of its cap (the faults of a new service usually come in runs)
    // and finds its level from there; halving takes an idle worker to no spin in a few sleeps.
    if (poll.mode == PollMode::kFixed) w->budget_ns = uint64_t{poll.spin_us} * 1000;
    if (poll.mode == PollMode::kAdaptive) w->budget_ns = uint64_t{poll.spin_us} * 1000 / 4;
    w->stats.spin_budget_ns = w->budget_ns;
    if (workers > 1) {
      w->epfd = ::epoll_create1(EPOLL_CLOEXEC);
      epoll_event in{EPOLLIN | EPOLLEXCLUSIVE, {}}, stop{EPOLLIN, {}};
      in.data.fd = uffd_;
      stop.data.fd = stop_fd_;
      if (w->epfd >= 0 && (::epoll_ctl(w->epfd, EPOLL_CTL_ADD, uffd_, &in) != 0 || ::epoll_ctl(w->epfd, EPOLL_CTL_ADD, stop_fd_, &stop) != 0)) {
        ::close(w->epfd);  // poll() then, herd and all
        w->epfd = -1;
      }
    }
    workers_.push_back(std::move(w));
  }
  {
    std::lock_guard<std::mutex> lock(outstanding_mu_);
    outstanding_.reserve(kOutstandingCapacity);
  }
  running_.store(true);
  for (auto& w : workers_) {
    try {
      w->thread = std::thread(&FaultService::loop, this, w.get());
    } catch (...) {
      stop();
      return -EAGAIN;
    }
  }
  return 0;
}

void FaultService::stop() {
  if (stop_fd_ < 0) return;
  uint64_t one = 1;
  // The eventfd stays readable (nobody reads it): every worker sees it, spinning or asleep.
  (void)!::write(stop_fd_, &one, sizeof(one));
  for (auto& w : workers_)
    if (w->thread.joinable()) w->thread.join();
  for (auto& w : workers_) {
    add(&stopped_stats_, w->stats);
    if (w->epfd >= 0) ::close(w->epfd);
  }
  workers_.clear();
  running_.store(false);
  retired_.clear();  // the service threads are gone: nobody else holds these
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

void FaultService::set_tap(std::shared_ptr<FaultTap> tap) {
  tap_.store(tap.get(), std::memory_order_seq_cst);
  // A worker that loaded the old tap counted itself first (both sides sequentially consistent).
  while (tap_users_.load(std::memory_order_seq_cst) != 0) std::this_thread::yield();
  tap_keep_ = std::move(tap);
}

bool FaultService::wait_rules_quiescent(int timeout_ms) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (auto& w : workers_) {
    const uint64_t e = w->rules_epoch.load(std::memory_order_seq_cst);
    if (!(e & 1)) continue;
    while (w->rules_epoch.load(std::memory_order_seq_cst) == e) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::yield();
    }
  }
  return true;
}

std::shared_ptr<const std::vector<Rule>> FaultService::rules_snapshot() const {
  std::lock_guard<std::mutex> lock(rules_mu_);
  return rules_;
}

void FaultService::add(ServiceStats* into, const ServiceStats& s) {
  into->reads += s.reads;
  into->messages += s.messages;
  into->faults += s.faults;
  into->fast_resolved += s.fast_resolved;
  into->fast_pages += s.fast_pages;
  into->forwarded += s.forwarded;
  into->events += s.events;
  into->batches += s.batches;
  into->max_batch = std::max(into->max_batch, s.max_batch);
  into->eexist += s.eexist;
  into->marker_fills += s.marker_fills;
  into->eagain += s.eagain;
  into->errors += s.errors;
  into->service_ns += s.service_ns;
  into->cpu_ns += s.cpu_ns;
  into->spin_ns += s.spin_ns;
  into->spin_hits += s.spin_hits;
  into->sleeps += s.sleeps;
  into->spin_budget_ns = std::max(into->spin_budget_ns, s.spin_budget_ns);
}

namespace {
// A live worker's CPU time, read from outside it (costs the worker nothing); 0 once it has exited,
// when its own last reading stands.
uint64_t thread_cpu_ns(std::thread& t) {
  clockid_t id;
  timespec ts;
  if (!t.joinable() || pthread_getcpuclockid(t.native_handle(), &id) != 0 || clock_gettime(id, &ts) != 0) return 0;
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}
}  // namespace

// One worker's counters, with its CPU time as of now.
ServiceStats FaultService::snapshot(Worker& w) {
  ServiceStats s;
  {
    std::lock_guard<std::mutex> lock(w.stats_mu);
    s = w.stats;
  }
  s.cpu_ns = std::max(s.cpu_ns, thread_cpu_ns(w.thread));
  return s;
}

std::vector<ServiceStats> FaultService::worker_stats() const {
  std::vector<ServiceStats> out;
  out.reserve(workers_.size());  // before any lock a worker takes (see FaultSink::on_batch)
  for (auto& w : workers_) out.push_back(snapshot(*w));
  return out;
}

ServiceStats FaultService::stats() const {
  ServiceStats sum = stopped_stats_;
  for (auto& w : workers_) add(&sum, snapshot(*w));
  return sum;
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
bool FaultService::resolve_fast(Worker* w, const Rule& rule, const FaultMsg& msg, int* err, uint64_t* pages) {
  const uint64_t page_addr = msg.address & ~(page_ - 1);
  uint64_t start = page_addr, len = page_;
  if (rule.granule > page_) {
    start = std::max(rule.start, page_addr & ~(rule.granule - 1));
    len = std::min(rule.end, (page_addr & ~(rule.granule - 1)) + rule.granule) - start;
  }
  // Counted before the ioctl wakes the faulter: whoever waits for the access and then reads
  // stats() must find this fault in them. Taken back below if the resolve fails.
  {
    std::lock_guard<std::mutex> lock(w->stats_mu);
    w->stats.fast_resolved++;
    w->stats.fast_pages += len / page_;
  }
  auto unpublish = [&] {
    std::lock_guard<std::mutex> lock(w->stats_mu);
    w->stats.fast_resolved--;
    w->stats.fast_pages -= len / page_;
  };
  if (rule.action == RuleAction::kHandler) {
    *err = rule.handler->resolve(uffd_, msg, pages);
    if (*err) unpublish();
    else if (*pages != len / page_) {
      std::lock_guard<std::mutex> lock(w->stats_mu);
      w->stats.fast_pages = w->stats.fast_pages - len / page_ + *pages;
    }
    return *err == 0;
  }
  int64_t done = 0;
  int rc = 0;
  uint64_t markers = 0, markers_now = 0;
  auto apply = [&](uint64_t s, uint64_t l) -> int {
    switch (rule.action) {
      case RuleAction::kCopy:
        return uffd_copy(uffd_, s, rule.source + (s - rule.start), l, rule.mode, &done);
      case RuleAction::kZero: {
        const int zrc = rule.zero_reads_markers ? uffd_zero_fill_shmem(uffd_, s, l, rule.mode, &done, &markers_now)
                                                : uffd_zero_fill(uffd_, s, l, rule.mode, &done, &markers_now);
        markers += markers_now;
        return zrc;
      }
      case RuleAction::kContinue:
        return uffd_continue(uffd_, s, l, rule.mode, &done);
      case RuleAction::kMove:
        return uffd_move(uffd_, s, rule.source + (s - rule.start), l, rule.mode, &done);
      case RuleAction::kPoison:
        return uffd_poison(uffd_, s, l, 0, &done);
      case RuleAction::kUnprotect:
        done = static_cast<int64_t>(l);
        return uffd_writeprotect(uffd_, s, l, 0);
      case RuleAction::kHandler:
        break;  // resolved above
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
  if (markers) {
    // After the fill, which has woken the faulter already: a reader of stats() may see it late.
    std::lock_guard<std::mutex> lock(w->stats_mu);
    w->stats.marker_fills += markers;
  }
  if (rc == -EEXIST) {
    // Someone else installed the page without waking us; make sure the faulter runs on.
    uffd_wake(uffd_, page_addr, page_);
    *err = -EEXIST;
    *pages = 0;
    std::lock_guard<std::mutex> lock(w->stats_mu);
    w->stats.fast_pages -= len / page_;  // resolved, but not by installing pages here
    return true;
  }
  *err = rc;
  if (rc == 0) *pages = len / page_;
  else unpublish();
  return rc == 0;
}

int FaultService::wait(Worker* w, pollfd* fds, bool retrying) {
  // With faults waiting for an unread event (EAGAIN), do not sleep: the event is already queued.
  if (retrying) return ::poll(fds, 2, 0);
  const uint64_t budget = poll_.mode == PollMode::kOff ? 0 : w->budget_ns;
  int pr = 0;
  if (budget) {
    const uint64_t t0 = now_ns();
    uint64_t t = t0;
    bool preempted = false;
    do {
      pr = ::poll(fds, 2, 0);
      if (pr != 0) break;
      // A faulter this worker just woke is often queued on this CPU (the waker's): let it run and
      // fault again instead of spinning in front of it.
      sched_yield();
      const uint64_t before = t;
      t = now_ns();
      // Off the CPU for longer than the whole budget: other work wants this CPU, and a spinning
      // worker (never asleep, so never favoured at wake-up) only queues behind it. Sleep instead.
      preempted = t - before > budget;
    } while (t - t0 < budget && !preempted);
    if (preempted && poll_.mode == PollMode::kAdaptive) {
      // A busy CPU: stop spinning, and do not grow again for a while (short gaps on a busy
      // machine would regrow the budget at once, only to queue behind the same work).
      w->budget_ns = 0;
      w->cooldown = w->cooldown_len;
      // Each preemption in a row doubles the wait: on a machine that stays busy, adaptive ends up
      // as "off" (every lost slice costs milliseconds, far more than a spin can save).
      w->cooldown_len = std::min(w->cooldown_len * 2, kAdaptiveCooldownMax);
    }
    std::lock_guard<std::mutex> lock(w->stats_mu);
    w->stats.spin_ns += (pr != 0 ? now_ns() : t) - t0;
    if (pr > 0) w->stats.spin_hits++;
  }
  if (pr != 0) return pr;
  const uint64_t t0 = poll_.mode == PollMode::kAdaptive ? now_ns() : 0;
  if (w->epfd >= 0) {
    epoll_event ev[2];
    pr = ::epoll_wait(w->epfd, ev, 2, -1);
    fds[0].revents = fds[1].revents = 0;
    for (int i = 0; i < pr; i++)  // EPOLLIN/ERR/HUP have poll()'s values
      (ev[i].data.fd == uffd_ ? fds[0] : fds[1]).revents = static_cast<short>(ev[i].events);
  } else {
    pr = ::poll(fds, 2, -1);
  }
  if (poll_.mode == PollMode::kAdaptive && pr > 0 && !(fds[1].revents & POLLIN)) {
    // A message came after the spin gave up: had it lasted the sleep, it would have caught it.
    // Grow while such gaps stay under the cap; halve when a sleep outlasts it (spinning would
    // only have burnt the CPU).
    const uint64_t cap = uint64_t{poll_.spin_us} * 1000, slept = now_ns() - t0 + budget;
    if (slept > cap) w->cooldown_len = kAdaptiveCooldown;  // an idle spell: the machine may have changed
    if (w->cooldown) w->cooldown--;
    else if (slept <= cap) w->budget_ns = std::min(cap, std::max<uint64_t>(w->budget_ns * 2, std::min<uint64_t>(cap, 10000)));
    else w->budget_ns /= 2;
    if (w->budget_ns < 1000) w->budget_ns = 0;  // under a microsecond a spin catches nothing
  }
  std::lock_guard<std::mutex> lock(w->stats_mu);
  w->stats.sleeps++;
  w->stats.spin_budget_ns = w->budget_ns;
  return pr;
}

void FaultService::loop(Worker* w) {
  // No allocation in here (see FaultSink::on_batch): every buffer was sized by start().
  {
    std::lock_guard<std::mutex> lock(w->stats_mu);
    w->stats.tid = static_cast<uint32_t>(::gettid());
  }
  uffd_msg* msgs = reinterpret_cast<uffd_msg*>(w->msgs.data());
  const size_t cap = w->work.capacity();
  const bool order_events = nworkers_ > 1;
  pollfd fds[2] = {{uffd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
  for (;;) {
    int pr = wait(w, fds, !w->retry.empty());
    if (pr < 0 && errno != EINTR) break;
    if (fds[1].revents & POLLIN) break;
    if (fds[0].revents & (POLLERR | POLLHUP | POLLNVAL)) break;

    w->forward.clear();
    w->events.clear();
    ServiceStats delta;
    w->work.clear();
    w->work.swap(w->retry);

    if (fds[0].revents & POLLIN) {
      // Several workers: the read and the hand-over of its events happen under read_mu_, so
      // events reach the sink in the kernel's order. Only service threads, which never allocate,
      // take this lock.
      std::unique_lock<std::mutex> read_lock(read_mu_, std::defer_lock);
      if (order_events) read_lock.lock();
      // Read no more than the work buffer can take beside the retries it already holds.
      const size_t room = std::min<size_t>(max_batch_, cap - w->work.size());
      ssize_t n = room ? ::read(uffd_, msgs, room * sizeof(uffd_msg)) : 0;
      if (n < 0 && errno != EAGAIN && errno != EINTR) break;
      size_t count = n > 0 ? static_cast<size_t>(n) / sizeof(uffd_msg) : 0;
      // The tap (a trace recorder) sees each fault as it is read, before any rule resolves it.
      FaultTap* tap = nullptr;
      struct TapUse {
        std::atomic<unsigned>* users = nullptr;
        ~TapUse() { if (users) users->fetch_sub(1, std::memory_order_seq_cst); }
      } tap_use;
      if (count && tap_.load(std::memory_order_relaxed)) {
        tap_users_.fetch_add(1, std::memory_order_seq_cst);
        tap_use.users = &tap_users_;
        tap = tap_.load(std::memory_order_seq_cst);
      }
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
            w->work.push_back({m.arg.pagefault.address, static_cast<uint32_t>(m.arg.pagefault.flags),
                               m.arg.pagefault.feat.ptid});
            if (tap) tap->on_fault(w->index, w->work.back());
            break;
          case UFFD_EVENT_FORK:
            w->events.push_back({EventKind::kFork, m.arg.fork.ufd, 0, 0});
            break;
          case UFFD_EVENT_REMAP:
            w->events.push_back({EventKind::kRemap, m.arg.remap.from, m.arg.remap.to, m.arg.remap.len});
            break;
          case UFFD_EVENT_REMOVE:
            w->events.push_back({EventKind::kRemove, m.arg.remove.start, m.arg.remove.end, 0});
            break;
          case UFFD_EVENT_UNMAP:
            w->events.push_back({EventKind::kUnmap, m.arg.remove.start, m.arg.remove.end, 0});
            break;
          default:
            break;
        }
      }
      delta.events = w->events.size();
      {
        // The faults are counted before any of them is resolved (see resolve_fast).
        std::lock_guard<std::mutex> lock(w->stats_mu);
        w->stats.reads += delta.reads;
        w->stats.messages += delta.messages;
        w->stats.faults += delta.faults;
        w->stats.events += delta.events;
        w->stats.max_batch = std::max(w->stats.max_batch, delta.max_batch);
        if (order_events && !w->events.empty()) w->stats.batches++;
      }
      if (order_events && !w->events.empty()) {
        if (sink_) sink_->on_batch(nullptr, 0, w->events.data(), w->events.size());
        w->events.clear();
      }
    }

    if (!w->work.empty()) {
      w->rules_epoch.fetch_add(1, std::memory_order_seq_cst);  // odd: a snapshot in use
      struct EpochEnd {
        std::atomic<uint64_t>& e;
        ~EpochEnd() { e.fetch_add(1, std::memory_order_seq_cst); }
      } epoch_end{w->rules_epoch};
      auto rules = rules_snapshot();
      const uint64_t t0 = rules->empty() ? 0 : now_ns();
      for (const FaultMsg& f : w->work) {
        const Rule* rule = rules->empty() ? nullptr : find_rule(*rules, f.address, kind_of(f.flags));
        if (rule) {
          int err = 0;
          uint64_t pages = 0;
          if (resolve_fast(w, *rule, f, &err, &pages)) {  // counts itself in w->stats
            if (err == -EEXIST) delta.eexist++;
            continue;
          }
          if (err == -EAGAIN) {
            delta.eagain++;
            w->retry.push_back(f);
            continue;
          }
          delta.errors++;
        }
        w->forward.push_back(f);
      }
      if (t0) delta.service_ns = now_ns() - t0;
    }

    if (!w->forward.empty()) {
      std::lock_guard<std::mutex> lock(outstanding_mu_);
      for (const FaultMsg& f : w->forward)
        if (outstanding_.size() < outstanding_.capacity()) outstanding_.push_back(f);
    }
    delta.forwarded = w->forward.size();
    const bool deliver = !w->forward.empty() || !w->events.empty();
    if (deliver) delta.batches = 1;
    {
      // Publish the counts before handing the batch over: JavaScript may resolve the faults, the
      // accesses finish and stats() be read before this thread runs again.
      std::lock_guard<std::mutex> lock(w->stats_mu);
      w->stats.forwarded += delta.forwarded;
      w->stats.batches += delta.batches;
      w->stats.eexist += delta.eexist;
      w->stats.eagain += delta.eagain;
      w->stats.errors += delta.errors;
      w->stats.service_ns += delta.service_ns;
    }
    if (deliver && sink_) sink_->on_batch(w->forward.data(), w->forward.size(), w->events.data(), w->events.size());
  }
  // Faults read and still waiting for an unread event: nobody else will see them again, so they go
  // to the sink (JavaScript or its fallback, and close()'s outcome through outstanding()).
  if (!w->retry.empty()) {
    {
      std::lock_guard<std::mutex> lock(outstanding_mu_);
      for (const FaultMsg& f : w->retry)
        if (outstanding_.size() < outstanding_.capacity()) outstanding_.push_back(f);
    }
    if (sink_) sink_->on_batch(w->retry.data(), w->retry.size(), nullptr, 0);
    w->retry.clear();
  }
  timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) {
    std::lock_guard<std::mutex> lock(w->stats_mu);
    w->stats.cpu_ns = static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
  }
}

}  // namespace pm::sys
