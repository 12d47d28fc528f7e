// The trace recorder: a tap on a fault service (sys::FaultTap) that copies each fault in the
// recorded ranges into a ring preallocated per service worker, and a writer thread that drains the
// rings into a trace file (docs/trace-format.md) and samples the pages written: every interval
// with PAGEMAP_SCAN (uffd-wp async), or at each write-protect round its owner makes (sync uffd-wp:
// the pages whose write faults it recorded since the round before). Plain C++, no Node-API.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../sys/fault_service.h"
#include "../sys/pagemap.h"

namespace pm::engine {

// The binary layout (little-endian; docs/trace-format.md). A file is the magic, a u32 version, a
// u32 header length, the JSON header padded with spaces to 8 bytes, then records of 24 bytes (a
// sample is followed by its runs, 16 bytes each), the last of them kTraceEnd. Version 2 added the
// range records: a range that appears or goes while recording; version 3 the write-protect-round
// sample method.
constexpr char kTraceMagic[8] = {'P', 'M', 'T', 'R', 'A', 'C', 'E', '\0'};
constexpr uint32_t kTraceVersion = 3;
enum TraceRecordType : uint8_t {
  kTraceFault = 1,
  kTraceSample = 2,
  kTraceDropped = 3,
  kTraceEnd = 4,
  kTraceRangeAdded = 5,
  kTraceRangeRemoved = 6,
};
// A fault's flags: bit 0 write, bits 1-2 the kind (0 missing, 1 wp, 2 minor).
constexpr uint8_t kTraceWrite = 1;
constexpr uint8_t kSampleWritten = 1;  // a sample's method: PAGEMAP_SCAN PAGE_IS_WRITTEN (wp-async)
constexpr uint8_t kSampleWpRounds = 2;  // the pages with write faults between two write-protect rounds
// A range-added record's flags: bits 0-2 the registration modes (1 missing, 2 wp, 4 minor, as
// UFFDIO_REGISTER_MODE_*), bit 3 shared memory.
constexpr uint8_t kRangeModesMask = 7, kRangeShared = 8;
struct TraceFileRecord {
  uint8_t type;
  uint8_t flags;
  uint16_t range;
  uint32_t tid;  // fault: the faulting thread (0 without UFFD_FEATURE_THREAD_ID); sample: runs;
                 // range added: its length in pages
  uint64_t a;    // fault: page index in the range; sample: interval start; dropped, end: a count;
                 // range added: its start address
  uint64_t b;    // nanoseconds since the recording started (sample: the interval's end)
};
static_assert(sizeof(TraceFileRecord) == 24, "24-byte records");

struct TraceRange {
  uint64_t start, length;
  uint8_t flags = 0;  // kRangeModesMask | kRangeShared bits, for a range added while recording
};

// Range indices are u16 in the file and never reused: a recording names at most this many.
constexpr uint32_t kMaxTraceRanges = 65535;

struct RecorderConfig {
  std::vector<TraceRange> ranges;  // the ranges at the start (indices 0..n-1), page aligned
  std::string path;
  std::string header;   // the JSON header, written as it is
  unsigned rings = 1;   // one per service worker (more workers share rings round-robin)
  uint64_t ring_capacity = 1 << 16;
  uint64_t sample_interval_ms = 0;  // 0: no PAGEMAP_SCAN samples
  // Samples at each write_round() instead: the recorded ranges are write-protected again by the
  // owner at each round (sync uffd-wp), so every page written in between took a write fault here.
  bool write_rounds = false;
  int pagemap_fd = -1;  // the recorded process's /proc/PID/pagemap (owned by the recorder)
  uint64_t page = 4096;
  uint64_t start_ns = 0;  // the recording's time origin (CLOCK_MONOTONIC)
};

struct RecorderStats {
  uint64_t records = 0;     // records written (faults, samples, dropped, end)
  uint64_t faults = 0;      // fault records written
  uint64_t samples = 0;     // sample records written
  uint64_t sample_runs = 0;
  uint64_t dropped = 0;     // faults lost to full rings
  uint64_t ignored = 0;     // faults outside the recorded ranges
  uint64_t bytes = 0;       // file size
  uint64_t writer_cpu_ns = 0;  // the writer thread's CPU time (draining, sampling, writing)
  uint64_t sample_ns = 0;      // wall time in PAGEMAP_SCAN
  uint64_t tap_ns = 0;         // time the service workers spent in the tap (the latency added)
  uint64_t tapped = 0;         // faults the tap saw
  uint64_t ranges = 0;         // range indices given out (the first ranges and those added since)
  uint64_t ranges_refused = 0; // ranges added past kMaxTraceRanges (not recorded: faults ignored)
  int error = 0;               // -errno of the first failed write or scan (recording stops there)
  const char* error_call = "";
};

// Whether PAGEMAP_SCAN can report written pages of [start, start + length) in the process whose
// pagemap fd is given: 0, or -errno (-EPERM: not registered for uffd-wp with WP_ASYNC; -ENOTTY:
// no PAGEMAP_SCAN). Changes nothing.
int probe_written_sampling(int pagemap_fd, uint64_t start, uint64_t length);

class TraceRecorder : public sys::FaultTap {
 public:
  explicit TraceRecorder(RecorderConfig config);
  ~TraceRecorder() override;
  // Opens the file, writes the header, resets the written bits (first sample) and starts the
  // writer. -errno (with the call in *call) on failure; nothing is left running then.
  int start(const char** call);
  // Stops the writer after a last drain and sample, writes the end record and closes the file.
  RecorderStats stop();
  RecorderStats stats();
  const RecorderConfig& config() const { return config_; }

  // A range registered while recording: recorded from now on under a new index (returned), which
  // a range-added record announces. -ENOSPC past kMaxTraceRanges, -EINVAL if unaligned or empty,
  // -EEXIST if it overlaps a range recorded now, -ESHUTDOWN once stopped. Any thread but a service worker (it waits for the
  // workers to leave the tap's old range table).
  int add_range(const TraceRange& r);
  // A range released (unregistered): its faults are no longer recorded (a range-removed record
  // says from when) and its addresses may come back as a new range. -ENOENT if no live range
  // has this start and length, -ESHUTDOWN once stopped.
  int remove_range(uint64_t start, uint64_t length);
  // The same, by the index add_range returned (or a first range's index).
  int remove_index(uint32_t index);
  // The ranges recorded now: [start, length].
  std::vector<TraceRange> live_ranges();
  // A write-protect round (config.write_rounds): call it just before protecting the recorded
  // pages again. Each range recorded now gets a sample of the pages whose write faults were
  // recorded since the round before (or the start), timed [that round, now). A write between this
  // call and its page's protection is in neither interval: the round is not atomic, as
  // PAGEMAP_SCAN's is. -EINVAL without write_rounds, -ESHUTDOWN once stopped. Any thread but a
  // service worker (it waits for the workers to leave the tap, so every fault timed before the
  // round is in a ring).
  int write_round();

  void on_fault(unsigned worker, const sys::FaultMsg& msg) override;

 private:
  // The ranges the tap looks faults up in: replaced whole, never changed in place, so a worker
  // reads it without a lock (as the fault service's rules are read).
  struct LiveRange {
    uint64_t start, length;
    uint16_t index;
  };
  struct RangeTable {
    std::vector<LiveRange> ranges;
  };
  struct RangeChange {
    uint64_t t_ns;
    TraceFileRecord record;
  };
  // A worker's passes through the tap: a replaced table is freed once every worker has left each
  // pass it had entered when the table was replaced (each worker on its own cache line: no shared
  // write on the fault path; two counters, not a parity bit, so a recorder tapping two services,
  // whose workers share an index, stays correct).
  struct alignas(64) WorkerEpoch {
    std::atomic<uint64_t> entered{0}, left{0};
  };
  int remove_first(const std::function<bool(const LiveRange&)>& which);
  // Publishes next (ranges_mu_ held) and frees the old table once no worker can still read it.
  void publish(std::unique_ptr<RangeTable> next);
  // Waits until each worker has left the passes through the tap it had entered by now.
  void wait_for_workers();
  struct Entry {
    uint64_t t_ns, page;
    uint32_t tid;
    uint16_t range;
    uint8_t flags;
  };
  // One producer at a time (the workers sharing it take mu; only service threads do), one
  // consumer (the writer): head and tail are the handshake.
  struct Ring {
    std::mutex mu;
    std::vector<Entry> slots;
    std::atomic<uint64_t> head{0}, tail{0};
    std::atomic<uint64_t> dropped{0};
    uint64_t dropped_written = 0;  // writer only
  };
  void loop();
  void drain();
  void sample(uint64_t now);
  void emit(const TraceFileRecord& r);
  // A range change or a write round, in file order (write rounds: sampled from written_).
  void emit_change(const RangeChange& c);
  // A write-round sample of one range: its pages in written_ since the last round, as runs.
  void emit_written(uint16_t range, uint64_t end_ns);
  // A sample record of either method followed by runs_, counted.
  void emit_sample(uint8_t method, uint16_t range, uint64_t start_ns, uint64_t end_ns);
  void emit_bytes(const void* p, size_t n);
  void flush();

  RecorderConfig config_;
  int fd_ = -1;
  std::vector<std::unique_ptr<Ring>> rings_;
  std::vector<uint8_t> out_;  // the writer's buffer
  std::vector<sys::ScanRegion> regions_;
  std::vector<std::pair<uint64_t, uint64_t>> runs_;  // one sample's runs, before they are written
  std::vector<Entry> merge_;
  std::vector<RangeChange> changes_;   // ranges added and removed, not yet written (ranges_mu_)
  std::vector<RangeChange> carried_;   // removals held back to the next drain (writer only)
  std::vector<LiveRange> sample_ranges_;  // the ranges the next sample scans (writer only)
  // Write rounds (writer only): per range index, the pages of the write faults written since the
  // last round, and whether the range is live as of the records written so far.
  std::vector<std::vector<uint64_t>> written_;
  std::vector<size_t> written_compacted_;  // each list's length after its last deduplication
  std::vector<bool> written_live_;
  uint64_t last_round_ns_ = 0;  // since the recording started
  std::mutex ranges_mu_;               // changes of ranges: the table, changes_, next_index_
  std::atomic<const RangeTable*> table_{nullptr};
  std::unique_ptr<const RangeTable> table_keep_;  // owns what table_ points to (ranges_mu_)
  std::array<WorkerEpoch, sys::FaultService::kMaxWorkers> epochs_;
  uint32_t next_index_ = 0;  // ranges_mu_
  bool closed_ = false;      // ranges_mu_: the end record is written, changes are refused
  std::atomic<uint64_t> ranges_refused_{0};
  uint64_t records_ = 0;  // writer only; published in stats_ by flush()
  uint64_t last_sample_ns_ = 0;
  std::atomic<uint64_t> tap_ns_{0}, tapped_{0}, ignored_{0};
  std::mutex mu_;  // stopping_, stats_ (the writer and the owner)
  std::condition_variable cv_;
  bool stopping_ = false;
  bool stopped_ = false;
  RecorderStats stats_;
  std::thread writer_;
};

}  // namespace pm::engine
