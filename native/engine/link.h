// LinkModel: the interconnect between host memory and a device (PCIe, NVLink-C2C, CXL), as a cost
// function over the events the engine really performs. Nothing here waits or moves data: the
// engine does the real work in host time, and each event it performs is charged here in modeled
// nanoseconds, so a run reports "what this would have cost on that link" beside what it cost on
// this machine. docs/link-model.md explains the model, the presets and the validation.
//
// Plain C++ (no Node-API), no allocation, no locks: charges are relaxed atomic adds, so any
// engine thread (the fault service, device threads, the engine's CPU-fault workers, JavaScript's
// job threads, a replay) may call it.
#pragma once

#include <atomic>
#include <cstdint>

namespace pm::engine {

// Link parameters, in the units a GPU/NIC memory engineer quotes. All >= 0; a bandwidth of 0 means
// unlimited (no per-byte cost). The TypeScript layer validates and documents them (lib/link.ts).
struct LinkParams {
  double latency_us = 0;             // per transfer (one DMA: a migration call, an eviction, a writeback run)
  double bandwidth_gbs = 0;          // host -> device, GB/s (1e9 bytes/s); 0 = unlimited
  double to_host_bandwidth_gbs = 0;  // device -> host; 0 = as bandwidth_gbs
  // Transfer-size curve: BW(s) = bw * (2/pi) * atan(k * s / 1024), k per KiB (the fitted PCIe 3.0
  // x16 curve has k = 0.07292 and bw = 12). 0: flat (BW(s) = bw).
  double curve_per_kib = 0;
  double fault_round_us = 0;         // one device fault round (batch): the far-fault service round trip
  double remote_access_ns = 0;       // per device access to a host-resident page
  double remote_bandwidth_gbs = 0;   // bytes of those accesses; 0 = as bandwidth_gbs
};

// What a charge is for: the categories DeviceCounters and reports show.
enum class LinkCategory : unsigned { kFaults, kToDevice, kToHost, kEviction, kWriteback, kRemote, kCount };
const char* LinkCategoryName(LinkCategory c);

enum class LinkDir : unsigned { kToDevice, kToHost };

class LinkModel {
 public:
  explicit LinkModel(const LinkParams& p);

  // Costs, without charging (what a caller planning a transfer may ask).
  uint64_t transfer_ns(uint64_t bytes, LinkDir dir) const;
  uint64_t fault_round_ns() const { return fault_round_ns_; }
  uint64_t remote_ns(uint64_t accesses, uint64_t bytes) const;

  // Charges, each counted in its category (ns, events, bytes); return the ns charged.
  uint64_t charge_fault_round() { return add(LinkCategory::kFaults, fault_round_ns_, 1, 0); }
  uint64_t charge_transfer(uint64_t bytes, LinkDir dir, LinkCategory category) {
    return add(category, transfer_ns(bytes, dir), 1, bytes);
  }
  uint64_t charge_remote(uint64_t accesses, uint64_t bytes) {
    return accesses ? add(LinkCategory::kRemote, remote_ns(accesses, bytes), accesses, bytes) : 0;
  }

  struct Counter {
    std::atomic<uint64_t> ns{0}, events{0}, bytes{0};
  };
  const Counter& counter(LinkCategory c) const { return counters_[static_cast<unsigned>(c)]; }
  uint64_t total_ns() const;
  const LinkParams& params() const { return params_; }

 private:
  uint64_t add(LinkCategory c, uint64_t ns, uint64_t events, uint64_t bytes) {
    Counter& k = counters_[static_cast<unsigned>(c)];
    k.ns.fetch_add(ns, std::memory_order_relaxed);
    k.events.fetch_add(events, std::memory_order_relaxed);
    k.bytes.fetch_add(bytes, std::memory_order_relaxed);
    return ns;
  }
  static uint64_t bytes_ns(uint64_t bytes, uint64_t fs_per_byte);

  const LinkParams params_;
  // Integer costs, fixed at construction: the hot path adds integers only. fs_per_byte: femtoseconds
  // per byte (1e6 / GB/s), exact for the round figures tests and presets use.
  uint64_t latency_ns_, fault_round_ns_, remote_access_ns_;
  uint64_t fs_per_byte_[2], remote_fs_per_byte_;
  Counter counters_[static_cast<unsigned>(LinkCategory::kCount)];
};

}  // namespace pm::engine
