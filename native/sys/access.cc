#include "access.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csetjmp>
#include <csignal>
#include <cstring>
#include <ctime>
#include <mutex>
#include <pthread.h>
#include <thread>

namespace pm::sys {

uint64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

namespace {

// ---- SIGBUS guard ------------------------------------------------------------------------------
// Only threads inside a guarded region jump out; any other SIGBUS gets the previous disposition
// (for Node: the default, which kills the process as it always would). SIGSEGV is deliberately
// not touched: Node's WebAssembly trap handler owns it.
// volatile: the stores around a memcpy would otherwise be dead-store eliminated (the compiler
// cannot see that a signal handler reads them).
thread_local sigjmp_buf* volatile tl_jump = nullptr;
thread_local volatile uint64_t tl_bad_addr = 0;
struct sigaction g_previous_bus;
std::once_flag g_install_once;

void on_sigbus(int sig, siginfo_t* info, void* ctx) {
  if (tl_jump != nullptr) {
    tl_bad_addr = reinterpret_cast<uint64_t>(info->si_addr);
    siglongjmp(*tl_jump, 1);
  }
  if (g_previous_bus.sa_flags & SA_SIGINFO) {
    if (g_previous_bus.sa_sigaction) return g_previous_bus.sa_sigaction(sig, info, ctx);
  } else if (g_previous_bus.sa_handler != SIG_DFL && g_previous_bus.sa_handler != SIG_IGN) {
    return g_previous_bus.sa_handler(sig);
  }
  // Default action: reinstate it; returning re-executes the access, which now kills as usual.
  signal(SIGBUS, SIG_DFL);
}

void install_guard() {
  std::call_once(g_install_once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &g_previous_bus);
  });
}

inline uint64_t xorshift(uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

struct Shared {
  const AccessSpec* spec;
  uint64_t nwords;
  // A sleeping barrier (threads + the coordinator): spinning threads would steal the CPU from the
  // fault handler they are about to wait for, which on a small machine is the whole measurement.
  pthread_barrier_t barrier;
  // Threads also wait for each other before exiting: an early thread's exit (stack unmapping,
  // TLB shootdown, mmap_lock) would otherwise land inside the others' timed accesses.
  pthread_barrier_t done;
};

struct ThreadOut {
  uint64_t start_ns = 0;
  uint64_t ops = 0, checksum = 0, mismatches = 0, first_mismatch = UINT64_MAX, end_ns = 0;
  int signal = 0;
  uint64_t signal_addr = 0;
  std::vector<uint32_t> latency;
};

// Offset (in bytes, 8-aligned) of the i-th access.
inline uint64_t offset_of(const AccessSpec& s, uint64_t nwords, uint64_t i, uint64_t& rng) {
  switch (s.pattern) {
    case AccessPattern::kSequential: {
      uint64_t off = i * s.unit;
      if (off >= s.length) off %= s.length;  // no division on the common path: it is per access
      return off & ~7ull;
    }
    case AccessPattern::kStrided: {
      uint64_t stride = s.stride ? s.stride : s.unit;
      return (i * stride) % s.length & ~7ull;
    }
    case AccessPattern::kRandom:
    case AccessPattern::kGather:
      return (xorshift(rng) % nwords) * 8;
  }
  return 0;
}

// Runs accesses [first, last) on this thread. Allocates nothing unless latency is asked for, so a
// forked child may call it.
void run_range(const AccessSpec& s, uint64_t nwords, uint64_t first, uint64_t last, uint64_t seed, ThreadOut* out) {
  sigjmp_buf jump;
  uint64_t rng = seed;
  // volatile: these survive a siglongjmp out of the loop below.
  volatile uint64_t i = first;
  volatile uint64_t sum = 0;
  if (sigsetjmp(jump, 0) != 0) {
    tl_jump = nullptr;
    out->signal = SIGBUS;
    out->signal_addr = tl_bad_addr;
    out->ops = i - first;
    out->checksum = sum;
    out->end_ns = now_ns();
    return;
  }
  tl_jump = &jump;
  uint64_t local_sum = 0, mism = 0, first_mism = UINT64_MAX;
  rng = seed;
  for (uint64_t k = first; k < last; k++) {
    i = k;
    uint64_t off = offset_of(s, nwords, k, rng);
    volatile uint64_t* p = reinterpret_cast<volatile uint64_t*>(s.base + off);
    uint64_t expect = s.seed + off / 8;
    uint64_t t0 = s.latency ? now_ns() : 0;
    switch (s.op) {
      case AccessOp::kRead:
        local_sum += *p;
        break;
      case AccessOp::kWrite:
        *p = expect;
        local_sum += expect;
        break;
      case AccessOp::kReadModifyWrite: {
        uint64_t v = *p + 1;
        *p = v;
        local_sum += v;
        break;
      }
      case AccessOp::kVerify: {
        uint64_t v = *p;
        local_sum += v;
        if (v != expect && mism++ == 0) first_mism = off;
        break;
      }
    }
    if (s.latency) {
      uint64_t d = now_ns() - t0;
      out->latency.push_back(d > UINT32_MAX ? UINT32_MAX : static_cast<uint32_t>(d));
    }
    sum = local_sum;
  }
  tl_jump = nullptr;
  out->ops = last - first;
  out->checksum = local_sum;
  out->mismatches = mism;
  out->first_mismatch = first_mism;
  out->end_ns = now_ns();
}

void worker(Shared* sh, unsigned index, ThreadOut* out) {
  const AccessSpec& s = *sh->spec;
  const uint64_t first = s.ops * index / s.threads;
  const uint64_t last = s.ops * (index + 1) / s.threads;
  if (s.latency) out->latency.reserve(last - first);
  if (s.barrier) pthread_barrier_wait(&sh->barrier);
  out->start_ns = now_ns();
  run_range(s, sh->nwords, first, last, s.seed * 0x9E3779B97F4A7C15ull + index + 1, out);
  if (s.barrier) pthread_barrier_wait(&sh->done);
}

}  // namespace

void run_access(const AccessSpec& spec_in, AccessResult* out) {
  install_guard();
  AccessSpec spec = spec_in;
  if (spec.unit < 8) spec.unit = 8;
  if (spec.threads == 0) spec.threads = 1;
  if (spec.ops == 0) spec.ops = std::max<uint64_t>(1, spec.length / spec.unit);
  Shared sh;
  sh.spec = &spec;
  sh.nwords = std::max<uint64_t>(1, spec.length / 8);
  std::vector<ThreadOut> outs(spec.threads);
  std::vector<std::thread> threads;
  threads.reserve(spec.threads);
  if (spec.barrier) {
    pthread_barrier_init(&sh.barrier, nullptr, spec.threads + 1);
    pthread_barrier_init(&sh.done, nullptr, spec.threads);
  }
  uint64_t start = now_ns();
  for (unsigned t = 0; t < spec.threads; t++) threads.emplace_back(worker, &sh, t, &outs[t]);
  // Even one thread waits at the barrier, so elapsed time excludes thread creation.
  if (spec.barrier) pthread_barrier_wait(&sh.barrier);
  for (auto& th : threads) th.join();
  // Elapsed runs from the first thread's start to the last one's end, as each thread saw them: the
  // coordinator may well be scheduled after the workers have finished.
  start = UINT64_MAX;
  for (auto& o : outs) start = std::min(start, o.start_ns);
  if (spec.barrier) {
    pthread_barrier_destroy(&sh.barrier);
    pthread_barrier_destroy(&sh.done);
  }
  uint64_t end = start;
  *out = AccessResult{};
  for (auto& o : outs) {
    out->ops += o.ops;
    out->checksum += o.checksum;
    out->mismatches += o.mismatches;
    out->first_mismatch = std::min(out->first_mismatch, o.first_mismatch);
    end = std::max(end, o.end_ns);
    if (o.signal && !out->signal) {
      out->signal = o.signal;
      out->signal_addr = o.signal_addr;
    }
    if (spec.latency) out->latency_ns.insert(out->latency_ns.end(), o.latency.begin(), o.latency.end());
  }
  out->elapsed_ns = end - start;
}

void run_access_inline(const AccessSpec& spec_in, uint64_t* ops, uint64_t* checksum, uint64_t* mismatches,
                       uint64_t* first_mismatch, int32_t* signal, uint64_t* signal_addr) {
  install_guard();
  AccessSpec spec = spec_in;
  spec.latency = false;
  if (spec.unit < 8) spec.unit = 8;
  if (spec.ops == 0) spec.ops = spec.length / spec.unit ? spec.length / spec.unit : 1;
  ThreadOut out;
  run_range(spec, spec.length / 8 ? spec.length / 8 : 1, 0, spec.ops, spec.seed * 0x9E3779B97F4A7C15ull + 1, &out);
  *ops = out.ops;
  *checksum = out.checksum;
  *mismatches = out.mismatches;
  *first_mismatch = out.first_mismatch;
  *signal = out.signal;
  *signal_addr = out.signal_addr;
}

int guarded_call(void (*fn)(void*), void* arg, uint64_t* bad_addr) {
  install_guard();
  sigjmp_buf jump;
  sigjmp_buf* volatile outer = tl_jump;  // a guarded call may run inside another
  if (sigsetjmp(jump, 0) != 0) {
    tl_jump = outer;
    if (bad_addr) *bad_addr = tl_bad_addr;
    return -EFAULT;
  }
  tl_jump = &jump;
  fn(arg);
  tl_jump = outer;
  return 0;
}

int guarded_copy(void* dst, const void* src, size_t n, uint64_t* bad_addr) {
  // A zero-length typed array may have no storage at all (a null pointer), which memcpy must
  // never be given, even with n == 0.
  if (n == 0) return 0;
  install_guard();
  sigjmp_buf jump;
  if (sigsetjmp(jump, 0) != 0) {
    tl_jump = nullptr;
    if (bad_addr) *bad_addr = tl_bad_addr;
    return -EFAULT;
  }
  tl_jump = &jump;
  std::memcpy(dst, src, n);
  tl_jump = nullptr;
  return 0;
}

}  // namespace pm::sys
