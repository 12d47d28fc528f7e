// Module entry: classes, functions and the kernel constants the TypeScript layer names.
#include <napi.h>

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>

#include "../sys/uapi.h"
#include "addon.h"
#include "errors.h"

#include "../engine/device.h"
#include "../engine/mirror.h"
#include "device.h"
#include "mapping.h"
#include "service.h"
#include "userfaultfd.h"
#include "pager.h"
#include "trace.h"
#include "fault_server.h"

namespace pm {

Napi::Value RunAccess(const Napi::CallbackInfo& info);
Napi::Value ForkRun(const Napi::CallbackInfo& info);
Napi::Value ForkDevice(const Napi::CallbackInfo& info);
Napi::Value CopyAsync(const Napi::CallbackInfo& info);
Napi::Value PopulateAsync(const Napi::CallbackInfo& info);
Napi::Value PagemapScan(const Napi::CallbackInfo& info);
Napi::Value StatxPath(const Napi::CallbackInfo& info);
Napi::Value FsType(const Napi::CallbackInfo& info);
Napi::Value Uname(const Napi::CallbackInfo& info);
Napi::Value ProbeUffd(const Napi::CallbackInfo& info);
Napi::Value SetAffinity(const Napi::CallbackInfo& info);
Napi::Value GetAffinity(const Napi::CallbackInfo& info);

namespace {

Napi::Object Constants(Napi::Env env) {
  Napi::Object c = Napi::Object::New(env);
  auto n = [&](const char* k, double v) { c.Set(k, Napi::Number::New(env, v)); };
#define C(x) n(#x, static_cast<double>(x))
  C(PROT_NONE); C(PROT_READ); C(PROT_WRITE); C(PROT_EXEC);
  C(MADV_NORMAL); C(MADV_RANDOM); C(MADV_SEQUENTIAL); C(MADV_WILLNEED); C(MADV_DONTNEED);
  C(MADV_FREE); C(MADV_REMOVE); C(MADV_DONTFORK); C(MADV_DOFORK); C(MADV_HUGEPAGE);
  C(MADV_NOHUGEPAGE); C(MADV_COLD); C(MADV_PAGEOUT); C(MADV_POPULATE_READ); C(MADV_POPULATE_WRITE);
  C(MADV_COLLAPSE);
  C(MS_ASYNC); C(MS_SYNC); C(MS_INVALIDATE);
  C(FALLOC_FL_KEEP_SIZE); C(FALLOC_FL_PUNCH_HOLE); C(FALLOC_FL_ZERO_RANGE);
  C(UFFDIO_REGISTER_MODE_MISSING); C(UFFDIO_REGISTER_MODE_WP); C(UFFDIO_REGISTER_MODE_MINOR);
  C(UFFDIO_COPY_MODE_DONTWAKE); C(UFFDIO_COPY_MODE_WP); C(UFFDIO_ZEROPAGE_MODE_DONTWAKE);
  C(UFFDIO_WRITEPROTECT_MODE_WP); C(UFFDIO_WRITEPROTECT_MODE_DONTWAKE);
  C(UFFDIO_CONTINUE_MODE_DONTWAKE); C(UFFDIO_CONTINUE_MODE_WP);
  C(UFFDIO_MOVE_MODE_DONTWAKE); C(UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES); C(UFFDIO_POISON_MODE_DONTWAKE);
  C(UFFD_PAGEFAULT_FLAG_WRITE); C(UFFD_PAGEFAULT_FLAG_WP); C(UFFD_PAGEFAULT_FLAG_MINOR);
  C(UFFD_FEATURE_PAGEFAULT_FLAG_WP); C(UFFD_FEATURE_EVENT_FORK); C(UFFD_FEATURE_EVENT_REMAP);
  C(UFFD_FEATURE_EVENT_REMOVE); C(UFFD_FEATURE_MISSING_HUGETLBFS); C(UFFD_FEATURE_MISSING_SHMEM);
  C(UFFD_FEATURE_EVENT_UNMAP); C(UFFD_FEATURE_SIGBUS); C(UFFD_FEATURE_THREAD_ID);
  C(UFFD_FEATURE_MINOR_HUGETLBFS); C(UFFD_FEATURE_MINOR_SHMEM); C(UFFD_FEATURE_EXACT_ADDRESS);
  C(UFFD_FEATURE_WP_HUGETLBFS_SHMEM); C(UFFD_FEATURE_WP_UNPOPULATED); C(UFFD_FEATURE_POISON);
  C(UFFD_FEATURE_WP_ASYNC); C(UFFD_FEATURE_MOVE);
  C(_UFFDIO_REGISTER); C(_UFFDIO_UNREGISTER); C(_UFFDIO_WAKE); C(_UFFDIO_COPY); C(_UFFDIO_ZEROPAGE);
  C(_UFFDIO_MOVE); C(_UFFDIO_WRITEPROTECT); C(_UFFDIO_CONTINUE); C(_UFFDIO_POISON); C(_UFFDIO_API);
  C(PAGE_IS_WPALLOWED); C(PAGE_IS_WRITTEN); C(PAGE_IS_FILE); C(PAGE_IS_PRESENT); C(PAGE_IS_SWAPPED);
  C(PAGE_IS_PFNZERO); C(PAGE_IS_HUGE); C(PAGE_IS_SOFT_DIRTY); C(PAGE_IS_GUARD);
  C(PM_SCAN_WP_MATCHING); C(PM_SCAN_CHECK_WPASYNC);
#undef C
  return c;
}

void Cleanup(void* arg) {
  // Environment teardown (process exit, or a worker thread ending): close every userfaultfd so
  // no thread sleeps on a fault that nobody will resolve.
  auto* data = static_cast<AddonData*>(arg);
  std::set<Userfaultfd*> open;
  {
    std::lock_guard<std::mutex> lock(data->mu);
    open = data->uffds;
  }
  for (Userfaultfd* u : open) u->Shutdown();
  std::vector<std::weak_ptr<engine::Mirror>> mirrors;
  std::vector<std::weak_ptr<engine::Device>> devices;
  {
    std::lock_guard<std::mutex> lock(data->mu);
    mirrors.swap(data->mirrors);
    devices.swap(data->devices);
  }
  for (auto& w : mirrors)
    if (auto m = w.lock()) m->detach();
  for (auto& w : devices)
    if (auto d = w.lock()) d->close();
}

// buffer.constants.MAX_LENGTH, where this Node can say (process.getBuiltinModule: 20.16+);
// otherwise the default, the smallest limit of any Node the addon supports.
uint64_t MaxViewBytes(Napi::Env env, uint64_t fallback) {
  try {
    Napi::Value process = env.Global().Get("process");
    if (!process.IsObject()) return fallback;
    Napi::Value get = process.As<Napi::Object>().Get("getBuiltinModule");
    if (!get.IsFunction()) return fallback;
    Napi::Value buffer = get.As<Napi::Function>().Call(process, {Napi::String::New(env, "buffer")});
    if (!buffer.IsObject()) return fallback;
    Napi::Value constants = buffer.As<Napi::Object>().Get("constants");
    if (!constants.IsObject()) return fallback;
    Napi::Value max = constants.As<Napi::Object>().Get("MAX_LENGTH");
    if (!max.IsNumber()) return fallback;
    const double v = max.As<Napi::Number>().DoubleValue();
    return v >= 1 && v <= 9007199254740991.0 ? static_cast<uint64_t>(v) : fallback;
  } catch (const Napi::Error&) {
    return fallback;
  }
}

}  // namespace

void CheckResultBytes(Napi::Env env, uint64_t bytes, const char* what) {
  const uint64_t limit = env.GetInstanceData<AddonData>()->max_view_bytes;
  if (bytes > limit)
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE",
                          std::string(what) + " would need " + std::to_string(bytes) + " bytes in one buffer, more than " +
                              "the largest this Node allows (" + std::to_string(limit) + "); ask for a smaller range");
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  env.SetInstanceData(data);
  data->max_view_bytes = MaxViewBytes(env, data->max_view_bytes);
  napi_add_env_cleanup_hook(env, Cleanup, data);
  Napi::Function mapping = Mapping::Init(env);
  data->mapping_ctor = Napi::Persistent(mapping);
  Napi::Function uffd = Userfaultfd::Init(env);
  data->uffd_ctor = Napi::Persistent(uffd);
  Napi::Function device = DeviceWrap::Init(env);
  data->device_ctor = Napi::Persistent(device);
  Napi::Function mirror = MirrorWrap::Init(env);
  data->mirror_ctor = Napi::Persistent(mirror);
  exports.Set("Device", device);
  exports.Set("Mirror", mirror);
  exports.Set("createDevice", Napi::Function::New(env, DeviceWrap::Create, "createDevice"));
  exports.Set("Mapping", mapping);
  exports.Set("Pager", PagerWrap::Init(env));
  exports.Set("createPager", Napi::Function::New(env, PagerWrap::Create, "createPager"));
  exports.Set("Userfaultfd", uffd);
  exports.Set("TraceRecorder", TraceRecorderWrap::Init(env));
  exports.Set("probeTraceSampling", Napi::Function::New(env, ProbeTraceSampling, "probeTraceSampling"));
  exports.Set("FaultServer", FaultServerWrap::Init(env));
  exports.Set("RemoteClient", RemoteClientWrap::Init(env));
  exports.Set("listenFaultServer", Napi::Function::New(env, FaultServerWrap::Listen, "listenFaultServer"));
  exports.Set("map", Napi::Function::New(env, Mapping::Map, "map"));
  exports.Set("openUserfaultfd", Napi::Function::New(env, Userfaultfd::Open, "openUserfaultfd"));
  exports.Set("adoptUserfaultfd", Napi::Function::New(env, Userfaultfd::Adopt, "adoptUserfaultfd"));
  exports.Set("runAccess", Napi::Function::New(env, RunAccess, "runAccess"));
  exports.Set("forkRun", Napi::Function::New(env, ForkRun, "forkRun"));
  exports.Set("forkDevice", Napi::Function::New(env, ForkDevice, "forkDevice"));
  exports.Set("copyAsync", Napi::Function::New(env, CopyAsync, "copyAsync"));
  exports.Set("populateAsync", Napi::Function::New(env, PopulateAsync, "populateAsync"));
  exports.Set("pagemapScan", Napi::Function::New(env, PagemapScan, "pagemapScan"));
  exports.Set("statx", Napi::Function::New(env, StatxPath, "statx"));
  exports.Set("fsType", Napi::Function::New(env, FsType, "fsType"));
  exports.Set("uname", Napi::Function::New(env, Uname, "uname"));
  exports.Set("probeUffd", Napi::Function::New(env, ProbeUffd, "probeUffd"));
  exports.Set("configureEngine", Napi::Function::New(env, ConfigureEngine, "configureEngine"));
  exports.Set("engineStats", Napi::Function::New(env, EngineStats, "engineStats"));
  exports.Set("setAffinity", Napi::Function::New(env, SetAffinity, "setAffinity"));
  exports.Set("getAffinity", Napi::Function::New(env, GetAffinity, "getAffinity"));
  exports.Set("constants", Constants(env));
  return exports;
}

}  // namespace pm

static Napi::Object InitAll(Napi::Env env, Napi::Object exports) { return pm::Init(env, exports); }

NODE_API_MODULE(pagemirror, InitAll)
