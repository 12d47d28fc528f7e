// runAccess(mapping, offset, length, options) -> Promise<AccessResult>, and the fork helper.
#include <napi.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../sys/access.h"
#include "../sys/fork.h"
#include "../engine/engine.h"
#include "addon.h"
#include "../sys/mem.h"
#include "args.h"
#include "errors.h"
#include "job.h"
#include "mapping.h"

namespace pm {

namespace {

sys::AccessOp ParseOp(Napi::Env env, const std::string& s) {
  if (s == "read") return sys::AccessOp::kRead;
  if (s == "write") return sys::AccessOp::kWrite;
  if (s == "rmw") return sys::AccessOp::kReadModifyWrite;
  if (s == "verify") return sys::AccessOp::kVerify;
  throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "op must be 'read', 'write', 'rmw' or 'verify'");
}

sys::AccessPattern ParsePattern(Napi::Env env, const std::string& s) {
  if (s == "sequential") return sys::AccessPattern::kSequential;
  if (s == "strided") return sys::AccessPattern::kStrided;
  if (s == "random") return sys::AccessPattern::kRandom;
  throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "pattern must be 'sequential', 'strided' or 'random'");
}

struct AccessState {
  sys::AccessSpec spec;
  sys::AccessResult result;
  RegionPin pin;
};

sys::AccessSpec ParseSpec(const Napi::CallbackInfo& info, Mapping* m) {
  Napi::Env env = info.Env();
  uint64_t off = ToU64(info[1], "offset");
  uint64_t len = ToU64(info[2], "length");
  if (len < 8) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "length must be at least 8 bytes");
  // The kernels load and store aligned 8-byte words (atomically for rmw): a misaligned word is
  // undefined behaviour, and one that straddles two pages takes two faults for one access.
  if (off % 8) throw CodedRangeError(env, "ERR_PAGEMIRROR_UNALIGNED", "offset (" + std::to_string(off) + ") must be a multiple of 8: the access kernels use 8-byte words");
  uint64_t addr = m->Range(env, off, len, false);
  Napi::Object o = info.Length() > 3 && info[3].IsObject() ? info[3].As<Napi::Object>() : Napi::Object::New(env);
  sys::AccessSpec s;
  s.base = addr;
  s.length = len;
  s.op = ParseOp(env, OptString(o, "op", "read"));
  s.pattern = ParsePattern(env, OptString(o, "pattern", "sequential"));
  s.unit = OptU64(o, "unit", sys::page_size());
  s.stride = OptU64(o, "stride", 0);
  s.ops = OptU64(o, "ops", 0);
  s.seed = OptU64(o, "seed", 1);
  s.threads = static_cast<unsigned>(OptU64(o, "threads", 1));
  s.latency = OptBool(o, "latency");
  s.barrier = OptBool(o, "barrier", true);
  if (s.threads == 0 || s.threads > 1024) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "threads must be 1..1024");
  if (s.unit < 8 || s.unit % 8) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "unit must be a multiple of 8");
  if (s.stride % 8) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "stride must be a multiple of 8");
  if (s.latency) CheckResultBytes(env, (s.ops ? s.ops : std::max<uint64_t>(1, len / s.unit)) * sizeof(uint32_t), "latency");
  // A SIGSEGV cannot be caught safely inside Node, so accesses the protection forbids are refused
  // here, before any thread starts.
  const bool writes = s.op != sys::AccessOp::kRead && s.op != sys::AccessOp::kVerify;
  if (m->region()->cpu_via_library.load() > 0)
    throw StateError(env, "ERR_PAGEMIRROR_FILE_STRATEGY", "a device holds its own copies of this file's pages (copy or bounce) on a file system userfaultfd cannot register: the CPU's mapping could read stale pages; use the mirror's pread()/pwrite()");
  int prot = m->region()->prot_over(off, len);
  if (!(prot & PROT_READ) && s.op != sys::AccessOp::kWrite)
    ThrowSystemError(env, -EACCES, "access", {nullptr, "the range is not readable (PROT_NONE); the access would SIGSEGV"});
  if (writes && !(prot & PROT_WRITE))
    ThrowSystemError(env, -EACCES, "access", {nullptr, "the range is not writable; the access would SIGSEGV"});
  return s;
}

Napi::Object ResultObject(Napi::Env env, const sys::AccessResult& r) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("ops", static_cast<double>(r.ops));
  o.Set("checksum", Napi::BigInt::New(env, r.checksum));
  o.Set("mismatches", static_cast<double>(r.mismatches));
  if (r.mismatches) o.Set("firstMismatch", static_cast<double>(r.first_mismatch));
  o.Set("elapsedNs", static_cast<double>(r.elapsed_ns));
  if (r.signal) {
    o.Set("signal", "SIGBUS");
    o.Set("signalAddress", Napi::BigInt::New(env, r.signal_addr));
  }
  if (!r.latency_ns.empty()) {
    Napi::Uint32Array lat = Napi::Uint32Array::New(env, r.latency_ns.size());
    std::memcpy(lat.Data(), r.latency_ns.data(), r.latency_ns.size() * sizeof(uint32_t));
    o.Set("latencyNs", lat);
  }
  return o;
}

}  // namespace

Napi::Value RunAccess(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Mapping* m = Mapping::Unwrap(info[0]);
  sys::AccessSpec spec = ParseSpec(info, m);
  auto state = std::unique_ptr<AccessState>(
      new AccessState{spec, {}, RegionPin(m->region(), spec.base - m->region()->addr, spec.length)});
  return NativeJob<AccessState>::Start(
      env, std::move(state), [](AccessState& s) { sys::run_access(s.spec, &s.result); },
      [](Napi::Env env, AccessState& s) -> Napi::Value { return ResultObject(env, s.result); });
}

// forkRun(mapping, offset, length, options) -> Promise<{pid, status, signal, ops, checksum, ...}>
// Node cannot run JavaScript in a forked child, so the child runs a native access kernel on one
// thread (no allocation: a forked child of a threaded parent must not take locks), reports through
// a pipe, and exits. The fork itself happens on a native thread: with EVENT_FORK registered, fork()
// sleeps until the handler reads the event, and the handler may be this very JavaScript thread.
namespace {

// The longest a forked child may sleep before its access (lib/access.ts FORK_DELAY_MAX_MS).
constexpr uint64_t kMaxForkDelayMs = 60'000;

struct ForkState {
  sys::AccessSpec spec;
  RegionPin pin;
  int delay_ms = 0;        // the child sleeps first (lets the parent act while it exists)
  pid_t parent = 0;        // the process that forks, as the child must find it
  pid_t pid = 0;
  int fork_errno = 0;
  int status = 0;
  bool have_report = false;
  struct Report {
    uint64_t ops, checksum, mismatches, first_mismatch, signal_addr;
    int32_t signal;
  } report{};
};

void ChildMain(ForkState& s, int wfd) {
  // The child dies with the thread that forked it (which waits for it until the process ends): a
  // parent that exits or is killed leaves no orphan holding its stdio. A parent already gone
  // before prctl took effect is seen as a new parent process id.
  if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || ::getppid() != s.parent) ::_exit(127);
  if (s.delay_ms) usleep(static_cast<useconds_t>(s.delay_ms) * 1000);
  sys::AccessSpec spec = s.spec;
  spec.threads = 1;
  spec.latency = false;
  ForkState::Report rep{};
  sys::run_access_inline(spec, &rep.ops, &rep.checksum, &rep.mismatches, &rep.first_mismatch, &rep.signal,
                         &rep.signal_addr);
  (void)!::write(wfd, &rep, sizeof rep);
  ::_exit(0);
}

}  // namespace

Napi::Value ForkRun(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Mapping* m = Mapping::Unwrap(info[0]);
  sys::AccessSpec spec = ParseSpec(info, m);
  Napi::Object o = info.Length() > 3 && info[3].IsObject() ? info[3].As<Napi::Object>() : Napi::Object::New(env);
  auto state = std::unique_ptr<ForkState>(
      new ForkState{spec, RegionPin(m->region(), spec.base - m->region()->addr, spec.length)});
  const uint64_t delay = OptU64(o, "delayMs", 0);
  if (delay > kMaxForkDelayMs)
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "delayMs must be at most " + std::to_string(kMaxForkDelayMs) + " (one minute)");
  state->delay_ms = static_cast<int>(delay);
  return NativeJob<ForkState>::Start(
      env, std::move(state),
      [](ForkState& s) {
        // Mirrors first: device-resident pages home, device write access to private pages gone.
        engine::Engine::get().before_fork();
        int p[2];
        if (::pipe2(p, O_CLOEXEC) != 0) {
          s.fork_errno = errno;
          return;
        }
        s.parent = ::getpid();
        // The child's access kernel uses thread-locals (its SIGBUS jump): allocated here, not there.
        sys::prepare_child_tls();
        pid_t pid = ::fork();
        if (pid < 0) {
          s.fork_errno = errno;
          ::close(p[0]);
          ::close(p[1]);
          return;
        }
        if (pid == 0) {
          ::close(p[0]);
          ChildMain(s, p[1]);
        }
        ::close(p[1]);
        s.pid = pid;
        ssize_t n;
        do {
          n = ::read(p[0], &s.report, sizeof s.report);
        } while (n < 0 && errno == EINTR);
        s.have_report = n == static_cast<ssize_t>(sizeof s.report);
        ::close(p[0]);
        while (::waitpid(pid, &s.status, 0) < 0 && errno == EINTR) {
        }
      },
      [](Napi::Env env, ForkState& s) -> Napi::Value {
        if (s.fork_errno) ThrowSystemError(env, -s.fork_errno, "fork");
        Napi::Object o = Napi::Object::New(env);
        o.Set("pid", s.pid);
        if (WIFEXITED(s.status)) o.Set("exitCode", WEXITSTATUS(s.status));
        if (WIFSIGNALED(s.status)) o.Set("termSignal", strsignal(WTERMSIG(s.status)));
        if (s.have_report) {
          o.Set("ops", static_cast<double>(s.report.ops));
          o.Set("checksum", Napi::BigInt::New(env, s.report.checksum));
          o.Set("mismatches", static_cast<double>(s.report.mismatches));
          if (s.report.signal) {
            o.Set("signal", "SIGBUS");
            o.Set("signalAddress", Napi::BigInt::New(env, s.report.signal_addr));
          }
        }
        return o;
      });
}

}  // namespace pm

namespace pm {

// copyAsync(mapping, offset, typedArray, toMapping) -> Promise<bytes>: the library's read()/write()
// for registered memory. The copy runs on a native thread, so a fault it takes is resolved by the
// fault service (or a JavaScript handler) while the main thread stays free.
namespace {
struct CopyState {
  uint64_t mapping_addr;
  uint8_t* data;
  size_t len;
  bool to_mapping;
  RegionPin pin;
  Napi::Reference<Napi::Value> keep;  // the typed array, alive until completion
  int rc = 0;
  uint64_t bad = 0;
};
}  // namespace

Napi::Value CopyAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Mapping* m = Mapping::Unwrap(info[0]);
  uint64_t off = ToU64(info[1], "offset");
  if (info.Length() < 3 || !info[2].IsTypedArray())
    throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "data must be a Uint8Array");
  Napi::TypedArray ta = info[2].As<Napi::TypedArray>();
  bool to_mapping = info.Length() > 3 && info[3].ToBoolean().Value();
  uint64_t len = ta.ByteLength();
  uint64_t addr = m->Range(env, off, len, false);
  if (m->region()->cpu_via_library.load() > 0)
    throw StateError(env, "ERR_PAGEMIRROR_FILE_STRATEGY", "a device holds its own copies of this file's pages (copy or bounce) on a file system userfaultfd cannot register: the CPU's mapping could read stale pages; use the mirror's pread()/pwrite()");
  int prot = m->region()->prot_over(off, len);
  if (!(prot & (to_mapping ? PROT_WRITE : PROT_READ)))
    ThrowSystemError(env, -EACCES, to_mapping ? "write" : "read",
                     {m->region()->path.empty() ? nullptr : m->region()->path.c_str(),
                      to_mapping ? "the range is not writable" : "the range is not readable"});
  auto state = std::unique_ptr<CopyState>(new CopyState{
      addr, static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset(), len, to_mapping,
      RegionPin(m->region(), off, len), Napi::Persistent(static_cast<Napi::Value>(ta))});
  return NativeJob<CopyState>::Start(
      env, std::move(state),
      [](CopyState& s) {
        void* mp = reinterpret_cast<void*>(s.mapping_addr);
        s.rc = s.to_mapping ? sys::guarded_copy(mp, s.data, s.len, &s.bad) : sys::guarded_copy(s.data, mp, s.len, &s.bad);
      },
      [](Napi::Env env, CopyState& s) -> Napi::Value {
        if (s.rc)
          ThrowSystemError(env, s.rc, s.to_mapping ? "write" : "read",
                           {nullptr, "SIGBUS: the page has no backing (file truncated, poisoned, or hugetlb pool exhausted)",
                            -1, s.bad});
        return Napi::Number::New(env, static_cast<double>(s.len));
      });
}

// populateAsync(mapping, offset, length, write) -> Promise<void>: MADV_POPULATE_READ/WRITE on a
// native thread. Populating gigabytes takes seconds, and a populate of registered memory sleeps
// until its faults are served, perhaps by this very JavaScript thread. Registered memory is
// touched from user mode instead, page by page: a user-mode-only userfaultfd (all an unprivileged
// process gets) never sees the faults a populate raises inside the kernel, which then fail.
namespace {
struct PopulateState {
  uint64_t addr, len, page;
  bool write, touch;
  RegionPin pin;
  int rc = 0;
  uint64_t bad = 0;
};

void TouchPages(void* arg) {
  auto& s = *static_cast<PopulateState*>(arg);
  for (uint64_t a = s.addr; a < s.addr + s.len; a += s.page) {
    auto* w = reinterpret_cast<uint64_t*>(a);
    if (s.write) __atomic_fetch_add(w, 0, __ATOMIC_RELAXED);  // a write fault that changes no data, even racing a writer
    else (void)*reinterpret_cast<volatile uint64_t*>(w);
  }
}
}  // namespace

Napi::Value PopulateAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Mapping* m = Mapping::Unwrap(info[0]);
  const uint64_t off = ToU64(info[1], "offset"), len = ToU64(info[2], "length");
  const bool write = info.Length() > 3 && info[3].ToBoolean().Value();
  if (len == 0) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "length must be > 0");
  const uint64_t addr = m->Range(env, off, len);
  Region& r = *m->region();
  const bool touch = r.registered.load() > 0;
  if (touch && !(r.prot_over(off, len) & (write ? PROT_WRITE : PROT_READ)))
    ThrowSystemError(env, -EACCES, "madvise", {nullptr, write ? "the range is not writable" : "the range is not readable"});
  auto state = std::unique_ptr<PopulateState>(
      new PopulateState{addr, len, r.page, write, touch, RegionPin(m->region(), off, len)});
  return NativeJob<PopulateState>::Start(
      env, std::move(state),
      [](PopulateState& s) {
        s.rc = s.touch ? sys::guarded_call(TouchPages, &s, &s.bad)
                       : sys::advise(reinterpret_cast<void*>(s.addr), s.len, s.write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ);
      },
      [](Napi::Env env, PopulateState& s) -> Napi::Value {
        if (s.rc) ThrowSystemError(env, s.rc, "madvise", {nullptr, s.rc == -EFAULT ? "a page could not be made present (PROT_NONE, SIGBUS)" : nullptr});
        return env.Undefined();
      });
}

}  // namespace pm
