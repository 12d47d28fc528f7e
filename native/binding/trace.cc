#include "trace.h"

#include <fcntl.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "../engine/replay.h"
#include "../sys/access.h"
#include "../sys/mem.h"
#include "addon.h"
#include "args.h"
#include "device.h"
#include "errors.h"
#include "job.h"
#include "userfaultfd.h"

namespace pm {

namespace {

// Marks the recorder objects this addon made: setTap() must not unwrap anything else as one.
const napi_type_tag kRecorderTag = {0x706d2d7472616365ull, 0x2d7265636f726472ull};

// /proc/PID/pagemap (0: this process), for PAGEMAP_SCAN on the recorded process's memory.
int OpenPagemap(uint64_t pid, std::string* path) {
  *path = pid ? "/proc/" + std::to_string(pid) + "/pagemap" : "/proc/self/pagemap";
  int fd = ::open(path->c_str(), O_RDONLY | O_CLOEXEC);
  return fd < 0 ? -errno : fd;
}

void CheckRange(Napi::Env env, uint64_t start, uint64_t length, uint64_t page) {
  CheckAligned(env, start, page, "start");
  CheckAligned(env, length, page, "length");
  if (length == 0 || start + length < start) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "a range must be non-empty and inside the address space");
}

uint64_t RangeU64(Napi::Env env, uint64_t v, uint64_t lo, uint64_t hi, const char* name) {
  if (v < lo || v > hi)
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE", std::string(name) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return v;
}

}  // namespace

Napi::Function TraceRecorderWrap::Init(Napi::Env env) {
  return DefineClass(env, "TraceRecorder",
                     {
                         InstanceMethod<&TraceRecorderWrap::Stop>("stop"),
                         InstanceMethod<&TraceRecorderWrap::Stats>("stats"),
                         InstanceMethod<&TraceRecorderWrap::AddRange>("addRange"),
                         InstanceMethod<&TraceRecorderWrap::RemoveRange>("removeRange"),
                         InstanceMethod<&TraceRecorderWrap::WriteRound>("writeRound"),
                     });
}

TraceRecorderWrap::TraceRecorderWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TraceRecorderWrap>(info) {
  Napi::Env env = info.Env();
  Napi::Object o = ArgObject(info, 0, "options");
  engine::RecorderConfig c;
  c.page = sys::page_size();
  Napi::Value rv = o.Get("ranges");
  if (!rv.IsArray()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "ranges must be an array of { start, length }");
  Napi::Array ra = rv.As<Napi::Array>();
  RangeU64(env, ra.Length(), 1, 65535, "ranges.length");
  for (uint32_t i = 0; i < ra.Length(); i++) {
    Napi::Value v = ra.Get(i);
    if (!v.IsObject()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "each range must be an object { start, length }");
    Napi::Object r = v.As<Napi::Object>();
    const uint64_t start = ToU64(r.Get("start"), "start"), length = ToU64(r.Get("length"), "length");
    CheckRange(env, start, length, c.page);
    c.ranges.push_back({start, length});
  }
  c.path = OptString(o, "path");
  if (c.path.empty() || c.path.find('\0') != std::string::npos)
    throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "path must be a non-empty file name without NUL bytes");
  c.header = OptString(o, "header", "{}");
  c.rings = static_cast<unsigned>(RangeU64(env, OptU64(o, "rings", 1), 1, sys::FaultService::kMaxWorkers, "rings"));
  c.ring_capacity = RangeU64(env, OptU64(o, "ringCapacity", 1 << 16), 16, 1 << 24, "ringCapacity");
  c.sample_interval_ms = RangeU64(env, OptU64(o, "sampleIntervalMs", 0), 0, 3600000, "sampleIntervalMs");
  c.write_rounds = OptBool(o, "writeRounds");
  if (c.write_rounds && c.sample_interval_ms)
    throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "a recorder samples with write rounds or with PAGEMAP_SCAN, not both (writeRounds with sampleIntervalMs)");
  const uint64_t pid = RangeU64(env, OptU64(o, "pid", 0), 0, 4194304, "pid");
  if (c.sample_interval_ms) {
    std::string pm_path;
    c.pagemap_fd = OpenPagemap(pid, &pm_path);
    if (c.pagemap_fd < 0) throw SystemError(env, c.pagemap_fd, "open", {pm_path.c_str(), "sampling needs the recorded process's pagemap"});
  }
  c.start_ns = sys::now_ns();
  const std::string path = c.path;
  auto rec = std::make_shared<engine::TraceRecorder>(std::move(c));  // owns the pagemap fd now
  const char* call = "open";
  int rc = rec->start(&call);
  if (rc) throw SystemError(env, rc, call, {path.c_str(), rc == -EINVAL ? "a trace is written to a regular file" : nullptr});
  recorder_ = std::move(rec);
  info.This().As<Napi::Object>().TypeTag(&kRecorderTag);
}

TraceRecorderWrap::~TraceRecorderWrap() = default;  // the recorder stops when its last holder lets go

std::shared_ptr<engine::TraceRecorder> TraceRecorderWrap::From(Napi::Value v) {
  if (!v.IsObject() || !v.As<Napi::Object>().CheckTypeTag(&kRecorderTag))
    throw CodedTypeError(v.Env(), "ERR_INVALID_ARG_TYPE", "expected a TraceRecorder");
  return Unwrap(v.As<Napi::Object>())->recorder_;
}

namespace {

Napi::Object StatsObject(Napi::Env env, const engine::RecorderStats& s) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("records", static_cast<double>(s.records));
  o.Set("faults", static_cast<double>(s.faults));
  o.Set("samples", static_cast<double>(s.samples));
  o.Set("sampleRuns", static_cast<double>(s.sample_runs));
  o.Set("dropped", static_cast<double>(s.dropped));
  o.Set("ignored", static_cast<double>(s.ignored));
  o.Set("bytes", static_cast<double>(s.bytes));
  o.Set("writerCpuNs", static_cast<double>(s.writer_cpu_ns));
  o.Set("sampleNs", static_cast<double>(s.sample_ns));
  o.Set("tapNs", static_cast<double>(s.tap_ns));
  o.Set("tapped", static_cast<double>(s.tapped));
  o.Set("ranges", static_cast<double>(s.ranges));
  o.Set("rangesRefused", static_cast<double>(s.ranges_refused));
  return o;
}


}  // namespace

Napi::Value TraceRecorderWrap::Stop(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!recorder_) throw StateError(env, "ERR_PAGEMIRROR_CLOSED", "the recorder is stopped");
  engine::RecorderStats s = recorder_->stop();
  if (s.error)
    throw SystemError(env, s.error, s.error_call,
                      {recorder_->config().path.c_str(), "the trace is incomplete: it ends where the error happened"});
  return StatsObject(env, s);
}

Napi::Value TraceRecorderWrap::Stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!recorder_) throw StateError(env, "ERR_PAGEMIRROR_CLOSED", "the recorder is stopped");
  return StatsObject(env, recorder_->stats());
}

Napi::Value TraceRecorderWrap::AddRange(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = ArgObject(info, 0, "range");
  const uint64_t start = ToU64(o.Get("start"), "start"), length = ToU64(o.Get("length"), "length");
  CheckRange(env, start, length, sys::page_size());
  const uint64_t modes = RangeU64(env, OptU64(o, "modes", 0), 0, engine::kRangeModesMask, "modes");
  engine::TraceRange r{start, length, static_cast<uint8_t>(modes | (OptBool(o, "shared") ? engine::kRangeShared : 0))};
  const int rc = recorder_->add_range(r);
  if (rc == -ESHUTDOWN) throw StateError(env, "ERR_PAGEMIRROR_CLOSED", "the recorder is stopped");
  if (rc < 0) {
    const char* hint = rc == -EEXIST ? "the range overlaps one recorded now" : rc == -ENOSPC ? "a trace names at most 65535 ranges" : nullptr;
    ThrowSystemError(env, rc, "addRange", {recorder_->config().path.c_str(), hint});
  }
  return Napi::Number::New(env, rc);
}

Napi::Value TraceRecorderWrap::RemoveRange(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const uint64_t index = RangeU64(env, ToU64(info[0], "index"), 0, engine::kMaxTraceRanges - 1, "index");
  const int rc = recorder_->remove_index(static_cast<uint32_t>(index));
  if (rc == -ESHUTDOWN) throw StateError(env, "ERR_PAGEMIRROR_CLOSED", "the recorder is stopped");
  if (rc == -ENOENT) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "range " + std::to_string(index) + " is not recorded now (never added, or removed already)");
  if (rc < 0) ThrowSystemError(env, rc, "removeRange", {recorder_->config().path.c_str(), nullptr});
  return env.Undefined();
}

Napi::Value TraceRecorderWrap::WriteRound(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int rc = recorder_->write_round();
  if (rc == -ESHUTDOWN) throw StateError(env, "ERR_PAGEMIRROR_CLOSED", "the recorder is stopped");
  if (rc == -EINVAL) throw StateError(env, "ERR_INVALID_STATE", "this recorder samples no write rounds (record with sampling: 'wp-rounds')");
  if (rc < 0) ThrowSystemError(env, rc, "writeRound", {recorder_->config().path.c_str(), nullptr});
  return env.Undefined();
}

Napi::Value ProbeTraceSampling(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const uint64_t page = sys::page_size();
  const uint64_t start = ToU64(info[0], "start"), length = ToU64(info[1], "length");
  const uint64_t pid = RangeU64(env, ToU64(info[2], "pid"), 0, 4194304, "pid");
  CheckAligned(env, start, page, "start");
  CheckAligned(env, length, page, "length");
  if (length == 0 || start + length < start) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "the range must be non-empty");
  std::string path;
  int fd = OpenPagemap(pid, &path);
  if (fd < 0) return Napi::Number::New(env, fd);
  int rc = engine::probe_written_sampling(fd, start, length);
  ::close(fd);
  return Napi::Number::New(env, rc);
}

// setTap(recorder | null): every fault the service reads is shown to the recorder first.
Napi::Value Userfaultfd::SetTap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int fd = live_fd(env);
  std::shared_ptr<engine::TraceRecorder> rec;
  if (info.Length() > 0 && !info[0].IsNull() && !info[0].IsUndefined()) rec = TraceRecorderWrap::From(info[0]);
  if (!service_) service_ = std::make_unique<sys::FaultService>(fd, sys::page_size());
  service_->set_tap(std::move(rec));
  return env.Undefined();
}

// ---- Replay ------------------------------------------------------------------------------------

namespace {

struct ReplayJob {
  std::shared_ptr<engine::Device> device;
  std::shared_ptr<engine::Mirror> mirror;
  std::vector<uint64_t> pages;
  std::vector<uint8_t> ops;
  engine::ReplaySpec spec;
  engine::ReplayResult result;
};

Napi::Object TriggerCounts(Napi::Env env, const uint64_t* by) {
  Napi::Object o = Napi::Object::New(env);
  for (unsigned k = 0; k < static_cast<unsigned>(engine::Trigger::kCount); k++)
    o.Set(engine::TriggerName(static_cast<engine::Trigger>(k)), static_cast<double>(by[k]));
  return o;
}

}  // namespace

// replay(pages: Float64Array, ops: Uint8Array, { threads, window, seed }) -> Promise<result>
Napi::Value MirrorWrap::Replay(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  if (info.Length() < 2 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array ||
      !info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
    throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "replay needs pages (a Float64Array) and ops (a Uint8Array)");
  Napi::Float64Array pa = info[0].As<Napi::Float64Array>();
  Napi::Uint8Array oa = info[1].As<Napi::Uint8Array>();
  if (pa.ElementLength() != oa.ElementLength()) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "pages and ops must have the same length");
  Napi::Object o = info.Length() > 2 && info[2].IsObject() ? info[2].As<Napi::Object>() : Napi::Object::New(env);
  auto job = std::unique_ptr<ReplayJob>(new ReplayJob{device_, m, {}, {}, {}, {}});
  // Access pages are base pages; a hugetlb mirror has one entry per huge page.
  const uint64_t ratio = m->page() / sys::page_size(), total = m->npages() * ratio;
  Allocating(env, "replay", [&] {
    job->pages.resize(pa.ElementLength());
    job->ops.assign(oa.Data(), oa.Data() + oa.ElementLength());
  });
  for (size_t i = 0; i < pa.ElementLength(); i++) {
    const double p = pa[i];
    if (!(p >= 0) || p >= static_cast<double>(total) || p != static_cast<double>(static_cast<uint64_t>(p)))
      throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "access " + std::to_string(i) + " is outside the mirror's " + std::to_string(total) + " pages");
    job->pages[i] = static_cast<uint64_t>(p) / ratio;
  }
  engine::ReplaySpec& s = job->spec;
  s.mirror = m.get();
  s.pages = job->pages.data();
  s.ops = job->ops.data();
  s.count = job->pages.size();
  s.threads = static_cast<unsigned>(RangeU64(env, OptU64(o, "threads", 1), 1, 64, "threads"));
  s.window = RangeU64(env, OptU64(o, "window", 0), 0, 1 << 20, "window");
  s.seed = OptU64(o, "seed", 1);
  return NativeJob<ReplayJob>::Start(
      env, std::move(job), [](ReplayJob& j) { engine::replay(*j.device, j.spec, &j.result); },
      [](Napi::Env env, ReplayJob& j) -> Napi::Value {
        const engine::ReplayResult& r = j.result;
        if (r.error) {
          Napi::Error err = SystemError(env, r.error, "device fault",
                                        {nullptr, r.error == -ENODEV ? "the device was closed" : "a replayed access could not be made present"});
          err.Value().Set("access", static_cast<double>(r.error_index));
          throw err;
        }
        Napi::Object o = Napi::Object::New(env);
        o.Set("accesses", static_cast<double>(r.accesses));
        o.Set("hits", static_cast<double>(r.hits));
        o.Set("misses", static_cast<double>(r.misses));
        o.Set("refaults", static_cast<double>(r.refaults));
        o.Set("windows", static_cast<double>(r.windows));
        o.Set("deviceFaults", static_cast<double>(r.fault_requests));
        o.Set("faultRounds", static_cast<double>(r.fault_rounds));
        o.Set("faultedPages", static_cast<double>(r.faulted_pages));
        o.Set("prefetchedPages", static_cast<double>(r.prefetched_pages));
        o.Set("invalidatedPages", static_cast<double>(r.invalidated_pages));
        o.Set("toDevice", TriggerCounts(env, r.to_device));
        o.Set("toHost", TriggerCounts(env, r.to_host));
        o.Set("checksum", Napi::BigInt::New(env, r.checksum));
        o.Set("hostNs", static_cast<double>(r.elapsed_ns));
        if (j.device->link()) SetModeledTime(o, r);
        return o;
      });
}

}  // namespace pm
