// Trace replay: a recorded access sequence run through a device's mirror on device threads, in
// windows, so that the device's fault rounds, migrations and evictions depend on the sequence and
// the device's options only (docs/trace-format.md, "Replay"). Plain C++, no Node-API.
#pragma once

#include <cstdint>

#include "device.h"

namespace pm::engine {

struct ReplaySpec {
  Mirror* mirror = nullptr;
  const uint64_t* pages = nullptr;  // entry index of each access, in trace order
  const uint8_t* ops = nullptr;     // bit 0: write; bits 1..7: the device thread
  uint64_t count = 0;
  unsigned threads = 1;             // device threads (1..64)
  uint64_t window = 32;             // accesses per step
  uint64_t seed = 1;                // written words are seed + access index
};

struct ReplayResult {
  uint64_t accesses = 0, hits = 0, misses = 0;  // misses: accesses that found no valid entry
  uint64_t refaults = 0;        // misses again after their fault round (evicted or invalidated meanwhile)
  uint64_t windows = 0;
  uint64_t fault_requests = 0, fault_rounds = 0, faulted_pages = 0, prefetched_pages = 0;
  uint64_t to_device[static_cast<unsigned>(Trigger::kCount)] = {};
  uint64_t to_host[static_cast<unsigned>(Trigger::kCount)] = {};
  uint64_t invalidated_pages = 0;
  uint64_t checksum = 0;
  uint64_t elapsed_ns = 0;
  // With the device's link model (docs/link-model.md), else 0: the fault rounds that served this
  // replay (with the migrations and evictions made in them), plus each window's slowest device
  // thread's accesses to host-resident pages.
  uint64_t modeled_ns = 0, modeled_fault_ns = 0, modeled_remote_ns = 0;
  uint64_t remote_accesses = 0, remote_bytes = 0;
  int error = 0;  // -errno of a failed device fault (EPERM, EFAULT, EBUSY, ENODEV)
  uint64_t error_index = 0;  // the access it failed on
};

void replay(Device& device, const ReplaySpec& spec, ReplayResult* out);

}  // namespace pm::engine
