#include "device.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sys/mman.h>

#include "../sys/mem.h"
#include "engine.h"
#include "migrate.h"

namespace pm::engine {

const char* TriggerName(Trigger t) {
  switch (t) {
    case Trigger::kExplicit: return "explicit";
    case Trigger::kDeviceFault: return "device-fault";
    case Trigger::kCpuFault: return "cpu-fault";
    case Trigger::kPrefetch: return "prefetch";
    case Trigger::kEviction: return "eviction";
    case Trigger::kRelease: return "release";
    case Trigger::kFork: return "fork";
    case Trigger::kCount: break;
  }
  return "unknown";
}

Device::Device(const DeviceConfig& config)
    : config_(config), link_(config.link ? std::make_unique<LinkModel>(config.link_params) : nullptr) {}

namespace {
// The fault round the calling thread is servicing (the device's service thread, inside
// service_batch): transfers made there are part of the round's modeled cost.
thread_local Device* tl_round_device = nullptr;
thread_local uint64_t tl_round_ns = 0;
}  // namespace

uint64_t Device::charge_transfer(uint64_t bytes, LinkDir dir, LinkCategory category) {
  if (!link_ || !bytes) return 0;
  const uint64_t ns = link_->charge_transfer(bytes, dir, category);
  if (tl_round_device == this) tl_round_ns += ns;
  return ns;
}

void Device::trace(TraceKind kind, Mirror* m, uint64_t a, uint64_t b, uint64_t c, uint64_t modeled_ns) {
  if (!config_.trace) return;
  TraceEvent e{sys::now_ns(), kind, m ? m->start() : 0, a, b, c, modeled_ns};
  std::lock_guard<std::mutex> lock(trace_mu_);
  if (trace_.size() < config_.trace_capacity) {
    trace_.push_back(e);
  } else {
    trace_[trace_head_] = e;
    trace_head_ = (trace_head_ + 1) % trace_.size();
    trace_dropped_++;
  }
}

std::vector<TraceEvent> Device::drain_trace(uint64_t* dropped) {
  std::lock_guard<std::mutex> lock(trace_mu_);
  std::vector<TraceEvent> out;
  out.reserve(trace_.size());
  for (size_t i = 0; i < trace_.size(); i++) out.push_back(trace_[(trace_head_ + i) % trace_.size()]);
  trace_.clear();
  trace_head_ = 0;
  *dropped = trace_dropped_;
  trace_dropped_ = 0;
  return out;
}

void Device::on_migrate(Mirror* m, bool to_device, uint64_t first, uint64_t pages, Trigger trigger) {
  if (!pages) return;
  (to_device ? counters_.to_device : counters_.to_host)[static_cast<unsigned>(trigger)].fetch_add(pages, std::memory_order_relaxed);
  // One migration call is one transfer over the link (its pages are batched into one DMA).
  const uint64_t ns = charge_transfer(pages * m->page(), to_device ? LinkDir::kToDevice : LinkDir::kToHost,
                                      trigger == Trigger::kEviction ? LinkCategory::kEviction
                                      : to_device                   ? LinkCategory::kToDevice
                                                                    : LinkCategory::kToHost);
  trace(to_device ? TraceKind::kMigrateToDevice : TraceKind::kMigrateToHost, m, first, pages, static_cast<uint64_t>(trigger), ns);
}

Device::~Device() {
  close();
  if (pool_registered_) Engine::get().unregister_range(reinterpret_cast<uint64_t>(pool_), slots_ * config_.page, pool_owner_);
  if (pool_) sys::unmap(pool_, slots_ * config_.page);
}

int Device::init() {
  slots_ = config_.memory / config_.page;
  if (slots_ == 0) return -EINVAL;
  void* p = nullptr;
  // Real memory owned by the device: private anonymous, so pages can be moved in and out of it
  // with UFFDIO_MOVE. Reserved lazily: a slot costs memory once used.
  int rc = sys::map(&p, nullptr, slots_ * config_.page, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | (config_.preallocate ? MAP_POPULATE : MAP_NORESERVE), -1, 0);
  if (rc) return rc;
  pool_ = static_cast<uint8_t*>(p);
  try {
    used_bits_.assign((slots_ + 63) / 64, 0);
    populated_bits_.assign((slots_ + 63) / 64, config_.preallocate ? ~0ull : 0ull);
  } catch (const std::bad_alloc&) {  // memory is the caller's number
    sys::unmap(pool_, slots_ * config_.page);
    pool_ = nullptr;
    return -ENOMEM;
  }
  try {
    service_ = std::thread(&Device::service, this);
  } catch (...) {
    return -EAGAIN;
  }
  return 0;
}

void Device::close() {
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  queue_cv_.notify_all();
  if (service_.joinable()) service_.join();
  // Nobody will service what is left: fail it so no device thread sleeps forever.
  std::lock_guard<std::mutex> lock(queue_mu_);
  for (Request* r : queue_) {
    r->result = -ENODEV;
    r->done = true;
  }
  queue_.clear();
  done_cv_.notify_all();
  // A closed device takes no new mirrors: with none left, its memory goes back to the system now
  // rather than when JavaScript collects the object (a preallocated pool is large).
  std::lock_guard<std::mutex> mirrors(mirrors_mu_);
  if (mirrors_.empty() && pool_) {
    std::lock_guard<std::mutex> slots(slot_mu_);
    sys::advise(pool_, slots_ * config_.page, MADV_DONTNEED);
    populated_bits_.assign(populated_bits_.size(), 0);
  }
}

bool Device::alloc_slot(uint64_t* slot, Mirror* holding, uint64_t page) {
  for (int attempt = 0;; attempt++) {
    {
      std::lock_guard<std::mutex> lock(slot_mu_);
      if (take_run_locked(1, slot)) {
        if (holding) resident_.push_back({holding, page, *slot});
        return true;
      }
    }
    if (config_.eviction == DeviceConfig::Eviction::kOff || attempt > 8 || !evict_one(holding)) return false;
  }
}

// Picks a victim (FIFO: the oldest allocation; LRU: the oldest without its access bit, clearing
// bits as it passes) and migrates it back to the host. Victims in a mirror that is busy changing
// (another migration or invalidation holds it) are passed over, never waited for.
bool Device::evict_one(Mirror* holding) {
  size_t queued = 0;
  for (size_t scanned = 0;; scanned++) {
    Resident r;
    {
      std::lock_guard<std::mutex> lock(slot_mu_);
      if (scanned == 0) queued = resident_.size();
      // Two passes over the queue as it was (stale entries dropped on the way do not shorten it:
      // the live ones behind them must still be reached, after their second chance).
      if (resident_.empty() || scanned > 2 * queued + 8) return false;
      r = resident_.front();
      resident_.pop_front();
      if (!attached_locked(r.mirror)) continue;  // closing: its pages go with it
      r.mirror->acquire();                      // it cannot be destroyed while we look at it
    }
    struct Release {
      Mirror* m;
      ~Release() { m->release(); }
    } guard{r.mirror};
    auto requeue = [&] {
      std::lock_guard<std::mutex> lock(slot_mu_);
      if (attached_locked(r.mirror)) resident_.push_back(r);
    };
    // Under the owner's change mutex (which every path that sets an entry holds), so "stale" is
    // decided on the entry as it will stay: a slot taken for a page whose entry is not set yet is
    // a load or migration under way, not a stale entry.
    std::unique_lock<std::mutex> other(r.mirror->change_mutex(), std::defer_lock);
    if (!Engine::holds(r.mirror) && !other.try_lock()) {
      requeue();
      continue;
    }
    const uint64_t e = r.mirror->entry(r.page);
    if (!(e & kOnDevice) || (e >> kSlotShift) != r.slot) {
      if (r.mirror->loading(r.page)) requeue();  // not stale: our own fill of it is under way
      continue;                                      // stale: already gone
    }
    // LRU's second chance lasts one pass: when device threads touch every resident page all the
    // time, the clock must still come round to a victim.
    if (config_.eviction == DeviceConfig::Eviction::kLru && scanned <= queued && r.mirror->test_and_clear_accessed(r.page)) {
      requeue();  // second chance
      continue;
    }
    if (MigrateToHost::evict(r.mirror, r.page)) return true;
    // Refused (a page its mirror is loading right now, or one the file could not take): it stays
    // resident and stays a candidate.
    const uint64_t now = r.mirror->entry(r.page);
    if ((now & kOnDevice) && (now >> kSlotShift) == r.slot) requeue();
  }
}

void Device::enforce_watermark(Mirror* holding) {
  if (config_.eviction == DeviceConfig::Eviction::kOff || config_.watermark >= 1.0) return;
  const uint64_t limit = static_cast<uint64_t>(config_.watermark * static_cast<double>(slots_));
  while (slots_used() > limit)
    if (!evict_one(holding)) return;
}

bool Device::take_run_locked(uint64_t n, uint64_t* first) {
  if (n == 0 || n > slots_ - used_count_) return false;
  auto used = [&](uint64_t s) { return (used_bits_[s / 64] >> (s % 64)) & 1; };
  // First fit from the cursor, wrapping once.
  for (uint64_t scanned = 0, s = cursor_ % slots_; scanned < slots_;) {
    if (s + n > slots_) {
      scanned += slots_ - s;
      s = 0;
      continue;
    }
    if (used_bits_[s / 64] == ~0ull && s % 64 == 0) {
      s += 64;
      scanned += 64;
      continue;
    }
    uint64_t k = 0;
    while (k < n && !used(s + k)) k++;
    if (k == n) {
      for (uint64_t j = s; j < s + n; j++) used_bits_[j / 64] |= 1ull << (j % 64);
      used_count_ += n;
      cursor_ = s + n;
      *first = s;
      return true;
    }
    s += k + 1;
    scanned += k + 1;
  }
  return false;
}

bool Device::alloc_run(uint64_t n, uint64_t* first, Mirror* holding, uint64_t page) {
  std::lock_guard<std::mutex> lock(slot_mu_);
  if (!take_run_locked(n, first)) return false;
  if (holding)
    for (uint64_t k = 0; k < n; k++) resident_.push_back({holding, page + k, *first + k});
  return true;
}

bool Device::slots_populated(uint64_t slot, uint64_t n) {
  std::lock_guard<std::mutex> lock(slot_mu_);
  for (uint64_t s = slot; s < slot + n; s++)
    if (!((populated_bits_[s / 64] >> (s % 64)) & 1)) return false;
  return true;
}

void Device::set_populated(uint64_t slot, uint64_t n, bool populated) {
  std::lock_guard<std::mutex> lock(slot_mu_);
  for (uint64_t s = slot; s < slot + n; s++) {
    if (populated) populated_bits_[s / 64] |= 1ull << (s % 64);
    else populated_bits_[s / 64] &= ~(1ull << (s % 64));
  }
}

void Device::free_slot(uint64_t slot, bool zap) {
  // Give the memory back too (a freed slot must not keep host RSS), unless the device owns its
  // memory for good (preallocate): then the page stays for the next copy.
  if (zap && !config_.preallocate) {
    sys::advise(slot_address(slot), config_.page, MADV_DONTNEED);
    set_populated(slot, 1, false);
  } else if (!zap) {
    set_populated(slot, 1, false);  // UFFDIO_MOVE took the page: a hole now
  }
  std::lock_guard<std::mutex> lock(slot_mu_);
  used_bits_[slot / 64] &= ~(1ull << (slot % 64));
  used_count_--;
}

int Device::register_pool() {
  std::lock_guard<std::mutex> lock(slot_mu_);
  if (pool_registered_) return 0;
  int rc = Engine::get().register_range(reinterpret_cast<uint64_t>(pool_), slots_ * config_.page, pool_owner_);
  if (rc == 0) pool_registered_ = true;
  return rc;
}

uint64_t Device::slots_used() {
  std::lock_guard<std::mutex> lock(slot_mu_);
  return used_count_;
}

uint64_t Device::table_bytes() {
  std::lock_guard<std::mutex> lock(mirrors_mu_);
  uint64_t n = 0;
  for (Mirror* m : mirrors_) n += m->table_bytes();
  return n;
}

int Device::fault(Mirror* m, uint64_t first, uint64_t last, bool write, KernelLink* acct) {
  Request r{m, first, last, write, acct};
  std::unique_lock<std::mutex> lock(queue_mu_);
  if (stopping_) return -ENODEV;
  queue_.push_back(&r);
  counters_.fault_requests.fetch_add(1, std::memory_order_relaxed);
  queue_cv_.notify_one();
  done_cv_.wait(lock, [&] { return r.done; });
  return r.result;
}

void Device::fault_group(Mirror* m, const uint64_t* pages, const uint8_t* writes, size_t n, int* results,
                         KernelLink* acct) {
  std::vector<Request> reqs;
  reqs.reserve(n);
  for (size_t i = 0; i < n; i++) reqs.push_back({m, pages[i], pages[i] + 1, writes[i] != 0, acct});
  std::unique_lock<std::mutex> lock(queue_mu_);
  if (stopping_) {
    for (size_t i = 0; i < n; i++) results[i] = -ENODEV;
    return;
  }
  for (Request& r : reqs) queue_.push_back(&r);
  counters_.fault_requests.fetch_add(n, std::memory_order_relaxed);
  queue_cv_.notify_one();
  done_cv_.wait(lock, [&] { return std::all_of(reqs.begin(), reqs.end(), [](const Request& r) { return r.done; }); });
  for (size_t i = 0; i < n; i++) results[i] = reqs[i].result;
}

void Device::service() {
  std::vector<Request*> batch;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(queue_mu_);
      queue_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      while (!queue_.empty() && batch.size() < config_.fault_batch) {
        batch.push_back(queue_.front());
        queue_.pop_front();
      }
    }
    const uint64_t t0 = sys::now_ns();
    const uint64_t pages0 = counters_.faulted_pages.load(std::memory_order_relaxed);
    tl_round_device = this;
    tl_round_ns = 0;
    service_batch(batch);
    tl_round_device = nullptr;
    // The round's modeled cost: the far-fault round trip plus every transfer it made (migrations,
    // the evictions they forced, prefetches), all before the replay.
    const uint64_t round_ns = link_ ? link_->charge_fault_round() + tl_round_ns : 0;
    const uint64_t ns = sys::now_ns() - t0;
    counters_.service_ns.fetch_add(ns, std::memory_order_relaxed);
    trace(TraceKind::kFaultBatch, batch.empty() ? nullptr : batch.front()->mirror, batch.size(),
          counters_.faulted_pages.load(std::memory_order_relaxed) - pages0, ns, round_ns);
    const uint64_t round = counters_.fault_rounds.fetch_add(1, std::memory_order_relaxed);
    // Each kernel waited for this round once, however many of its threads' faults it served.
    if (link_)
      for (Request* r : batch)
        if (r->acct && r->acct->last_round != round) {
          r->acct->last_round = round;
          r->acct->fault_ns += round_ns;
        }
    uint64_t n = batch.size(), prev = counters_.max_batch.load();
    while (n > prev && !counters_.max_batch.compare_exchange_weak(prev, n)) {
    }
    {
      std::lock_guard<std::mutex> lock(queue_mu_);
      for (Request* r : batch) r->done = true;
    }
    done_cv_.notify_all();  // replay
    batch.clear();
  }
}

// Dedupe and coalesce: each request grows to the fault-around granule (clamped to its mirror),
// overlapping requests of one mirror merge into one range fault, and a merged range is faulted for
// write if any request in it writes (upgrade). If the write fault is refused (a read-only range),
// the read requests in it are faulted again on their own, so a writer's EPERM is not a reader's.
void Device::service_batch(std::vector<Request*>& batch) {
  const uint64_t granule = std::max<uint64_t>(1, config_.fault_around / config_.page);
  std::sort(batch.begin(), batch.end(), [](const Request* a, const Request* b) {
    return a->mirror != b->mirror ? a->mirror < b->mirror : a->first < b->first;
  });
  struct Run {
    Mirror* m;
    uint64_t first, last;
    bool write;
    size_t begin, end;  // requests [begin, end) of the batch
  };
  std::vector<Run> runs;
  for (size_t i = 0; i < batch.size(); i++) {
    Request* r = batch[i];
    const uint64_t n = r->mirror->npages();
    uint64_t first = r->first / granule * granule;
    uint64_t last = std::min(n, std::max(r->last, (r->first / granule + 1) * granule));
    if (!runs.empty() && runs.back().m == r->mirror && first <= runs.back().last) {
      runs.back().last = std::max(runs.back().last, last);
      runs.back().write |= r->write;
      runs.back().end = i + 1;
    } else {
      runs.push_back({r->mirror, first, last, r->write, i, i + 1});
    }
  }
  for (const Run& run : runs) {
    if (config_.placement == DeviceConfig::Placement::kDevice && run.m->file_strategy() == FileStrategy::kNone) {
      // Unified-memory style: the faulted range moves into device memory first; what cannot move
      // (shared, file-backed, memory full with eviction off) is mapped on the host as usual.
      MigrateResult mr;
      MigrateToDevice::run(run.m, run.first, run.last, {true, false, Trigger::kDeviceFault}, &mr);
    }
    int rc = run.m->range_fault(run.first, run.last, run.write, config_.timeout_ms);
    if (rc == 0) counters_.faulted_pages.fetch_add((run.last - run.first) * (run.m->page() / config_.page), std::memory_order_relaxed);
    if (rc == 0 && config_.prefetch != DeviceConfig::Prefetch::kOff) prefetch(run.m, run.first, run.last);
    for (size_t i = run.begin; i < run.end; i++) {
      Request* r = batch[i];
      r->result = rc;
      // Merging is only an optimisation: when the merged run fails (a writer's EPERM, a neighbour's
      // unmapped page), each request gets its own answer.
      if (rc != 0 && run.end - run.begin > 1) r->result = run.m->range_fault(r->first, r->last, r->write, config_.timeout_ms);
      else if (rc == -EPERM && run.write && !r->write) r->result = run.m->range_fault(r->first, r->last, false, config_.timeout_ms);
    }
  }
}

bool Device::overlaps(uint64_t start, uint64_t end) {
  std::lock_guard<std::mutex> lock(mirrors_mu_);
  for (Mirror* m : mirrors_)
    if (start < m->start() + m->npages() * m->page() && m->start() < end && !m->dead()) return true;
  return false;
}

void Device::add_mirror(Mirror* m) {
  {
    std::lock_guard<std::mutex> lock(mirrors_mu_);
    mirrors_.push_back(m);
  }
  std::lock_guard<std::mutex> lock(slot_mu_);
  attached_.push_back(m);
}

bool Device::attached_locked(Mirror* m) const {
  return std::find(attached_.begin(), attached_.end(), m) != attached_.end();
}

void Device::remove_mirror(Mirror* m) {
  {
    std::lock_guard<std::mutex> lock(mirrors_mu_);
    mirrors_.erase(std::remove(mirrors_.begin(), mirrors_.end(), m), mirrors_.end());
  }
  std::lock_guard<std::mutex> lock(slot_mu_);
  attached_.erase(std::remove(attached_.begin(), attached_.end(), m), attached_.end());
  resident_.erase(std::remove_if(resident_.begin(), resident_.end(), [m](const Resident& r) { return r.mirror == m; }),
                  resident_.end());
}

uint64_t Device::release() {
  std::vector<Mirror*> ms;
  {
    std::lock_guard<std::mutex> lock(mirrors_mu_);
    ms = mirrors_;
    for (Mirror* m : ms) m->acquire();
  }
  uint64_t n = 0;
  for (Mirror* m : ms) {
    n += MigrateToHost::range(m, 0, m->npages(), Trigger::kRelease);
    m->release();
  }
  return n;
}

// After a successful fault of [first, last): fetch more before the replay, as the policy says.
// Prefetched pages are mapped for reading (or migrated, with placement device); a prefetch that
// fails is simply not done.
void Device::prefetch(Mirror* m, uint64_t first, uint64_t last) {
  const uint64_t n = m->npages();
  uint64_t a = 0, b = 0;
  if (config_.prefetch == DeviceConfig::Prefetch::kSequential) {
    // The window grows with the stream already mapped just before the fault: a sequential reader
    // doubles it each round (up to 2 MiB), a random one keeps it at the size it faulted.
    uint64_t streamed = 0;
    while (streamed < first && streamed < 512 && (m->entry(first - 1 - streamed) & kValid)) streamed++;
    const uint64_t window = std::min<uint64_t>(512, std::max(last - first, streamed + (last - first)));
    a = last;
    b = std::min(n, last + window);
  } else {
    const uint64_t block = (2ull << 20) / config_.page;
    a = first / block * block;
    b = std::min(n, a + block);
    uint64_t resident = 0;
    for (uint64_t i = a; i < b; i++)
      if (m->entry(i) & kValid) resident++;
    if (resident * 100 <= (b - a) * 51 || resident == b - a) return;
  }
  // Only what is not mapped yet.
  while (a < b && (m->entry(a) & kValid)) a++;
  while (b > a && (m->entry(b - 1) & kValid)) b--;
  if (a >= b) return;
  if (config_.placement == DeviceConfig::Placement::kDevice) {
    MigrateResult mr;
    MigrateToDevice::run(m, a, b, {true, false, Trigger::kPrefetch}, &mr);
  }
  if (m->range_fault(a, b, false, config_.timeout_ms) == 0) counters_.prefetched_pages.fetch_add(b - a, std::memory_order_relaxed);
}

void Device::on_invalidate(Mirror* m, uint64_t first, uint64_t, InvalidateCause cause, uint64_t cleared) {
  // Counted and traced in base pages (a hugetlb entry is m->page() / page of them), as the
  // kernel's test device counts pages.
  const uint64_t ratio = m->page() / config_.page;
  counters_.invalidations[static_cast<unsigned>(cause)].fetch_add(1, std::memory_order_relaxed);
  counters_.invalidated_pages.fetch_add(cleared * ratio, std::memory_order_relaxed);
  trace(TraceKind::kInvalidate, m, first * ratio, cleared * ratio, static_cast<uint64_t>(cause));
}

namespace {

inline uint64_t xorshift(uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

}  // namespace

// One thread's share of a kernel. Accesses go through the mirror: pin the page, access, unpin; a
// miss posts a fault and stalls until the service replays it.
// A SIGBUS in a device thread (a remote or pin mirror's file truncated by another process behind
// the library's back) ends this thread's kernel with EFAULT instead of the process: the body runs
// under the SIGBUS guard, and the pages it held pinned are published in `pins` (volatile: the
// stores must happen before the access that faults) so they can be unpinned after the jump.
void Device::run_share(const KernelSpec& s, uint64_t first_op, uint64_t last_op, unsigned index, KernelResult* out) {
  struct Call {
    Device* d;
    const KernelSpec* s;
    uint64_t first_op, last_op;
    unsigned index;
    KernelResult* out;
    volatile uint64_t pins[2];
  } c{this, &s, first_op, last_op, index, out, {~0ull, ~0ull}};
  uint64_t bad = 0;
  int rc = sys::guarded_call(
      [](void* p) {
        auto* c = static_cast<Call*>(p);
        c->d->run_share_body(*c->s, c->first_op, c->last_op, c->index, c->out, c->pins);
      },
      &c, &bad);
  if (rc == 0) return;
  for (uint64_t pinned : c.pins)
    if (pinned != ~0ull) s.mirror->unpin(pinned);
  out->error = -EFAULT;
  out->error_page = bad >= s.mirror->start() ? (bad - s.mirror->start()) / s.mirror->page() : 0;
}

void Device::run_share_body(const KernelSpec& s, uint64_t first_op, uint64_t last_op, unsigned index, KernelResult* out,
                            volatile uint64_t* pins) {
  Mirror* m = s.mirror;
  const uint64_t page = m->page();
  const uint64_t bytes = s.npages * page;
  const uint64_t words = bytes / 8;
  uint64_t rng = s.seed * 0x9E3779B97F4A7C15ull + index + 1;
  const bool copy = s.op == KernelOp::kCopyOut || s.op == KernelOp::kCopyIn;
  const bool writes = s.op == KernelOp::kWrite || s.op == KernelOp::kAtomicInc || s.op == KernelOp::kCopyIn;
  constexpr uint64_t kNone = ~0ull;
  const unsigned page_shift = static_cast<unsigned>(__builtin_ctzll(page));
  uint64_t held = kNone;  // the page currently pinned (published in pins[0])
  uint8_t* base = nullptr;
  // With a link model: whether the held page is host-resident (each access to it is remote), and
  // the op count when it was pinned. Counted per page, not per word.
  const bool model = link_ != nullptr;
  bool held_remote = false;
  uint64_t ops_at_pin = 0;
  for (uint64_t k = first_op; k < last_op; k++) {
    uint64_t off;  // byte offset within the kernel's range
    if (copy) {
      off = k * page;
    } else {
      switch (s.pattern) {
        case sys::AccessPattern::kSequential:
          // No division on the common path: a streaming kernel is bound by this arithmetic.
          off = k * s.unit;
          if (off >= bytes) off %= bytes;
          off &= ~7ull;
          break;
        case sys::AccessPattern::kStrided: off = (k * (s.stride ? s.stride : s.unit)) % bytes & ~7ull; break;
        case sys::AccessPattern::kGather: off = (s.gather[k % s.gather_count] % words) * 8; break;
        default: off = (xorshift(rng) % words) * 8; break;
      }
    }
    const uint64_t i = s.first + (off >> page_shift);
    // Consecutive accesses to one page keep it pinned: one pin per page, not per word.
    if (i != held) {
      if (held != kNone) m->unpin(held);
      if (held_remote) out->remote_accesses += out->ops - ops_at_pin;
      held_remote = false;
      held = pins[0] = kNone;
      uint64_t tries = 0;
      while ((base = static_cast<uint8_t*>(m->pin(i, writes))) == nullptr) {
        const uint64_t last = s.fault_to_end ? s.first + s.npages : i + 1;
        int rc = fault(m, i, last, writes, s.link);
        out->faults++;
        if (rc) {
          out->error = rc;
          out->error_page = i;
          return;
        }
        // Replayed, but an invalidation may have raced the replay: fault again, boundedly.
        if (++tries > 1000) {
          out->error = -EBUSY;
          out->error_page = i;
          return;
        }
      }
      held = pins[0] = i;
      if (writes) m->mark_dirty(i);
      if (model) {
        held_remote = !(m->entry(i) & kOnDevice);
        ops_at_pin = out->ops;
      }
    }
    const uint64_t in_page = off & (page - 1);
    // Streaming fast path: the rest of this page's words in one tight loop (vectorised loads).
    if (s.pattern == sys::AccessPattern::kSequential && s.unit < page &&
        (s.op == KernelOp::kRead || s.op == KernelOp::kWrite) && k * s.unit < bytes) {
      const uint64_t room = (page - in_page + s.unit - 1) / s.unit;
      const uint64_t n = std::min<uint64_t>(room, std::min(last_op - k, (bytes - k * s.unit + s.unit - 1) / s.unit));
      const uint64_t stride = s.unit / 8;
      uint64_t* w = reinterpret_cast<uint64_t*>(base + in_page);
      uint64_t sum = 0;
      if (s.op == KernelOp::kRead) {
        for (uint64_t j = 0; j < n; j++) sum += w[j * stride];
      } else {
        const uint64_t v0 = s.seed + off / 8;
        for (uint64_t j = 0; j < n; j++) {
          w[j * stride] = v0 + j * stride;
          sum += v0 + j * stride;
        }
      }
      out->checksum += sum;
      out->ops += n;
      k += n - 1;
      continue;
    }
    if (s.op == KernelOp::kCopy) {
      // The destination page is pinned for writing just for this word (the source stays held).
      const uint64_t doff = off + static_cast<uint64_t>(s.copy_to);
      const uint64_t di = s.first + (doff >> page_shift);
      uint8_t* dst;
      uint64_t tries = 0;
      while ((dst = static_cast<uint8_t*>(m->pin(di, true))) == nullptr) {
        m->unpin(held);  // never sleep on a fault while holding a pin
        held = pins[0] = kNone;
        int rc = fault(m, di, di + 1, true, s.link);
        out->faults++;
        if (rc || ++tries > 1000) {
          out->error = rc ? rc : -EBUSY;
          out->error_page = di;
          return;
        }
        if ((base = static_cast<uint8_t*>(m->pin(i, false))) == nullptr) {
          k--;  // the source went meanwhile: redo this word from the top
          goto next;
        }
        held = pins[0] = i;
      }
      pins[1] = di;
      {
        const uint64_t v = *reinterpret_cast<volatile uint64_t*>(base + in_page);
        *reinterpret_cast<volatile uint64_t*>(dst + (doff & (page - 1))) = v;
        out->checksum += v;
      }
      m->mark_dirty(di);
      m->unpin(di);
      pins[1] = kNone;
      out->ops++;
    next:
      continue;
    }
    switch (s.op) {
      case KernelOp::kRead: out->checksum += *reinterpret_cast<volatile uint64_t*>(base + in_page); break;
      case KernelOp::kWrite: {
        uint64_t v = s.seed + off / 8;
        *reinterpret_cast<volatile uint64_t*>(base + in_page) = v;
        out->checksum += v;
        break;
      }
      case KernelOp::kAtomicInc:
        out->checksum += __atomic_add_fetch(reinterpret_cast<uint64_t*>(base + in_page), 1, __ATOMIC_SEQ_CST);
        break;
      case KernelOp::kVerify: {
        uint64_t v = *reinterpret_cast<volatile uint64_t*>(base + in_page);
        out->checksum += v;
        if (v != s.seed + off / 8) out->mismatches++;
        break;
      }
      case KernelOp::kCopy:
        break;  // handled above
      case KernelOp::kCopyOut:
        std::memcpy(s.buffer + off, base, page);
        out->cpages++;
        break;
      case KernelOp::kCopyIn:
        std::memcpy(base, s.buffer + off, page);
        out->cpages++;
        break;
    }
    out->ops++;
  }
  if (held != kNone) m->unpin(held);
  if (held_remote) out->remote_accesses += out->ops - ops_at_pin;
  pins[0] = kNone;
}

void Device::run(const KernelSpec& spec_in, KernelResult* out) {
  KernelSpec spec = spec_in;
  if (spec.threads == 0) spec.threads = 1;
  if (spec.unit < 8) spec.unit = 8;
  const bool copy = spec.op == KernelOp::kCopyOut || spec.op == KernelOp::kCopyIn;
  const uint64_t total = copy ? spec.npages : (spec.ops ? spec.ops : spec.npages * spec.mirror->page() / spec.unit);
  std::vector<KernelResult> parts(spec.threads);
  KernelLink acct;
  spec.link = &acct;
  const uint64_t t0 = sys::now_ns();
  if (spec.threads == 1) {
    run_share(spec, 0, total, 0, &parts[0]);
  } else {
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < spec.threads; t++)
      threads.emplace_back(&Device::run_share, this, std::cref(spec), total * t / spec.threads,
                           total * (t + 1) / spec.threads, t, &parts[t]);
    for (auto& th : threads) th.join();
  }
  *out = KernelResult{};
  out->elapsed_ns = sys::now_ns() - t0;
  for (const KernelResult& p : parts) {
    out->ops += p.ops;
    out->checksum += p.checksum;
    out->mismatches += p.mismatches;
    out->faults += p.faults;
    out->cpages += p.cpages;
    if (link_) {
      // Device threads run side by side: the kernel's remote time is its slowest thread's.
      const uint64_t bytes = p.remote_accesses * (copy ? spec.mirror->page() : 8);
      out->remote_accesses += p.remote_accesses;
      out->remote_bytes += bytes;
      out->modeled_remote_ns = std::max(out->modeled_remote_ns, link_->charge_remote(p.remote_accesses, bytes));
    }
    if (p.error && !out->error) {
      out->error = p.error;
      out->error_page = p.error_page;
    }
  }
  // Fault rounds are serialised on the device's one service thread: they add up (each once).
  out->modeled_fault_ns = acct.fault_ns;
  out->modeled_ns = out->modeled_fault_ns + out->modeled_remote_ns;
}

}  // namespace pm::engine
