// Per-environment state (main thread and each worker thread get their own), so the addon is
// context-aware and its cleanup hooks run per environment.
#pragma once

#include <napi.h>

#include <cerrno>
#include <new>
#include <stdexcept>

#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "../sys/pagemap.h"
#include "errors.h"

namespace pm {
namespace engine {
class Device;
class Mirror;
}  // namespace engine


class Userfaultfd;

struct AddonData {
  Napi::FunctionReference mapping_ctor;
  Napi::FunctionReference uffd_ctor;
  Napi::FunctionReference device_ctor;
  Napi::FunctionReference mirror_ctor;
  Napi::FunctionReference pager_ctor;
  Napi::FunctionReference fault_server_ctor;
  Napi::FunctionReference remote_client_ctor;
  // Open userfaultfds: closed by the environment's cleanup hook so no thread stays asleep on a
  // fault after the environment goes away.
  std::mutex mu;
  std::set<Userfaultfd*> uffds;
  // Devices and mirrors made in this environment: at its teardown the mirrors close (a file
  // mirror writes its device's copies back, as the kernel keeps dirty page cache after a process
  // exits) and the devices stop their threads.
  std::vector<std::weak_ptr<engine::Device>> devices;
  std::vector<std::weak_ptr<engine::Mirror>> mirrors;
  // The largest ArrayBuffer this Node hands out (buffer.constants.MAX_LENGTH: 2^32 on Node 20).
  // Asking for more makes Node call the finalizer and fail; views past it are refused first.
  uint64_t max_view_bytes = 1ull << 32;
};

Napi::Object StatxToObject(Napi::Env env, const sys::StatxInfo& sx);

// A result of `bytes` bytes handed back in one ArrayBuffer must fit in one: checked before anything
// is allocated for it (a caller-sized allocation must not fail as a C++ exception).
void CheckResultBytes(Napi::Env env, uint64_t bytes, const char* what);

// Runs f, an allocation whose size the caller chose: running out of memory is ENOMEM, not an
// uncaught std::bad_alloc.
template <typename F>
auto Allocating(Napi::Env env, const char* what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
  } catch (const std::length_error&) {
  }
  ThrowSystemError(env, -ENOMEM, what, {nullptr, "not enough memory for a buffer this size; ask for a smaller range"});
}

}  // namespace pm
