#include "fault_server.h"
#include "trace.h"

#include <cerrno>
#include <cstring>

#include "addon.h"
#include "args.h"
#include "errors.h"

namespace pm {

namespace {

Napi::FunctionReference* remote_ctor(Napi::Env env) { return &env.GetInstanceData<AddonData>()->remote_client_ctor; }
Napi::FunctionReference* server_ctor(Napi::Env env) { return &env.GetInstanceData<AddonData>()->fault_server_ctor; }

const char* Name(engine::ServerEvent::Kind k) {
  switch (k) {
    case engine::ServerEvent::kRegister: return "register";
    case engine::ServerEvent::kUnregister: return "unregister";
    case engine::ServerEvent::kClosed: return "closed";
  }
  return "unknown";
}

}  // namespace

// ---- RemoteClientWrap ----

Napi::Function RemoteClientWrap::Init(Napi::Env env) {
  Napi::Function f = DefineClass(env, "RemoteClient",
                                 {
                                     InstanceMethod<&RemoteClientWrap::Info>("info"),
                                     InstanceMethod<&RemoteClientWrap::Evict>("evict"),
                                     InstanceMethod<&RemoteClientWrap::WriteProtect>("writeProtect"),
                                     InstanceMethod<&RemoteClientWrap::Configure>("configure"),
                                     InstanceMethod<&RemoteClientWrap::TakeTouches>("takeTouches"),
                                     InstanceMethod<&RemoteClientWrap::Counters>("counters"),
                                     InstanceMethod<&RemoteClientWrap::Release>("release"),
                                     InstanceMethod<&RemoteClientWrap::SetRecorder>("setRecorder"),
                                 });
  *remote_ctor(env) = Napi::Persistent(f);
  return f;
}

RemoteClientWrap::RemoteClientWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<RemoteClientWrap>(info) {
  if (info.Length() < 1 || !info[0].IsExternal())
    throw CodedTypeError(info.Env(), "ERR_ILLEGAL_CONSTRUCTOR", "remote clients come from a FaultServer");
  client = *info[0].As<Napi::External<std::shared_ptr<engine::RemoteClient>>>().Data();
}

bool IsRemoteClient(Napi::Value v) {
  Napi::Env env = v.Env();
  return v.IsObject() && !remote_ctor(env)->IsEmpty() && v.As<Napi::Object>().InstanceOf(remote_ctor(env)->Value());
}

std::shared_ptr<sys::FaultHandler> RemoteClientHandler(Napi::Value v) {
  if (!IsRemoteClient(v)) throw CodedTypeError(v.Env(), "ERR_INVALID_ARG_TYPE", "a handler rule needs a Pager or a remote client");
  return RemoteClientWrap::Unwrap(v.As<Napi::Object>())->client;
}

Napi::Value RemoteClientWrap::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("id", static_cast<double>(client->id));
  o.Set("pid", client->pid);
  o.Set("uid", client->uid);
  o.Set("gid", client->gid);
  o.Set("fd", client->uffd());
  o.Set("features", Napi::BigInt::New(env, client->features()));
  o.Set("poolPages", static_cast<double>(client->pool_pages()));
  o.Set("poolHeld", static_cast<double>(client->pool_held()));
  std::vector<engine::RemoteRange> rs = client->ranges();
  Napi::Array a = Napi::Array::New(env, rs.size());
  for (size_t i = 0; i < rs.size(); i++) {
    Napi::Object r = Napi::Object::New(env);
    r.Set("address", Napi::BigInt::New(env, rs[i].addr));
    r.Set("length", static_cast<double>(rs[i].len));
    r.Set("modes", rs[i].modes);
    r.Set("shared", rs[i].memfd >= 0);
    r.Set("offset", static_cast<double>(rs[i].offset));
    a.Set(static_cast<uint32_t>(i), r);
  }
  o.Set("ranges", a);
  return o;
}

namespace {

// A span operation on the client's pages (evict, writeProtect): (address, length) in, pages out.
// The hints name what the caller can fix for EINVAL and for the operation's own other errno.
Napi::Value SpanCall(const Napi::CallbackInfo& info, const char* syscall, int (engine::RemoteClient::*op)(uint64_t, uint64_t, uint64_t*),
                     engine::RemoteClient& client, const char* einval_hint, int other, const char* other_hint) {
  Napi::Env env = info.Env();
  const uint64_t addr = ToU64(info[0], "address");
  const uint64_t len = ToU64(info[1], "length");
  uint64_t pages = 0;
  int rc = (client.*op)(addr, len, &pages);
  if (rc == -ESHUTDOWN) throw StateError(env, "ERR_PAGEMIRROR_CLOSED", "the client is gone");
  if (rc) ThrowSystemError(env, rc, syscall, {nullptr, rc == -EINVAL ? einval_hint : rc == other ? other_hint : nullptr, -1, addr});
  return Napi::Number::New(env, static_cast<double>(pages));
}

}  // namespace

// evict(address: bigint, length): pages taken to the pool.
Napi::Value RemoteClientWrap::Evict(const Napi::CallbackInfo& info) {
  return SpanCall(info, "evict", &engine::RemoteClient::evict, *client,
                  "only page-aligned ranges inside the client's shared ranges registered for WP can be evicted", -ENOSPC,
                  "the client's pool is full (or it shared none): it holds every page it can");
}

// writeProtect(address: bigint, length): pages write-protected.
Napi::Value RemoteClientWrap::WriteProtect(const Napi::CallbackInfo& info) {
  return SpanCall(info, "writeProtect", &engine::RemoteClient::write_protect, *client,
                  "only page-aligned ranges inside the client's shared ranges registered for WP can be write-protected", -ENOENT,
                  "the client unmapped part of the range");
}

// configure(prefetch, protectReads).
Napi::Value RemoteClientWrap::Configure(const Napi::CallbackInfo& info) {
  const uint64_t pages = ToU64(info[0], "prefetch");
  if (pages > UINT32_MAX) throw CodedRangeError(info.Env(), "ERR_OUT_OF_RANGE", "prefetch must be 0..2^32-1");
  client->configure(static_cast<uint32_t>(pages), info[1].ToBoolean().Value());
  return info.Env().Undefined();
}

// takeTouches(): BigUint64Array of page address | kind bits (engine::RemoteClient::Touch).
Napi::Value RemoteClientWrap::TakeTouches(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<uint64_t> t;
  client->take_touches(&t);
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, t.size() * sizeof(uint64_t));
  if (!t.empty()) std::memcpy(ab.Data(), t.data(), t.size() * sizeof(uint64_t));
  napi_value out;
  napi_create_typedarray(env, napi_biguint64_array, t.size(), ab, 0, &out);
  return Napi::Value(env, out);
}

Napi::Value RemoteClientWrap::Counters(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  engine::RemoteClient::Counters c = client->counters();
  Napi::Object o = Napi::Object::New(env);
  o.Set("evicted", static_cast<double>(c.evicted));
  o.Set("restored", static_cast<double>(c.restored));
  o.Set("restoredOnRelease", static_cast<double>(c.released));
  o.Set("zeroFilled", static_cast<double>(c.zero_filled));
  o.Set("continued", static_cast<double>(c.continued));
  o.Set("unprotected", static_cast<double>(c.unprotected));
  o.Set("retried", static_cast<double>(c.retried));
  o.Set("raced", static_cast<double>(c.raced));
  o.Set("prefetched", static_cast<double>(c.prefetched));
  o.Set("protectedPages", static_cast<double>(c.protected_pages));
  o.Set("touchesDropped", static_cast<double>(c.touches_dropped));
  return o;
}

Napi::Value RemoteClientWrap::Release(const Napi::CallbackInfo& info) {
  client->release();
  return info.Env().Undefined();
}

Napi::Value RemoteClientWrap::SetRecorder(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<engine::TraceRecorder> rec;
  if (info.Length() > 0 && !info[0].IsNull() && !info[0].IsUndefined()) rec = TraceRecorderWrap::From(info[0]);
  const int rc = client->set_recorder(std::move(rec));
  if (rc == -ESHUTDOWN) throw StateError(env, "ERR_PAGEMIRROR_CLOSED", "the client is gone");
  if (rc < 0) ThrowSystemError(env, rc, "setRecorder", {nullptr, "the recorder could not take the client's ranges"});
  return env.Undefined();
}

// ---- FaultServerWrap ----

Napi::Function FaultServerWrap::Init(Napi::Env env) {
  Napi::Function f = DefineClass(env, "FaultServer",
                                 {
                                     InstanceMethod<&FaultServerWrap::Drop>("drop"),
                                     InstanceMethod<&FaultServerWrap::Stats>("stats"),
                                     InstanceMethod<&FaultServerWrap::Close>("close"),
                                 });
  *server_ctor(env) = Napi::Persistent(f);
  return f;
}

FaultServerWrap::FaultServerWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FaultServerWrap>(info) {
  if (info.Length() < 1 || !info[0].IsExternal())
    throw CodedTypeError(info.Env(), "ERR_ILLEGAL_CONSTRUCTOR", "use listenFaultServer()");
}

FaultServerWrap::~FaultServerWrap() {
  if (env_) napi_remove_env_cleanup_hook(env_, Cleanup, this);
  Shutdown();
}

void FaultServerWrap::Cleanup(void* arg) { static_cast<FaultServerWrap*>(arg)->Shutdown(); }

void FaultServerWrap::Shutdown() {
  if (server_) server_->stop();  // joins the I/O thread, releases every client, closes everything
  server_.reset();
  if (async_) {
    uv_close(reinterpret_cast<uv_handle_t*>(async_), [](uv_handle_t* h) { delete reinterpret_cast<uv_async_t*>(h); });
    async_ = nullptr;
  }
}

Napi::Value FaultServerWrap::Listen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[0].IsString() || !info[3].IsFunction())
    throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "listenFaultServer(path, allowUids, maxClients, callback)");
  const std::string path = info[0].As<Napi::String>().Utf8Value();
  if (path.empty() || path.find('\0') != std::string::npos)
    throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "path must be a non-empty string without NUL");
  engine::FaultServer::Options o;
  if (info[1].IsArray()) {
    Napi::Array a = info[1].As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); i++) {
      const int64_t u = ToI64(a.Get(i), "allowUids[i]");
      if (u < 0 || u > UINT32_MAX - 1) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "a uid is 0..2^32-2");
      o.allow_uids.push_back(static_cast<uint32_t>(u));
    }
  } else if (!info[1].IsUndefined()) {
    throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "allowUids must be an array of uids");
  }
  const int64_t max = ToI64(info[2], "maxClients");
  if (max < 1 || max > 4096) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "maxClients must be 1..4096");
  o.max_clients = static_cast<unsigned>(max);
  if (info.Length() > 4 && !info[4].IsUndefined()) {
    const int64_t t = ToI64(info[4], "helloTimeoutMs");
    if (t < 1 || t > 600000) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "helloTimeoutMs must be 1..600000");
    o.hello_timeout_ms = static_cast<uint64_t>(t);
  }
  Napi::Object obj = server_ctor(env)->New({Napi::External<void>::New(env, nullptr)});
  FaultServerWrap* self = Unwrap(obj);
  self->env_ = env;
  self->callback_ = Napi::Persistent(info[3].As<Napi::Function>());
  uv_loop_t* loop = nullptr;
  napi_get_uv_event_loop(env, &loop);
  self->async_ = new uv_async_t;
  self->async_->data = self;
  uv_async_init(loop, self->async_, &FaultServerWrap::OnAsync);
  self->server_ = std::make_unique<engine::FaultServer>();
  uv_async_t* async = self->async_;
  int rc = self->server_->start(path, std::move(o), [async] { uv_async_send(async); });
  if (rc) {
    self->Shutdown();
    const char* hint = rc == -EEXIST ? "the path exists and is not a socket: choose another path or remove it"
                       : rc == -EADDRINUSE ? "a server is listening there already"
                       : rc == -ENAMETOOLONG ? "a Unix socket path holds at most 107 bytes" : nullptr;
    ThrowSystemError(env, rc, "listen", {path.c_str(), hint});
  }
  napi_add_env_cleanup_hook(env, Cleanup, self);
  self->Ref();
  self->self_ref_ = true;
  return obj;
}

void FaultServerWrap::OnAsync(uv_async_t* handle) {
  auto* self = static_cast<FaultServerWrap*>(handle->data);
  if (!self->server_) return;
  std::vector<engine::ServerEvent> evs = self->server_->take();
  if (evs.empty()) return;
  Napi::Env env(self->env_);
  Napi::HandleScope scope(env);
  Napi::Array arr = Napi::Array::New(env, evs.size());
  for (size_t i = 0; i < evs.size(); i++) {
    const uint64_t id = evs[i].client->id;
    auto it = self->clients_.find(id);
    if (it == self->clients_.end()) {
      Napi::Object w = remote_ctor(env)->New({Napi::External<std::shared_ptr<engine::RemoteClient>>::New(env, &evs[i].client)});
      it = self->clients_.emplace(id, Napi::Persistent(w)).first;
    }
    Napi::Object e = Napi::Object::New(env);
    e.Set("type", Name(evs[i].kind));
    e.Set("first", evs[i].first);
    e.Set("client", it->second.Value());
    arr.Set(static_cast<uint32_t>(i), e);
  }
  try {
    self->callback_.MakeCallback(env.Global(), {arr});
  } catch (const Napi::Error& e) {
    napi_fatal_exception(self->env_, e.Value());
  }
}

Napi::Value FaultServerWrap::Drop(const Napi::CallbackInfo& info) {
  const int64_t id = ToI64(info[0], "id");
  if (server_ && id > 0) server_->drop(static_cast<uint64_t>(id));
  clients_.erase(static_cast<uint64_t>(id));
  return info.Env().Undefined();
}

Napi::Value FaultServerWrap::Stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  engine::FaultServer::Stats s = server_ ? server_->stats() : engine::FaultServer::Stats{};
  Napi::Object o = Napi::Object::New(env);
  o.Set("accepted", static_cast<double>(s.accepted));
  o.Set("refusedUid", static_cast<double>(s.refused_uid));
  o.Set("refusedFull", static_cast<double>(s.refused_full));
  o.Set("protocolErrors", static_cast<double>(s.protocol_errors));
  o.Set("refusals", static_cast<double>(s.refusals));
  o.Set("ended", static_cast<double>(s.ended));
  o.Set("helloTimeouts", static_cast<double>(s.hello_timeouts));
  o.Set("connections", static_cast<double>(s.clients));
  return o;
}

Napi::Value FaultServerWrap::Close(const Napi::CallbackInfo& info) {
  Shutdown();
  clients_.clear();
  if (env_) napi_remove_env_cleanup_hook(env_, Cleanup, this);
  env_ = nullptr;
  if (self_ref_) {
    self_ref_ = false;
    Unref();
  }
  return info.Env().Undefined();
}

}  // namespace pm
