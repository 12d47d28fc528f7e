#include "mapping.h"

#include <cerrno>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/mman.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "../sys/access.h"
#include "../sys/file.h"
#include "../sys/mem.h"
#include "../sys/pagemap.h"
#include "../sys/uapi.h"
#include "../engine/engine.h"
#include "../engine/mirror.h"
#include "addon.h"
#include "args.h"
#include "device.h"
#include "errors.h"

namespace pm {

// ---- Mapping -----------------------------------------------------------------------------------

Napi::Function Mapping::Init(Napi::Env env) {
  return DefineClass(env, "Mapping",
                     {
                         InstanceAccessor<&Mapping::Address>("address"),
                         InstanceAccessor<&Mapping::Length>("length"),
                         InstanceMethod<&Mapping::Info>("info"),
                         InstanceMethod<&Mapping::Buffer>("buffer"),
                         InstanceMethod<&Mapping::Protect>("protect"),
                         InstanceMethod<&Mapping::Advise>("advise"),
                         InstanceMethod<&Mapping::Sync>("sync"),
                         InstanceMethod<&Mapping::Remap>("remap"),
                         InstanceMethod<&Mapping::Fallocate>("fallocate"),
                         InstanceMethod<&Mapping::Truncate>("truncate"),
                         InstanceMethod<&Mapping::Residency>("residency"),
                         InstanceMethod<&Mapping::Cachestat>("cachestat"),
                         InstanceMethod<&Mapping::Pagemap>("pagemap"),
                         InstanceMethod<&Mapping::Statx>("statx"),
                         InstanceMethod<&Mapping::ReadInto>("readInto"),
                         InstanceMethod<&Mapping::WriteFrom>("writeFrom"),
                         InstanceMethod<&Mapping::Unmap>("unmap"),
                         InstanceMethod<&Mapping::Close>("close"),
                     });
}

Mapping::Mapping(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Mapping>(info) {
  // Constructed only by Map(), which passes an External<shared_ptr<Region>>.
  if (info.Length() < 1 || !info[0].IsExternal())
    throw CodedTypeError(info.Env(), "ERR_ILLEGAL_CONSTRUCTOR", "use pagemirror's map functions to create a Mapping");
  auto* holder = info[0].As<Napi::External<std::shared_ptr<Region>>>().Data();
  region_ = *holder;
}

Mapping::~Mapping() = default;

Mapping* Mapping::Unwrap(Napi::Value v) {
  Napi::Env env = v.Env();
  AddonData* data = env.GetInstanceData<AddonData>();
  if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(data->mapping_ctor.Value()))
    throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "expected a Mapping");
  return Napi::ObjectWrap<Mapping>::Unwrap(v.As<Napi::Object>());
}

Region& Mapping::live(Napi::Env env) {
  if (region_->closed.load()) throw StateError(env, "ERR_PAGEMIRROR_CLOSED", "the mapping is closed");
  return *region_;
}

uint64_t Mapping::Range(Napi::Env env, uint64_t off, uint64_t len, bool page_aligned) {
  Region& r = live(env);
  if (page_aligned) {
    CheckAligned(env, off, r.page, "offset");
    CheckAligned(env, len, r.page, "length");
  }
  if (!r.contains(off, len))
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE",
                          "range [" + std::to_string(off) + ", +" + std::to_string(len) +
                              ") lies outside the mapping of " + std::to_string(r.length) + " bytes");
  return r.addr + off;
}

void Mapping::DetachBuffer() {
  auto detach = [](Napi::Reference<Napi::ArrayBuffer>& ref) {
    if (ref.IsEmpty()) return;
    Napi::ArrayBuffer ab = ref.Value();
    if (!ab.IsEmpty() && !ab.IsDetached()) ab.Detach();
    ref.Reset();
  };
  detach(buffer_);
  for (auto& v : views_) detach(v);
  views_.clear();
}

static const char* KindName(RegionKind k) {
  switch (k) {
    case RegionKind::kAnonymous: return "anonymous";
    case RegionKind::kMemfd: return "memfd";
    case RegionKind::kFile: return "file";
  }
  return "?";
}

Napi::Value Mapping::Address(const Napi::CallbackInfo& info) {
  return Napi::BigInt::New(info.Env(), region_->addr);
}

Napi::Value Mapping::Length(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(region_->length));
}

Napi::Value Mapping::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Region& r = *region_;
  Napi::Object o = Napi::Object::New(env);
  o.Set("kind", KindName(r.kind));
  o.Set("address", Napi::BigInt::New(env, r.addr));
  o.Set("length", static_cast<double>(r.length));
  o.Set("pageSize", static_cast<double>(r.page));
  o.Set("shared", r.shared);
  o.Set("hugetlb", r.hugetlb);
  o.Set("fd", r.fd);
  o.Set("fileOffset", static_cast<double>(r.file_offset));
  if (!r.path.empty()) o.Set("path", r.path);
  if (!r.name.empty()) o.Set("name", r.name);
  o.Set("closed", r.closed.load());
  o.Set("registered", r.registered.load() > 0);
  o.Set("pins", r.pins.load());
  Napi::Array segs = Napi::Array::New(env);
  {
    std::lock_guard<std::mutex> lock(r.mu);
    uint32_t i = 0;
    for (auto it = r.prot.begin(); it != r.prot.end(); ++it) {
      auto next = std::next(it);
      Napi::Object s = Napi::Object::New(env);
      s.Set("offset", static_cast<double>(it->first));
      s.Set("length", static_cast<double>((next == r.prot.end() ? r.length : next->first) - it->first));
      s.Set("prot", it->second);
      segs.Set(i++, s);
    }
  }
  o.Set("protection", segs);
  Napi::Array holes = Napi::Array::New(env);
  {
    std::lock_guard<std::mutex> lock(r.mu);
    for (uint32_t i = 0; i < r.holes.size(); i++) {
      Napi::Object h = Napi::Object::New(env);
      h.Set("offset", static_cast<double>(r.holes[i].first));
      h.Set("length", static_cast<double>(r.holes[i].second));
      holes.Set(i, h);
    }
  }
  o.Set("holes", holes);
  return o;
}

namespace {
Napi::Error CpuViaLibrary(Napi::Env env) {
  return StateError(env, "ERR_PAGEMIRROR_FILE_STRATEGY",
                    "a device holds its own copies of this file's pages (copy or bounce strategy) on a file system "
                    "userfaultfd cannot register, so the CPU's mapping could read stale pages; use the mirror's "
                    "read()/write(), which go through the strategy");
}
}  // namespace

namespace {
// The finalizer's hold on the region. Node may call the finalizer when creating the ArrayBuffer
// fails (node::Buffer::New does, past its size limit), or may not: both the finalizer and the
// failed creator drop one reference, and whoever drops the last one frees the hold, so nothing is
// freed twice and a failure keeps no reference to the region.
struct ViewHold {
  std::shared_ptr<Region> region;
  int refs = 2;
  static void Drop(ViewHold* h) {
    if (--h->refs == 0) delete h;
  }
};
}  // namespace

// An external ArrayBuffer over [off, off + len) that holds the region alive, remembered so that
// DetachBuffer() detaches it.
Napi::ArrayBuffer Mapping::NewView(Napi::Env env, uint64_t off, uint64_t len) {
  Region& r = *region_;
  const uint64_t limit = env.GetInstanceData<AddonData>()->max_view_bytes;
  if (len > limit)
    throw CodedRangeError(env, "ERR_PAGEMIRROR_VIEW_TOO_LARGE",
                          "a view of " + std::to_string(len) + " bytes is larger than the largest ArrayBuffer this "
                          "Node allows (" + std::to_string(limit) + " bytes, buffer.constants.MAX_LENGTH); take "
                          "windows of the mapping with view(offset, length)");
  auto* hold = new ViewHold{region_};
  napi_value value = nullptr;
  napi_status st = napi_create_external_arraybuffer(
      env, reinterpret_cast<void*>(r.addr + off), len,
      [](napi_env, void*, void* hint) { ViewHold::Drop(static_cast<ViewHold*>(hint)); }, hold, &value);
  if (st != napi_ok) {
    hold->region.reset();
    ViewHold::Drop(hold);
    // Node's own exception (if it threw one) says less than this.
    bool pending = false;
    if (napi_is_exception_pending(env, &pending) == napi_ok && pending) {
      napi_value ignored;
      napi_get_and_clear_last_exception(env, &ignored);
    }
    throw CodedRangeError(env, "ERR_PAGEMIRROR_VIEW_TOO_LARGE",
                          "Node refused an ArrayBuffer of " + std::to_string(len) +
                              " bytes over this mapping; take smaller windows with view(offset, length)");
  }
  hold->refs--;  // the finalizer's reference is the only one left
  Napi::ArrayBuffer ab(env, value);
  views_.erase(std::remove_if(views_.begin(), views_.end(),
                              [](Napi::Reference<Napi::ArrayBuffer>& v) { return v.IsEmpty() || v.Value().IsEmpty(); }),
               views_.end());
  return ab;
}

// buffer() is the ArrayBuffer over the whole mapping (one, cached); buffer(offset, length) a new
// one over that window. Refused whenever a JavaScript access could kill or hang the process: while
// part of it is not read-write (a write would SIGSEGV), and while the mapping is registered with a
// userfaultfd (the main thread would sleep on a fault only it can resolve).
Napi::Value Mapping::Buffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Region& r = live(env);
  const bool whole = info.Length() < 1 || info[0].IsUndefined();
  const uint64_t off = whole ? 0 : ToU64(info[0], "offset");
  const uint64_t len = whole ? r.length : info.Length() < 2 || info[1].IsUndefined() ? r.length - std::min(off, r.length)
                                                                                    : ToU64(info[1], "length");
  Range(env, off, len, false);
  if (whole && !buffer_.IsEmpty()) {
    Napi::ArrayBuffer ab = buffer_.Value();
    if (!ab.IsEmpty() && !ab.IsDetached()) return ab;
  }
  if ((r.prot_over(off, len) & (PROT_READ | PROT_WRITE)) != (PROT_READ | PROT_WRITE))
    throw StateError(env, "ERR_PAGEMIRROR_NOT_WRITABLE",
                     "the range is not readable and writable throughout, so no ArrayBuffer is handed out "
                     "(a JavaScript write would kill the process); use read() or readSync()");
  if (r.cpu_via_library.load() > 0) throw CpuViaLibrary(env);
  if (r.registered.load() > 0)
    throw StateError(env, "ERR_PAGEMIRROR_REGISTERED",
                     "the mapping is registered with a userfaultfd: a JavaScript access could fault on the main "
                     "thread, which is the thread that must resolve it; use read()/write(), which run on a native "
                     "thread");
  Napi::ArrayBuffer ab = NewView(env, off, len);
  if (whole) buffer_ = Napi::Reference<Napi::ArrayBuffer>::New(ab, 0);
  else views_.push_back(Napi::Reference<Napi::ArrayBuffer>::New(ab, 0));
  return ab;
}

Napi::Value Mapping::Protect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t off = ToU64(info[0], "offset"), len = ToU64(info[1], "length");
  int64_t prot = ToI64(info[2], "prot");
  if (prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC))
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "prot has unknown bits");
  uint64_t addr = Range(env, off, len);
  Region& r = *region_;
  const int before = r.prot_over(off, len);
  if ((before & ~prot) && r.pinned_over(off, len))
    throw SystemError(env, -EBUSY, "mprotect",
                      {nullptr, "native threads are using this mapping; taking permissions away now could kill "
                                "them mid-access"});
  if ((prot & (PROT_READ | PROT_WRITE)) != (PROT_READ | PROT_WRITE)) DetachBuffer();
  Region::Invalidation inv(&r, off, len, InvalidateCause::kProtect);
  int rc = sys::protect(reinterpret_cast<void*>(addr), len, static_cast<int>(prot));
  if (rc) ThrowSystemError(env, rc, "mprotect", {r.path.empty() ? nullptr : r.path.c_str()});
  r.set_prot(off, len, static_cast<int>(prot));
  return env.Undefined();
}

Napi::Value Mapping::Advise(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t off = ToU64(info[0], "offset"), len = ToU64(info[1], "length");
  int64_t advice = ToI64(info[2], "advice");
  uint64_t addr = Range(env, off, len);
  if (advice == MADV_POPULATE_READ || advice == MADV_POPULATE_WRITE)
    CheckNoJsFault(env, off, len, advice == MADV_POPULATE_WRITE, "populating on the JavaScript thread");
  // DONTNEED/REMOVE/FREE may drop the contents; PAGEOUT/COLLAPSE change the page tables but keep
  // them (a device page survives those, as a device-private page does in the kernel).
  const bool discards = advice == MADV_DONTNEED || advice == MADV_REMOVE || advice == MADV_FREE;
  const bool rearranges = advice == MADV_PAGEOUT || advice == MADV_COLLAPSE;
  std::optional<Region::Invalidation> inv;
  if (discards) inv.emplace(region_.get(), off, len, InvalidateCause::kDiscard);
  else if (rearranges) inv.emplace(region_.get(), off, len, InvalidateCause::kAdvise);
  int rc = sys::advise(reinterpret_cast<void*>(addr), len, static_cast<int>(advice));
  if (rc) ThrowSystemError(env, rc, "madvise", {region_->path.empty() ? nullptr : region_->path.c_str()});
  return env.Undefined();
}

Napi::Value Mapping::Sync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t off = ToU64(info[0], "offset"), len = ToU64(info[1], "length");
  int64_t flags = ToI64(info[2], "flags");
  uint64_t addr = Range(env, off, len);
  // Writeback cleaning write-protects the pages (page_mkclean): device write access goes with it.
  std::optional<Region::Invalidation> inv;
  if (region_->shared && region_->kind != RegionKind::kAnonymous) inv.emplace(region_.get(), off, len, InvalidateCause::kWriteback);
  int rc = sys::sync(reinterpret_cast<void*>(addr), len, static_cast<int>(flags));
  // A write error is reported once per open file description, and file mirrors share this one.
  // (EBUSY, EINVAL and ENOMEM are msync's own: nothing failed to be written.)
  if (inv && rc && rc != -EBUSY && rc != -EINVAL && rc != -ENOMEM) inv->writeback_error(rc);
  if (rc) ThrowSystemError(env, rc, "msync", {region_->path.empty() ? nullptr : region_->path.c_str()});
  return env.Undefined();
}

// remap(length, mayMove, address?, dontUnmap?): mremap of the whole mapping. The address may
// change: the old ArrayBuffer is detached first. Mirrors follow the mapping (Region::Invalidation::
// moved). address: MREMAP_FIXED, into a range that must be free (reserved first with
// MAP_FIXED_NOREPLACE, since MREMAP_FIXED would silently unmap whatever lies there, another
// Mapping's memory included). dontUnmap: MREMAP_DONTUNMAP; the old range stays mapped and is
// returned as a new Mapping (empty for private memory; the same pages for shared memory).
Napi::Value Mapping::Remap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Region& r = live(env);
  uint64_t new_len = ToU64(info[0], "length");
  bool may_move = info.Length() > 1 && info[1].ToBoolean().Value();
  const bool fixed = info.Length() > 2 && !info[2].IsUndefined() && !info[2].IsNull();
  if (fixed && !info[2].IsBigInt()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "address must be a bigint");
  const uint64_t to = fixed ? ToU64(info[2], "address") : 0;
  bool dont_unmap = false;
  if (info.Length() > 3 && !info[3].IsUndefined()) {
    if (!info[3].IsBoolean()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "dontUnmap must be a boolean");
    dont_unmap = info[3].As<Napi::Boolean>().Value();
  }
  if (new_len == 0) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "length must be > 0");
  CheckAligned(env, new_len, r.page, "length");
  if ((fixed || dont_unmap) && !may_move)
    throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "address and dontUnmap move the mapping: mayMove cannot be false");
  if (fixed) {
    CheckAligned(env, to, r.page, "address");
    if (to > UINT64_MAX - new_len)
      throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "address + length overflows the address space");
    if (to < r.addr + r.length && r.addr < to + new_len)
      throw CodedRangeError(env, "ERR_OUT_OF_RANGE",
                            "the destination overlaps the mapping itself: mremap moves to a disjoint range");
  }
  if (dont_unmap && new_len != r.length)
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE",
                          "dontUnmap keeps the length: the kernel moves the pages and leaves the old range as it was "
                          "(remap to " + std::to_string(r.length) + " bytes, then resize)");
  if (dont_unmap && r.hugetlb)
    throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE",
                         "dontUnmap does not apply to hugetlb mappings (the kernel refuses MREMAP_DONTUNMAP on "
                         "VM_DONTEXPAND mappings)");
  if (r.pins.load() > 0)
    throw SystemError(env, -EBUSY, "mremap", {nullptr, "native threads are using this mapping"});
  const char* path = r.path.empty() ? nullptr : r.path.c_str();
  // An fd for the old range's Mapping, taken before anything changes.
  int kept_fd = -1;
  if (dont_unmap && r.fd >= 0) {
    kept_fd = fcntl(r.fd, F_DUPFD_CLOEXEC, 0);
    if (kept_fd < 0) ThrowSystemError(env, -errno, "fcntl", {path});
  }
  void* reserved = nullptr;
  if (fixed) {
    int rc = sys::map(&reserved, reinterpret_cast<void*>(to), new_len, PROT_NONE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
    if (rc == 0 && reinterpret_cast<uint64_t>(reserved) != to) {  // a kernel before 4.17 took it as a hint
      sys::unmap(reserved, new_len);
      rc = -EEXIST;
    }
    if (rc) {
      if (kept_fd >= 0) sys::close_fd(kept_fd);
      ThrowSystemError(env, rc, "mmap",
                       {nullptr, rc == -EEXIST ? "something is already mapped at the destination: moving there would "
                                                 "unmap it; choose a free range" : nullptr, -1, to});
    }
  }
  DetachBuffer();
  // Shared memory: device pages come home first, since the page cache is the data every mapping of
  // the file sees (the old range of a dontUnmap too). Private memory: device pages stay in device
  // memory and their holes move with the page tables, as device-private entries do in the kernel.
  if (r.shared) engine::Engine::get().bring_home(&r);
  // A shrink unmaps the tail: mirrors drop it as they would for munmap (their entries there go, and
  // a device access to it fails with EFAULT until the mapping grows back).
  if (new_len < r.length) {
    Region::Invalidation tail(&r, new_len, r.length - new_len, InvalidateCause::kUnmap);
  }
  const uint64_t old_addr = r.addr, old_len = r.length;
  std::optional<Region::Invalidation> inv(std::in_place, &r, 0, r.length, InvalidateCause::kRemap);
  int flags = may_move ? MREMAP_MAYMOVE : 0;
  if (fixed) flags |= MREMAP_FIXED;
  if (dont_unmap) flags |= MREMAP_DONTUNMAP;
  void* out = nullptr;
  int rc = sys::remap(&out, reinterpret_cast<void*>(r.addr), r.length, new_len, flags, reserved);
  if (rc) {
    if (reserved) sys::unmap(reserved, new_len);
    if (kept_fd >= 0) sys::close_fd(kept_fd);
    inv.reset();
    const char* hint = nullptr;
    if (rc == -EINVAL && r.hugetlb && new_len > r.length)
      hint = "the kernel does not grow hugetlb mappings (its huge page reservations cannot be split): map a larger one";
    else if (rc == -EINVAL && dont_unmap)
      hint = "MREMAP_DONTUNMAP needs Linux 5.7, and a private anonymous mapping before 5.13";
    else if (rc == -EFAULT)
      hint = "the mapping is no longer one kernel VMA (unmap() holes, protect() segments or a partial userfaultfd "
             "registration split it), and mremap moves one VMA";
    else if (rc == -ENOMEM && !may_move)
      hint = "the range after the mapping is taken: allow mayMove";
    ThrowSystemError(env, rc, "mremap", {path, hint});
  }
  if (new_len < r.length) {
    // Growing needs nothing: the last segment runs to the end, as the kernel extends the last VMA.
    std::lock_guard<std::mutex> lock(r.mu);
    r.prot.erase(r.prot.lower_bound(new_len), r.prot.end());
  }
  r.addr = reinterpret_cast<uint64_t>(out);
  r.length = new_len;
  inv->moved(old_addr, r.addr, new_len, dont_unmap);
  inv.reset();
  if (!dont_unmap) return Napi::BigInt::New(env, r.addr);

  auto k = std::make_shared<Region>();
  k->id = engine::Engine::next_owner_id();
  k->addr = old_addr;
  k->length = old_len;
  k->page = r.page;
  k->kind = r.kind;
  k->shared = r.shared;
  k->fd = kept_fd;
  k->file_offset = r.file_offset;
  k->path = r.path;
  k->name = r.name;
  {
    std::lock_guard<std::mutex> lock(r.mu);
    k->prot = r.prot;
  }
  // The kernel keeps the old range registered with every userfaultfd that had it (what a garbage
  // collector wants: faults there go to its handler). The engine's registrations moved with the
  // mirrors; any left are the user's, so JavaScript gets no view of the old range.
  if (r.registered.load() > engine::Engine::get().registered_mirrors(&r)) k->registered.store(1);
  AddonData* data = env.GetInstanceData<AddonData>();
  std::shared_ptr<Region> holder = k;
  return data->mapping_ctor.Value().New({Napi::External<std::shared_ptr<Region>>::New(env, &holder)});
}

Napi::Value Mapping::Fallocate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Region& r = live(env);
  int64_t mode = ToI64(info[0], "mode");
  uint64_t off = ToU64(info[1], "offset"), len = ToU64(info[2], "length");
  if (r.fd < 0) throw StateError(env, "ERR_PAGEMIRROR_NO_FILE", "anonymous memory has no file to fallocate");
  if (len == 0) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "length must be > 0");
  uint64_t avail = 0;
  if (!(mode & FALLOC_FL_PUNCH_HOLE) && sys::on_tmpfs(r.fd) == 1 && sys::memory_available(&avail) == 0 && len > avail) {
    // A memory-backed file's blocks are memory: the kernel would grant this and the OOM killer
    // would then end some process (perhaps this one) instead of the call failing.
    const std::string hint = "a memory-backed file (memfd, tmpfs) takes RAM or swap for every block: " + std::to_string(len) +
                             " bytes asked, " + std::to_string(avail) + " available (MemAvailable + SwapFree)";
    ThrowSystemError(env, -ENOMEM, "fallocate", {r.path.empty() ? nullptr : r.path.c_str(), hint.c_str()});
  }
  std::optional<Region::Invalidation> inv;
  if (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) FileRangeInvalidation(&inv, off, len, InvalidateCause::kTruncate);
  int rc = sys::allocate(r.fd, static_cast<int>(mode), static_cast<off_t>(off), static_cast<off_t>(len));
  if (rc) ThrowSystemError(env, rc, "fallocate", {r.path.empty() ? nullptr : r.path.c_str()});
  return env.Undefined();
}

Napi::Value Mapping::Truncate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Region& r = live(env);
  uint64_t len = ToU64(info[0], "length");
  if (r.fd < 0) throw StateError(env, "ERR_PAGEMIRROR_NO_FILE", "anonymous memory has no file to truncate");
  std::optional<Region::Invalidation> inv;
  FileRangeInvalidation(&inv, len, UINT64_MAX - len, InvalidateCause::kTruncate);
  int rc = sys::truncate_fd(r.fd, len);
  if (rc) ThrowSystemError(env, rc, "ftruncate", {r.path.empty() ? nullptr : r.path.c_str()});
  return env.Undefined();
}

Napi::Value Mapping::Residency(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t off = ToU64(info[0], "offset"), len = ToU64(info[1], "length");
  uint64_t addr = Range(env, off, len);
  const uint64_t base = sys::page_size();
  CheckResultBytes(env, (len + base - 1) / base, "residency");
  Napi::Uint8Array out = Napi::Uint8Array::New(env, (len + base - 1) / base);
  int rc = sys::residency(reinterpret_cast<void*>(addr), len, out.Data());
  if (rc) ThrowSystemError(env, rc, "mincore");
  return out;
}

Napi::Value Mapping::Cachestat(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Region& r = live(env);
  if (r.fd < 0) throw StateError(env, "ERR_PAGEMIRROR_NO_FILE", "anonymous memory has no page cache");
  uint64_t off = ToU64(info[0], "offset"), len = ToU64(info[1], "length");
  sys::CacheStat cs{};
  int rc = sys::cachestat(r.fd, off, len, &cs);
  if (rc) ThrowSystemError(env, rc, "cachestat", {r.path.empty() ? nullptr : r.path.c_str()});
  Napi::Object o = Napi::Object::New(env);
  o.Set("cache", static_cast<double>(cs.cache));
  o.Set("dirty", static_cast<double>(cs.dirty));
  o.Set("writeback", static_cast<double>(cs.writeback));
  o.Set("evicted", static_cast<double>(cs.evicted));
  o.Set("recentlyEvicted", static_cast<double>(cs.recently_evicted));
  return o;
}

Napi::Value Mapping::Pagemap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t off = ToU64(info[0], "offset"), len = ToU64(info[1], "length");
  uint64_t addr = Range(env, off, len, false);
  const uint64_t base = sys::page_size();
  CheckAligned(env, off, base, "offset");
  size_t n = (len + base - 1) / base;
  CheckResultBytes(env, n * sizeof(uint64_t), "pagemap");
  Napi::BigUint64Array out = Napi::BigUint64Array::New(env, n);
  int rc = sys::pagemap_read(addr, n, out.Data());
  if (rc) ThrowSystemError(env, rc, "pread", {"/proc/self/pagemap"});
  return out;
}

Napi::Value Mapping::Statx(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Region& r = live(env);
  if (r.fd < 0) throw StateError(env, "ERR_PAGEMIRROR_NO_FILE", "anonymous memory has no file");
  sys::StatxInfo sx;
  int rc = sys::statx_fd(r.fd, &sx);
  if (rc) ThrowSystemError(env, rc, "statx", {r.path.empty() ? nullptr : r.path.c_str()});
  return StatxToObject(env, sx);
}

// A file range [file_off, file_off + len) as it appears in this mapping, invalidated.
void Mapping::FileRangeInvalidation(std::optional<Region::Invalidation>* inv, uint64_t file_off, uint64_t len,
                                    InvalidateCause cause) {
  Region& r = *region_;
  const uint64_t map_start = r.file_offset, map_end = r.file_offset + r.length;
  const uint64_t end = len > UINT64_MAX - file_off ? UINT64_MAX : file_off + len;
  const uint64_t s = std::max(file_off, map_start), e = std::min(end, map_end);
  if (s >= e) return;
  const uint64_t first = (s - map_start) & ~(r.page - 1);
  const uint64_t last = ((e - map_start) + r.page - 1) & ~(r.page - 1);
  inv->emplace(&r, first, std::min(last, r.length) - first, cause);
}

// Throws ERR_PAGEMIRROR_WOULD_FAULT naming the first page of [off, off+len) that an access would
// fault on: not present, or write-protected by uffd for a write (pagemap).
static void ThrowIfWouldFault(Napi::Env env, Region& r, uint64_t off, uint64_t len, bool write, const std::string& what,
                              const std::string& instead) {
  const uint64_t base = sys::page_size();
  const uint64_t first = (r.addr + off) & ~(base - 1);
  const uint64_t end = r.addr + off + len;
  const uint64_t n = (end - first + base - 1) / base;
  // In chunks: a pin may cover a terabyte noReserve range.
  constexpr uint64_t kChunk = 4096;
  std::vector<uint64_t> pm(std::min(n, kChunk));
  for (uint64_t at = 0; at < n; at += kChunk) {
    const uint64_t k = std::min(kChunk, n - at);
    int rc = sys::pagemap_read(first + at * base, k, pm.data());
    if (rc) ThrowSystemError(env, rc, "pread", {"/proc/self/pagemap"});
    for (uint64_t i = 0; i < k; i++) {
      bool present = pm[i] >> 63 & 1;
      bool uffd_wp = pm[i] >> 57 & 1;
      if (!present || (write && uffd_wp))
        throw StateError(env, "ERR_PAGEMIRROR_WOULD_FAULT",
                         std::string("page at offset ") + std::to_string(first + (at + i) * base - r.addr) +
                             (present ? " is write-protected" : " is not present") +
                             " in a userfaultfd-registered mapping: " + what +
                             " would sleep on the thread that must resolve the fault; " + instead);
    }
  }
}

// A synchronous access from the main thread is allowed on registered memory only when it cannot
// fault: every page present (and, for a write, not write-protected by uffd). Racing changes by
// other threads remain possible; the threading rule in DESIGN.md says to use read()/write() then.
void Mapping::CheckNoFault(Napi::Env env, uint64_t off, uint64_t len, bool write) {
  Region& r = *region_;
  const int need = write ? PROT_WRITE : PROT_READ;
  if (!(r.prot_over(off, len) & need))
    throw SystemError(env, -EACCES, write ? "write" : "read",
                      {r.path.empty() ? nullptr : r.path.c_str(),
                       write ? "the range is not writable (mprotect/map prot)" : "the range is not readable"});
  if (r.cpu_via_library.load() > 0) throw CpuViaLibrary(env);
  if (r.registered.load() == 0 || len == 0) return;
  ThrowIfWouldFault(env, r, off, len, write, "a synchronous access",
                    "use the asynchronous read()/write()");
}

// Only registrations made through a Userfaultfd count: the engine's faults are resolved by its own
// native thread. Like CheckNoFault, it cannot see changes other threads make after it looked.
void Mapping::CheckNoJsFault(Napi::Env env, uint64_t off, uint64_t len, bool write, const std::string& what) {
  Region& r = live(env);
  if (r.js_registered.load() == 0 || len == 0) return;
  ThrowIfWouldFault(env, r, off, len, write, what,
                    std::string("fault the range in first with `await mapping.populate(") + (write ? "{ write: true }" : "") +
                        ")` (a native thread: the handler serves its faults meanwhile), or do this before registering");
}

Napi::Value Mapping::ReadInto(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t off = ToU64(info[0], "offset");
  if (info.Length() < 2 || !info[1].IsTypedArray())
    throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "target must be a Uint8Array");
  Napi::TypedArray ta = info[1].As<Napi::TypedArray>();
  uint64_t len = ta.ByteLength();
  uint64_t addr = Range(env, off, len, false);
  CheckNoFault(env, off, len, false);
  uint8_t* dst = static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
  uint64_t bad = 0;
  if (sys::guarded_copy(dst, reinterpret_cast<void*>(addr), len, &bad))
    ThrowSystemError(env, -EFAULT, "read", {region_->path.empty() ? nullptr : region_->path.c_str(),
                                            "SIGBUS while reading: the page has no backing (file truncated, "
                                            "poisoned, or hugetlb pool exhausted)",
                                            -1, bad});
  return Napi::Number::New(env, static_cast<double>(len));
}

Napi::Value Mapping::WriteFrom(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t off = ToU64(info[0], "offset");
  if (info.Length() < 2 || !info[1].IsTypedArray())
    throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "source must be a Uint8Array");
  Napi::TypedArray ta = info[1].As<Napi::TypedArray>();
  uint64_t len = ta.ByteLength();
  uint64_t addr = Range(env, off, len, false);
  CheckNoFault(env, off, len, true);
  const uint8_t* src = static_cast<const uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
  uint64_t bad = 0;
  if (sys::guarded_copy(reinterpret_cast<void*>(addr), src, len, &bad))
    ThrowSystemError(env, -EFAULT, "write", {region_->path.empty() ? nullptr : region_->path.c_str(),
                                             "SIGBUS while writing: the page has no backing (file truncated, "
                                             "poisoned, or hugetlb pool exhausted)",
                                             -1, bad});
  return Napi::Number::New(env, static_cast<double>(len));
}

// unmap(offset, length): munmap part of the mapping. The hole stays owned by this Mapping: its
// pages go, but its addresses stay reserved (an inaccessible PROT_NONE mapping put in their place in
// one call), since every later call over the whole range (close()'s munmap, a madvise, an mprotect)
// would otherwise reach whatever the kernel mapped there since: a thread's stack, an allocator's
// arena. It reads as no access everywhere (protection 0), so nothing can touch it.
Napi::Value Mapping::Unmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t off = ToU64(info[0], "offset"), len = ToU64(info[1], "length");
  if (len == 0) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "length must be > 0");
  uint64_t addr = Range(env, off, len);
  Region& r = *region_;
  if (r.pinned_over(off, len))
    throw SystemError(env, -EBUSY, "munmap", {nullptr, "native threads are using this part of the mapping"});
  DetachBuffer();
  {
    Region::Invalidation inv(&r, off, len, InvalidateCause::kUnmap);
    void* hole = nullptr;
    int rc = sys::map(&hole, reinterpret_cast<void*>(addr), len, PROT_NONE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    if (rc) ThrowSystemError(env, rc, "mmap", {nullptr, "the part could not be replaced by an inaccessible reservation"});
    r.set_prot(off, len, 0);
  }
  std::lock_guard<std::mutex> lock(r.mu);
  r.holes.emplace_back(off, len);
  return env.Undefined();
}

Napi::Value Mapping::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Region& r = *region_;
  if (r.closed.load()) return env.Undefined();  // close is idempotent
  if (r.pins.load() > 0)
    throw SystemError(env, -EBUSY, "munmap",
                      {nullptr, "native threads or fault rules are using this mapping: wait for access jobs, remove "
                                "rules, or close the userfaultfd first"});
  // Its mirrors close first, as their own close() would: device copies of a file's pages go back
  // to the file and leases are released (a lease left behind would make every open() of the file,
  // by any process, wait out the lease-break time). Pinned mirrors stay, without their lease.
  engine::WriteErrorReport loss;
  const std::shared_ptr<engine::Mirror> lossy = CloseMirrors(env, &loss);
  DetachBuffer();
  {
    Region::Invalidation inv(&r, 0, r.length, InvalidateCause::kUnmap);
    r.unmap_now();
  }
  if (r.fd >= 0) {
    sys::close_fd(r.fd);
    r.fd = -1;
  }
  // Closed either way; but as close(2) reports a failed writeback, so does this.
  if (lossy) throw DataLostError(env, *lossy, loss);
  return env.Undefined();
}

std::shared_ptr<engine::Mirror> Mapping::CloseMirrors(Napi::Env env, engine::WriteErrorReport* loss) {
  std::vector<std::shared_ptr<engine::Mirror>> mine;
  {
    AddonData* data = env.GetInstanceData<AddonData>();
    std::lock_guard<std::mutex> lock(data->mu);
    for (auto& w : data->mirrors)
      if (auto m = w.lock())
        if (m->region() == region_.get() && !m->closed()) mine.push_back(std::move(m));
  }
  std::shared_ptr<engine::Mirror> lossy;
  for (auto& m : mine) {
    if (m->pinned()) {
      // A long-term pin outlives the munmap, as a GUP pin does: the device keeps its pages.
      m->release_lease();
      continue;
    }
    m->detach();
    if (lossy) continue;
    *loss = m->file_loss();
    if (loss->error) lossy = m;
  }
  return lossy;
}

// ---- the factory -------------------------------------------------------------------------------

static uint64_t HugePageSizeFlag(Napi::Env env, uint64_t size) {
  if (size == 0) return 0;
  int shift = __builtin_ctzll(size);
  if ((1ull << shift) != size)
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "hugePageSize must be a power of two");
  return static_cast<uint64_t>(shift) << MAP_HUGE_SHIFT;
}

static uint64_t DefaultHugePageSize() {
  FILE* f = fopen("/proc/meminfo", "r");
  if (!f) return 2u << 20;
  char line[256];
  uint64_t kb = 2048;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "Hugepagesize: %lu kB", &kb) == 1) break;
  fclose(f);
  return kb * 1024;
}

Napi::Value Mapping::Map(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = ArgObject(info, 0, "options");
  std::string kind = OptString(o, "kind", "anonymous");
  uint64_t length = OptU64(o, "length", 0);
  int prot = static_cast<int>(OptU64(o, "prot", PROT_READ | PROT_WRITE));
  bool shared = OptBool(o, "shared", kind != "anonymous");
  bool populate = OptBool(o, "populate");
  bool huge = OptBool(o, "hugetlb");
  bool want_sync = OptBool(o, "sync");
  bool noreserve = OptBool(o, "noReserve");
  uint64_t huge_size = huge ? OptU64(o, "hugePageSize", 0) : 0;
  uint64_t offset = OptU64(o, "offset", 0);

  auto r = std::make_shared<Region>();
  r->id = engine::Engine::next_owner_id();
  r->shared = shared;
  r->hugetlb = huge;
  r->page = huge ? (huge_size ? huge_size : DefaultHugePageSize()) : sys::page_size();
  r->file_offset = offset;
  int flags = shared ? MAP_SHARED : MAP_PRIVATE;
  if (populate) flags |= MAP_POPULATE;
  if (noreserve) flags |= MAP_NORESERVE;
  const char* syscall = "mmap";

  if (kind == "anonymous") {
    r->kind = RegionKind::kAnonymous;
    flags |= MAP_ANONYMOUS;
    if (huge) flags |= MAP_HUGETLB | static_cast<int>(HugePageSizeFlag(env, huge_size));
  } else if (kind == "memfd") {
    r->kind = RegionKind::kMemfd;
    r->name = OptString(o, "name", "pagemirror");
    unsigned mflags = MFD_CLOEXEC | MFD_ALLOW_SEALING;
    if (huge) mflags = MFD_CLOEXEC | MFD_HUGETLB | static_cast<unsigned>(HugePageSizeFlag(env, huge_size));
    int rc = sys::memfd(&r->fd, r->name.c_str(), mflags);
    if (rc) ThrowSystemError(env, rc, "memfd_create");
    if (length) {
      uint64_t size_needed = offset + length;
      rc = sys::truncate_fd(r->fd, size_needed);
      if (rc) ThrowSystemError(env, rc, "ftruncate", {nullptr, huge ? "no huge pages reserved? see /proc/sys/vm/nr_hugepages" : nullptr});
    }
  } else if (kind == "file") {
    r->kind = RegionKind::kFile;
    r->path = OptString(o, "path");
    Napi::Value fdv = o.Get("fd");
    if (!fdv.IsUndefined() && !fdv.IsNull()) {
      int64_t fd = ToI64(fdv, "fd");
      int dup = fcntl(static_cast<int>(fd), F_DUPFD_CLOEXEC, 0);  // own our descriptor once
      if (dup < 0) ThrowSystemError(env, -errno, "fcntl", {r->path.empty() ? nullptr : r->path.c_str()});
      r->fd = dup;
    } else {
      if (r->path.empty()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "a file mapping needs path or fd");
      bool writable = (prot & PROT_WRITE) && shared;
      int oflags = writable ? O_RDWR : O_RDONLY;
      if (OptBool(o, "create")) oflags = O_RDWR | O_CREAT;
      int rc = sys::open_file(&r->fd, r->path.c_str(), oflags, static_cast<mode_t>(OptU64(o, "mode", 0600)));
      if (rc) ThrowSystemError(env, rc, "open", {r->path.c_str()});
    }
    uint64_t size = 0;
    int rc = sys::file_size(r->fd, &size);
    if (rc) ThrowSystemError(env, rc, "fstat", {r->path.empty() ? nullptr : r->path.c_str()});
    if (OptBool(o, "create") && length && size < offset + length) {
      rc = sys::truncate_fd(r->fd, offset + length);
      if (rc) ThrowSystemError(env, rc, "ftruncate", {r->path.c_str()});
      size = offset + length;
    }
    if (!length) {
      if (size <= offset)
        throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "the file is empty past offset: give a length");
      length = (size - offset + r->page - 1) / r->page * r->page;
    }
    if (want_sync) flags = (flags & ~MAP_SHARED) | MAP_SHARED_VALIDATE | MAP_SYNC;
  } else {
    throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "kind must be 'anonymous', 'memfd' or 'file'");
  }
  if (want_sync && kind != "file")
    throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "sync (MAP_SYNC) applies to file mappings only");
  if (length == 0) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "length must be > 0");
  length = (length + r->page - 1) / r->page * r->page;
  CheckAligned(env, offset, sys::page_size(), "offset");
  if (huge) CheckAligned(env, offset, r->page, "offset");

  // align: start the mapping on this boundary (2 MiB for THP and fault-around experiments). Map a
  // bit more, then give back what lies before and after the aligned part.
  const uint64_t align = OptU64(o, "align", 0);
  if (align && (align & (align - 1) || align < sys::page_size()))
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "align must be a power of two of at least one page");
  if (align > sys::page_size() && kind != "anonymous")
    throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "align applies to anonymous mappings");
  const uint64_t slack = align > sys::page_size() ? align : 0;
  void* addr = nullptr;
  int rc = sys::map(&addr, nullptr, length + slack, prot, flags, r->fd, static_cast<off_t>(offset));
  if (rc == 0 && slack) {
    const uint64_t raw = reinterpret_cast<uint64_t>(addr);
    const uint64_t aligned = (raw + align - 1) & ~(align - 1);
    if (aligned > raw) sys::unmap(addr, aligned - raw);
    if (raw + slack > aligned) sys::unmap(reinterpret_cast<void*>(aligned + length), raw + slack - aligned);
    addr = reinterpret_cast<void*>(aligned);
  }
  if (rc) {
    const char* hint = nullptr;
    if (huge && rc == -ENOMEM) hint = "no huge pages free: reserve some with echo N > /proc/sys/vm/nr_hugepages";
    else if (want_sync && rc == -EOPNOTSUPP) hint = "MAP_SYNC needs a DAX file system";
    else if (huge && rc == -EINVAL) hint = "this huge page size is not supported here";
    ThrowSystemError(env, rc, syscall, {r->path.empty() ? nullptr : r->path.c_str(), hint});
  }
  r->addr = reinterpret_cast<uint64_t>(addr);
  r->length = length;
  r->prot[0] = prot;

  AddonData* data = env.GetInstanceData<AddonData>();
  std::shared_ptr<Region> holder = r;
  return data->mapping_ctor.Value().New({Napi::External<std::shared_ptr<Region>>::New(env, &holder)});
}

}  // namespace pm
