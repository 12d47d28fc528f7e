// The trace recorder: a tap on a fault service (sys::FaultTap) that copies each fault in the
// recorded ranges into a ring preallocated per service worker, and a writer thread that drains the
// rings into a trace file (docs/trace-format.md) and, every interval, samples the pages written
// since the last sample with PAGEMAP_SCAN (uffd-wp async). Plain C++, no Node-API.
#pragma once

#include <atomic>
#include <condition_variable>
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
// sample is followed by its runs, 16 bytes each), the last of them kTraceEnd.
constexpr char kTraceMagic[8] = {'P', 'M', 'T', 'R', 'A', 'C', 'E', '\0'};
constexpr uint32_t kTraceVersion = 1;
enum TraceRecordType : uint8_t { kTraceFault = 1, kTraceSample = 2, kTraceDropped = 3, kTraceEnd = 4 };
// A fault's flags: bit 0 write, bits 1-2 the kind (0 missing, 1 wp, 2 minor).
constexpr uint8_t kTraceWrite = 1;
constexpr uint8_t kSampleWritten = 1;  // a sample's method: PAGEMAP_SCAN PAGE_IS_WRITTEN (wp-async)
struct TraceFileRecord {
  uint8_t type;
  uint8_t flags;
  uint16_t range;
  uint32_t tid;  // fault: the faulting thread (0 without UFFD_FEATURE_THREAD_ID); sample: runs
  uint64_t a;    // fault: page index in the range; sample: interval start; dropped, end: a count
  uint64_t b;    // nanoseconds since the recording started (sample: the interval's end)
};
static_assert(sizeof(TraceFileRecord) == 24, "24-byte records");

struct TraceRange {
  uint64_t start, length;
};

struct RecorderConfig {
  std::vector<TraceRange> ranges;  // at most 65535, page aligned
  std::string path;
  std::string header;   // the JSON header, written as it is
  unsigned rings = 1;   // one per service worker (more workers share rings round-robin)
  uint64_t ring_capacity = 1 << 16;
  uint64_t sample_interval_ms = 0;  // 0: no samples
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

  void on_fault(unsigned worker, const sys::FaultMsg& msg) override;

 private:
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
  void emit_bytes(const void* p, size_t n);
  void flush();

  RecorderConfig config_;
  int fd_ = -1;
  std::vector<std::unique_ptr<Ring>> rings_;
  std::vector<uint8_t> out_;  // the writer's buffer
  std::vector<sys::ScanRegion> regions_;
  std::vector<std::pair<uint64_t, uint64_t>> runs_;  // one sample's runs, before they are written
  std::vector<Entry> merge_;
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
