// Page-table and file introspection: PAGEMAP_SCAN, statx, statfs, uname, and the probes that need
// a real attempt (opening a userfaultfd, registering each kind of memory) rather than a file read.
#include <napi.h>

#include <cerrno>
#include <sched.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <vector>

#include "../sys/mem.h"
#include "../sys/pagemap.h"
#include "../sys/uapi.h"
#include "../sys/uffd.h"
#include "addon.h"
#include "args.h"
#include "errors.h"
#include "mapping.h"

namespace pm {

Napi::Object StatxToObject(Napi::Env env, const sys::StatxInfo& sx) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("size", static_cast<double>(sx.size));
  o.Set("blocks", static_cast<double>(sx.blocks));
  o.Set("blksize", sx.blksize);
  o.Set("mode", sx.mode);
  o.Set("attributes", Napi::BigInt::New(env, sx.attributes));
  o.Set("attributesMask", Napi::BigInt::New(env, sx.attributes_mask));
  o.Set("dax", sx.dax);
  o.Set("devMajor", sx.dev_major);
  o.Set("devMinor", sx.dev_minor);
  return o;
}

// pagemapScan(mapping, offset, length, {flags, categoryInverted, categoryMask, anyOf, returnMask,
// maxPages, maxRegions}) -> {regions: [{offset, length, categories}], walkEnd}
Napi::Value PagemapScan(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Mapping* m = Mapping::Unwrap(info[0]);
  uint64_t off = ToU64(info[1], "offset"), len = ToU64(info[2], "length");
  uint64_t addr = m->Range(env, off, len, false);
  CheckAligned(env, off, sys::page_size(), "offset");
  Napi::Object o = info.Length() > 3 && info[3].IsObject() ? info[3].As<Napi::Object>() : Napi::Object::New(env);
  sys::ScanRequest req;
  req.start = addr;
  req.end = addr + len;
  req.flags = OptU64(o, "flags", 0);
  req.category_inverted = OptU64(o, "categoryInverted", 0);
  req.category_mask = OptU64(o, "categoryMask", 0);
  req.category_anyof_mask = OptU64(o, "anyOf", 0);
  req.return_mask = OptU64(o, "returnMask", 0x1ff);
  req.max_pages = OptU64(o, "maxPages", 0);
  req.max_regions = OptU64(o, "maxRegions", 1024);
  if (req.max_regions == 0 || req.max_regions > (1u << 20))
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "maxRegions must be 1..1048576");
  std::vector<sys::ScanRegion> regions;
  uint64_t walk_end = 0;
  long n = sys::pagemap_scan(req, &regions, &walk_end);
  if (n < 0) {
    const char* hint = n == -ENOTTY ? "the kernel lacks PAGEMAP_SCAN (6.7+)" :
                       n == -EINVAL ? "bad category masks or flags" :
                       n == -EPERM ? "checkWpAsync: the range is not registered for uffd-wp with WP_ASYNC" : nullptr;
    ThrowSystemError(env, static_cast<int>(n), "ioctl(PAGEMAP_SCAN)", {"/proc/self/pagemap", hint});
  }
  Napi::Array arr = Napi::Array::New(env, regions.size());
  const uint64_t base = m->region()->addr;
  for (size_t i = 0; i < regions.size(); i++) {
    Napi::Object r = Napi::Object::New(env);
    r.Set("offset", static_cast<double>(regions[i].start - base));
    r.Set("length", static_cast<double>(regions[i].end - regions[i].start));
    r.Set("categories", static_cast<double>(regions[i].categories));
    arr.Set(static_cast<uint32_t>(i), r);
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("regions", arr);
  out.Set("walkEnd", static_cast<double>(walk_end - base));
  return out;
}

Napi::Value StatxPath(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "path must be a string");
  std::string path = info[0].As<Napi::String>().Utf8Value();
  sys::StatxInfo sx;
  int rc = sys::statx_path(path.c_str(), &sx);
  if (rc) ThrowSystemError(env, rc, "statx", {path.c_str()});
  return StatxToObject(env, sx);
}

Napi::Value FsType(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "path must be a string");
  std::string path = info[0].As<Napi::String>().Utf8Value();
  uint64_t t = 0;
  int rc = sys::fs_type(path.c_str(), &t);
  if (rc) ThrowSystemError(env, rc, "statfs", {path.c_str()});
  return Napi::Number::New(env, static_cast<double>(t));
}

Napi::Value Uname(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  struct utsname u;
  ::uname(&u);
  Napi::Object o = Napi::Object::New(env);
  o.Set("sysname", u.sysname);
  o.Set("release", u.release);
  o.Set("version", u.version);
  o.Set("machine", u.machine);
  o.Set("pageSize", static_cast<double>(sys::page_size()));
  return o;
}

// setAffinity([cpu...]): pins the calling thread; threads it creates afterwards (the fault service,
// access threads) inherit the mask. Benchmarks pin so that handler and faulter share a CPU the way
// the C baseline is run, instead of measuring the scheduler's placement luck.
Napi::Value SetAffinity(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsArray()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "cpus must be an array");
  Napi::Array a = info[0].As<Napi::Array>();
  cpu_set_t set;
  CPU_ZERO(&set);
  for (uint32_t i = 0; i < a.Length(); i++) {
    uint64_t c = ToU64(a.Get(i), "cpu");
    if (c >= CPU_SETSIZE) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "cpu out of range");
    CPU_SET(static_cast<int>(c), &set);
  }
  if (::sched_setaffinity(0, sizeof set, &set) != 0) ThrowSystemError(env, -errno, "sched_setaffinity");
  return env.Undefined();
}

Napi::Value GetAffinity(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  cpu_set_t set;
  if (::sched_getaffinity(0, sizeof set, &set) != 0) ThrowSystemError(env, -errno, "sched_getaffinity");
  Napi::Array a = Napi::Array::New(env);
  uint32_t n = 0;
  for (int c = 0; c < CPU_SETSIZE; c++)
    if (CPU_ISSET(c, &set)) a.Set(n++, c);
  return a;
}

// probeUffd(): opens a throw-away userfaultfd, asks UFFDIO_API for nothing (which reports every
// feature the kernel has), and registers one small region of each memory kind in each mode to
// learn which ioctls the kernel allows there. Nothing is faulted.
Napi::Value ProbeUffd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bool umo = info.Length() > 0 && info[0].ToBoolean().Value();
  Napi::Object out = Napi::Object::New(env);
  sys::UffdOpenResult r;
  int rc = sys::uffd_open(true, umo, &r);
  out.Set("deviceError", r.device_error ? ErrnoName(-r.device_error) : "");
  out.Set("syscallError", r.syscall_error ? ErrnoName(-r.syscall_error) : "");
  if (rc) {
    out.Set("available", false);
    out.Set("error", ErrnoName(-rc));
    return out;
  }
  out.Set("available", true);
  out.Set("openedBy", r.opened_by == sys::UffdOpenedBy::kDevice ? "device" : "syscall");
  out.Set("userModeOnly", r.user_mode_only);
  uint64_t features = 0, ioctls = 0;
  rc = sys::uffd_api(r.fd, 0, &features, &ioctls);
  sys::close_fd(r.fd);
  if (rc) {
    out.Set("apiError", ErrnoName(-rc));
    return out;
  }
  out.Set("features", Napi::BigInt::New(env, features));
  out.Set("ioctls", Napi::BigInt::New(env, ioctls));
  // UFFDIO_API(0) lists EVENT_FORK even where asking for it is refused (user-mode-only without
  // CAP_SYS_PTRACE): ask for real on a second descriptor.
  if (features & UFFD_FEATURE_EVENT_FORK) {
    sys::UffdOpenResult f;
    if (sys::uffd_open(true, umo, &f) == 0) {
      int err = sys::uffd_api(f.fd, UFFD_FEATURE_EVENT_FORK, nullptr, nullptr);
      if (err) out.Set("eventForkError", ErrnoName(-err));
      sys::close_fd(f.fd);
    }
  }

  const uint64_t page = sys::page_size();
  struct Kind {
    const char* name;
    int flags;
    bool memfd;
  } kinds[] = {{"anonymous", MAP_PRIVATE | MAP_ANONYMOUS, false},
               {"sharedAnonymous", MAP_SHARED | MAP_ANONYMOUS, false},
               {"shmem", MAP_SHARED, true}};
  struct Mode {
    const char* name;
    uint64_t mode;
    uint64_t feature;
  } modes[] = {{"missing", UFFDIO_REGISTER_MODE_MISSING, 0},
               {"wp", UFFDIO_REGISTER_MODE_WP, UFFD_FEATURE_PAGEFAULT_FLAG_WP},
               {"minor", UFFDIO_REGISTER_MODE_MINOR, UFFD_FEATURE_MINOR_SHMEM}};
  Napi::Object reg = Napi::Object::New(env);
  for (const Kind& k : kinds) {
    Napi::Object per = Napi::Object::New(env);
    for (const Mode& m : modes) {
      sys::UffdOpenResult u;
      if (sys::uffd_open(true, umo, &u)) continue;
      int fd = -1;
      void* addr = nullptr;
      int err = sys::uffd_api(u.fd, m.feature & features, nullptr, nullptr);
      if (!err && k.memfd) {
        err = sys::memfd(&fd, "pagemirror-probe", MFD_CLOEXEC);
        if (!err) err = sys::truncate_fd(fd, page);
      }
      if (!err) err = sys::map(&addr, nullptr, page, PROT_READ | PROT_WRITE, k.flags, fd, 0);
      uint64_t allowed = 0;
      if (!err) err = sys::uffd_register(u.fd, reinterpret_cast<uint64_t>(addr), page, m.mode, &allowed);
      if (err) per.Set(m.name, ErrnoName(-err));
      else per.Set(m.name, Napi::BigInt::New(env, allowed));
      if (addr) sys::unmap(addr, page);
      if (fd >= 0) sys::close_fd(fd);
      sys::close_fd(u.fd);
    }
    reg.Set(k.name, per);
  }
  out.Set("register", reg);
  return out;
}

}  // namespace pm
