// Access traces for JavaScript: the recorder (a tap on a Userfaultfd's fault service, writing a
// trace file) and the replay of a trace through a Mirror (MirrorWrap::Replay).
#pragma once

#include <napi.h>

#include <memory>

#include "../engine/trace_recorder.h"

namespace pm {

class TraceRecorderWrap : public Napi::ObjectWrap<TraceRecorderWrap> {
 public:
  static Napi::Function Init(Napi::Env env);
  // new TraceRecorder({ ranges: [{ start: bigint, length }], path, header, rings, ringCapacity,
  // sampleIntervalMs, pid }): opens the file, writes the header and starts the writer thread.
  explicit TraceRecorderWrap(const Napi::CallbackInfo& info);
  ~TraceRecorderWrap() override;
  // The recorder of a value JavaScript passed (type-tagged), or a TypeError.
  static std::shared_ptr<engine::TraceRecorder> From(Napi::Value v);

 private:
  Napi::Value Stop(const Napi::CallbackInfo& info);
  Napi::Value Stats(const Napi::CallbackInfo& info);
  // addRange({ start: bigint, length, modes?, shared? }) -> index; removeRange(index).
  Napi::Value AddRange(const Napi::CallbackInfo& info);
  Napi::Value RemoveRange(const Napi::CallbackInfo& info);
  Napi::Value WriteRound(const Napi::CallbackInfo& info);
  std::shared_ptr<engine::TraceRecorder> recorder_;
};

// probeTraceSampling(start: bigint, length, pid) -> 0 or -errno: whether PAGEMAP_SCAN can report
// the written pages of the range (uffd-wp with WP_ASYNC), without changing anything.
Napi::Value ProbeTraceSampling(const Napi::CallbackInfo& info);

}  // namespace pm
