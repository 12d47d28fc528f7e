// The fault service's settings and counters as JavaScript sees them, for a Userfaultfd's service
// and for the engine's CPU-fault service alike.
#pragma once

#include <napi.h>

#include "../sys/fault_service.h"

namespace pm {

struct ServiceConfig {
  unsigned max_batch = 64, workers = 1;
  sys::PollOptions poll;
};
// (maxBatch, workers, pollMode, spinUs) from info[i] on (without maxBatch when !with_batch), each
// optional (undefined: the default); checked whole before anything starts: RangeError
// ERR_OUT_OF_RANGE, TypeError ERR_INVALID_ARG_VALUE.
ServiceConfig ConfigArgs(const Napi::CallbackInfo& info, size_t i, bool with_batch = true);
// The polling counters (cpuNs, spinNs, spinHits, sleeps, spinBudgetNs) set on o.
void SetPollStats(Napi::Object o, const sys::ServiceStats& s);
// {reads, faults, fastResolved, forwarded, cpuNs, ...} per worker.
Napi::Array WorkerStats(Napi::Env env, const std::vector<sys::ServiceStats>& ws);

// configureEngine(workers?, pollMode?, spinUs?) and engineStats(): the engine's CPU-fault service.
Napi::Value ConfigureEngine(const Napi::CallbackInfo& info);
Napi::Value EngineStats(const Napi::CallbackInfo& info);

}  // namespace pm
