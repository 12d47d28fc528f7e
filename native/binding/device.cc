#include "device.h"

#include <sys/mman.h>
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "../sys/access.h"
#include "../sys/mem.h"
#include "addon.h"
#include "args.h"
#include "errors.h"
#include "job.h"
#include "mapping.h"

namespace pm {

// ---- Device ------------------------------------------------------------------------------------

Napi::Function DeviceWrap::Init(Napi::Env env) {
  return DefineClass(env, "Device",
                     {
                         InstanceMethod<&DeviceWrap::Mirror>("mirror"),
                         InstanceMethod<&DeviceWrap::Counters>("counters"),
                         InstanceMethod<&DeviceWrap::Memory>("memory"),
                         InstanceMethod<&DeviceWrap::Release>("release"),
                         InstanceMethod<&DeviceWrap::DrainTrace>("drainTrace"),
                         InstanceMethod<&DeviceWrap::Close>("close"),
                     });
}

DeviceWrap::DeviceWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<DeviceWrap>(info) {
  if (info.Length() < 1 || !info[0].IsExternal())
    throw CodedTypeError(info.Env(), "ERR_ILLEGAL_CONSTRUCTOR", "use createDevice()");
  device_ = *info[0].As<Napi::External<std::shared_ptr<engine::Device>>>().Data();
}

DeviceWrap::~DeviceWrap() {
  if (device_) device_->close();
}

std::shared_ptr<engine::Device> DeviceWrap::device(Napi::Env env) {
  if (closed_) throw StateError(env, "ERR_PAGEMIRROR_CLOSED", "the device is closed");
  return device_;
}

// createDevice({name, memory, faultBatch, faultAround, timeoutMs})
Napi::Value DeviceWrap::Create(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = ArgObject(info, 0, "options");
  engine::DeviceConfig c;
  c.name = OptString(o, "name", "device");
  c.page = sys::page_size();
  c.memory = OptU64(o, "memory", 64ull << 20);
  c.fault_batch = static_cast<unsigned>(OptU64(o, "faultBatch", 32));
  c.fault_around = OptU64(o, "faultAround", c.page);
  c.timeout_ms = static_cast<int>(OptU64(o, "timeoutMs", 1000));
  std::string placement = OptString(o, "placement", "host");
  if (placement == "host") c.placement = engine::DeviceConfig::Placement::kHost;
  else if (placement == "device") c.placement = engine::DeviceConfig::Placement::kDevice;
  else throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "placement must be 'host' or 'device'");
  std::string eviction = OptString(o, "eviction", "off");
  if (eviction == "off") c.eviction = engine::DeviceConfig::Eviction::kOff;
  else if (eviction == "fifo") c.eviction = engine::DeviceConfig::Eviction::kFifo;
  else if (eviction == "lru") c.eviction = engine::DeviceConfig::Eviction::kLru;
  else throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "eviction must be 'off', 'fifo' or 'lru'");
  Napi::Value wm = o.Get("watermark");
  if (!wm.IsUndefined()) {
    if (!wm.IsNumber()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "watermark must be a number");
    c.watermark = wm.As<Napi::Number>().DoubleValue();
    if (!(c.watermark > 0 && c.watermark <= 1)) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "watermark must be in (0, 1]");
  }
  c.preallocate = OptBool(o, "preallocate", false);
  std::string prefetch = OptString(o, "prefetch", "off");
  if (prefetch == "off") c.prefetch = engine::DeviceConfig::Prefetch::kOff;
  else if (prefetch == "sequential") c.prefetch = engine::DeviceConfig::Prefetch::kSequential;
  else if (prefetch == "density") c.prefetch = engine::DeviceConfig::Prefetch::kDensity;
  else throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "prefetch must be 'off', 'sequential' or 'density'");
  Napi::Value link = o.Get("link");
  if (!link.IsUndefined()) {
    // Resolved and validated in TypeScript (lib/link.ts); checked again so that a direct caller of
    // the addon cannot hand the model a NaN or a negative cost.
    if (!link.IsObject()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "link must be an object");
    Napi::Object lo = link.As<Napi::Object>();
    auto num = [&](const char* key) {
      Napi::Value v = lo.Get(key);
      if (v.IsUndefined()) return 0.0;
      if (!v.IsNumber()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", std::string("link.") + key + " must be a number");
      const double d = v.As<Napi::Number>().DoubleValue();
      if (!(d >= 0 && d < 1e15)) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", std::string("link.") + key + " must be a finite number >= 0");
      return d;
    };
    c.link = true;
    c.link_params.latency_us = num("latencyUs");
    c.link_params.bandwidth_gbs = num("bandwidthGBs");
    c.link_params.to_host_bandwidth_gbs = num("toHostBandwidthGBs");
    c.link_params.curve_per_kib = num("curvePerKiB");
    c.link_params.fault_round_us = num("faultRoundUs");
    c.link_params.remote_access_ns = num("remoteAccessNs");
    c.link_params.remote_bandwidth_gbs = num("remoteBandwidthGBs");
  }
  c.trace = OptBool(o, "trace", false);
  c.trace_capacity = OptU64(o, "traceCapacity", 1 << 16);
  if (c.trace_capacity == 0 || c.trace_capacity > (1u << 24)) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "traceCapacity must be 1..16777216");
  if (c.memory < c.page || c.memory % c.page)
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "memory must be a positive multiple of the page size");
  if (c.fault_batch == 0 || c.fault_batch > 65536) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "faultBatch must be 1..65536");
  if (c.fault_around < c.page || (c.fault_around & (c.fault_around - 1)))
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "faultAround must be a power of two of at least one page");
  auto dev = std::make_shared<engine::Device>(c);
  int rc = dev->init();
  if (rc) ThrowSystemError(env, rc, "mmap", {nullptr, "allocating device memory"});
  AddonData* data = env.GetInstanceData<AddonData>();
  {
    std::lock_guard<std::mutex> lock(data->mu);
    auto& v = data->devices;
    v.erase(std::remove_if(v.begin(), v.end(), [](const std::weak_ptr<engine::Device>& w) { return w.expired(); }), v.end());
    v.push_back(dev);
  }
  return data->device_ctor.Value().New({Napi::External<std::shared_ptr<engine::Device>>::New(env, &dev)});
}

// mirror(mapping, offset, length) -> Mirror
Napi::Value DeviceWrap::Mirror(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto dev = device(env);
  Mapping* m = Mapping::Unwrap(info[0]);
  uint64_t off = ToU64(info[1], "offset"), len = ToU64(info[2], "length");
  if (len == 0) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "length must be > 0");
  m->Range(env, off, len);
  if (dev->overlaps(m->region()->addr + off, m->region()->addr + off + len))
    throw SystemError(env, -EEXIST, "mirror", {nullptr, "this device already mirrors part of that range"});
  // A hugetlb mapping is mirrored with one entry per huge page (the device maps it whole, as a
  // PMD); it cannot migrate (EINVAL, as in the kernel).
  std::string write_mode = info.Length() > 3 && info[3].IsString() ? info[3].As<Napi::String>().Utf8Value() : "shared";
  // File strategy: {strategy, snapshot, writebackIntervalMs, chunkPages} (validated in TypeScript).
  engine::FileOptions fopt;
  bool file = false;
  if (info.Length() > 5 && info[5].IsObject()) {
    Napi::Object fo = info[5].As<Napi::Object>();
    const std::string st = OptString(fo, "strategy", "remote");
    fopt.strategy = st == "copy" ? engine::FileStrategy::kCopy : st == "bounce" ? engine::FileStrategy::kBounce
                  : st == "pin" ? engine::FileStrategy::kPin : st == "remote" ? engine::FileStrategy::kRemote
                  : throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "strategy must be 'remote', 'copy', 'bounce' or 'pin'");
    fopt.snapshot = OptString(fo, "snapshot", "pagecache") == "buffer" ? engine::SnapshotMode::kBuffer : engine::SnapshotMode::kPageCache;
    fopt.writeback_interval_ms = OptU64(fo, "writebackIntervalMs", 0);
    fopt.chunk_pages = OptU64(fo, "chunkPages", 64);
    file = true;
  }
  const bool sole = write_mode == "single" || fopt.strategy == engine::FileStrategy::kCopy ||
                    fopt.strategy == engine::FileStrategy::kBounce;
  {
    // A single-writer mirror write-protects the CPU mapping, which every other device thread of
    // this process would meet too: it cannot share memory with other mirrors (either order).
    int total = 0, singles = 0;
    engine::Engine::get().region_mirrors(m->region().get(), &total, &singles);
    if ((sole && total > 0) || (!sole && singles > 0))
      throw SystemError(env, -EBUSY, "mirror",
                        {nullptr, "a single-writer mirror, or a copy/bounce file mirror, cannot share its memory with other "
                                  "mirrors (they would not see its device's copies)"});
  }
  // A pin faults the whole range in for write on this thread (get_user_pages): over memory that
  // JavaScript serves, it would wait for itself. (Read-only memory is EPERM below, before any fault.)
  const bool pin = (info.Length() > 4 && info[4].ToBoolean().Value()) || (file && fopt.strategy == engine::FileStrategy::kPin);
  if (pin && (m->region()->prot_over(off, len) & PROT_WRITE)) m->CheckNoJsFault(env, off, len, true, "pinning");
  auto mirror = std::make_shared<engine::Mirror>(dev.get(), m->region(), off, len);
  if (!mirror->table_ok()) {
    mirror->detach();
    ThrowSystemError(env, -ENOMEM, "mirror", {nullptr, "no memory for the page table's top level; mirror a smaller range"});
  }
  if (write_mode == "single") {
    int rc = mirror->enable_single_writer();
    if (rc) {
      mirror->detach();
      const char* hint = rc == -EOPNOTSUPP ? "single-writer mode needs shared memory with a file (memfd, tmpfs): the device "
                                             "writes through its own mapping of it; for private anonymous memory use exclusive()"
                         : rc == -EINVAL ? "userfaultfd cannot write-protect this memory (only shmem/tmpfs files)"
                         : rc == -EBUSY ? "the range is registered with another userfaultfd"
                         : rc == -EACCES ? "the device writes through its own mapping of the file, which needs the file open "
                                           "for writing: map it with prot 'rw'"
                         : rc == -EPERM ? m->region()->not_writable_hint() : nullptr;
      ThrowSystemError(env, rc, rc == -EACCES ? "mmap" : "ioctl(UFFDIO_REGISTER)", {nullptr, hint});
    }
  } else if (write_mode != "shared") {
    mirror->detach();
    throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "writeMode must be 'shared' or 'single'");
  }
  if (info.Length() > 4 && info[4].ToBoolean().Value()) {
    if (write_mode == "single") {
      mirror->detach();
      throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "pin and writeMode 'single' do not combine");
    }
    int rc = mirror->enable_pin(dev->config().timeout_ms);
    if (rc) {
      mirror->detach();
      ThrowSystemError(env, rc, "pin", {nullptr, rc == -EPERM ? "pinning needs write access to the range" : nullptr});
    }
  }
  if (file) {
    if (write_mode == "single" || (info.Length() > 4 && info[4].ToBoolean().Value())) {
      mirror->detach();
      throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "a file strategy does not combine with writeMode 'single' or pin (use strategy 'pin')");
    }
    int rc = mirror->enable_file(fopt);
    if (rc) {
      mirror->detach();
      const char* hint = rc == -EINVAL ? "file strategies need a shared mapping of a file (a file or memfd mapped shared)"
                         : rc == -EOPNOTSUPP ? "copy and bounce keep the data in device memory: not on hugetlbfs, and not on "
                                               "DAX, whose pages already are the device-addressable memory (use remote or pin)"
                         : rc == -EPERM && fopt.strategy == engine::FileStrategy::kPin ? "pinning needs write access to the range"
                         : rc == -EPERM && !m->region()->may_write() && engine::Engine::get().ensure() == 0
                             ? m->region()->not_writable_hint()
                         : rc == -EPERM || rc == -EACCES || rc == -ENOSYS
                             ? "copy and bounce need the engine's userfaultfd, which this process cannot open (see "
                               "vm.unprivileged_userfaultfd, /dev/userfaultfd and `npx pagemirror probe`); remote and pin do not"
                         : rc == -EBUSY ? "the range is registered with another userfaultfd" : nullptr;
      ThrowSystemError(env, rc, "mirror", {m->region()->path.empty() ? nullptr : m->region()->path.c_str(), hint});
    }
  }
  AddonData* data = env.GetInstanceData<AddonData>();
  {
    std::lock_guard<std::mutex> lock(data->mu);
    auto& v = data->mirrors;
    v.erase(std::remove_if(v.begin(), v.end(), [](const std::weak_ptr<engine::Mirror>& w) { return w.expired(); }), v.end());
    v.push_back(mirror);
  }
  return data->mirror_ctor.Value().New({Napi::External<std::shared_ptr<engine::Device>>::New(env, &dev),
                                        Napi::External<std::shared_ptr<engine::Mirror>>::New(env, &mirror)});
}

Napi::Value DeviceWrap::Counters(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  engine::DeviceCounters& c = device_->counters();
  Napi::Object o = Napi::Object::New(env);
  o.Set("faultRounds", static_cast<double>(c.fault_rounds.load()));
  o.Set("faultRequests", static_cast<double>(c.fault_requests.load()));
  o.Set("faultedPages", static_cast<double>(c.faulted_pages.load()));
  o.Set("maxBatch", static_cast<double>(c.max_batch.load()));
  o.Set("serviceNs", static_cast<double>(c.service_ns.load()));
  o.Set("invalidatedPages", static_cast<double>(c.invalidated_pages.load()));
  o.Set("prefetchedPages", static_cast<double>(c.prefetched_pages.load()));
  Napi::Object inv = Napi::Object::New(env);
  for (unsigned i = 0; i <= static_cast<unsigned>(InvalidateCause::kAdvise); i++) {
    uint64_t n = c.invalidations[i].load();
    if (n) inv.Set(InvalidateCauseName(static_cast<InvalidateCause>(i)), static_cast<double>(n));
  }
  o.Set("invalidations", inv);
  Napi::Object to_dev = Napi::Object::New(env), to_host = Napi::Object::New(env);
  for (unsigned i = 0; i < static_cast<unsigned>(engine::Trigger::kCount); i++) {
    const char* name = engine::TriggerName(static_cast<engine::Trigger>(i));
    if (uint64_t n = c.to_device[i].load()) to_dev.Set(name, static_cast<double>(n));
    if (uint64_t n = c.to_host[i].load()) to_host.Set(name, static_cast<double>(n));
  }
  o.Set("migratedToDevice", to_dev);
  o.Set("migratedToHost", to_host);
  if (const engine::LinkModel* link = device_->link()) {
    Napi::Object modeled = Napi::Object::New(env);
    for (unsigned i = 0; i < static_cast<unsigned>(engine::LinkCategory::kCount); i++) {
      const auto& k = link->counter(static_cast<engine::LinkCategory>(i));
      Napi::Object e = Napi::Object::New(env);
      e.Set("ns", static_cast<double>(k.ns.load()));
      e.Set("count", static_cast<double>(k.events.load()));
      e.Set("bytes", static_cast<double>(k.bytes.load()));
      modeled.Set(engine::LinkCategoryName(static_cast<engine::LinkCategory>(i)), e);
    }
    o.Set("modeledNs", static_cast<double>(link->total_ns()));
    o.Set("modeled", modeled);
  }
  return o;
}

// drainTrace() -> {events: [...], dropped}: the events recorded since the last call.
Napi::Value DeviceWrap::DrainTrace(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t dropped = 0;
  std::vector<engine::TraceEvent> ev = device_->drain_trace(&dropped);
  const uint64_t page = device_->config().page;
  Napi::Array arr = Napi::Array::New(env, ev.size());
  for (size_t i = 0; i < ev.size(); i++) {
    const engine::TraceEvent& e = ev[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("tNs", static_cast<double>(e.t_ns));
    o.Set("mirror", Napi::BigInt::New(env, e.mirror));
    if (device_->link() && e.kind != engine::TraceKind::kInvalidate) o.Set("modeledNs", static_cast<double>(e.modeled_ns));
    switch (e.kind) {
      case engine::TraceKind::kFaultBatch:
        o.Set("type", "fault-batch");
        o.Set("faults", static_cast<double>(e.a));
        o.Set("pages", static_cast<double>(e.b));
        o.Set("serviceNs", static_cast<double>(e.c));
        break;
      case engine::TraceKind::kMigrateToDevice:
      case engine::TraceKind::kMigrateToHost:
        o.Set("type", e.kind == engine::TraceKind::kMigrateToDevice ? "migrate-to-device" : "migrate-to-host");
        o.Set("offset", static_cast<double>(e.a * page));
        o.Set("pages", static_cast<double>(e.b));
        o.Set("bytes", static_cast<double>(e.b * page));
        o.Set("trigger", engine::TriggerName(static_cast<engine::Trigger>(e.c)));
        break;
      case engine::TraceKind::kInvalidate:
        o.Set("type", "invalidate");
        o.Set("offset", static_cast<double>(e.a * page));
        o.Set("pages", static_cast<double>(e.b));
        o.Set("cause", InvalidateCauseName(static_cast<InvalidateCause>(e.c)));
        break;
    }
    arr.Set(static_cast<uint32_t>(i), o);
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("events", arr);
  out.Set("dropped", static_cast<double>(dropped));
  return out;
}

Napi::Value DeviceWrap::Memory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("pageSize", static_cast<double>(device_->config().page));
  o.Set("slots", static_cast<double>(device_->slots_total()));
  o.Set("used", static_cast<double>(device_->slots_used()));
  o.Set("tableBytes", static_cast<double>(device_->table_bytes()));
  return o;
}

// release() -> Promise<pages>: every page of this device's memory goes back to the host.
Napi::Value DeviceWrap::Release(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  struct State {
    std::shared_ptr<engine::Device> dev;
    uint64_t pages = 0;
  };
  return NativeJob<State>::Start(
      env, std::unique_ptr<State>(new State{device(env)}), [](State& s) { s.pages = s.dev->release(); },
      [](Napi::Env env, State& s) -> Napi::Value { return Napi::Number::New(env, static_cast<double>(s.pages)); });
}

Napi::Value DeviceWrap::Close(const Napi::CallbackInfo& info) {
  if (!closed_) {
    closed_ = true;
    device_->close();
  }
  return info.Env().Undefined();
}

// ---- Mirror ------------------------------------------------------------------------------------

Napi::Function MirrorWrap::Init(Napi::Env env) {
  return DefineClass(env, "Mirror",
                     {
                         InstanceMethod<&MirrorWrap::Run>("run"),
                         InstanceMethod<&MirrorWrap::Replay>("replay"),
                         InstanceMethod<&MirrorWrap::Read>("read"),
                         InstanceMethod<&MirrorWrap::Write>("write"),
                         InstanceMethod<&MirrorWrap::Entries>("entries"),
                         InstanceMethod<&MirrorWrap::MigrateToDevice>("migrateToDevice"),
                         InstanceMethod<&MirrorWrap::MigrateToHost>("migrateToHost"),
                         InstanceMethod<&MirrorWrap::Snapshot>("snapshot"),
                         InstanceMethod<&MirrorWrap::Exclusive>("exclusiveCount"),
                         InstanceMethod<&MirrorWrap::Info>("info"),
                         InstanceMethod<&MirrorWrap::Close>("close"),
                         InstanceMethod<&MirrorWrap::FileRead>("fileRead"),
                         InstanceMethod<&MirrorWrap::FileWrite>("fileWrite"),
                         InstanceMethod<&MirrorWrap::Writeback>("writeback"),
                         InstanceMethod<&MirrorWrap::FileStats>("fileStats"),
                         InstanceMethod<&MirrorWrap::TakeLease>("takeLease"),
                         InstanceMethod<&MirrorWrap::AcknowledgeLoss>("acknowledgeLoss"),
                     });
}

MirrorWrap::MirrorWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<MirrorWrap>(info) {
  if (info.Length() < 2 || !info[0].IsExternal() || !info[1].IsExternal())
    throw CodedTypeError(info.Env(), "ERR_ILLEGAL_CONSTRUCTOR", "use device.mirror()");
  device_ = *info[0].As<Napi::External<std::shared_ptr<engine::Device>>>().Data();
  mirror_ = *info[1].As<Napi::External<std::shared_ptr<engine::Mirror>>>().Data();
}

MirrorWrap::~MirrorWrap() {
  if (mirror_) mirror_->detach();
}

std::shared_ptr<engine::Mirror> MirrorWrap::live(Napi::Env env) {
  if (!mirror_) throw StateError(env, "ERR_PAGEMIRROR_CLOSED", "the mirror is closed");
  if (mirror_->closed())
    throw StateError(env, "ERR_PAGEMIRROR_CLOSED", "the mirror was closed with its mapping (Mapping.close() closes its mirrors)");
  return mirror_;
}

namespace {

struct KernelJob {
  std::shared_ptr<engine::Device> device;
  // No region pin: device threads reach host memory only through valid entries, and every
  // CPU-side change (munmap included) clears entries and waits for accesses in flight first.
  std::shared_ptr<engine::Mirror> mirror;
  engine::KernelSpec spec;
  engine::KernelResult result;
  std::vector<uint8_t> buffer;  // copyOut/copyIn staging: nothing reaches the caller on error
  std::vector<uint64_t> gather;  // gather pattern indices
};

engine::KernelOp ParseKernelOp(Napi::Env env, const std::string& s) {
  if (s == "read") return engine::KernelOp::kRead;
  if (s == "write") return engine::KernelOp::kWrite;
  if (s == "atomic") return engine::KernelOp::kAtomicInc;
  if (s == "verify") return engine::KernelOp::kVerify;
  if (s == "copy") return engine::KernelOp::kCopy;
  throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "op must be 'read', 'write', 'atomic', 'verify' or 'copy'");
}

// ratio: the unit of first and n in mirror entries (base pages per entry, > 1 for hugetlb).
void CheckPages(Napi::Env env, engine::Mirror& m, uint64_t first, uint64_t n, uint64_t ratio = 1) {
  const uint64_t total = m.npages() * ratio;
  if (n == 0) throw SystemError(env, -EINVAL, "device", {nullptr, "npages must be > 0"});
  if (first > total || n > total - first)
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "pages [" + std::to_string(first) + ", +" + std::to_string(n) +
                                                       ") lie outside the mirror of " + std::to_string(total) + " pages");
}

// A range of the mirror's entries [first, last), given as a byte offset and a count of base pages,
// as the kernel's test device counts them (a 2 MiB hugetlb page is 512 pages) while a hugetlb
// mirror has one entry per huge page: ratio base pages each. whole: a device access, which must
// cover whole huge pages; otherwise (migration, which refuses hugetlb anyway) the range widens.
struct EntryRange {
  uint64_t first, last, ratio;
};
EntryRange ToEntries(Napi::Env env, engine::Mirror& m, uint64_t off, uint64_t n, bool whole = true) {
  const uint64_t base = sys::page_size(), ratio = m.page() / base;
  CheckAligned(env, off, whole ? m.page() : base, "offset");
  if (whole && n % ratio)
    throw CodedRangeError(env, "ERR_PAGEMIRROR_UNALIGNED",
                          "npages (" + std::to_string(n) + ") must cover whole huge pages of " + std::to_string(ratio) +
                              " pages: the mirror maps hugetlb pages whole");
  CheckPages(env, m, off / base, n, ratio);
  return {off / base / ratio, (off / base + n + ratio - 1) / ratio, ratio};
}

Napi::Object ResultObject(Napi::Env env, const engine::KernelResult& r, uint64_t ratio, bool link) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("ops", static_cast<double>(r.ops));
  o.Set("checksum", Napi::BigInt::New(env, r.checksum));
  o.Set("mismatches", static_cast<double>(r.mismatches));
  o.Set("faults", static_cast<double>(r.faults));
  o.Set("cpages", static_cast<double>(r.cpages * ratio));
  o.Set("elapsedNs", static_cast<double>(r.elapsed_ns));
  if (link) SetModeledTime(o, r);
  return o;
}

Napi::Value Start(Napi::Env env, std::unique_ptr<KernelJob> job, bool copy_out) {
  return NativeJob<KernelJob>::Start(
      env, std::move(job), [](KernelJob& j) { j.device->run(j.spec, &j.result); },
      [copy_out](Napi::Env env, KernelJob& j) -> Napi::Value {
        if (j.result.error) {
          const char* hint = j.result.error == -EPERM ? "the range is not writable"
                             : j.result.error == -EFAULT ? "no mapping, PROT_NONE, the mirror is gone, or the page could not be "
                                                           "made present (SIGBUS: past end of file, hugetlb pool empty, I/O error)"
                             : j.result.error == -ENOSPC ? "the file system is full: the page could not be allocated"
                             : j.result.error == -EBUSY ? "invalidations kept racing the range fault past the timeout"
                             : j.result.error == -ENODEV ? "the device was closed" : nullptr;
          Napi::Error err = SystemError(env, j.result.error, "device fault", {nullptr, hint});
          err.Value().Set("page", static_cast<double>(j.result.error_page));
          err.Value().Set("faults", static_cast<double>(j.result.faults));
          throw err;
        }
        Napi::Object o = ResultObject(env, j.result, j.mirror->page() / sys::page_size(), j.device->link() != nullptr);
        if (copy_out) o.Set("data", Napi::Buffer<uint8_t>::Copy(env, j.buffer.data(), j.buffer.size()));
        return o;
      });
}

}  // namespace

// run({offset, npages, op, pattern, unit, stride, ops, seed, threads}) -> Promise<result>
Napi::Value MirrorWrap::Run(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  Napi::Object o = ArgObject(info, 0, "kernel");
  const uint64_t page = m->page();
  uint64_t off = OptU64(o, "offset", 0);
  CheckAligned(env, off, page, "offset");
  const uint64_t ratio = page / sys::page_size();
  const EntryRange r = ToEntries(env, *m, off, OptU64(o, "npages", (m->npages() - std::min(m->npages(), off / page)) * ratio));
  const uint64_t n = r.last - r.first;
  auto job = std::unique_ptr<KernelJob>(new KernelJob{device_, m, {}, {}, {}});
  engine::KernelSpec& s = job->spec;
  s.mirror = m.get();
  s.first = r.first;
  s.npages = n;
  s.op = ParseKernelOp(env, OptString(o, "op", "read"));
  std::string pat = OptString(o, "pattern", "sequential");
  s.pattern = pat == "sequential" ? sys::AccessPattern::kSequential : pat == "strided" ? sys::AccessPattern::kStrided
            : pat == "random" ? sys::AccessPattern::kRandom : pat == "gather" ? sys::AccessPattern::kGather
            : throw CodedTypeError(env, "ERR_INVALID_ARG_VALUE", "pattern must be 'sequential', 'strided', 'random' or 'gather'");
  if (s.pattern == sys::AccessPattern::kGather) {
    Napi::Value idx = o.Get("indices");
    if (!idx.IsTypedArray() || idx.As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array)
      throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "the gather pattern needs indices: a Uint32Array of word indices");
    Napi::Uint32Array a = idx.As<Napi::Uint32Array>();
    if (a.ElementLength() == 0) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "indices must not be empty");
    Allocating(env, "run", [&] { job->gather.assign(a.Data(), a.Data() + a.ElementLength()); });
    s.gather = job->gather.data();
    s.gather_count = job->gather.size();
  }
  if (s.op == engine::KernelOp::kCopy) {
    int64_t to = ToI64(o.Get("copyTo"), "copyTo");
    CheckAligned(env, static_cast<uint64_t>(to < 0 ? -to : to), page, "copyTo");
    const int64_t lo = static_cast<int64_t>(s.first * page) + to, hi = lo + static_cast<int64_t>(n * page);
    if (lo < 0 || static_cast<uint64_t>(hi) > m->npages() * page)
      throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "copyTo moves the range outside the mirror");
    s.copy_to = to;
  }
  s.unit = OptU64(o, "unit", page);
  s.stride = OptU64(o, "stride", 0);
  s.ops = OptU64(o, "ops", 0);
  s.seed = OptU64(o, "seed", 1);
  s.threads = static_cast<unsigned>(OptU64(o, "threads", 1));
  if (s.unit < 8 || s.unit % 8 || s.stride % 8) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "unit and stride must be multiples of 8");
  if (s.threads == 0 || s.threads > 1024) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "threads must be 1..1024");
  return Start(env, std::move(job), false);
}

// read(offset, npages) -> Promise<{data, cpages, faults}>: the device reads the range through its
// page table; a miss faults everything from that page to the end of the range in one round.
Napi::Value MirrorWrap::Read(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  const EntryRange r = ToEntries(env, *m, ToU64(info[0], "offset"), ToU64(info[1], "npages"));
  const uint64_t n = r.last - r.first;
  CheckResultBytes(env, n * m->page(), "read");
  auto job = std::unique_ptr<KernelJob>(new KernelJob{device_, m, {}, {}, {}});
  Allocating(env, "read", [&] { job->buffer.resize(n * m->page()); });
  job->spec = engine::KernelSpec{m.get(), r.first, n, engine::KernelOp::kCopyOut};
  job->spec.buffer = job->buffer.data();
  job->spec.fault_to_end = true;
  return Start(env, std::move(job), true);
}

// write(offset, data) -> Promise<{cpages, faults}>
Napi::Value MirrorWrap::Write(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  uint64_t off = ToU64(info[0], "offset");
  if (info.Length() < 2 || !info[1].IsTypedArray()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "data must be a Uint8Array");
  Napi::TypedArray ta = info[1].As<Napi::TypedArray>();
  CheckAligned(env, off, m->page(), "offset");
  CheckAligned(env, ta.ByteLength(), m->page(), "data length");
  uint64_t n = ta.ByteLength() / m->page();
  CheckPages(env, *m, off / m->page(), n);
  auto job = std::unique_ptr<KernelJob>(new KernelJob{device_, m, {}, {}, {}});
  const uint8_t* src = static_cast<const uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
  Allocating(env, "write", [&] { job->buffer.assign(src, src + ta.ByteLength()); });
  job->spec = engine::KernelSpec{m.get(), off / m->page(), n, engine::KernelOp::kCopyIn};
  job->spec.buffer = job->buffer.data();
  job->spec.fault_to_end = true;
  return Start(env, std::move(job), false);
}

Napi::Value MirrorWrap::Entries(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  uint64_t first = ToU64(info[0], "page"), n = ToU64(info[1], "npages");
  // One per base page: a hugetlb page's entry stands for each of its pages.
  const uint64_t ratio = m->page() / sys::page_size();
  CheckPages(env, *m, first, n, ratio);
  CheckResultBytes(env, n * sizeof(uint64_t), "entries");
  Napi::BigUint64Array out = Napi::BigUint64Array::New(env, n);
  for (uint64_t i = 0; i < n; i++) out[i] = m->entry((first + i) / ratio);
  return out;
}

namespace {

const char* SkipName(engine::MigrateSkip s) {
  switch (s) {
    case engine::MigrateSkip::kShared: return "shared";
    case engine::MigrateSkip::kFileBacked: return "file-backed";
    case engine::MigrateSkip::kDax: return "dax";
    case engine::MigrateSkip::kOtherDevice: return "other-device";
    case engine::MigrateSkip::kNoMemory: return "device-memory-full";
    case engine::MigrateSkip::kPinned: return "pinned";
    case engine::MigrateSkip::kError: return "error";
    case engine::MigrateSkip::kUnregistrable: return "userfaultfd-unsupported";
    case engine::MigrateSkip::kNone: return "none";
  }
  return "unknown";
}

struct MigrateJob {
  std::shared_ptr<engine::Device> device;
  std::shared_ptr<engine::Mirror> mirror;
  uint64_t first, last;
  bool use_move;
  engine::MigrateResult result;
  bool atomic = false;
  uint64_t granule_pages = 512;
  uint64_t back = 0;
  uint64_t elapsed_ns = 0;
};

}  // namespace

// migrateToDevice(offset, npages, useMove) -> Promise<{cpages, moved, byMove, byCopy, zeroFilled,
// skipped: [{offset, reason}]}>. Errors: EINVAL (no access, hugetlb), ENOENT (nothing is on the
// device afterwards), EBUSY (the range is registered with another userfaultfd).
Napi::Value MirrorWrap::MigrateToDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  const EntryRange range = ToEntries(env, *m, ToU64(info[0], "offset"), ToU64(info[1], "npages"), false);
  bool use_move = info.Length() < 3 || info[2].ToBoolean().Value();
  auto job = std::unique_ptr<MigrateJob>(new MigrateJob{device_, m, range.first, range.last, use_move, {}});
  job->atomic = info.Length() > 3 && info[3].ToBoolean().Value();
  if (info.Length() > 4 && !info[4].IsUndefined()) {
    uint64_t g = ToU64(info[4], "granule");
    if (g < m->page() || (g & (g - 1))) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "granule must be a power of two of at least one page");
    job->granule_pages = g / m->page();
  }
  return NativeJob<MigrateJob>::Start(
      env, std::move(job),
      [](MigrateJob& j) {
        uint64_t t0 = sys::now_ns();
        engine::MigrateToDevice::run(j.mirror.get(), j.first, j.last,
                                     {j.use_move, j.atomic, engine::Trigger::kExplicit, j.granule_pages}, &j.result);
        j.elapsed_ns = sys::now_ns() - t0;
      },
      [](Napi::Env env, MigrateJob& j) -> Napi::Value {
        const auto& r = j.result;
        Napi::Array skipped = Napi::Array::New(env, r.skipped.size());
        for (size_t i = 0; i < r.skipped.size(); i++) {
          Napi::Object o = Napi::Object::New(env);
          o.Set("offset", static_cast<double>((r.skipped[i].first - j.first) * j.mirror->page()));
          o.Set("reason", SkipName(r.skipped[i].second));
          skipped.Set(static_cast<uint32_t>(i), o);
        }
        if (r.error) {
          const char* hint = r.error == -EINVAL ? "a page in the range has no access (PROT_NONE) or is hugetlb"
                             : r.error == -ENOENT ? "no page of the range could move (see err.skipped)"
                             : r.error == -EBUSY ? "the range is registered with another userfaultfd"
                             : nullptr;
          Napi::Error err = SystemError(env, r.error, "migrate", {nullptr, hint});
          err.Value().Set("skipped", skipped);
          throw err;
        }
        Napi::Object o = Napi::Object::New(env);
        const uint64_t ratio = j.mirror->page() / sys::page_size();  // counted in base pages, as the kernel does
        o.Set("cpages", static_cast<double>(r.resident * ratio));
        o.Set("moved", static_cast<double>(r.moved * ratio));
        o.Set("byMove", static_cast<double>(r.moved_by_move * ratio));
        o.Set("byCopy", static_cast<double>(r.moved_by_copy * ratio));
        o.Set("zeroFilled", static_cast<double>(r.zero_filled * ratio));
        o.Set("elapsedNs", static_cast<double>(j.elapsed_ns));
        o.Set("skipped", skipped);
        return o;
      });
}

// migrateToHost(offset, npages) -> Promise<{cpages}>: pages actually moved back.
Napi::Value MirrorWrap::MigrateToHost(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  const EntryRange range = ToEntries(env, *m, ToU64(info[0], "offset"), ToU64(info[1], "npages"), false);
  auto job = std::unique_ptr<MigrateJob>(new MigrateJob{device_, m, range.first, range.last, true, {}});
  return NativeJob<MigrateJob>::Start(
      env, std::move(job),
      [](MigrateJob& j) {
        uint64_t t0 = sys::now_ns();
        j.back = engine::MigrateToHost::range(j.mirror.get(), j.first, j.last);
        j.elapsed_ns = sys::now_ns() - t0;
      },
      [](Napi::Env env, MigrateJob& j) -> Napi::Value {
        Napi::Object o = Napi::Object::New(env);
        o.Set("cpages", static_cast<double>(j.back * (j.mirror->page() / sys::page_size())));
        o.Set("elapsedNs", static_cast<double>(j.elapsed_ns));
        return o;
      });
}

Napi::Value MirrorWrap::Snapshot(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  uint64_t off = ToU64(info[0], "offset"), n = ToU64(info[1], "npages");
  // One byte per base page, hugetlb included (each carries the PMD/PUD flag), as the kernel's.
  const uint64_t base = sys::page_size();
  CheckAligned(env, off, base, "offset");
  CheckPages(env, *m, off / base, n, m->page() / base);
  CheckResultBytes(env, n, "snapshot");
  Napi::Uint8Array out = Napi::Uint8Array::New(env, n);
  m->snapshot(off / base, off / base + n, out.Data());
  return out;
}

// exclusiveCount(offset, npages): pages still held exclusively (checkExclusive is EPERM if > 0).
Napi::Value MirrorWrap::Exclusive(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  const EntryRange r = ToEntries(env, *m, ToU64(info[0], "offset"), ToU64(info[1], "npages"), false);
  return Napi::Number::New(env, static_cast<double>(m->count_exclusive(r.first, r.last) * r.ratio));
}

Napi::Value MirrorWrap::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  if (!mirror_ || mirror_->closed()) {
    o.Set("closed", true);
    return o;
  }
  const engine::MirrorStats& s = mirror_->stats();
  o.Set("closed", false);
  o.Set("dead", mirror_->dead());
  o.Set("address", Napi::BigInt::New(env, mirror_->start()));
  o.Set("npages", static_cast<double>(mirror_->npages()));
  o.Set("pageSize", static_cast<double>(mirror_->page()));
  o.Set("tableBytes", static_cast<double>(mirror_->table_bytes()));
  o.Set("invalidations", static_cast<double>(s.invalidations.load()));
  o.Set("invalidatedPages", static_cast<double>(s.invalidated_pages.load() * (mirror_->page() / sys::page_size())));
  o.Set("rangeFaults", static_cast<double>(s.range_faults.load()));
  o.Set("retries", static_cast<double>(s.retries.load()));
  o.Set("pinned", mirror_->pinned());
  o.Set("diverged", static_cast<double>(mirror_->diverged()));
  return o;
}

Napi::Value MirrorWrap::Close(const Napi::CallbackInfo& info) {
  if (mirror_) {
    mirror_->detach();
    const engine::WriteErrorReport loss = mirror_->file_loss();
    const std::shared_ptr<engine::Mirror> m = std::move(mirror_);
    // Closed either way; but as close(2) reports a failed writeback, so does this.
    if (loss.error) throw DataLostError(info.Env(), *m, loss);
  }
  return info.Env().Undefined();
}

// ---- File strategies ---------------------------------------------------------------------------

namespace {

struct FileIoJob {
  std::shared_ptr<engine::Mirror> mirror;
  uint64_t off = 0, len = 0;
  std::vector<uint8_t> data;
  int64_t rc = 0;
  engine::Mirror::WritebackResult wb;
  bool sync = false;   // writeback: fdatasync after
  bool write = false;  // file I/O: a write (else a read)
};

}  // namespace

// The pages of a write error on the error object: pages (how many) and ranges ({offset, length}
// in bytes of the mirror, merged).
static void SetPages(Napi::Env env, Napi::Object o, const engine::Mirror& m, std::vector<std::pair<uint64_t, uint64_t>> runs) {
  std::sort(runs.begin(), runs.end());
  Napi::Array ranges = Napi::Array::New(env);
  uint64_t pages = 0;
  for (size_t k = 0; k < runs.size();) {
    auto [a, b] = runs[k++];
    for (; k < runs.size() && runs[k].first <= b; k++) b = std::max(b, runs[k].second);
    Napi::Object r = Napi::Object::New(env);
    r.Set("offset", static_cast<double>(a * m.page()));
    r.Set("length", static_cast<double>((b - a) * m.page()));
    ranges.Set(ranges.Length(), r);
    pages += b - a;
  }
  o.Set("pages", static_cast<double>(pages));
  o.Set("ranges", ranges);
}

Napi::Error DataLostError(Napi::Env env, const engine::Mirror& m, const engine::WriteErrorReport& loss) {
  const std::string hint =
      (loss.pages ? std::to_string(loss.pages) + " pages of the mirror" : std::string("data of the file the library cannot name")) +
      " may be lost: the file could not take them and no copy is left (the kernel marks pages clean after a failed "
      "writeback); rewrite them, then call acknowledgeLoss()";
  Napi::Error err = SystemError(env, loss.error, loss.syscall ? loss.syscall : "writeback",
                                {m.region()->path.empty() ? nullptr : m.region()->path.c_str(), hint.c_str()});
  err.Value().Set("code", "ERR_PAGEMIRROR_DATA_LOST");
  err.Value().Set("cause", ErrnoName(loss.error < 0 ? -loss.error : loss.error));
  SetPages(env, err.Value(), m, loss.runs);
  return err;
}

namespace {

engine::Mirror& FileMirror(Napi::Env env, engine::Mirror& m) {
  if (m.file_strategy() == engine::FileStrategy::kNone)
    throw SystemError(env, -EINVAL, "mirror", {nullptr, "not a file mirror: create it with a strategy (device.mirrorFile)"});
  return m;
}

// A file job that the mirror's close (its own, or its mapping's) cut off: the engine stops it with
// EBADF, which would read as a bad descriptor of the caller's; say what happened instead.
void ThrowIfClosedUnder(Napi::Env env, int64_t rc, engine::Mirror& m, const char* what) {
  if (rc == -EBADF && m.closed())
    throw StateError(env, "ERR_PAGEMIRROR_CLOSED",
                     std::string("the mirror was closed while its ") + what +
                         " ran (close() writes the device's copies back itself)");
}

void CheckBytes(Napi::Env env, engine::Mirror& m, uint64_t off, uint64_t len) {
  const uint64_t size = m.npages() * m.page();
  if (off > size || len > size - off)
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE", "bytes [" + std::to_string(off) + ", +" + std::to_string(len) +
                                                       ") lie outside the mirror of " + std::to_string(size) + " bytes");
}

}  // namespace

namespace {

// read() (data: length bytes to fill) or write() (data: the bytes) of the file through the
// strategy, on a native job thread: it may wait for a device's accesses or for the disk.
Napi::Value StartFileIo(Napi::Env env, std::shared_ptr<engine::Mirror> m, uint64_t off, std::vector<uint8_t> data, bool write) {
  CheckBytes(env, *m, off, data.size());
  auto job = std::make_unique<FileIoJob>();
  job->mirror = std::move(m);
  job->off = off;
  job->len = data.size();
  job->data = std::move(data);
  job->write = write;
  return NativeJob<FileIoJob>::Start(
      env, std::move(job),
      [](FileIoJob& j) {
        j.rc = j.write ? j.mirror->file_write(j.off, j.len, j.data.data()) : j.mirror->file_read(j.off, j.len, j.data.data());
      },
      [](Napi::Env env, FileIoJob& j) -> Napi::Value {
        ThrowIfClosedUnder(env, j.rc, *j.mirror, j.write ? "pwrite()" : "pread()");
        if (j.rc < 0) ThrowSystemError(env, static_cast<int>(j.rc), j.write ? "pwrite" : "pread", {});
        if (j.write) return env.Undefined();
        return Napi::Buffer<uint8_t>::Copy(env, j.data.data(), static_cast<size_t>(j.rc));
      });
}

}  // namespace

// fileRead(offset, length) -> Promise<Buffer>: read() of the file through the strategy.
Napi::Value MirrorWrap::FileRead(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  FileMirror(env, *m);
  const uint64_t off = ToU64(info[0], "offset"), len = ToU64(info[1], "length");
  CheckBytes(env, *m, off, len);
  CheckResultBytes(env, len, "pread");
  return StartFileIo(env, m, off, Allocating(env, "pread", [&] { return std::vector<uint8_t>(len); }), false);
}

// fileWrite(offset, data) -> Promise<void>: write() of the file through the strategy.
Napi::Value MirrorWrap::FileWrite(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  FileMirror(env, *m);
  if (info.Length() < 2 || !info[1].IsTypedArray()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", "data must be a Uint8Array");
  const uint64_t off = ToU64(info[0], "offset");
  Napi::TypedArray ta = info[1].As<Napi::TypedArray>();
  const uint8_t* src = static_cast<const uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
  return StartFileIo(env, m, off, Allocating(env, "pwrite", [&] { return std::vector<uint8_t>(src, src + ta.ByteLength()); }), true);
}

// writeback(offset, length, sync) -> Promise<{pages, bytesCopied, elapsedNs}>
Napi::Value MirrorWrap::Writeback(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  FileMirror(env, *m);
  auto job = std::make_unique<FileIoJob>();
  job->mirror = m;
  job->off = ToU64(info[0], "offset");
  job->len = ToU64(info[1], "length");
  job->sync = info.Length() > 2 && info[2].ToBoolean().Value();
  CheckAligned(env, job->off, m->page(), "offset");
  CheckBytes(env, *m, job->off, job->len);
  return NativeJob<FileIoJob>::Start(
      env, std::move(job),
      [](FileIoJob& j) {
        const uint64_t page = j.mirror->page();
        j.rc = j.mirror->writeback(j.off / page, (j.off + j.len + page - 1) / page, j.sync, &j.wb);
      },
      [](Napi::Env env, FileIoJob& j) -> Napi::Value {
        ThrowIfClosedUnder(env, j.rc, *j.mirror, j.sync ? "fsync()" : "writeback()");
        // Loss first: it is sticky, and whatever else failed is part of it.
        const engine::WriteErrorReport loss = j.mirror->file_loss();
        if (loss.error) throw DataLostError(env, *j.mirror, loss);
        if (j.rc < 0) {
          const engine::WriteErrorReport& kept = j.wb.kept;
          const bool own = kept.error == j.rc && kept.syscall;
          Napi::Error err = SystemError(env, static_cast<int>(j.rc), own ? kept.syscall : j.sync ? "fdatasync" : "writeback",
                                        {j.mirror->region()->path.empty() ? nullptr : j.mirror->region()->path.c_str(),
                                         kept.pages ? "the device keeps these pages dirty; the next writeback or fsync() writes them again" : nullptr});
          SetPages(env, err.Value(), *j.mirror, kept.runs);
          throw err;
        }
        Napi::Object o = Napi::Object::New(env);
        o.Set("pages", static_cast<double>(j.wb.pages));
        o.Set("bytesCopied", static_cast<double>(j.wb.bytes_copied));
        o.Set("elapsedNs", static_cast<double>(j.wb.elapsed_ns));
        return o;
      });
}

Napi::Value MirrorWrap::FileStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  const engine::FileStats* s = FileMirror(env, *m).file_stats();
  uint64_t on_device = 0, dirty = 0, sole = 0;
  for (uint64_t i = 0; i < m->npages(); i++) {
    const uint64_t e = m->entry(i);
    if (e & engine::kOnDevice) on_device++;
    if (e & engine::kDirty) dirty++;
    if (e & engine::kSole) sole++;
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("strategy", engine::FileStrategyName(m->file_strategy()));
  o.Set("cpuFaultsIntercepted", m->file_intercepts_cpu());
  o.Set("leaseHeld", m->lease_held());
  o.Set("devicePages", static_cast<double>(on_device));
  o.Set("dirtyPages", static_cast<double>(dirty));
  o.Set("soleCopies", static_cast<double>(sole));
  o.Set("loadedPages", static_cast<double>(s->loaded_pages.load()));
  o.Set("freedPages", static_cast<double>(s->freed_pages.load()));
  o.Set("pulledBack", static_cast<double>(s->pulled_back.load()));
  o.Set("sharedReads", static_cast<double>(s->shared_reads.load()));
  o.Set("writebacks", static_cast<double>(s->writebacks.load()));
  o.Set("writtenPages", static_cast<double>(s->written_pages.load()));
  o.Set("snapshotBytes", static_cast<double>(s->snapshot_bytes.load()));
  o.Set("readBytes", static_cast<double>(s->io_read_bytes.load()));
  o.Set("writeBytes", static_cast<double>(s->io_write_bytes.load()));
  o.Set("leaseBreaks", static_cast<double>(s->lease_breaks.load()));
  o.Set("storeErrors", static_cast<double>(s->store_errors.load()));
  o.Set("writeErrors", static_cast<double>(s->write_errors.load()));
  o.Set("unconfirmedPages", static_cast<double>(m->file_unconfirmed()));
  const engine::WriteErrorReport loss = m->file_loss();
  o.Set("lostPages", static_cast<double>(loss.pages));
  o.Set("loss", loss.error ? Napi::Value(Napi::String::New(env, ErrnoName(-loss.error))) : env.Null());
  o.Set("writebackNs", static_cast<double>(s->writeback_ns.load()));
  return o;
}

Napi::Value MirrorWrap::TakeLease(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  int rc = FileMirror(env, *m).take_lease();
  if (rc) {
    const char* hint = rc == -EAGAIN ? "a write lease needs the file to be open nowhere else (any other open, by any "
                                       "process, read-only included, or a writable mapping elsewhere)"
                       : rc == -EACCES ? "only the file's owner (or CAP_LEASE) may take a lease"
                       : rc == -EINVAL ? "this file system does not support leases"
                       : rc == -EBADF ? "the mirror's range is gone (unmapped or moved): nothing would release the lease" : nullptr;
    ThrowSystemError(env, rc, "fcntl(F_SETLEASE)", {m->region()->path.empty() ? nullptr : m->region()->path.c_str(), hint});
  }
  return env.Undefined();
}

// acknowledgeLoss() -> {pages, ranges, code} | null: the sticky loss, cleared.
Napi::Value MirrorWrap::AcknowledgeLoss(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  const engine::WriteErrorReport loss = FileMirror(env, *m).file_loss(true);
  if (!loss.error) return env.Null();
  Napi::Object o = Napi::Object::New(env);
  o.Set("code", ErrnoName(-loss.error));
  o.Set("errno", loss.error);
  o.Set("syscall", loss.syscall ? loss.syscall : "writeback");
  SetPages(env, o, *m, loss.runs);
  return o;
}

}  // namespace pm
