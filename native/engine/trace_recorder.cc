#include "trace_recorder.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../sys/access.h"
#include "../sys/uapi.h"

namespace pm::engine {

namespace {

constexpr size_t kOutBuffer = 1 << 20;
constexpr size_t kScanRegions = 4096;  // regions per PAGEMAP_SCAN call; the walk resumes past them

uint64_t cpu_ns_of(std::thread& t) {
  clockid_t id;
  timespec ts;
  if (!t.joinable() || pthread_getcpuclockid(t.native_handle(), &id) != 0 || clock_gettime(id, &ts) != 0) return 0;
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

sys::ScanRequest written_request(uint64_t start, uint64_t end, uint64_t flags) {
  sys::ScanRequest req;
  req.start = start;
  req.end = end;
  req.flags = flags;
  req.category_mask = PAGE_IS_WRITTEN;
  req.return_mask = PAGE_IS_WRITTEN;
  req.max_regions = kScanRegions;
  return req;
}

}  // namespace

int probe_written_sampling(int pagemap_fd, uint64_t start, uint64_t length) {
  sys::ScanRegion one[1];
  sys::ScanRequest req = written_request(start, start + length, PM_SCAN_CHECK_WPASYNC);
  req.max_regions = 1;
  req.max_pages = 1;
  long n = sys::pagemap_scan_fd(pagemap_fd, req, one, nullptr);
  return n < 0 ? static_cast<int>(n) : 0;
}

TraceRecorder::TraceRecorder(RecorderConfig config) : config_(std::move(config)) {}

TraceRecorder::~TraceRecorder() {
  stop();
  if (config_.pagemap_fd >= 0) ::close(config_.pagemap_fd);
}

int TraceRecorder::start(const char** call) {
  *call = "open";
  try {
    out_.reserve(kOutBuffer);
    regions_.resize(kScanRegions);
    rings_.reserve(config_.rings);
    for (unsigned i = 0; i < config_.rings; i++) {
      rings_.push_back(std::make_unique<Ring>());
      rings_.back()->slots.resize(config_.ring_capacity);
    }
    merge_.reserve(config_.rings * config_.ring_capacity);
  } catch (const std::bad_alloc&) {
    return -ENOMEM;
  } catch (const std::length_error&) {
    return -ENOMEM;
  }
  // Non-blocking: this runs on the JavaScript thread, and opening a FIFO nobody reads would wait
  // for a reader forever. A trace goes to a file (or a character device such as /dev/null).
  fd_ = ::open(config_.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NONBLOCK, 0644);
  if (fd_ < 0) return -errno;
  auto fail = [&](int err, const char* what) {
    ::close(fd_);
    fd_ = -1;
    *call = what;
    return err;
  };
  struct stat st{};
  if (::fstat(fd_, &st) != 0) return fail(-errno, "fstat");
  if (!S_ISREG(st.st_mode) && !S_ISCHR(st.st_mode)) return fail(-EINVAL, "open");
  const int fl = ::fcntl(fd_, F_GETFL);
  if (fl < 0 || ::fcntl(fd_, F_SETFL, fl & ~O_NONBLOCK) != 0) return fail(-errno, "fcntl");
  // The header: magic, version, length, then the JSON padded to 8 bytes so records stay aligned.
  std::string json = config_.header;
  json.append((8 - json.size() % 8) % 8, ' ');
  const uint32_t version = kTraceVersion, len = static_cast<uint32_t>(json.size());
  emit_bytes(kTraceMagic, sizeof(kTraceMagic));
  emit_bytes(&version, 4);
  emit_bytes(&len, 4);
  emit_bytes(json.data(), json.size());
  flush();
  if (stats_.error) return fail(stats_.error, "write");
  if (config_.sample_interval_ms) {
    // Clears the written bits so the first sample covers the recording only.
    for (const TraceRange& r : config_.ranges) {
      sys::ScanRequest req = written_request(r.start, r.start + r.length, PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC);
      for (;;) {
        uint64_t walk_end = req.end;
        long n = sys::pagemap_scan_fd(config_.pagemap_fd, req, regions_.data(), &walk_end);
        if (n < 0) return fail(static_cast<int>(n), "ioctl(PAGEMAP_SCAN)");
        if (walk_end >= req.end || walk_end <= req.start) break;
        req.start = walk_end;
      }
    }
  }
  last_sample_ns_ = sys::now_ns();
  try {
    writer_ = std::thread(&TraceRecorder::loop, this);
  } catch (...) {
    return fail(-EAGAIN, "pthread_create");
  }
  return 0;
}

void TraceRecorder::on_fault(unsigned worker, const sys::FaultMsg& msg) {
  const uint64_t t0 = sys::now_ns();
  tapped_.fetch_add(1, std::memory_order_relaxed);
  const std::vector<TraceRange>& ranges = config_.ranges;
  size_t i = 0;
  while (i < ranges.size() && !(msg.address >= ranges[i].start && msg.address - ranges[i].start < ranges[i].length)) i++;
  if (i == ranges.size()) {
    ignored_.fetch_add(1, std::memory_order_relaxed);
  } else {
    const uint8_t kind = (msg.flags & UFFD_PAGEFAULT_FLAG_MINOR) ? 2 : (msg.flags & UFFD_PAGEFAULT_FLAG_WP) ? 1 : 0;
    const Entry e{t0 > config_.start_ns ? t0 - config_.start_ns : 0, (msg.address - ranges[i].start) / config_.page,
                  msg.tid, static_cast<uint16_t>(i),
                  static_cast<uint8_t>(((msg.flags & UFFD_PAGEFAULT_FLAG_WRITE) ? kTraceWrite : 0) | (kind << 1))};
    Ring& r = *rings_[worker % rings_.size()];
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(r.mu);
      const uint64_t head = r.head.load(std::memory_order_relaxed), tail = r.tail.load(std::memory_order_acquire);
      const uint64_t cap = r.slots.size();
      if (head - tail >= cap) {
        r.dropped.fetch_add(1, std::memory_order_relaxed);
      } else {
        r.slots[head % cap] = e;
        r.head.store(head + 1, std::memory_order_release);
        wake = head - tail + 1 == cap / 2;  // half full: drain before the interval ends
      }
    }
    if (wake) cv_.notify_one();
  }
  tap_ns_.fetch_add(sys::now_ns() - t0, std::memory_order_relaxed);
}

void TraceRecorder::emit_bytes(const void* p, size_t n) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  while (n) {
    if (out_.size() == kOutBuffer) flush();
    const size_t k = std::min(n, kOutBuffer - out_.size());
    out_.insert(out_.end(), b, b + k);
    b += k;
    n -= k;
  }
}

void TraceRecorder::emit(const TraceFileRecord& r) {
  emit_bytes(&r, sizeof(r));
  records_++;
}

void TraceRecorder::flush() {
  // Only this thread (the writer, or start() before it runs) writes stats_; it locks for the
  // owner's readers.
  size_t done = 0;
  int err = 0;
  while (done < out_.size() && !stats_.error) {
    ssize_t n = ::write(fd_, out_.data() + done, out_.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      // The rest of the recording is lost: stop() reports the error; records are still drained
      // (and counted as dropped) so the service never waits on a full ring.
      err = n < 0 ? -errno : -EIO;
      break;
    }
    done += static_cast<size_t>(n);
  }
  std::lock_guard<std::mutex> lock(mu_);
  stats_.bytes += done;
  stats_.records = records_;
  if (err) {
    stats_.error = err;
    stats_.error_call = "write";
  }
  out_.clear();
}

void TraceRecorder::drain() {
  merge_.clear();
  for (auto& rp : rings_) {
    Ring& r = *rp;
    const uint64_t tail = r.tail.load(std::memory_order_relaxed), head = r.head.load(std::memory_order_acquire);
    const uint64_t cap = r.slots.size();
    for (uint64_t k = tail; k < head; k++) merge_.push_back(r.slots[k % cap]);
    r.tail.store(head, std::memory_order_release);
  }
  // Each ring is in time order already; merged, the file is in time order as of each drain.
  if (rings_.size() > 1)
    std::stable_sort(merge_.begin(), merge_.end(), [](const Entry& a, const Entry& b) { return a.t_ns < b.t_ns; });
  uint64_t written = 0, dropped = 0;
  for (const Entry& e : merge_) {
    if (stats_.error) break;
    emit({kTraceFault, e.flags, e.range, e.tid, e.page, e.t_ns});
    written++;
  }
  for (auto& rp : rings_) {
    const uint64_t d = rp->dropped.load(std::memory_order_relaxed);
    dropped += d - rp->dropped_written;
    rp->dropped_written = d;
  }
  // Where faults were lost is part of the trace: a reader knows the order around it is incomplete.
  if (dropped && !stats_.error) emit({kTraceDropped, 0, 0, 0, dropped, sys::now_ns() - config_.start_ns});
  std::lock_guard<std::mutex> lock(mu_);
  stats_.faults += written;
  stats_.dropped += merge_.size() - written + dropped;
}

void TraceRecorder::sample(uint64_t now) {
  const uint64_t t0 = sys::now_ns();
  for (size_t i = 0; i < config_.ranges.size() && !stats_.error; i++) {
    const TraceRange& r = config_.ranges[i];
    runs_.clear();
    // Reports the pages written since the last scan and write-protects them again, atomically.
    sys::ScanRequest req = written_request(r.start, r.start + r.length, PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC);
    for (;;) {
      uint64_t walk_end = req.end;
      long n = sys::pagemap_scan_fd(config_.pagemap_fd, req, regions_.data(), &walk_end);
      if (n < 0) {
        // The range went away (unmapped, unregistered): that is the end of its samples, not an
        // I/O error; the header's method still says what the samples were.
        if (n == -EPERM || n == -EINVAL || n == -EFAULT || n == -ENOENT) break;
        std::lock_guard<std::mutex> lock(mu_);
        stats_.error = static_cast<int>(n);
        stats_.error_call = "ioctl(PAGEMAP_SCAN)";
        return;
      }
      for (long k = 0; k < n; k++) {
        const uint64_t first = (regions_[k].start - r.start) / config_.page, count = (regions_[k].end - regions_[k].start) / config_.page;
        if (!runs_.empty() && runs_.back().first + runs_.back().second == first) runs_.back().second += count;
        else runs_.emplace_back(first, count);
      }
      if (walk_end >= req.end || walk_end <= req.start) break;
      req.start = walk_end;
    }
    emit({kTraceSample, kSampleWritten, static_cast<uint16_t>(i), static_cast<uint32_t>(runs_.size()),
          last_sample_ns_ - config_.start_ns, now - config_.start_ns});
    for (const auto& run : runs_) {
      const uint64_t pair[2] = {run.first, run.second};
      emit_bytes(pair, sizeof(pair));
    }
    std::lock_guard<std::mutex> lock(mu_);
    stats_.samples++;
    stats_.sample_runs += runs_.size();
  }
  last_sample_ns_ = now;
  std::lock_guard<std::mutex> lock(mu_);
  stats_.sample_ns += sys::now_ns() - t0;
}

void TraceRecorder::loop() {
  const uint64_t interval_ns = config_.sample_interval_ms * 1000000ull;
  // Woken early when a ring is half full; otherwise drains at least every 20 ms.
  const auto period = std::chrono::milliseconds(config_.sample_interval_ms ? std::min<uint64_t>(config_.sample_interval_ms, 20) : 20);
  for (;;) {
    bool stop;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, period, [&] { return stopping_; });
      stop = stopping_;
    }
    drain();
    const uint64_t now = sys::now_ns();
    if (interval_ns && (stop || now - last_sample_ns_ >= interval_ns)) sample(now);
    flush();
    if (stop) break;
  }
  if (!stats_.error) emit({kTraceEnd, 0, 0, 0, stats_.faults, sys::now_ns() - config_.start_ns});
  flush();
  const int closed = ::close(fd_) != 0 ? -errno : 0;
  fd_ = -1;
  if (closed && !stats_.error) {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.error = closed;
    stats_.error_call = "close";
  }
  timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.writer_cpu_ns = static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
  }
}

RecorderStats TraceRecorder::stats() {
  const uint64_t cpu = cpu_ns_of(writer_);
  std::lock_guard<std::mutex> lock(mu_);
  RecorderStats s = stats_;
  s.writer_cpu_ns = std::max(s.writer_cpu_ns, cpu);
  s.tap_ns = tap_ns_.load(std::memory_order_relaxed);
  s.tapped = tapped_.load(std::memory_order_relaxed);
  s.ignored = ignored_.load(std::memory_order_relaxed);
  return s;
}

RecorderStats TraceRecorder::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopped_) {
      stopping_ = true;
      stopped_ = true;
    }
  }
  cv_.notify_all();
  if (writer_.joinable()) writer_.join();
  return stats();
}

}  // namespace pm::engine
