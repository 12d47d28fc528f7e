// Per-environment state (main thread and each worker thread get their own), so the addon is
// context-aware and its cleanup hooks run per environment.
#pragma once

#include <napi.h>

#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "../sys/pagemap.h"

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

}  // namespace pm
