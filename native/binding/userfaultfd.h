// Userfaultfd: one userfaultfd, its feature negotiation, registration, the resolve ioctls, and the
// fault service that reads faults on a native thread and hands JavaScript batches.
#pragma once

#include <napi.h>
#include <uv.h>

#include <memory>
#include <mutex>
#include <vector>

#include "../sys/fault_service.h"
#include "../engine/region.h"

namespace pm {

struct AddonData;

class Userfaultfd : public Napi::ObjectWrap<Userfaultfd>, public sys::FaultSink {
 public:
  static Napi::Function Init(Napi::Env env);
  static Napi::Value Open(const Napi::CallbackInfo& info);
  static Napi::Value Adopt(const Napi::CallbackInfo& info);

  explicit Userfaultfd(const Napi::CallbackInfo& info);
  ~Userfaultfd() override;

  // Environment teardown: stop the service, apply the default close outcome.
  void Shutdown();

  void on_batch(const sys::FaultMsg* faults, size_t nfaults, const sys::EventMsg* events, size_t nevents) override;

 private:
  struct Registration {
    std::weak_ptr<Region> region;
    uint64_t start, len, mode;
    uint64_t page;  // the memory's page size (hugetlb: 2 MiB or 1 GiB)
  };

  Napi::Value Info(const Napi::CallbackInfo& info);
  Napi::Value Api(const Napi::CallbackInfo& info);
  Napi::Value Register(const Napi::CallbackInfo& info);
  Napi::Value Unregister(const Napi::CallbackInfo& info);
  Napi::Value Copy(const Napi::CallbackInfo& info);
  Napi::Value Zeropage(const Napi::CallbackInfo& info);
  Napi::Value Continue(const Napi::CallbackInfo& info);
  Napi::Value Move(const Napi::CallbackInfo& info);
  Napi::Value Poison(const Napi::CallbackInfo& info);
  Napi::Value WriteProtect(const Napi::CallbackInfo& info);
  Napi::Value Wake(const Napi::CallbackInfo& info);
  Napi::Value Fallback(const Napi::CallbackInfo& info);
  Napi::Value ResolveMany(const Napi::CallbackInfo& info);
  Napi::Value Serve(const Napi::CallbackInfo& info);
  Napi::Value Reconfigure(const Napi::CallbackInfo& info);
  Napi::Value SetRules(const Napi::CallbackInfo& info);
  Napi::Value SetTap(const Napi::CallbackInfo& info);  // native/binding/trace.cc
  Napi::Value Stats(const Napi::CallbackInfo& info);
  Napi::Value Outstanding(const Napi::CallbackInfo& info);
  Napi::Value Ref(const Napi::CallbackInfo& info);
  Napi::Value Unref(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  int live_fd(Napi::Env env);
  // Resolves a (mapping|address, offset, length) triple at info[i..i+2] to an absolute range.
  uint64_t Target(const Napi::CallbackInfo& info, size_t i, uint64_t* len, bool* was_mapping = nullptr);
  template <int (*Ioctl)(int, uint64_t, uint64_t, uint64_t, int64_t*)>
  Napi::Value ResolveRange(const Napi::CallbackInfo& info, const char* name);
  Napi::Value ResolveResult(Napi::Env env, int rc, int64_t done, uint64_t start, uint64_t len, const char* name);
  void StopService();
  enum class Outcome { kWake, kZero, kSigbus };
  void CloseWith(Outcome outcome);
  const Registration* RegistrationAt(uint64_t addr) const;
  // A zero source as large as the largest huge page registered (reserved, never touched): a missing
  // fault on hugetlb memory is resolved by UFFDIO_COPY from it (ZEROPAGE does not apply there).
  void* zero_huge_ = nullptr;
  uint64_t zero_huge_len_ = 0;
  void ResolveAsUnregistered(const sys::FaultMsg& f, bool keep_wp, uint64_t page = 0);

  int fd_ = -1;
  bool api_done_ = false;
  uint64_t features_ = 0, ioctls_ = 0;
  bool user_mode_only_ = false;
  int opened_by_ = 0;  // 0 device, 1 syscall, 2 adopted (a FORK event's child uffd)
  int device_error_ = 0, syscall_error_ = 0;
  std::vector<Registration> registrations_;
  std::unique_ptr<sys::FaultService> service_;
  std::vector<std::shared_ptr<Region>> rule_sources_;  // pinned while rules use them
  std::vector<RegionPin> rule_pins_;
  // The rules as set, and for each whether it serves shared shmem (a zero rule there must look for
  // uffd-wp markers where the memory is registered for WP: sys::uffd_zero_fill_shmem).
  std::vector<sys::Rule> rules_;
  std::vector<bool> rule_on_shared_shmem_;
  // Hands rules_ to the service with zero_reads_markers as the registrations now say.
  void PushRules();
  bool WpRegistered(uint64_t start, uint64_t end) const;
  // ZEROPAGE on [start, end) of this memory, keeping any uffd-wp marker's protection.
  int ZeroFill(const Region* region, uint64_t start, uint64_t len, uint64_t mode, int64_t* done) const;
  std::vector<RegionPin> retired_pins_;  // sources of removed rules a batch in flight may still read
  // Faults and events waiting for the JavaScript thread, in buffers sized once by serve(): the
  // service thread must not allocate (FaultSink::on_batch). While one wake-up of the JavaScript
  // thread is pending, later faults join it: under load batches grow by themselves, and an idle
  // handler still gets each fault at once. The wake-up is a uv_async_t (uv_async_send neither
  // allocates nor blocks), not a thread-safe function, whose queue allocates.
  struct Pending {
    static constexpr size_t kCapacity = 16384;
    std::mutex mu;
    std::vector<sys::FaultMsg> faults;
    std::vector<sys::EventMsg> events;
    // The JavaScript thread's side of a double buffer: swapped with the above under the lock (no
    // allocation while the lock is held: a fork in progress blocks malloc, and the service thread,
    // which must read the fork event, needs this lock).
    std::vector<sys::FaultMsg> taken_faults;
    std::vector<sys::EventMsg> taken_events;
    bool queued = false;
    uint64_t overflow = 0;     // faults resolved by the fallback because the buffer was full
    uv_async_t* async = nullptr;
    napi_env env = nullptr;
    napi_ref callback = nullptr;
    napi_async_context context = nullptr;
    int fd = -1;
  };
  std::shared_ptr<Pending> pending_;
  static void OnAsync(uv_async_t* handle);
  bool serving_ = false;
  bool self_ref_ = false;  // serving keeps this object alive: no fault is left to a collected handler
  AddonData* data_ = nullptr;
};

}  // namespace pm
