#include "trace_recorder.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fcntl.h>
#include <functional>
#include <pthread.h>
#include <thread>
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

TraceRecorder::TraceRecorder(RecorderConfig config) : config_(std::move(config)) {
  auto table = std::make_unique<RangeTable>();
  for (const TraceRange& r : config_.ranges) table->ranges.push_back({r.start, r.length, static_cast<uint16_t>(next_index_++)});
  table_.store(table.get(), std::memory_order_seq_cst);
  table_keep_ = std::move(table);
  if (config_.write_rounds) {
    written_.resize(config_.ranges.size());
    written_compacted_.resize(config_.ranges.size());
    written_live_.assign(config_.ranges.size(), true);
  }
}

void TraceRecorder::publish(std::unique_ptr<RangeTable> next) {
  std::unique_ptr<const RangeTable> old = std::move(table_keep_);
  table_.store(next.get(), std::memory_order_seq_cst);
  table_keep_ = std::move(next);
  // A worker that loaded the old table counted its entry first (both sides sequentially
  // consistent): once it has left, it reads the new one.
  wait_for_workers();
}

void TraceRecorder::wait_for_workers() {
  for (WorkerEpoch& e : epochs_) {
    const uint64_t entered = e.entered.load(std::memory_order_seq_cst);
    while (e.left.load(std::memory_order_acquire) < entered) std::this_thread::yield();
  }
}

int TraceRecorder::add_range(const TraceRange& r) {
  if (r.length == 0 || r.start % config_.page || r.length % config_.page || r.start + r.length < r.start ||
      r.length / config_.page > UINT32_MAX)
    return -EINVAL;
  try {
    std::lock_guard<std::mutex> lock(ranges_mu_);
    if (closed_) return -ESHUTDOWN;
    const RangeTable& now = *table_keep_;
    for (const LiveRange& o : now.ranges)
      if (r.start < o.start + o.length && o.start < r.start + r.length) return -EEXIST;
    if (next_index_ >= kMaxTraceRanges) {
      ranges_refused_.fetch_add(1, std::memory_order_relaxed);
      return -ENOSPC;
    }
    const uint16_t index = static_cast<uint16_t>(next_index_);
    auto next = std::make_unique<RangeTable>(now);
    next->ranges.push_back({r.start, r.length, index});
    changes_.reserve(changes_.size() + 1);
    // Timed before the table is published: every fault recorded in the range comes later.
    const uint64_t t = sys::now_ns() - config_.start_ns;
    publish(std::move(next));
    next_index_++;
    changes_.push_back({t, {kTraceRangeAdded, static_cast<uint8_t>(r.flags & (kRangeModesMask | kRangeShared)), index,
                            static_cast<uint32_t>(r.length / config_.page), r.start, t}});
    return index;
  } catch (const std::bad_alloc&) {
    return -ENOMEM;
  }
}

int TraceRecorder::remove_range(uint64_t start, uint64_t length) {
  return remove_first([&](const LiveRange& o) { return o.start == start && o.length == length; });
}

int TraceRecorder::remove_index(uint32_t index) {
  return remove_first([&](const LiveRange& o) { return o.index == index; });
}

int TraceRecorder::remove_first(const std::function<bool(const LiveRange&)>& which) {
  try {
    std::lock_guard<std::mutex> lock(ranges_mu_);
    if (closed_) return -ESHUTDOWN;
    const RangeTable& now = *table_keep_;
    auto next = std::make_unique<RangeTable>();
    next->ranges.reserve(now.ranges.size());
    uint16_t index = 0;
    bool found = false;
    for (const LiveRange& o : now.ranges) {
      if (!found && which(o)) {
        index = o.index;
        found = true;
      } else {
        next->ranges.push_back(o);
      }
    }
    if (!found) return -ENOENT;
    changes_.reserve(changes_.size() + 1);
    publish(std::move(next));
    // Timed after no worker can still record into it: every fault of the range comes earlier.
    const uint64_t t = sys::now_ns() - config_.start_ns;
    changes_.push_back({t, {kTraceRangeRemoved, 0, index, 0, 0, t}});
    return 0;
  } catch (const std::bad_alloc&) {
    return -ENOMEM;
  }
}

int TraceRecorder::write_round() {
  if (!config_.write_rounds) return -EINVAL;
  try {
    std::lock_guard<std::mutex> lock(ranges_mu_);
    if (closed_) return -ESHUTDOWN;
    changes_.reserve(changes_.size() + 1);
    // Timed first: a worker still in the tap now timed its fault earlier, and is waited for, so
    // every fault before the round is in a ring when the writer meets the round.
    const uint64_t t = sys::now_ns() - config_.start_ns;
    wait_for_workers();
    changes_.push_back({t, {kTraceSample, kSampleWpRounds, 0, 0, 0, t}});
    return 0;
  } catch (const std::bad_alloc&) {
    return -ENOMEM;
  }
}

std::vector<TraceRange> TraceRecorder::live_ranges() {
  std::lock_guard<std::mutex> lock(ranges_mu_);
  std::vector<TraceRange> out;
  for (const LiveRange& o : table_keep_->ranges) out.push_back({o.start, o.length});
  return out;
}

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
  WorkerEpoch& epoch = epochs_[worker % epochs_.size()];
  epoch.entered.fetch_add(1, std::memory_order_seq_cst);
  const RangeTable& table = *table_.load(std::memory_order_seq_cst);
  // Read after the table: a range added before its table was published is timed earlier.
  const uint64_t t0 = sys::now_ns();
  tapped_.fetch_add(1, std::memory_order_relaxed);
  const LiveRange* range = nullptr;
  for (const LiveRange& r : table.ranges)
    if (msg.address >= r.start && msg.address - r.start < r.length) {
      range = &r;
      break;
    }
  if (!range) {
    ignored_.fetch_add(1, std::memory_order_relaxed);
  } else {
    const uint8_t kind = (msg.flags & UFFD_PAGEFAULT_FLAG_MINOR) ? 2 : (msg.flags & UFFD_PAGEFAULT_FLAG_WP) ? 1 : 0;
    const Entry e{t0 > config_.start_ns ? t0 - config_.start_ns : 0, (msg.address - range->start) / config_.page,
                  msg.tid, range->index,
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
  // Left only after the fault is in its ring: a removal timed after this pass comes after it.
  epoch.left.fetch_add(1, std::memory_order_release);
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
  // Ranges removed before the rings are read have all their faults in the rings by now; ranges
  // added after they are read may already have faults there: so removals are taken from before
  // the rings' drain, additions from after it, and later removals wait for the next drain.
  std::vector<RangeChange> changes;
  changes.swap(carried_);
  auto take_changes = [&](bool removals) {
    std::lock_guard<std::mutex> lock(ranges_mu_);
    // A write round goes with the removals: faults timed before it may still be on their way
    // into the rings while they are read.
    for (const RangeChange& c : changes_) (removals || c.record.type == kTraceRangeAdded ? changes : carried_).push_back(c);
    changes_.clear();
    if (!removals) {
      // The ranges sampled after this drain: those whose addition it writes, none it has not.
      sample_ranges_.clear();
      for (const LiveRange& o : table_keep_->ranges) sample_ranges_.push_back(o);
    }
  };
  take_changes(true);
  merge_.clear();
  for (auto& rp : rings_) {
    Ring& r = *rp;
    const uint64_t tail = r.tail.load(std::memory_order_relaxed), head = r.head.load(std::memory_order_acquire);
    const uint64_t cap = r.slots.size();
    for (uint64_t k = tail; k < head; k++) merge_.push_back(r.slots[k % cap]);
    r.tail.store(head, std::memory_order_release);
  }
  take_changes(false);
  // Merged by time, the file is in time order as of each drain. Even one ring needs it: workers
  // sharing a ring (more workers than rings) time a fault before they take its lock, and a range's
  // removal must come after each of its faults, all timed before it.
  std::stable_sort(merge_.begin(), merge_.end(), [](const Entry& a, const Entry& b) { return a.t_ns < b.t_ns; });
  // At equal times an addition goes before the faults, a removal after them.
  std::stable_sort(changes.begin(), changes.end(), [](const RangeChange& a, const RangeChange& b) { return a.t_ns < b.t_ns; });
  // A write round at the time of a fault samples it: the round's faults are those timed before it.
  auto before = [](const RangeChange& c, const Entry& e) {
    return c.t_ns < e.t_ns || (c.t_ns == e.t_ns && c.record.type == kTraceRangeAdded);
  };
  uint64_t written = 0, dropped = 0;
  size_t k = 0;
  for (const Entry& e : merge_) {
    if (stats_.error) break;
    for (; k < changes.size() && before(changes[k], e); k++) emit_change(changes[k]);
    emit({kTraceFault, e.flags, e.range, e.tid, e.page, e.t_ns});
    if (config_.write_rounds && (e.flags & kTraceWrite) && e.range < written_.size()) written_[e.range].push_back(e.page);
    written++;
  }
  for (; k < changes.size() && !stats_.error; k++) emit_change(changes[k]);
  // An owner that makes no rounds: each range's list stays within twice its distinct pages.
  for (size_t i = 0; i < written_.size(); i++) {
    std::vector<uint64_t>& v = written_[i];
    if (v.size() <= 2 * std::max<size_t>(written_compacted_[i], 32768)) continue;
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
    written_compacted_[i] = v.size();
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

void TraceRecorder::emit_change(const RangeChange& c) {
  if (stats_.error) return;
  if (!config_.write_rounds) {
    emit(c.record);
    return;
  }
  const uint16_t range = c.record.range;
  if (c.record.type == kTraceSample) {
    // A write round: every range live as of the records so far gets its sample.
    for (size_t i = 0; i < written_live_.size() && !stats_.error; i++)
      if (written_live_[i]) emit_written(static_cast<uint16_t>(i), c.t_ns);
    last_round_ns_ = c.t_ns;
    return;
  }
  if (c.record.type == kTraceRangeAdded) {
    if (range >= written_.size()) {
      written_.resize(range + 1u);
      written_compacted_.resize(range + 1u);
      written_live_.resize(range + 1u, false);
    }
    written_live_[range] = true;
  } else if (c.record.type == kTraceRangeRemoved && range < written_live_.size() && written_live_[range]) {
    // The writes since the last round in a range that goes: its last sample, before its removal.
    if (!written_[range].empty()) emit_written(range, c.t_ns);
    written_live_[range] = false;
    std::vector<uint64_t>().swap(written_[range]);
  }
  emit(c.record);
}

void TraceRecorder::emit_written(uint16_t range, uint64_t end_ns) {
  std::vector<uint64_t>& pages = written_[range];
  std::sort(pages.begin(), pages.end());
  runs_.clear();
  uint64_t prev = UINT64_MAX;
  for (uint64_t p : pages) {
    if (p == prev) continue;  // written twice in the interval (a missing fault, then a WP one)
    if (!runs_.empty() && runs_.back().first + runs_.back().second == p) runs_.back().second++;
    else runs_.emplace_back(p, 1);
    prev = p;
  }
  pages.clear();
  written_compacted_[range] = 0;
  emit_sample(kSampleWpRounds, range, std::min(last_round_ns_, end_ns), end_ns);
}

void TraceRecorder::emit_sample(uint8_t method, uint16_t range, uint64_t start_ns, uint64_t end_ns) {
  emit({kTraceSample, method, range, static_cast<uint32_t>(runs_.size()), start_ns, end_ns});
  for (const auto& run : runs_) {
    const uint64_t pair[2] = {run.first, run.second};
    emit_bytes(pair, sizeof(pair));
  }
  std::lock_guard<std::mutex> lock(mu_);
  stats_.samples++;
  stats_.sample_runs += runs_.size();
}

void TraceRecorder::sample(uint64_t now) {
  const uint64_t t0 = sys::now_ns();
  for (size_t i = 0; i < sample_ranges_.size() && !stats_.error; i++) {
    const LiveRange& r = sample_ranges_[i];
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
    emit_sample(kSampleWritten, r.index, last_sample_ns_ - config_.start_ns, now - config_.start_ns);
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
  {
    // The removals the last drain held back, and changes since: no fault follows them now.
    std::lock_guard<std::mutex> lock(ranges_mu_);
    closed_ = true;
    carried_.insert(carried_.end(), changes_.begin(), changes_.end());
    changes_.clear();
  }
  std::stable_sort(carried_.begin(), carried_.end(), [](const RangeChange& a, const RangeChange& b) { return a.t_ns < b.t_ns; });
  for (const RangeChange& c : carried_) emit_change(c);
  const uint64_t end = sys::now_ns() - config_.start_ns;
  // The writes since the last round: a last sample, as the PAGEMAP_SCAN method takes one at stop.
  if (config_.write_rounds) emit_change({end, {kTraceSample, kSampleWpRounds, 0, 0, 0, end}});
  if (!stats_.error) emit({kTraceEnd, 0, 0, 0, stats_.faults, end});
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
  uint64_t ranges;
  {
    std::lock_guard<std::mutex> lock(ranges_mu_);
    ranges = next_index_;
  }
  std::lock_guard<std::mutex> lock(mu_);
  RecorderStats s = stats_;
  s.writer_cpu_ns = std::max(s.writer_cpu_ns, cpu);
  s.tap_ns = tap_ns_.load(std::memory_order_relaxed);
  s.tapped = tapped_.load(std::memory_order_relaxed);
  s.ignored = ignored_.load(std::memory_order_relaxed);
  s.ranges_refused = ranges_refused_.load(std::memory_order_relaxed);
  s.ranges = ranges;
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
