// forkDevice(mapping, offset, length, steps, {memory, timeoutMs}) -> Promise<{pid, exitCode,
// steps, counters}>: a device kernel sequence in a forked child (native/engine/fork_device.h). The
// fork happens on a native thread: with EVENT_FORK registered on a user's userfaultfd, fork()
// sleeps until that handler (maybe this JavaScript thread) reads the event.
#include <napi.h>

#include <cerrno>
#include <cstring>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include "../engine/engine.h"
#include "../engine/fork_device.h"
#include "../sys/fork.h"
#include "../sys/pagemap.h"
#include "args.h"
#include "errors.h"
#include "job.h"
#include "mapping.h"

namespace pm {

namespace {

struct ForkDeviceState {
  engine::ForkPlan plan;
  RegionPin pin;
  int timeout_ms = 10000;
  int rc = 0;
  sys::ForkOutcome outcome;
  std::vector<uint8_t> out;
};

// Indexed by engine::ForkOp.
const char* const kForkOps[] = {"read", "write", "verify", "migrate", "migrate-back", "cpu-read", "cpu-write", "cpu-verify"};

engine::ForkOp ParseForkOp(Napi::Env env, const std::string& s) {
  for (unsigned k = 0; k < sizeof kForkOps / sizeof *kForkOps; k++)
    if (s == kForkOps[k]) return static_cast<engine::ForkOp>(k);
  throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE",
                       "op must be 'read', 'write', 'verify', 'migrate', 'migrate-back', 'cpu-read', 'cpu-write' or 'cpu-verify'");
}

const char* StepHint(engine::ForkOp op, int error) {
  switch (error) {
    case -EPERM: return "the range is not writable";
    case -EFAULT: return op >= engine::ForkOp::kCpuRead ? "an access met a SIGBUS nobody could resolve" : "no mapping, PROT_NONE, or a SIGBUS";
    case -EINVAL: return "a page in the range has no access (PROT_NONE) or is hugetlb";
    case -ENOENT: return "no page of the range could move (see skipped)";
    case -EBUSY: return "the range is registered with another userfaultfd (one with EVENT_FORK follows the fork)";
    default: return nullptr;
  }
}

Napi::Object StepObject(Napi::Env env, const engine::ForkPlan& plan, const engine::ForkStepReport& r) {
  const engine::ForkStep& s = plan.steps[r.index];
  Napi::Object o = Napi::Object::New(env);
  o.Set("op", kForkOps[static_cast<unsigned>(s.op)]);
  o.Set("offset", static_cast<double>(s.first * plan.page));
  o.Set("npages", static_cast<double>(s.npages));
  o.Set("checksum", Napi::BigInt::New(env, r.checksum));
  o.Set("mismatches", static_cast<double>(r.mismatches));
  o.Set("faults", static_cast<double>(r.faults));
  o.Set("cpages", static_cast<double>(r.cpages));
  o.Set("moved", static_cast<double>(r.moved));
  o.Set("byMove", static_cast<double>(r.by_move));
  o.Set("byCopy", static_cast<double>(r.by_copy));
  o.Set("zeroFilled", static_cast<double>(r.zero_filled));
  o.Set("cpuFaults", static_cast<double>(r.cpu_faults));
  Napi::Object skipped = Napi::Object::New(env);
  static const char* const reasons[] = {"none", "shared", "file-backed", "dax", "other-device", "device-memory-full", "pinned", "error", "userfaultfd-unsupported"};
  for (unsigned k = 1; k < sizeof reasons / sizeof *reasons; k++)
    if (r.skipped[k]) skipped.Set(reasons[k], static_cast<double>(r.skipped[k]));
  o.Set("skipped", skipped);
  o.Set("elapsedNs", static_cast<double>(r.elapsed_ns));
  if (r.error) {
    Napi::Error err = SystemError(env, r.error, "forkRun", {nullptr, StepHint(s.op, r.error)});
    err.Value().Set("step", static_cast<double>(r.index));
    err.Value().Set("page", static_cast<double>(r.error_page));
    o.Set("error", err.Value());
  }
  return o;
}

}  // namespace

Napi::Value ForkDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Mapping* m = Mapping::Unwrap(info[0]);
  const std::shared_ptr<Region> region = m->region();
  const uint64_t page = region->page;
  const uint64_t off = ToU64(info[1], "offset"), len = ToU64(info[2], "length");
  CheckAligned(env, off, page, "offset");
  CheckAligned(env, len, page, "length");
  if (len == 0) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "length must be > 0");
  const uint64_t addr = m->Range(env, off, len);
  if (info.Length() < 4 || !info[3].IsArray()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "steps must be an array");
  Napi::Array steps = info[3].As<Napi::Array>();
  if (steps.Length() == 0 || steps.Length() > 4096) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "steps must hold 1..4096 steps");
  Napi::Object o = ArgObject(info, 4, "options");
  auto state = std::unique_ptr<ForkDeviceState>(new ForkDeviceState{{}, RegionPin(region, off, len)});
  engine::ForkPlan& plan = state->plan;
  plan.start = addr;
  plan.page = page;
  plan.npages = len / page;
  plan.shared = region->shared;
  plan.private_file = region->kind != RegionKind::kAnonymous && !region->shared;
  uint64_t fs = 0;
  plan.private_shmem = plan.private_file && (region->kind == RegionKind::kMemfd || (sys::fs_type_fd(region->fd, &fs) == 0 && fs == TMPFS_MAGIC));
  plan.hugetlb = region->hugetlb;
  const uint64_t memory = OptU64(o, "memory", 64ull << 20);
  if (memory < page) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "memory must be at least one page");
  plan.slots = std::min<uint64_t>(memory / page, 1ull << 24);
  const uint64_t timeout = OptU64(o, "timeoutMs", 10000);
  if (timeout == 0 || timeout > 600000) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "timeoutMs must be 1..600000");
  state->timeout_ms = static_cast<int>(timeout);
  for (uint32_t k = 0; k < steps.Length(); k++) {
    Napi::Value v = steps.Get(k);
    if (!v.IsObject()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "steps[" + std::to_string(k) + "] must be an object");
    Napi::Object so = v.As<Napi::Object>();
    engine::ForkStep s;
    s.op = ParseForkOp(env, OptString(so, "op", ""));
    const uint64_t soff = OptU64(so, "offset", 0);
    CheckAligned(env, soff, page, "step offset");
    s.first = soff / page;
    if (s.first >= plan.npages) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "steps[" + std::to_string(k) + "].offset lies outside the range");
    s.npages = OptU64(so, "npages", plan.npages - s.first);
    if (s.npages == 0 || s.npages > plan.npages - s.first)
      throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "steps[" + std::to_string(k) + "] covers pages outside the range of " + std::to_string(plan.npages) + " pages");
    s.seed = OptU64(so, "seed", 1);
    s.prot = region->prot_over(off + s.first * page, s.npages * page);
    // The child's own CPU would take a SIGSEGV (refused before the fork, as access() does); the
    // device's accesses answer EFAULT/EPERM in the child, as the kernel's device does.
    const bool cpu_write = s.op == engine::ForkOp::kCpuWrite;
    if (s.op >= engine::ForkOp::kCpuRead && !(s.prot & (cpu_write ? PROT_WRITE : PROT_READ)))
      ThrowSystemError(env, -EACCES, "forkRun", {nullptr, cpu_write ? "a cpu-write step over a range that is not writable would SIGSEGV"
                                                                      : "a CPU step over a range that is not readable would SIGSEGV"});
    plan.steps.push_back(s);
  }
  engine::fork_plan_prepare(&plan);
  return NativeJob<ForkDeviceState>::Start(
      env, std::move(state),
      [](ForkDeviceState& s) {
        // The parent's mirrors first: device-resident pages home (the child must see the data),
        // device write access to private pages gone (they become copy-on-write).
        engine::Engine::get().before_fork();
        s.rc = sys::fork_collect(engine::fork_device_main, &s.plan, s.timeout_ms, &s.out, &s.outcome);
      },
      [](Napi::Env env, ForkDeviceState& s) -> Napi::Value {
        if (s.rc) ThrowSystemError(env, s.rc, "fork");
        const size_t n = std::min(s.out.size() / sizeof(engine::ForkStepReport), s.plan.steps.size());
        Napi::Array steps = Napi::Array::New(env, n);
        for (size_t k = 0; k < n; k++) {
          engine::ForkStepReport r;
          std::memcpy(&r, s.out.data() + k * sizeof r, sizeof r);
          if (r.index >= s.plan.steps.size()) break;
          steps.Set(static_cast<uint32_t>(k), StepObject(env, s.plan, r));
        }
        if (s.outcome.timed_out) {
          Napi::Error err = SystemError(env, -ETIMEDOUT, "forkRun",
                                        {nullptr, "the child did not finish within timeoutMs and was killed; err.steps holds the steps it finished"});
          err.Value().Set("pid", s.outcome.pid);
          err.Value().Set("steps", steps);
          throw err;
        }
        Napi::Object o = Napi::Object::New(env);
        o.Set("pid", s.outcome.pid);
        if (WIFEXITED(s.outcome.status)) o.Set("exitCode", WEXITSTATUS(s.outcome.status));
        if (WIFSIGNALED(s.outcome.status)) o.Set("termSignal", strsignal(WTERMSIG(s.outcome.status)));
        o.Set("steps", steps);
        const size_t tail = n * sizeof(engine::ForkStepReport);
        if (n == s.plan.steps.size() && s.out.size() >= tail + sizeof(engine::ForkCounters)) {
          engine::ForkCounters c;
          std::memcpy(&c, s.out.data() + tail, sizeof c);
          Napi::Object co = Napi::Object::New(env);
          co.Set("faultRounds", static_cast<double>(c.fault_rounds));
          co.Set("faultedPages", static_cast<double>(c.faulted_pages));
          co.Set("migratedToDevice", static_cast<double>(c.to_device));
          Napi::Object home = Napi::Object::New(env);
          home.Set("explicit", static_cast<double>(c.to_host_explicit));
          home.Set("cpu-fault", static_cast<double>(c.to_host_cpu_fault));
          co.Set("migratedToHost", home);
          o.Set("counters", co);
        }
        return o;
      });
}

}  // namespace pm
