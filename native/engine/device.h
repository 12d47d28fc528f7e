// Device: an emulated GPU/NIC/FPGA. It owns real memory (a private anonymous pool of page-sized
// slots), mirrors ranges of the process through its own page tables (Mirror), and runs access
// kernels on native device threads. A device thread that misses posts a fault to the fault buffer
// and stalls; one service thread takes faults in batches (dedupe, upgrade read to write, coalesce to
// the fault-around granule), runs the range faults, and replays the stalled threads.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../sys/access.h"
#include "engine.h"
#include "link.h"
#include "mirror.h"

namespace pm::engine {


enum class TraceKind : uint32_t { kFaultBatch, kMigrateToDevice, kMigrateToHost, kInvalidate };

// One trace event. a/b/c by kind: batch (requests, pages, service ns); migrate (first page,
// pages, trigger); invalidate (first page, pages cleared, cause). modeled_ns: the link model's
// charge for the event (a batch: its round and the transfers made in it), 0 without a link.
struct TraceEvent {
  uint64_t t_ns;
  TraceKind kind;
  uint64_t mirror;  // the mirror's start address
  uint64_t a, b, c;
  uint64_t modeled_ns = 0;
};

struct DeviceConfig {
  std::string name = "device";
  bool trace = false;             // record a trace of events (bounded ring, oldest dropped)
  size_t trace_capacity = 1 << 16;
  uint64_t memory = 64ull << 20;  // bytes of device memory
  uint64_t page = 4096;
  unsigned fault_batch = 32;      // faults serviced per round (the kernel's test device: 32 pages)
  uint64_t fault_around = 0;      // bytes; 0 = one page
  int timeout_ms = 1000;          // range-fault retry budget, then EBUSY (as hmm_range_fault)
  // Where a device fault puts the data: kHost maps the host page (HMM mirroring); kDevice migrates
  // the faulted range into device memory first (unified-memory drivers' default).
  enum class Placement { kHost, kDevice } placement = Placement::kHost;
  // Eviction when device memory is full: off (the page stays on the host, reported), FIFO (by
  // allocation), or LRU (second chance on the device's access bit).
  enum class Eviction { kOff, kFifo, kLru } eviction = Eviction::kOff;
  double watermark = 1.0;         // after a migration, evict down to this fraction of memory in use
  // Prefetch after a fault round: kSequential fetches ahead, doubling with the stream (to 2 MiB);
  // kDensity fetches a whole 2 MiB block once more than 51 % of it is resident (NVIDIA's tree rule).
  enum class Prefetch { kOff, kSequential, kDensity } prefetch = Prefetch::kOff;
  // Allocate all device memory up front (as a GPU's memory is): migrations then copy into slots
  // that exist instead of allocating a page per slot, and freed slots keep their pages.
  bool preallocate = false;
  // The interconnect model (link.h): absent (the default), nothing is modeled or charged.
  bool link = false;
  LinkParams link_params;
};

struct DeviceCounters {
  std::atomic<uint64_t> fault_rounds{0};   // service rounds (batches)
  std::atomic<uint64_t> fault_requests{0}; // faults posted by device threads
  std::atomic<uint64_t> faulted_pages{0};  // pages made present by range faults
  std::atomic<uint64_t> max_batch{0};
  std::atomic<uint64_t> service_ns{0};
  std::atomic<uint64_t> invalidations[16] = {};  // by InvalidateCause
  std::atomic<uint64_t> invalidated_pages{0};
  std::atomic<uint64_t> prefetched_pages{0};
  std::atomic<uint64_t> to_device[static_cast<unsigned>(Trigger::kCount)] = {};  // pages, by trigger
  std::atomic<uint64_t> to_host[static_cast<unsigned>(Trigger::kCount)] = {};
};

// The fault rounds one kernel waited for, written by the service thread only: each round that
// served at least one of the kernel's requests is charged to the kernel once.
struct KernelLink {
  uint64_t fault_ns = 0;
  uint64_t last_round = ~0ull;
};

enum class KernelOp { kRead, kWrite, kAtomicInc, kVerify, kCopy, kCopyOut, kCopyIn };

struct KernelSpec {
  Mirror* mirror = nullptr;
  uint64_t first = 0, npages = 0;   // the page range the kernel covers
  KernelOp op = KernelOp::kRead;
  sys::AccessPattern pattern = sys::AccessPattern::kSequential;
  uint64_t unit = 8;                // bytes between words, sequential
  uint64_t stride = 0;
  uint64_t ops = 0;                 // 0 = one per unit over the range
  uint64_t seed = 1;
  unsigned threads = 1;
  uint8_t* buffer = nullptr;        // copyOut/copyIn: npages * page bytes
  int64_t copy_to = 0;              // copy: each word goes this many bytes further (page multiple)
  const uint64_t* gather = nullptr; // gather pattern: word indices within the range
  uint64_t gather_count = 0;
  bool fault_to_end = false;        // a miss faults from the page to the end of the range in one round
  KernelLink* link = nullptr;       // set by run(): where the kernel's fault rounds are charged
};

struct KernelResult {
  uint64_t ops = 0, checksum = 0, mismatches = 0;
  uint64_t faults = 0;  // fault rounds this kernel waited for
  uint64_t cpages = 0;  // pages copied (copyOut/copyIn)
  int error = 0;        // -errno of a failed range fault: EPERM, EFAULT, EBUSY
  uint64_t error_page = 0;
  uint64_t elapsed_ns = 0;
  // With a link model: modeled time of the kernel, its fault rounds' share and its remote
  // accesses' share (see Device::run), and the accesses to host-resident pages counted for it.
  uint64_t modeled_ns = 0, modeled_fault_ns = 0, modeled_remote_ns = 0;
  uint64_t remote_accesses = 0, remote_bytes = 0;
};


class Device {
 public:
  explicit Device(const DeviceConfig& config);
  ~Device();
  int init();     // maps the memory pool and starts the service thread; -errno on failure
  void close();   // stops the service; faults still queued fail with -ENODEV
  const DeviceConfig& config() const { return config_; }
  DeviceCounters& counters() { return counters_; }

  // Device memory.
  void* slot_address(uint64_t slot) const { return pool_ + slot * config_.page; }
  // A free slot; with eviction on and memory full, evicts a victim first. `holding` is the mirror
  // whose change mutex the caller holds (its pages may be evicted without locking again).
  bool alloc_slot(uint64_t* slot, Mirror* holding = nullptr, uint64_t page = 0);
  // n contiguous slots (for one multi-page ioctl), without eviction; false if none are free.
  bool alloc_run(uint64_t n, uint64_t* first, Mirror* holding, uint64_t page);
  // Evicts until at most watermark * slots are in use.
  void enforce_watermark(Mirror* holding);
  // zap: give the memory back (MADV_DONTNEED). Not needed after UFFDIO_MOVE took the page away.
  // With preallocate, a slot that still has its page keeps it.
  void free_slot(uint64_t slot, bool zap = true);
  // Whether slots [slot, slot + n) all have a page (then they are filled by plain copies; holes
  // need the resolve ioctls, since the pool is registered with the engine's userfaultfd).
  bool slots_populated(uint64_t slot, uint64_t n);
  void set_populated(uint64_t slot, uint64_t n, bool populated);
  uint64_t slots_total() const { return slots_; }
  uint64_t slots_used();
  // Host memory the page tables of this device's mirrors hold (allocated where they map pages).
  uint64_t table_bytes();
  // Registers the pool with the engine's userfaultfd (once): UFFDIO_MOVE needs its destination
  // registered, and slots are filled with the resolve ioctls.
  int register_pool();

  // Posts a fault for [first, last) of m and sleeps until it is serviced. Returns the range fault's
  // result (0, -EPERM, -EFAULT, -EBUSY) or -ENODEV if the device closed.
  // acct: the kernel the fault belongs to (its modeled fault time), or null.
  int fault(Mirror* m, uint64_t first, uint64_t last, bool write, KernelLink* acct = nullptr);
  // Posts n faults of m at once (pages[i], write if writes[i]) and sleeps until all are serviced;
  // results[i] as fault() returns. The service takes them in order, faultBatch per round, so
  // the rounds depend on the requests only (trace replay's determinism).
  // acct: as fault()'s.
  void fault_group(Mirror* m, const uint64_t* pages, const uint8_t* writes, size_t n, int* results,
                   KernelLink* acct = nullptr);

  // Runs a kernel on spec.threads device threads and waits for them (call from a native thread).
  void run(const KernelSpec& spec, KernelResult* out);

  // Whether one of this device's mirrors already covers part of [start, end).
  bool overlaps(uint64_t start, uint64_t end);
  void add_mirror(Mirror* m);
  void remove_mirror(Mirror* m);
  // Evicts all of this device's memory back to the host (the kernel device's release). Returns pages.
  uint64_t release();

  void on_migrate(Mirror* m, bool to_device, uint64_t first, uint64_t pages, Trigger trigger);
  // Takes the trace recorded so far (and how many events were dropped since the last call).
  std::vector<TraceEvent> drain_trace(uint64_t* dropped);
  void trace(TraceKind kind, Mirror* m, uint64_t a, uint64_t b, uint64_t c, uint64_t modeled_ns = 0);

  // The link model, or null (no link configured). Every charge goes through it; charge_transfer
  // also adds the cost to the fault round in progress when the service thread makes the transfer.
  LinkModel* link() { return link_.get(); }
  uint64_t charge_transfer(uint64_t bytes, LinkDir dir, LinkCategory category);

  void on_invalidate(Mirror* m, uint64_t first, uint64_t last, InvalidateCause cause, uint64_t cleared);

 private:
  struct Request {
    Mirror* mirror;
    uint64_t first, last;
    bool write;
    KernelLink* acct;
    int result = 0;
    bool done = false;
  };
  void service();
  void service_batch(std::vector<Request*>& batch);
  void prefetch(Mirror* m, uint64_t first, uint64_t last);
  void run_share(const KernelSpec& spec, uint64_t first_op, uint64_t last_op, unsigned index, KernelResult* out);
  void run_share_body(const KernelSpec& spec, uint64_t first_op, uint64_t last_op, unsigned index, KernelResult* out,
                      volatile uint64_t* pins);

  DeviceConfig config_;
  uint8_t* pool_ = nullptr;
  uint64_t slots_ = 0;
  std::mutex slot_mu_;
  // Slot bitmap (1 = in use), scanned from a rotating cursor: runs of contiguous slots let a 64 KiB
  // or 2 MiB migration be one ioctl.
  std::vector<uint64_t> used_bits_;
  std::vector<uint64_t> populated_bits_;  // slot has a page (preallocate, or filled and kept)
  uint64_t used_count_ = 0;
  uint64_t cursor_ = 0;
  bool take_run_locked(uint64_t n, uint64_t* first);
  bool pool_registered_ = false;
  const uint64_t pool_owner_ = Engine::next_owner_id();
  // Device-resident pages in allocation order (the FIFO/LRU queue). Stale entries (pages freed by
  // other paths) are skipped when met.
  struct Resident {
    Mirror* mirror;
    uint64_t page;
    uint64_t slot;
  };
  bool attached_locked(Mirror* m) const;  // under slot_mu_: m is still one of ours
  std::deque<Resident> resident_;
  bool evict_one(Mirror* holding);
  std::mutex trace_mu_;
  std::vector<TraceEvent> trace_;
  size_t trace_head_ = 0;  // ring start once full
  uint64_t trace_dropped_ = 0;
  std::mutex mirrors_mu_;
  std::vector<Mirror*> mirrors_;
  std::vector<Mirror*> attached_;  // under slot_mu_: mirrors whose resident pages may be queued

  std::mutex queue_mu_;
  std::condition_variable queue_cv_;  // the service waits for requests
  std::condition_variable done_cv_;   // device threads wait for their replay
  std::deque<Request*> queue_;
  bool stopping_ = false;
  std::thread service_;
  DeviceCounters counters_;
  std::unique_ptr<LinkModel> link_;
};

}  // namespace pm::engine
