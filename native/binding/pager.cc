#include "pager.h"

#include <fcntl.h>
#include <unistd.h>

#include "addon.h"
#include "args.h"
#include "errors.h"
#include "job.h"
#include "mapping.h"
#include "../sys/mem.h"

namespace pm {

namespace {

Napi::FunctionReference* ctor_ref(Napi::Env env) { return &env.GetInstanceData<AddonData>()->pager_ctor; }

Napi::Error WriteError(Napi::Env env, const engine::Pager& p, const engine::PagerWriteError& e) {
  const std::string& path = p.config().path;
  const bool truncated = e.file_size != UINT64_MAX;
  const bool lost = !e.lost.empty();
  const std::string hint =
      lost ? "the file did not take data written back before this flush (its fdatasync failed): err.lost names the " +
                 std::to_string(e.lost.size()) +
                 " granule(s) evicted meanwhile, of which no copy is left (the file may not hold what was written to "
                 "them); the granules in err.granules are still in memory, kept dirty: flush() writes them again"
      : truncated ? "the file was truncated under the pager to " + std::to_string(e.file_size) +
                      " bytes: the granules named in err.granules hold data past its end, which write-back does not write "
                      "(it never grows the file back); they are kept resident and dirty: grow the file and flush() again, or "
                      "acknowledgeLoss() to give them up"
                : std::string("the granules named in err.granules are kept resident and dirty; flush() or close() writes them "
                              "again, or acknowledgeLoss() gives them up");
  Napi::Error err = SystemError(env, e.err, e.syscall, {path.empty() ? nullptr : path.c_str(), hint.c_str()});
  if (lost) {
    // As the file mirrors report a failed writeback of pages no one else holds.
    err.Value().Set("code", "ERR_PAGEMIRROR_DATA_LOST");
    err.Value().Set("cause", ErrnoName(-e.err));
    Napi::Array ls = Napi::Array::New(env, e.lost.size());
    for (size_t i = 0; i < e.lost.size(); i++) ls.Set(static_cast<uint32_t>(i), Napi::Number::New(env, static_cast<double>(e.lost[i])));
    err.Value().Set("lost", ls);
  } else if (truncated) {
    // Data the file cannot hold as it is, as the file strategies report theirs.
    err.Value().Set("code", "ERR_PAGEMIRROR_DATA_LOST");
    err.Value().Set("cause", "ENXIO");
    err.Value().Set("fileSize", Napi::Number::New(env, static_cast<double>(e.file_size)));
  }
  Napi::Array gs = Napi::Array::New(env, e.granules.size());
  for (size_t i = 0; i < e.granules.size(); i++) gs.Set(static_cast<uint32_t>(i), Napi::Number::New(env, static_cast<double>(e.granules[i])));
  err.Value().Set("granules", gs);
  return err;
}

// One of a few named values; the first is the default. ERR_INVALID_ARG_VALUE names them all.
template <typename T>
T OptChoice(const Napi::Object& o, const char* key, std::initializer_list<std::pair<const char*, T>> names) {
  const std::string v = OptString(o, key, names.begin()->first);
  std::string all;
  for (const auto& [name, value] : names) {
    if (v == name) return value;
    all += all.empty() ? name : std::string(", ") + name;
  }
  throw CodedTypeError(o.Env(), "ERR_INVALID_ARG_VALUE", std::string(key) + " must be one of " + all);
}

}  // namespace

Napi::Function PagerWrap::Init(Napi::Env env) {
  Napi::Function f = DefineClass(env, "Pager",
                                 {
                                     InstanceMethod<&PagerWrap::Attach>("attach"),
                                     InstanceMethod<&PagerWrap::Flush>("flush"),
                                     InstanceMethod<&PagerWrap::Prefetch>("prefetch"),
                                     InstanceMethod<&PagerWrap::Install>("install"),
                                     InstanceMethod<&PagerWrap::Poison>("poison"),
                                     InstanceMethod<&PagerWrap::Stats>("stats"),
                                     InstanceMethod<&PagerWrap::LastError>("lastError"),
                                     InstanceMethod<&PagerWrap::AcknowledgeLoss>("acknowledgeLoss"),
                                     InstanceMethod<&PagerWrap::Close>("close"),
                                 });
  *ctor_ref(env) = Napi::Persistent(f);
  return f;
}

PagerWrap::PagerWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<PagerWrap>(info) {
  if (info.Length() < 1 || !info[0].IsExternal())
    throw CodedTypeError(info.Env(), "ERR_ILLEGAL_CONSTRUCTOR", "use createPager() to create a Pager");
}

Napi::Value PagerWrap::Create(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Mapping* m = Mapping::Unwrap(info[0]);
  Napi::Object o = ArgObject(info, 1, "options");
  engine::PagerConfig c;
  c.page = sys::page_size();
  c.granule = OptU64(o, "granule", c.page);
  if (c.granule < c.page || c.granule > (2ull << 20) || (c.granule & (c.granule - 1)))
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "granule must be a power of two from 4 KiB to 2 MiB");
  std::shared_ptr<Region> r = m->region();
  c.length = r->length - r->length % c.granule;
  if (c.length == 0) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "the region is smaller than one granule");
  c.base = m->Range(env, 0, c.length);
  c.data_length = std::min(OptU64(o, "dataLength", c.length), c.length);
  c.file_offset = OptU64(o, "fileOffset", 0);
  c.mode = OptChoice<engine::PagerMode>(o, "mode", {{"private", engine::PagerMode::kPrivate}, {"shared", engine::PagerMode::kShared},
                                  {"anonymous", engine::PagerMode::kAnonymous}});
  c.resident_limit = OptU64(o, "residentLimit", 0);
  c.policy = OptChoice<engine::EvictPolicy>(o, "policy", {{"fifo", engine::EvictPolicy::kFifo}, {"clock", engine::EvictPolicy::kClock}});
  c.prefetch_max = OptU64(o, "prefetch", 0);
  c.fill = OptChoice<engine::FillRule>(o, "fill", {{"zero", engine::FillRule::kZero}, {"pattern", engine::FillRule::kPattern},
                                  {"callback", engine::FillRule::kCallback}});
  c.seed = OptU64(o, "seed", 0);
  c.confirm_writes = OptBool(o, "confirm", true);
  c.path = OptString(o, "path", "");
  const int fd = static_cast<int>(ToI64(o.Get("fd"), "fd"));
  const int swap = o.Has("swapFd") ? static_cast<int>(ToI64(o.Get("swapFd"), "swapFd")) : -1;
  if (swap >= 0 && c.mode != engine::PagerMode::kPrivate)
    throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "swapFd applies to private mode");
  c.fd = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (c.fd < 0) ThrowSystemError(env, -errno, "fcntl", {c.path.empty() ? nullptr : c.path.c_str()});
  if (swap >= 0) {
    c.swap_fd = ::fcntl(swap, F_DUPFD_CLOEXEC, 0);
    if (c.swap_fd < 0) {
      const int e = -errno;
      ::close(c.fd);
      ThrowSystemError(env, e, "fcntl", {nullptr});
    }
  }
  Napi::Object obj = ctor_ref(env)->New({Napi::External<void>::New(env, nullptr)});
  PagerWrap* w = PagerWrap::Unwrap(obj);
  w->pin_ = std::make_unique<RegionPin>(r);
  w->pager_ = std::make_shared<engine::Pager>(std::move(c));
  return obj;
}

std::shared_ptr<engine::Pager> PagerWrap::live(Napi::Env env) {
  if (!pager_) throw StateError(env, "ERR_PAGEMIRROR_CLOSED", "the pager is closed");
  return pager_;
}

std::shared_ptr<sys::FaultHandler> PagerHandler(Napi::Value v) {
  Napi::Env env = v.Env();
  if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(ctor_ref(env)->Value()))
    throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "a handler rule needs a Pager");
  return PagerWrap::Unwrap(v.As<Napi::Object>())->live(env);
}

// attach(fd): the userfaultfd whose service resolves the region's faults (the pager's own).
Napi::Value PagerWrap::Attach(const Napi::CallbackInfo& info) {
  live(info.Env())->set_uffd(static_cast<int>(ToI64(info[0], "fd")));
  return info.Env().Undefined();
}

namespace {
struct FlushState {
  std::shared_ptr<engine::Pager> pager;
  int rc = 0;
  engine::PagerWriteError err;
};
struct LossState {
  std::shared_ptr<engine::Pager> pager;
  bool had = false;
  engine::PagerWriteError err;
};
struct PrefetchState {
  std::shared_ptr<engine::Pager> pager;
  uint64_t g0, g1;
  int64_t rc = 0;
};
}  // namespace

Napi::Value PagerWrap::Flush(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto state = std::make_unique<FlushState>();
  state->pager = live(env);
  return NativeJob<FlushState>::Start(
      env, std::move(state), [](FlushState& s) { s.rc = s.pager->flush(&s.err); },
      [](Napi::Env env, FlushState& s) -> Napi::Value {
        if (s.rc) throw WriteError(env, *s.pager, s.err);
        return env.Undefined();
      });
}

// acknowledgeLoss(): on a job thread, as it waits for a write-back in progress (wb_mu_).
Napi::Value PagerWrap::AcknowledgeLoss(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto state = std::make_unique<LossState>();
  state->pager = live(env);
  return NativeJob<LossState>::Start(
      env, std::move(state), [](LossState& s) { s.had = s.pager->acknowledge_loss(&s.err); },
      [](Napi::Env env, LossState& s) -> Napi::Value { return s.had ? WriteError(env, *s.pager, s.err).Value() : env.Null(); });
}

Napi::Value PagerWrap::Prefetch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto state = std::make_unique<PrefetchState>();
  state->pager = live(env);
  state->g0 = ToU64(info[0], "first");
  state->g1 = ToU64(info[1], "end");
  return NativeJob<PrefetchState>::Start(
      env, std::move(state), [](PrefetchState& s) { s.rc = s.pager->prefetch(s.g0, s.g1); },
      [](Napi::Env env, PrefetchState& s) -> Napi::Value {
        if (s.rc < 0) {
          const std::string& path = s.pager->config().path;
          ThrowSystemError(env, static_cast<int>(s.rc), "pread", {path.empty() ? nullptr : path.c_str()});
        }
        return Napi::Number::New(env, static_cast<double>(s.rc));
      });
}

// install(granule, data): the fill callback's bytes for one granule.
Napi::Value PagerWrap::Install(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto p = live(env);
  uint64_t g = ToU64(info[0], "granule");
  if (info.Length() < 2 || !info[1].IsTypedArray()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "data must be a Uint8Array");
  Napi::TypedArray ta = info[1].As<Napi::TypedArray>();
  if (ta.ByteLength() != p->config().granule) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "data must be one granule long");
  int rc = p->install(g, static_cast<const uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset());
  if (rc) ThrowSystemError(env, rc, "ioctl", {nullptr, "UFFDIO_COPY of a filled granule"});
  return env.Undefined();
}

Napi::Value PagerWrap::Poison(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int rc = live(env)->poison(ToU64(info[0], "address"));
  if (rc) ThrowSystemError(env, rc, "ioctl", {nullptr, "UFFDIO_POISON"});
  return env.Undefined();
}

Napi::Value PagerWrap::Stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  engine::PagerStats s = live(env)->stats();
  Napi::Object o = Napi::Object::New(env);
  auto n = [&](const char* k, uint64_t v) { o.Set(k, Napi::Number::New(env, static_cast<double>(v))); };
  n("faults", s.faults); n("missing", s.missing); n("wp", s.wp); n("minor", s.minor);
  n("fills", s.fills); n("fillBytes", s.fill_bytes); n("prefetched", s.prefetched);
  n("evictions", s.evictions); n("evictAborts", s.evict_aborts);
  n("writebacks", s.writebacks); n("writebackBytes", s.writeback_bytes); n("waits", s.waits);
  n("resident", s.resident); n("dirty", s.dirty); n("limit", s.limit);
  n("writeErrors", s.write_errors); n("fillErrors", s.fill_errors);
  n("shortFills", s.short_fills); n("discarded", s.discarded); n("lost", s.lost);
  n("fillNs", s.fill_ns); n("writebackNs", s.writeback_ns);
  return o;
}

Napi::Value PagerWrap::LastError(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto p = live(env);
  engine::PagerWriteError e;
  if (!p->last_error(&e)) return env.Null();
  return WriteError(env, *p, e).Value();
}

// close(): the engine closes its descriptor and lets the region go. The caller stopped the fault
// service first (Userfaultfd.close()), so no thread resolves with the engine any more.
Napi::Value PagerWrap::Close(const Napi::CallbackInfo& info) {
  if (pager_) pager_->close();
  pager_.reset();
  pin_.reset();
  return info.Env().Undefined();
}

}  // namespace pm
