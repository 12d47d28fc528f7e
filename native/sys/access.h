// Access kernels: native threads that read or write patterns over an address range. Every access
// that may fault runs here, never on the JavaScript thread (DESIGN.md, the threading rule).
// A SIGBUS raised by an access (uffd POISON, a file truncated under a shared mapping, a hugetlb
// pool running dry) ends that thread's kernel with an error instead of killing the process.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pm::sys {

enum class AccessOp { kRead, kWrite, kReadModifyWrite, kVerify };
enum class AccessPattern { kSequential, kStrided, kRandom, kGather };  // gather: device kernels only

struct AccessSpec {
  uint64_t base = 0;     // first byte of the range
  uint64_t length = 0;   // bytes; ops touch 8-byte words inside [base, base + length)
  AccessOp op = AccessOp::kRead;
  AccessPattern pattern = AccessPattern::kSequential;
  uint64_t unit = 4096;  // distance between touched words for sequential access
  uint64_t stride = 0;   // strided: distance between consecutive accesses (wraps around)
  uint64_t ops = 0;      // accesses in all; 0 = length / unit
  uint64_t seed = 1;     // random: xorshift seed; write: value = seed + word index
  unsigned threads = 1;  // each thread takes a contiguous share of the op indices
  bool latency = false;  // record per-access nanoseconds (for percentiles)
  bool barrier = true;   // start all threads together (concurrent faults)
};

struct AccessResult {
  uint64_t ops = 0;
  uint64_t checksum = 0;    // wrapping sum of words read (read/rmw) or written (write)
  uint64_t mismatches = 0;  // verify: words that differ from seed + word index
  uint64_t first_mismatch = UINT64_MAX;  // offset of the first one
  uint64_t elapsed_ns = 0;  // from the barrier to the last thread's end
  int signal = 0;           // SIGBUS if an access faulted fatally
  uint64_t signal_addr = 0;
  std::vector<uint32_t> latency_ns;  // when requested: one entry per access (saturating)
};

// Runs the kernel on spec.threads threads and waits for them: call it from a native thread.
void run_access(const AccessSpec& spec, AccessResult* out);

// The same kernel on the calling thread, one share, no allocation: for forked children.
void run_access_inline(const AccessSpec& spec, uint64_t* ops, uint64_t* checksum, uint64_t* mismatches,
                       uint64_t* first_mismatch, int32_t* signal, uint64_t* signal_addr);

// memcpy that turns a SIGBUS into an error (returns -EFAULT and the address) instead of killing
// the process; used by the library's read()/write() on mappings.
int guarded_copy(void* dst, const void* src, size_t n, uint64_t* bad_addr);

// Calls fn(arg) with SIGBUS turned into a return of -EFAULT (and the address) instead of the
// process's death. fn must leave nothing half-done that its caller cannot undo from memory it
// published (volatile) before the access that faulted.
int guarded_call(void (*fn)(void*), void* arg, uint64_t* bad_addr);

uint64_t now_ns();

}  // namespace pm::sys
