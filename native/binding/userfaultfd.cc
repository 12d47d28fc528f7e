#include "userfaultfd.h"

#include <cerrno>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <string>

#include "../sys/mem.h"
#include "../sys/uapi.h"
#include "../sys/uffd.h"
#include "addon.h"
#include "args.h"
#include "errors.h"
#include "mapping.h"
#include "service.h"
#include "pager.h"
#include "fault_server.h"

namespace pm {

namespace {

struct Batch {
  std::vector<sys::FaultMsg> faults;
  std::vector<sys::EventMsg> events;
};

const char* EventName(sys::EventKind k) {
  switch (k) {
    case sys::EventKind::kFork: return "fork";
    case sys::EventKind::kRemap: return "remap";
    case sys::EventKind::kRemove: return "remove";
    case sys::EventKind::kUnmap: return "unmap";
  }
  return "unknown";
}

// Runs on the JavaScript thread: one call per batch, never one per fault.
void DeliverBatch(Napi::Env env, Napi::Function callback, Batch* batch, napi_async_context context) {
  std::unique_ptr<Batch> owned(batch);
  if (env == nullptr || callback.IsEmpty()) return;
  const size_t n = batch->faults.size();
  Napi::BigUint64Array addresses = Napi::BigUint64Array::New(env, n);
  Napi::Uint32Array flags = Napi::Uint32Array::New(env, n);
  Napi::Uint32Array tids = Napi::Uint32Array::New(env, n);
  for (size_t i = 0; i < n; i++) {
    addresses[i] = batch->faults[i].address;
    flags[i] = batch->faults[i].flags;
    tids[i] = batch->faults[i].tid;
  }
  Napi::Array events = Napi::Array::New(env, batch->events.size());
  for (size_t i = 0; i < batch->events.size(); i++) {
    const sys::EventMsg& e = batch->events[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("type", EventName(e.kind));
    switch (e.kind) {
      case sys::EventKind::kFork:
        o.Set("fd", static_cast<double>(e.a));
        break;
      case sys::EventKind::kRemap:
        o.Set("from", Napi::BigInt::New(env, e.a));
        o.Set("to", Napi::BigInt::New(env, e.b));
        o.Set("length", static_cast<double>(e.c));
        break;
      case sys::EventKind::kRemove:
      case sys::EventKind::kUnmap:
        o.Set("start", Napi::BigInt::New(env, e.a));
        o.Set("end", Napi::BigInt::New(env, e.b));
        break;
    }
    events.Set(static_cast<uint32_t>(i), o);
  }
  Napi::Object arg = Napi::Object::New(env);
  arg.Set("addresses", addresses);
  arg.Set("flags", flags);
  arg.Set("tids", tids);
  arg.Set("events", events);
  callback.MakeCallback(env.Global(), {arg}, context);
}

uint64_t RuleKinds(Napi::Env env, const std::string& action) {
  if (action == "copy" || action == "zero" || action == "move" || action == "poison") return sys::kFaultMissing;
  if (action == "unprotect") return sys::kFaultWp;
  if (action == "continue") return sys::kFaultMinor;
  throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE",
                       "action must be one of copy, zero, move, poison, unprotect, continue");
}

}  // namespace

Napi::Function Userfaultfd::Init(Napi::Env env) {
  return DefineClass(env, "Userfaultfd",
                     {
                         InstanceMethod<&Userfaultfd::Info>("info"),
                         InstanceMethod<&Userfaultfd::Api>("api"),
                         InstanceMethod<&Userfaultfd::Register>("register"),
                         InstanceMethod<&Userfaultfd::Unregister>("unregister"),
                         InstanceMethod<&Userfaultfd::Copy>("copy"),
                         InstanceMethod<&Userfaultfd::Zeropage>("zeropage"),
                         InstanceMethod<&Userfaultfd::Continue>("continue"),
                         InstanceMethod<&Userfaultfd::Move>("move"),
                         InstanceMethod<&Userfaultfd::Poison>("poison"),
                         InstanceMethod<&Userfaultfd::WriteProtect>("writeProtect"),
                         InstanceMethod<&Userfaultfd::Wake>("wake"),
                         InstanceMethod<&Userfaultfd::Fallback>("fallback"),
                         InstanceMethod<&Userfaultfd::ResolveMany>("resolveMany"),
                         InstanceMethod<&Userfaultfd::Serve>("serve"),
                         InstanceMethod<&Userfaultfd::Reconfigure>("reconfigure"),
                         InstanceMethod<&Userfaultfd::SetRules>("setRules"),
                         InstanceMethod<&Userfaultfd::SetTap>("setTap"),
                         InstanceMethod<&Userfaultfd::Stats>("stats"),
                         InstanceMethod<&Userfaultfd::Outstanding>("outstanding"),
                         InstanceMethod<&Userfaultfd::Ref>("ref"),
                         InstanceMethod<&Userfaultfd::Unref>("unref"),
                         InstanceMethod<&Userfaultfd::Close>("close"),
                     });
}

Userfaultfd::Userfaultfd(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Userfaultfd>(info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsExternal())
    throw CodedTypeError(env, "ERR_ILLEGAL_CONSTRUCTOR", "use openUserfaultfd() to create a Userfaultfd");
  auto* r = info[0].As<Napi::External<sys::UffdOpenResult>>().Data();
  fd_ = r->fd;
  user_mode_only_ = r->user_mode_only;
  opened_by_ = static_cast<int>(r->opened_by);
  device_error_ = r->device_error;
  syscall_error_ = r->syscall_error;
  if (info.Length() > 1 && info[1].IsBoolean() && info[1].As<Napi::Boolean>().Value()) opened_by_ = 2;
  data_ = env.GetInstanceData<AddonData>();
  std::lock_guard<std::mutex> lock(data_->mu);
  data_->uffds.insert(this);
}

Userfaultfd::~Userfaultfd() {
  {
    std::lock_guard<std::mutex> lock(data_->mu);
    data_->uffds.erase(this);
  }
  Shutdown();
  if (zero_huge_) sys::unmap(zero_huge_, zero_huge_len_);
}

void Userfaultfd::Shutdown() { CloseWith(Outcome::kWake); }

int Userfaultfd::live_fd(Napi::Env env) {
  if (fd_ < 0) throw StateError(env, "ERR_PAGEMIRROR_CLOSED", "the userfaultfd is closed");
  return fd_;
}

// The one way asked for failed: say which step and what would make it work.
[[noreturn]] static void ThrowOpenViaError(Napi::Env env, bool device, bool umo, const sys::UffdOpenResult& r, int rc) {
  if (!device) {
    const char* hint = rc == -EPERM ? (umo ? "the kernel refused even a user-mode-only userfaultfd"
                                           : "full userfaultfd(2) needs CAP_SYS_PTRACE or sysctl "
                                             "vm.unprivileged_userfaultfd=1; ask for userModeOnly, or use via 'device' "
                                             "with read-write access to /dev/userfaultfd")
                       : rc == -ENOSYS ? "this kernel has no userfaultfd(2) (CONFIG_USERFAULTFD)" : nullptr;
    ThrowSystemError(env, rc, "userfaultfd", {nullptr, hint});
  }
  if (r.device_ioctl_failed)
    ThrowSystemError(env, rc, "ioctl(USERFAULTFD_IOC_NEW)", {"/dev/userfaultfd", nullptr});
  const char* hint = rc == -ENOENT ? "no /dev/userfaultfd here (Linux 6.1+, and it must be visible in this mount "
                                     "namespace); use via 'syscall' or 'auto'"
                     : rc == -EACCES || rc == -EPERM
                         ? "the device node is not open to this user (root-only by default): give read-write access "
                           "to /dev/userfaultfd, or use via 'syscall' or 'auto'"
                         : nullptr;
  ThrowSystemError(env, rc, "open", {"/dev/userfaultfd", hint});
}

Napi::Value Userfaultfd::Open(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = info.Length() > 0 && info[0].IsObject() ? info[0].As<Napi::Object>() : Napi::Object::New(env);
  bool nonblocking = OptBool(o, "nonBlocking", true);
  bool umo = OptBool(o, "userModeOnly", false);
  const std::string via = OptString(o, "via", "auto");
  if (via != "auto" && via != "device" && via != "syscall")
    throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "via must be 'auto', 'device' or 'syscall'");
  sys::UffdOpenResult r;
  if (via != "auto") {
    const bool device = via == "device";
    int rc = sys::uffd_open_via(device ? sys::UffdVia::kDevice : sys::UffdVia::kSyscall, nonblocking, umo, &r);
    if (rc) ThrowOpenViaError(env, device, umo, r, rc);
    AddonData* data = env.GetInstanceData<AddonData>();
    return data->uffd_ctor.Value().New({Napi::External<sys::UffdOpenResult>::New(env, &r)});
  }
  int rc = sys::uffd_open(nonblocking, umo, &r);
  if (rc) {
    std::string hint =
        "/dev/userfaultfd: " + std::string(ErrnoName(-r.device_error)) +
        "; userfaultfd(2): " + std::string(ErrnoName(-r.syscall_error)) +
        ". Unprivileged use needs one of: read-write access to /dev/userfaultfd, sysctl "
        "vm.unprivileged_userfaultfd=1, or CAP_SYS_PTRACE";
    ThrowSystemError(env, rc, "userfaultfd", {nullptr, hint.c_str()});
  }
  AddonData* data = env.GetInstanceData<AddonData>();
  return data->uffd_ctor.Value().New({Napi::External<sys::UffdOpenResult>::New(env, &r)});
}

// adoptUserfaultfd(fd, features, take): wraps a userfaultfd this process received (a FORK event's
// child descriptor, or one from elsewhere). UFFDIO_API was negotiated by the parent's descriptor;
// the child's inherits its features. Only a userfaultfd is accepted (closing another descriptor
// would close, say, a mapping's file under it). The object owns a duplicate, so the caller's
// descriptor stays the caller's; take (the library's fork events) owns fd itself instead.
Napi::Value Userfaultfd::Adopt(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  sys::UffdOpenResult r;
  const int64_t fd = ToI64(info[0], "fd");
  if (fd < 0 || fd > INT32_MAX) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "fd must be a descriptor number (0..2^31-1)");
  char what[256];
  int rc = sys::uffd_is_userfaultfd(static_cast<int>(fd), what, sizeof what);
  if (rc < 0) ThrowSystemError(env, rc, "fcntl", {nullptr, rc == -EBADF ? "fd is not an open descriptor" : nullptr});
  if (rc == 0)
    throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE",
                         "fd " + std::to_string(fd) + " is not a userfaultfd (it is " + what + ")");
  const uint64_t features = info.Length() > 1 ? ToU64(info[1], "features") : 0;
  const bool take = info.Length() > 2 && info[2].ToBoolean().Value();
  r.fd = take ? static_cast<int>(fd) : ::fcntl(static_cast<int>(fd), F_DUPFD_CLOEXEC, 0);
  if (r.fd < 0) ThrowSystemError(env, -errno, "fcntl(F_DUPFD_CLOEXEC)");
  AddonData* data = env.GetInstanceData<AddonData>();
  Napi::Object obj = data->uffd_ctor.Value().New({Napi::External<sys::UffdOpenResult>::New(env, &r),
                                                  Napi::Boolean::New(env, true)});
  Userfaultfd* self = Napi::ObjectWrap<Userfaultfd>::Unwrap(obj);
  self->api_done_ = true;
  self->features_ = features;
  return obj;
}

Napi::Value Userfaultfd::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("fd", fd_);
  o.Set("features", Napi::BigInt::New(env, features_));
  o.Set("ioctls", Napi::BigInt::New(env, ioctls_));
  o.Set("negotiated", api_done_);
  o.Set("userModeOnly", user_mode_only_);
  o.Set("openedBy", opened_by_ == 0 ? "device" : opened_by_ == 1 ? "syscall" : "adopted");
  o.Set("deviceError", device_error_ ? ErrnoName(-device_error_) : "");
  o.Set("syscallError", syscall_error_ ? ErrnoName(-syscall_error_) : "");
  o.Set("serving", serving_);
  return o;
}

// UFFDIO_API: asks for `features`; with probe=true asks for none first, which reports everything
// the kernel offers (and spends this descriptor's one negotiation).
Napi::Value Userfaultfd::Api(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = live_fd(env);
  uint64_t want = ToU64(info[0], "features");
  if (api_done_)
    throw SystemError(env, -EINVAL, "ioctl(UFFDIO_API)", {nullptr, "features are negotiated once per userfaultfd"});
  uint64_t got = 0, ioctls = 0;
  int rc = sys::uffd_api(fd, want, &got, &ioctls);
  if (rc) {
    const char* hint = rc == -EINVAL ? "the kernel lacks a requested feature" :
                       rc == -EPERM ? "EVENT_FORK needs CAP_SYS_PTRACE for a user-mode-only userfaultfd" : nullptr;
    ThrowSystemError(env, rc, "ioctl(UFFDIO_API)", {nullptr, hint});
  }
  api_done_ = true;
  // The kernel answers with every feature it has; this descriptor enabled what was asked for.
  features_ = want;
  ioctls_ = ioctls;
  Napi::Object o = Napi::Object::New(env);
  o.Set("features", Napi::BigInt::New(env, want));
  o.Set("offered", Napi::BigInt::New(env, got));
  o.Set("ioctls", Napi::BigInt::New(env, ioctls));
  return o;
}

uint64_t Userfaultfd::Target(const Napi::CallbackInfo& info, size_t i, uint64_t* len, bool* was_mapping) {
  Napi::Env env = info.Env();
  uint64_t off = ToU64(info[i + 1], "offset");
  *len = ToU64(info[i + 2], "length");
  if (*len == 0) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "length must be > 0");
  if (info[i].IsBigInt()) {
    // A raw address: for descriptors of another process (a forked child), whose layout is not
    // ours to check. The kernel validates it.
    uint64_t base = ToU64(info[i], "address");
    CheckAligned(env, base + off, sys::page_size(), "address");
    CheckAligned(env, *len, sys::page_size(), "length");
    if (was_mapping) *was_mapping = false;
    return base + off;
  }
  Mapping* m = Mapping::Unwrap(info[i]);
  if (was_mapping) *was_mapping = true;
  return m->Range(env, off, *len);
}

Napi::Value Userfaultfd::Register(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = live_fd(env);
  if (!api_done_)
    throw StateError(env, "ERR_PAGEMIRROR_NOT_NEGOTIATED", "negotiate features (api) before registering");
  Mapping* m = Mapping::Unwrap(info[0]);
  uint64_t len = 0;
  uint64_t start = Target(info, 0, &len);
  uint64_t mode = ToU64(info[3], "mode");
  // JavaScript must not touch this memory any more (a fault would sleep on the main thread).
  m->DetachBuffer();
  uint64_t ioctls = 0;
  int rc = sys::uffd_register(fd, start, len, mode, &ioctls);
  if (rc) {
    const char* hint = nullptr;
    if (rc == -EINVAL) hint = "this memory does not support that mode (MINOR needs shmem or hugetlbfs, WP on "
                              "shmem needs WP_HUGETLBFS_SHMEM) or the range is not aligned";
    else if (rc == -EBUSY) hint = "the range is registered with another userfaultfd";
    else if (rc == -EPERM) hint = m->region()->not_writable_hint();
    const std::string& path = m->region()->path;
    ThrowSystemError(env, rc, "ioctl(UFFDIO_REGISTER)", {path.empty() ? nullptr : path.c_str(), hint});
  }
  m->region()->registered.fetch_add(1);
  m->region()->js_registered.fetch_add(1);
  registrations_.push_back({m->region(), start, len, mode, m->region()->page});
  if ((mode & UFFDIO_REGISTER_MODE_WP) && service_ && !rules_.empty()) PushRules();
  if (m->region()->page > zero_huge_len_ && m->region()->page > sys::page_size()) {
    // Virtual only: UFFDIO_COPY reads it through the shared zero page.
    void* z = nullptr;
    if (sys::map(&z, nullptr, m->region()->page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0) == 0) {
      if (zero_huge_) sys::unmap(zero_huge_, zero_huge_len_);
      zero_huge_ = z;
      zero_huge_len_ = m->region()->page;
    }
  }
  return Napi::BigInt::New(env, ioctls);
}

Napi::Value Userfaultfd::Unregister(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = live_fd(env);
  uint64_t len = 0;
  uint64_t start = Target(info, 0, &len);
  int rc = sys::uffd_unregister(fd, start, len);
  if (rc) ThrowSystemError(env, rc, "ioctl(UFFDIO_UNREGISTER)");
  for (auto it = registrations_.begin(); it != registrations_.end();) {
    if (it->start >= start && it->start + it->len <= start + len) {
      if (auto r = it->region.lock()) {
        r->registered.fetch_sub(1);
        r->js_registered.fetch_sub(1);
      }
      it = registrations_.erase(it);
    } else {
      ++it;
    }
  }
  if (service_ && !rules_.empty()) PushRules();
  return env.Undefined();
}

// Resolve ioctls report {bytes, exists}: EEXIST means another thread's fault resolved the page
// first, which the kernel documents as success for the caller. Any other error throws, carrying
// the partial progress in err.bytes so the caller can retry from there (EAGAIN: an event is
// unread; the service thread reads it, then a retry succeeds).
Napi::Value Userfaultfd::ResolveResult(Napi::Env env, int rc, int64_t done, uint64_t start, uint64_t len,
                                       const char* name) {
  if (service_) service_->resolved(start, rc == 0 ? len : static_cast<uint64_t>(done));
  if (rc && rc != -EEXIST) {
    const char* hint = nullptr;
    if (rc == -EAGAIN) hint = "an event is unread or the address space is changing; retry after reading it";
    else if (rc == -ENOENT) hint = "the mapping changed or the source has a hole";
    else if (rc == -ESRCH) hint = "the faulting process has exited";
    ThrowSystemError(env, rc, name, {nullptr, hint, done, start});
  }
  if (rc == -EEXIST) sys::uffd_wake(fd_, start, len);
  Napi::Object o = Napi::Object::New(env);
  o.Set("bytes", static_cast<double>(rc == 0 ? static_cast<int64_t>(len) : done));
  o.Set("exists", rc == -EEXIST);
  return o;
}

// copy(dst: Mapping|address, offset, length, src: Mapping|TypedArray|address, srcOffset, mode)
Napi::Value Userfaultfd::Copy(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = live_fd(env);
  uint64_t len = 0;
  uint64_t dst = Target(info, 0, &len);
  uint64_t src_off = ToU64(info[4], "sourceOffset");
  uint64_t mode = ToU64(info[5], "mode");
  uint64_t src = 0;
  if (info[3].IsTypedArray()) {
    Napi::TypedArray ta = info[3].As<Napi::TypedArray>();
    if (src_off > ta.ByteLength() || len > ta.ByteLength() - src_off)
      throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "the source is shorter than length");
    src = reinterpret_cast<uint64_t>(ta.ArrayBuffer().Data()) + ta.ByteOffset() + src_off;
  } else if (info[3].IsBigInt()) {
    src = ToU64(info[3], "source") + src_off;
  } else {
    Mapping* sm = Mapping::Unwrap(info[3]);
    src = sm->Range(env, src_off, len, false);
    // The ioctl reads its source on this thread.
    sm->CheckNoJsFault(env, src_off, len, false, "UFFDIO_COPY reading its source");
  }
  int64_t done = 0;
  int rc = sys::uffd_copy(fd, dst, src, len, mode, &done);
  return ResolveResult(env, rc, done, dst, len, "ioctl(UFFDIO_COPY)");
}

// The resolvers that take one range and a mode: (target, offset, length, mode).
template <int (*Ioctl)(int, uint64_t, uint64_t, uint64_t, int64_t*)>
Napi::Value Userfaultfd::ResolveRange(const Napi::CallbackInfo& info, const char* name) {
  Napi::Env env = info.Env();
  int fd = live_fd(env);
  uint64_t len = 0;
  uint64_t start = Target(info, 0, &len);
  uint64_t mode = ToU64(info[3], "mode");
  int64_t done = 0;
  int rc = Ioctl(fd, start, len, mode, &done);
  return ResolveResult(env, rc, done, start, len, name);
}

bool Userfaultfd::WpRegistered(uint64_t start, uint64_t end) const {
  for (const Registration& r : registrations_)
    if ((r.mode & UFFDIO_REGISTER_MODE_WP) && r.start < end && start < r.start + r.len) return true;
  return false;
}

int Userfaultfd::ZeroFill(const Region* region, uint64_t start, uint64_t len, uint64_t mode, int64_t* done) const {
  if (region && region->shared && !region->hugetlb && WpRegistered(start, start + len))
    return sys::uffd_zero_fill_shmem(fd_, start, len, mode, done, nullptr);
  return sys::uffd_zero_fill(fd_, start, len, mode, done, nullptr);
}

Napi::Value Userfaultfd::Zeropage(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  live_fd(env);
  uint64_t len = 0;
  bool was_mapping = false;
  uint64_t start = Target(info, 0, &len, &was_mapping);
  uint64_t mode = ToU64(info[3], "mode");
  int64_t done = 0;
  const Region* region = was_mapping ? Mapping::Unwrap(info[0])->region().get() : nullptr;
  int rc = ZeroFill(region, start, len, mode, &done);
  return ResolveResult(env, rc, done, start, len, "ioctl(UFFDIO_ZEROPAGE)");
}

Napi::Value Userfaultfd::Continue(const Napi::CallbackInfo& info) {
  return ResolveRange<sys::uffd_continue>(info, "ioctl(UFFDIO_CONTINUE)");
}

// move(dst, offset, length, src: Mapping|address, srcOffset, mode)
Napi::Value Userfaultfd::Move(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = live_fd(env);
  uint64_t len = 0;
  uint64_t dst = Target(info, 0, &len);
  uint64_t src_off = ToU64(info[4], "sourceOffset");
  uint64_t mode = ToU64(info[5], "mode");
  uint64_t src;
  if (info[3].IsBigInt()) {
    src = ToU64(info[3], "source") + src_off;
    CheckAligned(env, src, sys::page_size(), "source");
  } else {
    src = Mapping::Unwrap(info[3])->Range(env, src_off, len);
  }
  int64_t done = 0;
  int rc = sys::uffd_move(fd, dst, src, len, mode, &done);
  return ResolveResult(env, rc, done, dst, len, "ioctl(UFFDIO_MOVE)");
}

Napi::Value Userfaultfd::Poison(const Napi::CallbackInfo& info) {
  return ResolveRange<sys::uffd_poison>(info, "ioctl(UFFDIO_POISON)");
}

Napi::Value Userfaultfd::WriteProtect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = live_fd(env);
  uint64_t len = 0;
  uint64_t start = Target(info, 0, &len);
  uint64_t mode = ToU64(info[3], "mode");
  int rc = sys::uffd_writeprotect(fd, start, len, mode);
  if (rc) ThrowSystemError(env, rc, "ioctl(UFFDIO_WRITEPROTECT)", {nullptr, nullptr, -1, start});
  if (!(mode & UFFDIO_WRITEPROTECT_MODE_WP) && service_) service_->resolved(start, len);
  return env.Undefined();
}

Napi::Value Userfaultfd::Wake(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = live_fd(env);
  uint64_t len = 0;
  uint64_t start = Target(info, 0, &len);
  int rc = sys::uffd_wake(fd, start, len);
  if (rc) ThrowSystemError(env, rc, "ioctl(UFFDIO_WAKE)");
  return env.Undefined();
}

// resolveMany(action, target, offsets: Float64Array, length, source?, sourceOffsets?, mode)
// -> {bytes, exists}: a fault batch resolved in one call, as a driver services its fault buffer.
// Each item is [offset, offset + length) of target; copy/move read from source at the matching
// sourceOffsets entry (or the same offset). EEXIST counts as success (`exists`); any other error
// stops the loop and throws with err.bytes (bytes resolved so far) and err.index (the item).
Napi::Value Userfaultfd::ResolveMany(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = live_fd(env);
  std::string action = info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "";
  enum { kCopy, kZero, kContinue, kMove, kUnprotect, kPoison } act;
  if (action == "copy") act = kCopy;
  else if (action == "zeropage") act = kZero;
  else if (action == "continue") act = kContinue;
  else if (action == "move") act = kMove;
  else if (action == "unprotect") act = kUnprotect;
  else if (action == "poison") act = kPoison;
  else throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "action must be copy, zeropage, continue, move, unprotect or poison");
  if (info.Length() < 3 || !info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "offsets must be a Float64Array");
  Napi::Float64Array offsets = info[2].As<Napi::Float64Array>();
  const uint64_t len = ToU64(info[3], "length");
  const uint64_t mode = ToU64(info[6], "mode");
  const uint64_t page = sys::page_size();
  if (len == 0 || len % page) throw CodedRangeError(env, "ERR_PAGEMIRROR_UNALIGNED", "length must be a positive multiple of the page size");
  uint64_t base, limit;
  const Region* target_region = nullptr;
  if (info[1].IsBigInt()) {
    base = ToU64(info[1], "address");
    limit = UINT64_MAX;
  } else {
    Mapping* m = Mapping::Unwrap(info[1]);
    base = m->live(env).addr;
    limit = m->region()->length;
    target_region = m->region().get();
  }
  uint64_t src_base = 0, src_limit = 0;
  Mapping* src_mapping = nullptr;
  if (act == kCopy || act == kMove) {
    if (info[4].IsTypedArray() && act == kCopy) {
      Napi::TypedArray ta = info[4].As<Napi::TypedArray>();
      src_base = reinterpret_cast<uint64_t>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
      src_limit = ta.ByteLength();
    } else {
      Mapping* sm = Mapping::Unwrap(info[4]);
      src_mapping = sm;
      src_base = sm->live(env).addr;
      src_limit = sm->region()->length;
    }
  }
  const bool has_src_offsets = info[5].IsTypedArray();
  Napi::Float64Array src_offsets = has_src_offsets ? info[5].As<Napi::Float64Array>() : Napi::Float64Array();
  if (has_src_offsets && src_offsets.ElementLength() != offsets.ElementLength())
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "sourceOffsets must have one entry per offset");
  // Validate everything before the first ioctl: a batch is resolved whole or fails untouched.
  const size_t n = offsets.ElementLength();
  for (size_t i = 0; i < n; i++) {
    double o = offsets[i];
    if (!(o >= 0) || static_cast<uint64_t>(o) % page || static_cast<uint64_t>(o) > limit || len > limit - static_cast<uint64_t>(o))
      throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "offsets[" + std::to_string(i) + "] is unaligned or outside the target");
    if (act == kCopy || act == kMove) {
      double so = has_src_offsets ? src_offsets[i] : o;
      if (!(so >= 0) || static_cast<uint64_t>(so) > src_limit || len > src_limit - static_cast<uint64_t>(so))
        throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "sourceOffsets[" + std::to_string(i) + "] is outside the source");
      if (act == kCopy && src_mapping)
        src_mapping->CheckNoJsFault(env, static_cast<uint64_t>(so), len, false, "UFFDIO_COPY reading its source");
    }
  }
  // replay: resolve everything without waking, then wake each resolved run once, so the faulting
  // threads restart together after the batch (the device-fault "replay") instead of preempting the
  // handler one by one.
  const bool replay = info.Length() > 7 && info[7].ToBoolean().Value();
  uint64_t resolve_mode = mode;
  if (replay) resolve_mode |= act == kUnprotect ? UFFDIO_WRITEPROTECT_MODE_DONTWAKE : UFFDIO_COPY_MODE_DONTWAKE;
  std::vector<uint64_t> woken;
  if (replay) woken.reserve(n);
  uint64_t bytes = 0, exists = 0;
  struct Waker {
    int fd;
    uint64_t len;
    std::vector<uint64_t>* starts;
    bool on;
    // Wake what was resolved so far even when a later item fails: nobody is left asleep.
    ~Waker() {
      if (!on || starts->empty()) return;
      std::sort(starts->begin(), starts->end());
      uint64_t run_start = (*starts)[0], run_end = run_start + len;
      for (size_t k = 1; k < starts->size(); k++) {
        if ((*starts)[k] <= run_end) {
          run_end = std::max(run_end, (*starts)[k] + len);
          continue;
        }
        sys::uffd_wake(fd, run_start, run_end - run_start);
        run_start = (*starts)[k];
        run_end = run_start + len;
      }
      sys::uffd_wake(fd, run_start, run_end - run_start);
    }
  } waker{fd, len, &woken, replay};
  for (size_t i = 0; i < n; i++) {
    const uint64_t dst = base + static_cast<uint64_t>(offsets[i]);
    const uint64_t src = src_base + static_cast<uint64_t>(has_src_offsets ? src_offsets[i] : offsets[i]);
    int64_t done = 0;
    int rc;
    switch (act) {
      case kCopy: rc = sys::uffd_copy(fd, dst, src, len, resolve_mode, &done); break;
      case kZero: rc = ZeroFill(target_region, dst, len, resolve_mode, &done); break;
      case kContinue: rc = sys::uffd_continue(fd, dst, len, resolve_mode, &done); break;
      case kMove: rc = sys::uffd_move(fd, dst, src, len, resolve_mode, &done); break;
      case kPoison: rc = sys::uffd_poison(fd, dst, len, resolve_mode, &done); break;
      case kUnprotect: rc = sys::uffd_writeprotect(fd, dst, len, resolve_mode); done = rc ? 0 : len; break;
    }
    if (service_) service_->resolved(dst, rc == 0 ? len : static_cast<uint64_t>(done));
    if (replay && (rc == 0 || rc == -EEXIST)) woken.push_back(dst);
    if (rc == -EEXIST) {
      exists++;
      if (!replay && !(mode & UFFDIO_COPY_MODE_DONTWAKE)) sys::uffd_wake(fd, dst, len);
      bytes += static_cast<uint64_t>(done);
      continue;
    }
    if (rc) {
      Napi::Error err = SystemError(env, rc, "ioctl(resolveMany)", {nullptr, nullptr, static_cast<int64_t>(bytes + done), dst});
      err.Value().Set("index", static_cast<double>(i));
      throw err;
    }
    bytes += len;
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("bytes", static_cast<double>(bytes));
  o.Set("exists", static_cast<double>(exists));
  return o;
}

// serve(callback, maxBatch?, workers?, pollMode?, spinUs?): starts the service threads. The
// callback receives batches.
Napi::Value Userfaultfd::Serve(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = live_fd(env);
  if (!api_done_) throw StateError(env, "ERR_PAGEMIRROR_NOT_NEGOTIATED", "negotiate features (api) before serving");
  if (service_ && service_->running()) throw StateError(env, "ERR_PAGEMIRROR_SERVING", "already serving");
  if (info.Length() < 1 || !info[0].IsFunction())
    throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "callback must be a function");
  const ServiceConfig config = ConfigArgs(info, 1);
  auto p = std::make_shared<Pending>();
  p->faults.reserve(Pending::kCapacity);
  p->events.reserve(Pending::kCapacity);
  p->taken_faults.reserve(Pending::kCapacity);
  p->taken_events.reserve(Pending::kCapacity);
  p->env = env;
  p->fd = fd;
  napi_create_reference(env, info[0], 1, &p->callback);
  napi_async_init(env, nullptr, Napi::String::New(env, "pagemirror-faults"), &p->context);
  uv_loop_t* loop = nullptr;
  napi_get_uv_event_loop(env, &loop);
  p->async = new uv_async_t;
  // The handle's data is a heap copy of the shared_ptr: the callback and the close callback own it.
  p->async->data = new std::shared_ptr<Pending>(p);
  uv_async_init(loop, p->async, &Userfaultfd::OnAsync);
  pending_ = p;
  serving_ = true;
  if (!self_ref_) {
    Napi::ObjectWrap<Userfaultfd>::Ref();
    self_ref_ = true;
  }
  if (!service_) service_ = std::make_unique<sys::FaultService>(fd, sys::page_size());
  int rc = service_->start(this, config.max_batch, config.workers, config.poll);
  if (rc) {
    StopService();
    ThrowSystemError(env, rc, "pthread_create");
  }
  return env.Undefined();
}

// reconfigure(maxBatch?, workers?, pollMode?, spinUs?): restarts a running service with other
// settings. The workers stop after their batch in hand (faults they were retrying go to the
// callback); what the kernel still has queued waits for the new ones.
Napi::Value Userfaultfd::Reconfigure(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  live_fd(env);
  if (!service_ || !service_->running() || !pending_) throw StateError(env, "ERR_PAGEMIRROR_NOT_SERVED", "not serving: call serve()");
  const ServiceConfig config = ConfigArgs(info, 0);
  service_->stop();
  int rc = service_->start(this, config.max_batch, config.workers, config.poll);
  if (rc && service_->start(this, config.max_batch, 1, {}) != 0) {
    // Not even one worker: nothing would serve the descriptor; stop as close() would, leaving
    // the outcome to the caller's close().
    StopService();
  }
  if (rc) ThrowSystemError(env, rc, "pthread_create");
  return env.Undefined();
}

// On the JavaScript thread: everything pending goes to the callback as one batch.
void Userfaultfd::OnAsync(uv_async_t* handle) {
  std::shared_ptr<Pending> p = *static_cast<std::shared_ptr<Pending>*>(handle->data);
  {
    std::lock_guard<std::mutex> lock(p->mu);
    p->faults.swap(p->taken_faults);  // both keep their capacity: nothing allocated under the lock
    p->events.swap(p->taken_events);
    p->queued = false;
  }
  auto* batch = new Batch();
  batch->faults.assign(p->taken_faults.begin(), p->taken_faults.end());
  batch->events.assign(p->taken_events.begin(), p->taken_events.end());
  p->taken_faults.clear();
  p->taken_events.clear();
  if (batch->faults.empty() && batch->events.empty()) {
    delete batch;
    return;
  }
  Napi::Env env(p->env);
  Napi::HandleScope scope(env);
  napi_value fn;
  if (napi_get_reference_value(p->env, p->callback, &fn) != napi_ok || fn == nullptr) {
    delete batch;
    return;
  }
  // MakeCallback: runs the microtask queue afterwards, so async handlers make progress.
  try {
    DeliverBatch(env, Napi::Function(env, fn), batch, p->context);
  } catch (const Napi::Error& e) {
    napi_fatal_exception(p->env, e.Value());
  }
}

void Userfaultfd::on_batch(const sys::FaultMsg* faults, size_t nfaults, const sys::EventMsg* events, size_t nevents) {
  std::shared_ptr<Pending>& p = pending_;
  if (!p) return;
  bool wake = false;
  size_t overflow_from = nfaults;
  {
    std::lock_guard<std::mutex> lock(p->mu);
    const size_t room = p->faults.capacity() - p->faults.size();
    if (nfaults > room) overflow_from = room;
    p->faults.insert(p->faults.end(), faults, faults + std::min(nfaults, room));
    const size_t eroom = p->events.capacity() - p->events.size();
    p->events.insert(p->events.end(), events, events + std::min(nevents, eroom));
    if (!p->queued) {
      p->queued = true;
      wake = true;
    }
    p->overflow += nfaults - overflow_from;
  }
  // More faults asleep at once than the buffer holds (more sleeping threads than it has room for):
  // never leave one asleep; resolve the excess as the fallback would.
  // (registrations_ belongs to the JavaScript thread: no write-protect-keeping zero page here.)
  for (size_t i = overflow_from; i < nfaults; i++) ResolveAsUnregistered(faults[i], false);
  if (wake) uv_async_send(p->async);
}

// setRules([{mapping|address, offset, length, action, source?, sourceOffset?, granule?, mode?}])
Napi::Value Userfaultfd::SetRules(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  live_fd(env);
  if (info.Length() < 1 || !info[0].IsArray()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "rules must be an array");
  Napi::Array arr = info[0].As<Napi::Array>();
  std::vector<sys::Rule> rules;
  std::vector<bool> on_shared_shmem;
  std::vector<RegionPin> pins;
  for (uint32_t i = 0; i < arr.Length(); i++) {
    if (!arr.Get(i).IsObject()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "each rule must be an object");
    Napi::Object o = arr.Get(i).As<Napi::Object>();
    sys::Rule r;
    uint64_t off = OptU64(o, "offset", 0);
    Napi::Value target = o.Get("mapping");
    uint64_t len;
    bool shared_shmem = false;
    if (target.IsBigInt()) {
      r.start = ToU64(target, "mapping") + off;
      len = OptU64(o, "length", 0);
      CheckAligned(env, r.start, sys::page_size(), "address");
    } else {
      Mapping* m = Mapping::Unwrap(target);
      len = OptU64(o, "length", m->region()->length - std::min(off, m->region()->length));
      r.start = m->Range(env, off, len);
      shared_shmem = m->region()->shared && !m->region()->hugetlb;
    }
    if (len == 0) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "rule length must be > 0");
    r.end = r.start + len;
    std::string action = OptString(o, "action");
    if (action == "handler") {  // the pager: every fault in the range goes to its engine
      r.kinds = sys::kFaultMissing | sys::kFaultWp | sys::kFaultMinor;
      r.action = sys::RuleAction::kHandler;
      r.handler = IsRemoteClient(o.Get("handler")) ? RemoteClientHandler(o.Get("handler")) : PagerHandler(o.Get("handler"));
      rules.push_back(r);
      on_shared_shmem.push_back(false);
      continue;
    }
    r.kinds = static_cast<uint32_t>(RuleKinds(env, action));
    r.action = action == "copy" ? sys::RuleAction::kCopy : action == "zero" ? sys::RuleAction::kZero
             : action == "move" ? sys::RuleAction::kMove : action == "poison" ? sys::RuleAction::kPoison
             : action == "unprotect" ? sys::RuleAction::kUnprotect : sys::RuleAction::kContinue;
    r.granule = OptU64(o, "granule", 0);
    if (r.granule && (r.granule & (r.granule - 1)))
      throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "granule must be a power of two");
    r.mode = OptU64(o, "mode", 0);
    if (r.action == sys::RuleAction::kCopy || r.action == sys::RuleAction::kMove) {
      Napi::Value src = o.Get("source");
      uint64_t soff = OptU64(o, "sourceOffset", 0);
      if (src.IsUndefined()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", action + " rules need a source Mapping");
      Mapping* sm = Mapping::Unwrap(src);
      r.source = sm->Range(env, soff, len, r.action == sys::RuleAction::kMove);
      pins.emplace_back(sm->region(), soff, len);
    }
    rules.push_back(r);
    on_shared_shmem.push_back(shared_shmem && r.action == sys::RuleAction::kZero);
  }
  if (!service_) service_ = std::make_unique<sys::FaultService>(fd_, sys::page_size());
  rules_ = std::move(rules);
  rule_on_shared_shmem_ = std::move(on_shared_shmem);
  PushRules();
  // A batch already in flight may still resolve with the old rules: the old sources stay pinned
  // (close() refuses, EBUSY) until it is done, which is microseconds. If it is stuck (a copy from a
  // source that is itself faulting), they stay pinned until a later setRules() finds it done.
  if (service_->wait_rules_quiescent(1000)) retired_pins_.clear();
  else for (RegionPin& p : rule_pins_) retired_pins_.push_back(std::move(p));
  rule_pins_ = std::move(pins);
  return env.Undefined();
}

void Userfaultfd::PushRules() {
  std::vector<sys::Rule> rules = rules_;
  for (size_t i = 0; i < rules.size(); i++)
    rules[i].zero_reads_markers = rule_on_shared_shmem_[i] && WpRegistered(rules[i].start, rules[i].end);
  service_->set_rules(std::move(rules));
}

Napi::Value Userfaultfd::Stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  sys::ServiceStats s = service_ ? service_->stats() : sys::ServiceStats{};
  Napi::Object o = Napi::Object::New(env);
  o.Set("reads", static_cast<double>(s.reads));
  o.Set("messages", static_cast<double>(s.messages));
  o.Set("faults", static_cast<double>(s.faults));
  o.Set("fastResolved", static_cast<double>(s.fast_resolved));
  o.Set("fastPages", static_cast<double>(s.fast_pages));
  o.Set("forwarded", static_cast<double>(s.forwarded));
  o.Set("events", static_cast<double>(s.events));
  o.Set("batches", static_cast<double>(s.batches));
  o.Set("maxBatch", static_cast<double>(s.max_batch));
  o.Set("eexist", static_cast<double>(s.eexist));
  o.Set("markerFills", static_cast<double>(s.marker_fills));
  o.Set("eagain", static_cast<double>(s.eagain));
  o.Set("errors", static_cast<double>(s.errors));
  o.Set("serviceNs", static_cast<double>(s.service_ns));
  SetPollStats(o, s);
  o.Set("workers", WorkerStats(env, service_ ? service_->worker_stats() : std::vector<sys::ServiceStats>{}));
  return o;
}

Napi::Value Userfaultfd::Outstanding(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<sys::FaultMsg> out = service_ ? service_->outstanding() : std::vector<sys::FaultMsg>{};
  Napi::BigUint64Array a = Napi::BigUint64Array::New(env, out.size());
  for (size_t i = 0; i < out.size(); i++) a[i] = out[i].address;
  return a;
}

Napi::Value Userfaultfd::Ref(const Napi::CallbackInfo& info) {
  if (pending_ && pending_->async) uv_ref(reinterpret_cast<uv_handle_t*>(pending_->async));
  return info.Env().Undefined();
}

Napi::Value Userfaultfd::Unref(const Napi::CallbackInfo& info) {
  if (pending_ && pending_->async) uv_unref(reinterpret_cast<uv_handle_t*>(pending_->async));
  return info.Env().Undefined();
}

void Userfaultfd::StopService() {
  if (service_) service_->stop();
  serving_ = false;
  if (std::shared_ptr<Pending> p = std::move(pending_)) {
    // Events read but never delivered: a fork's child descriptor nobody will adopt is closed here,
    // which wakes the child's faults (they proceed as unregistered memory) instead of leaving the
    // child asleep forever.
    {
      std::lock_guard<std::mutex> lock(p->mu);
      for (const sys::EventMsg& e : p->events)
        if (e.kind == sys::EventKind::kFork) sys::close_fd(static_cast<int>(e.a));
      p->events.clear();
      p->faults.clear();
    }
    // The handle is closed on this (the JavaScript) thread; its close callback frees it and drops
    // the last references once libuv is done with it.
    if (p->callback) napi_delete_reference(p->env, p->callback);
    if (p->context) napi_async_destroy(p->env, p->context);
    p->callback = nullptr;
    p->context = nullptr;
    uv_close(reinterpret_cast<uv_handle_t*>(p->async), [](uv_handle_t* h) {
      delete static_cast<std::shared_ptr<Pending>*>(h->data);
      delete reinterpret_cast<uv_async_t*>(h);
    });
  }
}

// What the kernel would have done without us: un-protect a WP fault, map the page cache's page for a
// minor one, a zero page for a missing one; keep_wp: a missing fault in a range also registered for
// WP gets a write-protected zero page (ZEROPAGE has no WP mode), or a dirty tracker would miss the
// next write. Wakes the faulter. No allocation: the service thread calls it too.
// page: the memory's page size (0: the base page; the service thread passes 0, as it cannot look
// registrations up). A resolve that fails (a huge page resolved with the base size, memory gone)
// still wakes the faulter: it faults again, and that fault is delivered.
void Userfaultfd::ResolveAsUnregistered(const sys::FaultMsg& f, bool keep_wp, uint64_t page) {
  if (page == 0) page = sys::page_size();
  const uint64_t a = f.address & ~(page - 1);
  int64_t done = 0;
  int rc;
  if (f.flags & UFFD_PAGEFAULT_FLAG_WP) {
    rc = sys::uffd_writeprotect(fd_, a, page, 0);
  } else if (f.flags & UFFD_PAGEFAULT_FLAG_MINOR) {
    rc = sys::uffd_continue(fd_, a, page, 0, &done);
  } else if (page > sys::kZeroSourceBytes || keep_wp) {
    const void* src = page <= sys::kZeroSourceBytes ? sys::zero_source() : (page <= zero_huge_len_ ? zero_huge_ : nullptr);
    rc = src ? sys::uffd_copy(fd_, a, reinterpret_cast<uint64_t>(src), page, keep_wp ? UFFDIO_COPY_MODE_WP : 0, &done) : -EINVAL;
  } else {
    rc = sys::uffd_zero_fill(fd_, a, page, 0, &done, nullptr);
  }
  if (rc) sys::uffd_wake(fd_, a, page);
}

const Userfaultfd::Registration* Userfaultfd::RegistrationAt(uint64_t addr) const {
  for (const Registration& r : registrations_)
    if (addr >= r.start && addr < r.start + r.len) return &r;
  return nullptr;
}

// fallback(addresses: BigUint64Array, flags: Uint32Array): what the kernel would have done without
// us, for faults a handler failed to resolve (the TypeScript layer's fallback), each at its
// memory's page size. Wakes every faulter, resolved or not.
Napi::Value Userfaultfd::Fallback(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsTypedArray() || !info[1].IsTypedArray() ||
      info[0].As<Napi::TypedArray>().TypedArrayType() != napi_biguint64_array ||
      info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array)
    throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "fallback(addresses: BigUint64Array, flags: Uint32Array)");
  auto addrs = info[0].As<Napi::TypedArrayOf<uint64_t>>();
  auto flags = info[1].As<Napi::TypedArrayOf<uint32_t>>();
  if (addrs.ElementLength() != flags.ElementLength())
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "addresses and flags must have the same length");
  if (fd_ < 0) return env.Undefined();
  for (size_t i = 0; i < addrs.ElementLength(); i++) {
    sys::FaultMsg f{};
    f.address = addrs[i];
    f.flags = flags[i];
    const Registration* r = RegistrationAt(f.address);
    const uint64_t page = r ? r->page : sys::page_size();
    ResolveAsUnregistered(f, r && (r->mode & UFFDIO_REGISTER_MODE_WP), page);
    if (service_) service_->resolved(f.address & ~(page - 1), page);  // woken, resolved or not
  }
  return env.Undefined();
}

void Userfaultfd::CloseWith(Outcome outcome) {
  if (fd_ < 0) return;
  StopService();
  if (outcome != Outcome::kWake && service_) {
    std::vector<sys::FaultMsg> pending = service_->outstanding();
    std::vector<sys::FaultMsg> queued = service_->drain();
    pending.insert(pending.end(), queued.begin(), queued.end());
    for (const sys::FaultMsg& f : pending) {
      if (outcome == Outcome::kSigbus) {
        int64_t done;
        const uint64_t page = sys::page_size();
        sys::uffd_poison(fd_, f.address & ~(page - 1), page, 0, &done);
      } else {
        const Registration* r = RegistrationAt(f.address);
        ResolveAsUnregistered(f, r && (r->mode & UFFDIO_REGISTER_MODE_WP), r ? r->page : 0);
      }
    }
  }
  service_.reset();
  rule_pins_.clear();
  rules_.clear();  // and their handlers (a pager, a served client) with the service
  rule_on_shared_shmem_.clear();
  retired_pins_.clear();
  for (auto& reg : registrations_)
    if (auto r = reg.region.lock()) {
      r->registered.fetch_sub(1);
      r->js_registered.fetch_sub(1);
    }
  registrations_.clear();
  sys::close_fd(fd_);
  fd_ = -1;
}

Napi::Value Userfaultfd::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string how = info.Length() > 0 && info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "wake";
  Outcome o;
  if (how == "wake") o = Outcome::kWake;
  else if (how == "zero") o = Outcome::kZero;
  else if (how == "sigbus") o = Outcome::kSigbus;
  else throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "outcome must be 'wake', 'zero' or 'sigbus'");
  if (o == Outcome::kSigbus && !(features_ & UFFD_FEATURE_POISON) && fd_ >= 0)
    throw StateError(env, "ERR_PAGEMIRROR_FEATURE", "close('sigbus') needs the POISON feature negotiated");
  CloseWith(o);
  if (self_ref_) {
    self_ref_ = false;
    Napi::ObjectWrap<Userfaultfd>::Unref();
  }
  return env.Undefined();
}

}  // namespace pm
