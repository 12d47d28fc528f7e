#include "service.h"

#include <algorithm>
#include <string>

#include "../engine/engine.h"
#include "args.h"
#include "errors.h"

namespace pm {

ServiceConfig ConfigArgs(const Napi::CallbackInfo& info, size_t i, bool with_batch) {
  Napi::Env env = info.Env();
  ServiceConfig c;
  // Slot k of (maxBatch, workers, pollMode, spinUs); without maxBatch the others move up one.
  auto at = [&](size_t k) { return info[i + k - (with_batch ? 0 : 1)]; };
  auto given = [&](size_t k) { return (with_batch || k > 0) && info.Length() > i + k - (with_batch ? 0 : 1) && !at(k).IsUndefined(); };
  if (given(0)) c.max_batch = static_cast<unsigned>(std::min<uint64_t>(ToU64(at(0), "maxBatch"), 4096));
  if (given(1)) {
    const uint64_t w = ToU64(at(1), "workers");
    if (w < 1 || w > sys::FaultService::kMaxWorkers)
      throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "workers must be 1.." + std::to_string(sys::FaultService::kMaxWorkers));
    c.workers = static_cast<unsigned>(w);
  }
  if (given(2)) {
    const std::string mode = at(2).IsString() ? at(2).As<Napi::String>().Utf8Value() : "";
    if (mode == "off") c.poll.mode = sys::PollMode::kOff;
    else if (mode == "fixed") c.poll.mode = sys::PollMode::kFixed;
    else if (mode == "adaptive") c.poll.mode = sys::PollMode::kAdaptive;
    else throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "poll mode must be 'off', 'fixed' or 'adaptive'");
  }
  if (given(3)) {
    const uint64_t us = ToU64(at(3), "spinUs");
    if (us > sys::FaultService::kMaxSpinUs)
      throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "spinUs must be 0.." + std::to_string(sys::FaultService::kMaxSpinUs));
    c.poll.spin_us = static_cast<uint32_t>(us);
  }
  return c;
}

void SetPollStats(Napi::Object o, const sys::ServiceStats& s) {
  o.Set("cpuNs", static_cast<double>(s.cpu_ns));
  o.Set("spinNs", static_cast<double>(s.spin_ns));
  o.Set("spinHits", static_cast<double>(s.spin_hits));
  o.Set("sleeps", static_cast<double>(s.sleeps));
  o.Set("spinBudgetNs", static_cast<double>(s.spin_budget_ns));
}

Napi::Array WorkerStats(Napi::Env env, const std::vector<sys::ServiceStats>& ws) {
  Napi::Array per = Napi::Array::New(env, ws.size());
  for (size_t i = 0; i < ws.size(); i++) {
    Napi::Object w = Napi::Object::New(env);
    w.Set("reads", static_cast<double>(ws[i].reads));
    w.Set("faults", static_cast<double>(ws[i].faults));
    w.Set("fastResolved", static_cast<double>(ws[i].fast_resolved));
    w.Set("forwarded", static_cast<double>(ws[i].forwarded));
    w.Set("tid", ws[i].tid);
    SetPollStats(w, ws[i]);
    per.Set(static_cast<uint32_t>(i), w);
  }
  return per;
}

Napi::Value ConfigureEngine(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const ServiceConfig c = ConfigArgs(info, 0, false);
  int rc = engine::Engine::get().configure(c.workers, c.poll);
  if (rc) ThrowSystemError(env, rc, "pthread_create", {nullptr, "the engine's fault service could not start its workers"});
  return env.Undefined();
}

Napi::Value EngineStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  engine::Engine& e = engine::Engine::get();
  const sys::ServiceStats s = e.stats();
  Napi::Object o = Napi::Object::New(env);
  o.Set("faults", static_cast<double>(s.faults));
  o.Set("reads", static_cast<double>(s.reads));
  o.Set("batches", static_cast<double>(s.batches));
  o.Set("maxBatch", static_cast<double>(s.max_batch));
  SetPollStats(o, s);
  o.Set("workerCount", e.workers());
  o.Set("workers", WorkerStats(env, e.worker_stats()));
  return o;
}

}  // namespace pm
