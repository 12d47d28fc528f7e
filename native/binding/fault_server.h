// The fault server for JavaScript: a thin wrapper over native/engine/fault_server. Events reach
// JavaScript through a uv_async_t; each client is one RemoteClientWrap for its whole life.
#pragma once

#include <napi.h>
#include <uv.h>

#include <map>
#include <memory>

#include "../engine/fault_server.h"

namespace pm {

class RemoteClientWrap : public Napi::ObjectWrap<RemoteClientWrap> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit RemoteClientWrap(const Napi::CallbackInfo& info);
  std::shared_ptr<engine::RemoteClient> client;

 private:
  Napi::Value Info(const Napi::CallbackInfo& info);
  Napi::Value Evict(const Napi::CallbackInfo& info);
  Napi::Value WriteProtect(const Napi::CallbackInfo& info);
  Napi::Value Configure(const Napi::CallbackInfo& info);
  Napi::Value TakeTouches(const Napi::CallbackInfo& info);
  Napi::Value Counters(const Napi::CallbackInfo& info);
  Napi::Value Release(const Napi::CallbackInfo& info);
  // setRecorder(recorder | null): the recorder's ranges follow the client's registrations.
  Napi::Value SetRecorder(const Napi::CallbackInfo& info);
};

// Whether v is a RemoteClientWrap, and its default policy as a handler rule's resolver.
bool IsRemoteClient(Napi::Value v);
std::shared_ptr<sys::FaultHandler> RemoteClientHandler(Napi::Value v);

class FaultServerWrap : public Napi::ObjectWrap<FaultServerWrap> {
 public:
  static Napi::Function Init(Napi::Env env);
  // listenFaultServer(path, allowUids: number[] | undefined, maxClients, callback(events))
  static Napi::Value Listen(const Napi::CallbackInfo& info);
  explicit FaultServerWrap(const Napi::CallbackInfo& info);
  ~FaultServerWrap() override;

 private:
  Napi::Value Drop(const Napi::CallbackInfo& info);
  Napi::Value Stats(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  static void OnAsync(uv_async_t* handle);
  static void Cleanup(void* arg);
  void Shutdown();

  std::unique_ptr<engine::FaultServer> server_;
  uv_async_t* async_ = nullptr;
  Napi::FunctionReference callback_;
  std::map<uint64_t, Napi::ObjectReference> clients_;
  napi_env env_ = nullptr;
  bool self_ref_ = false;
};

}  // namespace pm
