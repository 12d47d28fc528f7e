// A device in a forked child: the kernel's HMM tests fork, and the child opens its own device and
// reads and writes through it (anon_write_child, anon_write_child_shared), so copy-on-write of
// mirrored and migrated pages is exercised from both sides. A forked child of this process has
// one thread and no JavaScript, and must not take a lock another thread held at fork time (the
// engine's, a device's): so the child's device is this small single-threaded one, built over the
// same virtual range of the child's own (copied) address space, with its own page table, its own
// memory and its own userfaultfd. Its "device thread" is the child's only thread: a device fault
// is serviced inline (a range fault), and a CPU touch of a page in its memory is a real
// userfaultfd fault delivered as SIGBUS (UFFD_FEATURE_SIGBUS) whose handler brings the page home.
#pragma once

#include <cstdint>
#include <vector>

#include "mirror.h"

namespace pm::engine {

enum class ForkOp : uint32_t {
  kRead,         // the device reads every word (checksum)
  kWrite,        // the device writes seed + word index (within the step's range)
  kVerify,       // the device reads and counts words that differ from seed + word index
  kMigrate,      // migrate to the child's device memory
  kMigrateBack,  // migrate the child's device pages home
  kCpuRead,      // the child's CPU reads every word (touching a page in device memory faults)
  kCpuWrite,
  kCpuVerify,
};

struct ForkStep {
  ForkOp op = ForkOp::kRead;
  uint64_t first = 0, npages = 0;  // pages within the range
  uint64_t seed = 1;
  int prot = 0;                    // the parent's protection over the step's range (read in the parent)
};

constexpr unsigned kForkSkipReasons = 16;  // indexed by MigrateSkip

// One record per step, written through the pipe when the step ends (a child killed midway still
// reports the steps it finished).
struct ForkStepReport {
  uint32_t index;
  int32_t error;         // -errno, 0 if the step succeeded
  uint64_t error_page;   // within the step's range
  uint64_t checksum, mismatches, faults, cpages;
  uint64_t moved, by_move, by_copy, zero_filled, cpu_faults;
  uint64_t skipped[kForkSkipReasons];
  uint64_t elapsed_ns;
};

// The last record: the child device's counters over the whole run.
struct ForkCounters {
  uint64_t fault_rounds, faulted_pages, to_device, to_host_explicit, to_host_cpu_fault;
};

// Everything the child needs, allocated by the parent before fork (the child allocates nothing
// from the heap).
struct ForkPlan {
  uint64_t start = 0, npages = 0, page = 4096;
  bool shared = false;        // MAP_SHARED: the child's writes are the parent's too; nothing migrates
  bool private_file = false;  // MAP_PRIVATE of a file: only pages copied on write migrate
  bool private_shmem = false; // ... of a tmpfs file or memfd, which userfaultfd can register (MINOR)
  bool hugetlb = false;
  uint64_t slots = 0;         // the child device's memory, in pages
  std::vector<ForkStep> steps;
  std::vector<uint64_t> table;    // npages entries (the child device's page table)
  std::vector<uint64_t> pagemap;  // npages: scratch for /proc/self/pagemap reads
  std::vector<uint8_t> slot_used; // slots
};

// Sizes the plan's buffers. Call in the parent, before fork.
void fork_plan_prepare(ForkPlan* plan);
// The child's main: runs the steps, writes one ForkStepReport per step and then ForkCounters to
// fd. Returns the exit status (0: every record was written).
int fork_device_main(void* plan, int fd);

}  // namespace pm::engine
