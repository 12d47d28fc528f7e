// The fault service: one native thread per userfaultfd that reads fault and event messages in
// batches, resolves the faults a rule covers without entering JavaScript (the fast path), and
// hands the rest, with every event, to a sink in batches. No Node-API here.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

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
  uint64_t eagain = 0;         // resolves retried because an event was unread
  uint64_t errors = 0;         // fast-path resolves that failed and were forwarded instead
  uint64_t service_ns = 0;     // time spent resolving on the fast path
};

class FaultSink {
 public:
  virtual ~FaultSink() = default;
  // Called on the service thread; the arrays are valid during the call only. Must not allocate:
  // with EVENT_FORK, a fork() in another thread holds every malloc lock until this thread has read
  // the fork event, so a malloc here could wait for a fork that waits for us.
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

  // Errors: -errno from eventfd/pthread creation. max_batch bounds messages per read(2).
  int start(FaultSink* sink, unsigned max_batch);
  // Stops and joins the thread. Messages still queued in the kernel stay there (close wakes them).
  void stop();
  bool running() const { return running_.load(); }

  void set_rules(std::vector<Rule> rules);
  // Waits (up to timeout_ms) until no batch started before this call still resolves with an older
  // rule snapshot: after set_rules() and this, a removed rule's source is no longer read. False on
  // timeout (a batch stuck in an ioctl, e.g. a copy from a source that is itself faulting).
  bool wait_rules_quiescent(int timeout_ms);
  ServiceStats stats() const;

  // Faults handed to JavaScript and not yet seen resolved: close() uses them to apply the caller's
  // chosen outcome. The binding calls resolved() after each resolve ioctl it performs.
  void resolved(uint64_t start, uint64_t len);
  std::vector<FaultMsg> outstanding();
  // Reads whatever the kernel still has queued without blocking (close() path); pagefaults are
  // returned, events dropped.
  std::vector<FaultMsg> drain();

 private:
  void loop();
  bool resolve_fast(const Rule& rule, const FaultMsg& msg, int* err, uint64_t* pages);
  std::shared_ptr<const std::vector<Rule>> rules_snapshot() const;
  // Odd while the service thread resolves a batch with a rule snapshot.
  std::atomic<uint64_t> rules_epoch_{0};

  const int uffd_;
  const uint64_t page_;
  int stop_fd_ = -1;
  unsigned max_batch_ = 64;
  FaultSink* sink_ = nullptr;
  std::thread thread_;
  std::atomic<bool> running_{false};

  mutable std::mutex rules_mu_;
  std::shared_ptr<const std::vector<Rule>> rules_;
  // Snapshots replaced while the service runs: kept here (by the caller's thread) so that neither
  // the lock holder nor the service thread frees one (see FaultSink::on_batch); freed by stop().
  std::vector<std::shared_ptr<const std::vector<Rule>>> retired_;

  mutable std::mutex stats_mu_;
  ServiceStats stats_;

  // Buffers of the service loop, allocated by start() on the caller's thread: the loop itself never
  // allocates (see FaultSink::on_batch).
  std::vector<uffd_msg_storage> msgs_;
  std::vector<FaultMsg> work_, retry_, forward_;
  std::vector<EventMsg> events_;

  std::mutex outstanding_mu_;
  std::vector<FaultMsg> outstanding_;  // bounded (capacity set by start())
};

}  // namespace pm::sys
