// The fault service: one or more native worker threads per userfaultfd that read fault and event
// messages in batches, resolve the faults a rule covers without entering JavaScript (the fast
// path), and hand the rest, with every event, to a sink in batches. No Node-API here.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct pollfd;

namespace pm::sys {

// Storage for one struct uffd_msg (kept opaque here so this header needs no kernel headers).
struct uffd_msg_storage {
  unsigned char bytes[32];
};

// Fault kinds, as a bit mask (a rule serves the kinds it names).
enum FaultKind : uint32_t { kFaultMissing = 1, kFaultWp = 2, kFaultMinor = 4 };

struct FaultMsg {
  uint64_t address;  // page-aligned unless UFFD_FEATURE_EXACT_ADDRESS
  uint32_t flags;    // UFFD_PAGEFAULT_FLAG_WRITE | _WP | _MINOR
  uint32_t tid;      // faulting thread (UFFD_FEATURE_THREAD_ID), else 0
};

enum class EventKind : uint32_t { kFork = 1, kRemap = 2, kRemove = 3, kUnmap = 4 };
struct EventMsg {
  EventKind kind;
  uint64_t a, b, c;  // FORK: child uffd fd; REMAP: from, to, len; REMOVE/UNMAP: start, end
};

enum class RuleAction : uint32_t { kCopy, kZero, kUnprotect, kContinue, kMove, kPoison, kHandler };

// A resolver in C++ for a kHandler rule (the pager): called on the service thread for each fault
// in the rule's range, it resolves and wakes. 0: resolved, *pages installed; -EAGAIN: retry after
// the next read; any other -errno: the fault goes to the sink (JavaScript) like an unruled one.
class FaultHandler {
 public:
  virtual ~FaultHandler() = default;
  virtual int resolve(int uffd, const FaultMsg& msg, uint64_t* pages) = 0;
};

struct Rule {
  uint64_t start = 0, end = 0;  // the range served (page aligned)
  uint32_t kinds = kFaultMissing;
  RuleAction action = RuleAction::kZero;
  uint64_t source = 0;  // copy/move: the source address that corresponds to start
  uint64_t granule = 0; // fault-around: resolve the aligned block of this size (0 = one page)
  uint64_t mode = 0;    // ioctl mode bits (COPY_MODE_WP, CONTINUE_MODE_WP, MOVE_ALLOW_SRC_HOLES)
  // zero on shared shmem registered for WP: look for uffd-wp markers in pagemap before filling
  // (uffd_zero_fill_shmem), since ZEROPAGE there would replace one with a writable page.
  bool zero_reads_markers = false;
  std::shared_ptr<void> keep;  // keeps the source mapping's owner alive while the rule exists
  std::shared_ptr<FaultHandler> handler;  // kHandler
};

struct ServiceStats {
  uint64_t reads = 0;          // read(2) calls that returned messages
  uint64_t messages = 0;
  uint64_t faults = 0;
  uint64_t fast_resolved = 0;  // faults resolved natively
  uint64_t fast_pages = 0;     // pages installed by the fast path (fault-around counts)
  uint64_t forwarded = 0;      // faults handed to the sink
  uint64_t events = 0;
  uint64_t batches = 0;        // sink calls
  uint64_t max_batch = 0;      // most messages in one read
  uint64_t eexist = 0;         // resolves that found the page present (a race, treated as success)
  uint64_t marker_fills = 0;   // zero rules' pages filled over a uffd-wp marker (kept write-protected)
  uint64_t eagain = 0;         // resolves retried because an event was unread
  uint64_t errors = 0;         // fast-path resolves that failed and were forwarded instead
  uint64_t service_ns = 0;     // time spent resolving on the fast path
  uint64_t cpu_ns = 0;         // CPU time of the service threads (CLOCK_THREAD_CPUTIME_ID)
  uint64_t spin_ns = 0;        // wall time spent polling the descriptor without sleeping
  uint64_t spin_hits = 0;      // spins that found the descriptor readable (a sleep saved)
  uint64_t sleeps = 0;         // blocking poll() calls
  uint64_t spin_budget_ns = 0; // the spin budget now (adaptive: the largest of the workers')
  uint32_t tid = 0;            // per worker: its thread id (0 in sums)
};

// How a worker waits for the next message. kOff: poll() sleeps at once. kFixed: poll with a zero
// timeout for up to spin_us first. kAdaptive: the same with a budget that follows the recent gaps
// between a sleep and the next message (grows while they are shorter than the cap spin_us, halves
// when a sleep outlasts it), as KVM's halt polling does.
enum class PollMode : uint32_t { kOff, kFixed, kAdaptive };
struct PollOptions {
  PollMode mode = PollMode::kOff;
  uint32_t spin_us = 0;  // kFixed: the spin; kAdaptive: the budget's cap
};

// Sees every page fault a worker reads, as it reads it (before any rule resolves it): the trace
// recorder (native/engine/trace_recorder.h). Called on service threads, so the same rule as
// FaultSink::on_batch holds: no allocation, no lock an allocating thread may hold.
class FaultTap {
 public:
  virtual ~FaultTap() = default;
  virtual void on_fault(unsigned worker, const FaultMsg& msg) = 0;
};

class FaultSink {
 public:
  virtual ~FaultSink() = default;
  // Called on a service thread; the arrays are valid during the call only. Must not allocate:
  // with EVENT_FORK, a fork() in another thread holds every malloc lock until this thread has read
  // the fork event, so a malloc here could wait for a fork that waits for us. With several
  // workers it is called from each of them, concurrently.
  virtual void on_batch(const FaultMsg* faults, size_t nfaults, const EventMsg* events, size_t nevents) = 0;
};

class FaultService {
 public:
  // Faults handed over and not yet seen resolved, tracked for close(): at most this many (a fault
  // is a sleeping thread, so more would mean more threads than this asleep at once).
  static constexpr size_t kOutstandingCapacity = 16384;

  FaultService(int uffd, uint64_t page_size);
  ~FaultService();
  FaultService(const FaultService&) = delete;
  FaultService& operator=(const FaultService&) = delete;

  static constexpr unsigned kMaxWorkers = 64;
  static constexpr uint32_t kMaxSpinUs = 1000000;
  // Adaptive polling: sleeps without growth after a spin was preempted (doubling up to the max
  // while preemptions keep coming; back to the first after a sleep longer than the cap).
  static constexpr unsigned kAdaptiveCooldown = 64;
  static constexpr unsigned kAdaptiveCooldownMax = 65536;

  // Errors: -errno from eventfd/pthread creation, -EINVAL for workers outside 1..kMaxWorkers.
  // max_batch bounds messages per read(2) (each worker reads its own batches).
  int start(FaultSink* sink, unsigned max_batch, unsigned workers = 1, PollOptions poll = {});
  // Stops and joins every worker. Messages still queued in the kernel stay there (close wakes them);
  // faults a worker had read and was retrying (EAGAIN) go to the sink first.
  void stop();
  bool running() const { return running_.load(); }
  unsigned workers() const { return nworkers_; }
  PollOptions poll_options() const { return poll_; }

  void set_rules(std::vector<Rule> rules);
  // Installs (or, with nullptr, removes) the tap, kept across stop()/start(). Returns once no
  // worker still calls the previous one, which the caller may then destroy.
  void set_tap(std::shared_ptr<FaultTap> tap);
  // Waits (up to timeout_ms) until no batch started before this call still resolves with an older
  // rule snapshot: after set_rules() and this, a removed rule's source is no longer read. False on
  // timeout (a batch stuck in an ioctl, e.g. a copy from a source that is itself faulting).
  bool wait_rules_quiescent(int timeout_ms);
  // Summed over the workers (max_batch and spin_budget_ns: the largest), counting stopped ones.
  ServiceStats stats() const;
  // One entry per running worker (empty when stopped).
  std::vector<ServiceStats> worker_stats() const;

  // Faults handed to JavaScript and not yet seen resolved: close() uses them to apply the caller's
  // chosen outcome. The binding calls resolved() after each resolve ioctl it performs.
  void resolved(uint64_t start, uint64_t len);
  std::vector<FaultMsg> outstanding();
  // Reads whatever the kernel still has queued without blocking (close() path); pagefaults are
  // returned, events dropped.
  std::vector<FaultMsg> drain();

  // One reader of the descriptor: its own buffers, counters and rule epoch.
  struct Worker {
    std::thread thread;
    unsigned index = 0;  // 0..workers-1: the tap's ring
    // Odd while this worker resolves a batch with a rule snapshot.
    std::atomic<uint64_t> rules_epoch{0};
    mutable std::mutex stats_mu;
    ServiceStats stats;
    uint64_t budget_ns = 0;  // adaptive polling's current spin
    unsigned cooldown = 0;   // adaptive: sleeps left before the budget may grow again
    unsigned cooldown_len = kAdaptiveCooldown;  // the next cooldown (doubles per preemption)
    // Several workers sleep in epoll_wait() on their own epoll, which holds the descriptor with
    // EPOLLEXCLUSIVE: a fault wakes one sleeping worker, not all of them. -1: plain poll().
    int epfd = -1;
    // Buffers of the loop, allocated by start() on the caller's thread: the loop itself never
    // allocates (see FaultSink::on_batch).
    std::vector<uffd_msg_storage> msgs;
    std::vector<FaultMsg> work, retry, forward;
    std::vector<EventMsg> events;
  };

 private:
  void loop(Worker* w);
  // Waits for the descriptor (or the stop eventfd) as poll_ says; returns poll()'s result.
  int wait(Worker* w, ::pollfd* fds, bool retrying);
  bool resolve_fast(Worker* w, const Rule& rule, const FaultMsg& msg, int* err, uint64_t* pages);
  std::shared_ptr<const std::vector<Rule>> rules_snapshot() const;
  static void add(ServiceStats* into, const ServiceStats& s);
  static ServiceStats snapshot(Worker& w);

  const int uffd_;
  const uint64_t page_;
  int stop_fd_ = -1;
  unsigned max_batch_ = 64;
  unsigned nworkers_ = 1;
  PollOptions poll_;
  FaultSink* sink_ = nullptr;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::atomic<bool> running_{false};
  // With several workers, held from a read(2) until that read's events are handed to the sink:
  // the sink sees events in the order the kernel queued them. Only service threads take it.
  std::mutex read_mu_;
  ServiceStats stopped_stats_;  // counters of workers already joined (owner's thread only)

  mutable std::mutex rules_mu_;
  std::shared_ptr<const std::vector<Rule>> rules_;
  // Snapshots replaced while the service runs: kept here (by the caller's thread) so that neither
  // the lock holder nor the service thread frees one (see FaultSink::on_batch); freed by stop().
  std::vector<std::shared_ptr<const std::vector<Rule>>> retired_;

  std::shared_ptr<FaultTap> tap_keep_;  // owner's thread only
  std::atomic<FaultTap*> tap_{nullptr};
  std::atomic<unsigned> tap_users_{0};  // workers between loading tap_ and their last call on it

  std::mutex outstanding_mu_;
  std::vector<FaultMsg> outstanding_;  // bounded (capacity set by start())
};

}  // namespace pm::sys
