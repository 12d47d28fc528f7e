// Per-environment state (main thread and each worker thread get their own), so the addon is
// context-aware and its cleanup hooks run per environment.
#pragma once

#include <napi.h>

#include <mutex>
#include <set>

#include "../sys/pagemap.h"

namespace pm {

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
};

Napi::Object StatxToObject(Napi::Env env, const sys::StatxInfo& sx);

}  // namespace pm
