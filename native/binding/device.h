// Device and Mirror objects for JavaScript: thin wrappers over native/engine.
#pragma once

#include <napi.h>

#include <memory>

#include "../engine/device.h"
#include "../engine/migrate.h"
#include "../engine/mirror.h"

namespace pm {

class DeviceWrap : public Napi::ObjectWrap<DeviceWrap> {
 public:
  static Napi::Function Init(Napi::Env env);
  static Napi::Value Create(const Napi::CallbackInfo& info);
  explicit DeviceWrap(const Napi::CallbackInfo& info);
  ~DeviceWrap() override;
  std::shared_ptr<engine::Device> device(Napi::Env env);

 private:
  Napi::Value Mirror(const Napi::CallbackInfo& info);
  Napi::Value Counters(const Napi::CallbackInfo& info);
  Napi::Value Memory(const Napi::CallbackInfo& info);
  Napi::Value Release(const Napi::CallbackInfo& info);
  Napi::Value DrainTrace(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  Napi::Value FileRead(const Napi::CallbackInfo& info);
  Napi::Value FileWrite(const Napi::CallbackInfo& info);
  Napi::Value Writeback(const Napi::CallbackInfo& info);
  Napi::Value FileStats(const Napi::CallbackInfo& info);
  Napi::Value TakeLease(const Napi::CallbackInfo& info);
  std::shared_ptr<engine::Device> device_;
  bool closed_ = false;
};

class MirrorWrap : public Napi::ObjectWrap<MirrorWrap> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit MirrorWrap(const Napi::CallbackInfo& info);
  ~MirrorWrap() override;

 private:
  std::shared_ptr<engine::Mirror> live(Napi::Env env);
  Napi::Value Run(const Napi::CallbackInfo& info);
  Napi::Value Replay(const Napi::CallbackInfo& info);  // native/binding/trace.cc
  Napi::Value Read(const Napi::CallbackInfo& info);
  Napi::Value Write(const Napi::CallbackInfo& info);
  Napi::Value Entries(const Napi::CallbackInfo& info);
  Napi::Value MigrateToDevice(const Napi::CallbackInfo& info);
  Napi::Value MigrateToHost(const Napi::CallbackInfo& info);
  Napi::Value Snapshot(const Napi::CallbackInfo& info);
  Napi::Value Exclusive(const Napi::CallbackInfo& info);
  Napi::Value Info(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  Napi::Value FileRead(const Napi::CallbackInfo& info);
  Napi::Value FileWrite(const Napi::CallbackInfo& info);
  Napi::Value Writeback(const Napi::CallbackInfo& info);
  Napi::Value FileStats(const Napi::CallbackInfo& info);
  Napi::Value TakeLease(const Napi::CallbackInfo& info);
  Napi::Value AcknowledgeLoss(const Napi::CallbackInfo& info);
  std::shared_ptr<engine::Device> device_;
  std::shared_ptr<engine::Mirror> mirror_;
};

// A loss of data the library cannot write again (FileMirror: ERR_PAGEMIRROR_DATA_LOST).
Napi::Error DataLostError(Napi::Env env, const engine::Mirror& m, const engine::WriteErrorReport& loss);

// The link model's fields of a device kernel's or a trace replay's result (docs/link-model.md),
// set only when the device has a link.
template <class Result>
void SetModeledTime(Napi::Object o, const Result& r) {
  o.Set("modeledNs", static_cast<double>(r.modeled_ns));
  o.Set("modeledFaultNs", static_cast<double>(r.modeled_fault_ns));
  o.Set("modeledRemoteNs", static_cast<double>(r.modeled_remote_ns));
  o.Set("remoteAccesses", static_cast<double>(r.remote_accesses));
  o.Set("remoteBytes", static_cast<double>(r.remote_bytes));
}

}  // namespace pm
