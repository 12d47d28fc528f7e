#include "link.h"

#include <cmath>

namespace pm::engine {

const char* LinkCategoryName(LinkCategory c) {
  switch (c) {
    case LinkCategory::kFaults: return "faults";
    case LinkCategory::kToDevice: return "migrateToDevice";
    case LinkCategory::kToHost: return "migrateToHost";
    case LinkCategory::kEviction: return "evictions";
    case LinkCategory::kWriteback: return "writeback";
    case LinkCategory::kRemote: return "remoteAccess";
    case LinkCategory::kCount: break;
  }
  return "unknown";
}

namespace {

uint64_t round_ns(double ns) { return ns > 0 ? static_cast<uint64_t>(std::llround(ns)) : 0; }
uint64_t fs_per_byte(double gbs) { return gbs > 0 ? round_ns(1e6 / gbs) : 0; }

}  // namespace

LinkModel::LinkModel(const LinkParams& p)
    : params_(p),
      latency_ns_(round_ns(p.latency_us * 1e3)),
      fault_round_ns_(round_ns(p.fault_round_us * 1e3)),
      remote_access_ns_(round_ns(p.remote_access_ns)),
      fs_per_byte_{fs_per_byte(p.bandwidth_gbs), fs_per_byte(p.to_host_bandwidth_gbs > 0 ? p.to_host_bandwidth_gbs : p.bandwidth_gbs)},
      remote_fs_per_byte_(fs_per_byte(p.remote_bandwidth_gbs > 0 ? p.remote_bandwidth_gbs : p.bandwidth_gbs)) {}

uint64_t LinkModel::bytes_ns(uint64_t bytes, uint64_t fs) {
  // 128-bit: a TiB at a slow link's femtoseconds per byte overflows 64 bits.
  return static_cast<uint64_t>(static_cast<unsigned __int128>(bytes) * fs / 1000000u);
}

uint64_t LinkModel::transfer_ns(uint64_t bytes, LinkDir dir) const {
  const unsigned d = static_cast<unsigned>(dir);
  if (!bytes) return 0;
  if (params_.curve_per_kib > 0 && fs_per_byte_[d]) {
    // Small transfers reach a fraction of the asymptote (DMA setup, TLP overheads): the fitted
    // atan curve, evaluated once per transfer (transfers are not the per-access hot path).
    const double bw = (d == 0 || params_.to_host_bandwidth_gbs <= 0 ? params_.bandwidth_gbs : params_.to_host_bandwidth_gbs) *
                      (2 / M_PI) * std::atan(params_.curve_per_kib * static_cast<double>(bytes) / 1024);
    return latency_ns_ + round_ns(static_cast<double>(bytes) / bw);
  }
  return latency_ns_ + bytes_ns(bytes, fs_per_byte_[d]);
}

uint64_t LinkModel::remote_ns(uint64_t accesses, uint64_t bytes) const {
  return accesses * remote_access_ns_ + bytes_ns(bytes, remote_fs_per_byte_);
}

uint64_t LinkModel::total_ns() const {
  uint64_t n = 0;
  for (const Counter& c : counters_) n += c.ns.load(std::memory_order_relaxed);
  return n;
}

}  // namespace pm::engine
