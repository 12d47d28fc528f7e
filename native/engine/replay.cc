#include "replay.h"

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "../sys/access.h"

namespace pm::engine {

namespace {

// A replayed access reads or writes one word, as a device kernel's does.
constexpr uint64_t kReplayWordBytes = 8;

class Barrier {
 public:
  explicit Barrier(unsigned n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    if (released_) return;
    const uint64_t gen = gen_;
    if (++waiting_ == n_) {
      waiting_ = 0;
      gen_++;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }
  // Lets every waiter go (a pool that could not be started whole).
  void release() {
    std::lock_guard<std::mutex> lock(mu_);
    released_ = true;
    waiting_ = 0;
    gen_++;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  const unsigned n_;
  unsigned waiting_ = 0;
  uint64_t gen_ = 0;
  bool released_ = false;
};

struct Touch {
  volatile uint64_t* word;
  uint64_t value;
  bool write;
  uint64_t read;
};

// One word of page i, if its entry is valid (a hit): false on a miss, which touches nothing. The
// access itself runs under the SIGBUS guard (a file truncated behind the library's back), with the
// page pinned outside it so the pin is always dropped; -EFAULT then.
// remote (with a link model): counts a hit on a page that is not in device memory, an access the
// link carries.
int touch(Mirror* m, uint64_t i, bool write, uint64_t index, uint64_t seed, uint64_t* sum, bool* hit, uint64_t* remote) {
  auto* base = static_cast<uint8_t*>(m->pin(i, write));
  *hit = base != nullptr;
  if (!base) return 0;
  if (remote && !(m->entry(i) & kOnDevice)) ++*remote;
  if (write) m->mark_dirty(i);
  Touch t{reinterpret_cast<volatile uint64_t*>(base) + index % (m->page() / 8), seed + index, write, 0};
  uint64_t bad = 0;
  int rc = sys::guarded_call(
      [](void* p) {
        auto* t = static_cast<Touch*>(p);
        if (t->write) *t->word = t->value;
        else t->read = *t->word;
      },
      &t, &bad);
  m->unpin(i);
  *sum += write ? t.value : t.read;
  return rc ? -EFAULT : 0;
}

struct Counts {
  uint64_t rounds, requests, faulted, prefetched, invalidated;
  uint64_t to_device[static_cast<unsigned>(Trigger::kCount)], to_host[static_cast<unsigned>(Trigger::kCount)];
};

Counts read_counts(DeviceCounters& c) {
  Counts s{c.fault_rounds.load(), c.fault_requests.load(), c.faulted_pages.load(), c.prefetched_pages.load(),
           c.invalidated_pages.load(), {}, {}};
  for (unsigned k = 0; k < static_cast<unsigned>(Trigger::kCount); k++) {
    s.to_device[k] = c.to_device[k].load();
    s.to_host[k] = c.to_host[k].load();
  }
  return s;
}

}  // namespace

// Each window of accesses runs in three steps. 1: every device thread tries its accesses of the
// window (hit or miss depends only on the entries as the window found them: hits change no entry).
// 2: the misses, in trace order, are posted to the fault buffer at once and serviced in rounds of
// faultBatch (merge, fault-around, placement, prefetch, eviction), as a GPU replays a fault buffer.
// 3: the missed accesses are retried in trace order; one that misses again (evicted by a later
// fault of the same round) faults alone. Nothing depends on thread timing, so the counts do not.
void replay(Device& device, const ReplaySpec& spec, ReplayResult* out) {
  *out = ReplayResult{};
  Mirror* m = spec.mirror;
  const unsigned threads = std::max(1u, spec.threads);
  const uint64_t window = spec.window ? spec.window : device.config().fault_batch;
  const Counts before = read_counts(device.counters());
  const uint64_t t0 = sys::now_ns();

  // With a link: the rounds that served the replay's faults (each once), and the device threads'
  // accesses to host-resident pages. A window's threads run side by side, so a window costs its
  // slowest thread's remote time; windows, and step 3's retries on this thread, follow each other.
  LinkModel* const link = device.link();
  KernelLink acct;
  KernelLink* const acct_or_null = link ? &acct : nullptr;
  uint64_t serial_remote = 0;
  struct PerThread {
    uint64_t hits = 0, sum = 0, remote = 0;
    int error = 0;
    uint64_t error_index = 0;
  };
  std::vector<PerThread> per(threads);
  std::vector<uint8_t> missed(window);
  std::vector<uint64_t> miss_index, miss_pages;
  std::vector<uint8_t> miss_writes;
  std::vector<int> results;
  miss_index.reserve(window);
  miss_pages.reserve(window);
  miss_writes.reserve(window);
  results.reserve(window);
  uint64_t w0 = 0, w1 = 0;
  bool finished = false;

  auto try_window = [&](unsigned t) {
    PerThread& p = per[t];
    for (uint64_t i = w0; i < w1 && !p.error; i++) {
      if (((spec.ops[i] >> 1) % threads) != t) continue;
      bool hit = false;
      int rc = touch(m, spec.pages[i], spec.ops[i] & 1, i, spec.seed, &p.sum, &hit, link ? &p.remote : nullptr);
      if (rc) {
        p.error = rc;
        p.error_index = i;
      } else if (hit) {
        p.hits++;
      } else {
        missed[i - w0] = 1;
      }
    }
  };

  Barrier barrier(threads + 1);
  std::vector<std::thread> pool;
  if (threads > 1) {
    try {
      for (unsigned t = 0; t < threads; t++) {
        pool.emplace_back([&, t] {
          for (;;) {
            barrier.wait();
            if (finished) return;
            try_window(t);
            barrier.wait();
          }
        });
      }
    } catch (...) {
      finished = true;
      barrier.release();
      for (auto& th : pool) th.join();
      out->error = -EAGAIN;
      return;
    }
  }

  for (w0 = 0; w0 < spec.count && !out->error; w0 = w1) {
    w1 = std::min(spec.count, w0 + window);
    std::fill(missed.begin(), missed.end(), 0);
    if (threads > 1) {
      barrier.wait();  // go
      barrier.wait();  // every thread is done with the window
    } else {
      try_window(0);
    }
    out->windows++;
    if (link) {
      uint64_t slowest = 0;
      for (PerThread& p : per) {
        slowest = std::max(slowest, link->charge_remote(p.remote, p.remote * kReplayWordBytes));
        out->remote_accesses += p.remote;
        p.remote = 0;
      }
      out->modeled_remote_ns += slowest;
    }
    for (const PerThread& p : per)
      if (p.error && !out->error) {
        out->error = p.error;
        out->error_index = p.error_index;
      }
    if (out->error) break;
    miss_index.clear();
    miss_pages.clear();
    miss_writes.clear();
    for (uint64_t i = w0; i < w1; i++) {
      if (!missed[i - w0]) continue;
      miss_index.push_back(i);
      miss_pages.push_back(spec.pages[i]);
      miss_writes.push_back(spec.ops[i] & 1);
    }
    if (miss_index.empty()) continue;
    out->misses += miss_index.size();
    results.assign(miss_index.size(), 0);
    device.fault_group(m, miss_pages.data(), miss_writes.data(), miss_index.size(), results.data(), acct_or_null);
    for (size_t k = 0; k < miss_index.size() && !out->error; k++) {
      const uint64_t i = miss_index[k];
      int rc = results[k];
      for (unsigned tries = 0; rc == 0; tries++) {
        bool hit = false;
        rc = touch(m, spec.pages[i], spec.ops[i] & 1, i, spec.seed, &per[0].sum, &hit, link ? &serial_remote : nullptr);
        if (rc || hit) break;
        if (tries >= 1000) {
          rc = -EBUSY;
          break;
        }
        out->refaults++;
        rc = device.fault(m, spec.pages[i], spec.pages[i] + 1, spec.ops[i] & 1, acct_or_null);
      }
      if (rc) {
        out->error = rc;
        out->error_index = i;
      }
    }
  }
  if (threads > 1) {
    finished = true;
    barrier.wait();
    for (auto& th : pool) th.join();
  }

  out->elapsed_ns = sys::now_ns() - t0;
  if (link) {
    out->modeled_remote_ns += link->charge_remote(serial_remote, serial_remote * kReplayWordBytes);
    out->remote_accesses += serial_remote;
    out->remote_bytes = out->remote_accesses * kReplayWordBytes;
    out->modeled_fault_ns = acct.fault_ns;
    out->modeled_ns = out->modeled_fault_ns + out->modeled_remote_ns;
  }
  for (const PerThread& p : per) {
    out->hits += p.hits;
    out->checksum += p.sum;
  }
  out->accesses = out->error ? out->error_index : spec.count;
  const Counts after = read_counts(device.counters());
  out->fault_rounds = after.rounds - before.rounds;
  out->fault_requests = after.requests - before.requests;
  out->faulted_pages = after.faulted - before.faulted;
  out->prefetched_pages = after.prefetched - before.prefetched;
  out->invalidated_pages = after.invalidated - before.invalidated;
  for (unsigned k = 0; k < static_cast<unsigned>(Trigger::kCount); k++) {
    out->to_device[k] = after.to_device[k] - before.to_device[k];
    out->to_host[k] = after.to_host[k] - before.to_host[k];
  }
}

}  // namespace pm::engine
