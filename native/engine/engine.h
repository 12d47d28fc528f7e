// Engine: the process-wide side of migration. One userfaultfd registers every range whose pages a
// device has taken (and the device memory pools, the destination of UFFDIO_MOVE); its service
// thread resolves the CPU faults natively: a CPU touch on a device-resident page migrates it back
// (the device-private page fault), any other missing page gets a zero page, a write-protect fault
// raised while a page is being copied waits for the copy and goes on.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "region.h"
#include "../sys/fault_service.h"

namespace pm::engine {

class Mirror;

class Engine : public sys::FaultSink {
 public:
  // The one engine of this process (never destroyed: its thread runs until exit).
  static Engine& get();

  // Opens the userfaultfd and starts the service on first use. Errors: those of userfaultfd(2)
  // and UFFDIO_API; -EOPNOTSUPP when the kernel lacks UFFDIO_MOVE and write protection.
  int ensure();
  int fd() const { return fd_; }
  // Worker threads and polling of the CPU-fault service, process-wide (a pull-back from a slow disk
  // then holds up only its own worker). Before first use it only records them; on a running
  // service the workers finish the faults in hand, stop, and start again with the new setting.
  // -EINVAL: workers outside 1..FaultService::kMaxWorkers. Call from one thread at a time.
  int configure(unsigned workers, sys::PollOptions poll);
  sys::ServiceStats stats();
  std::vector<sys::ServiceStats> worker_stats();
  unsigned workers() const { return workers_; }
  sys::PollOptions poll_options() const { return poll_; }
  bool has_move() const { return has_move_; }
  // The descriptor sees faults raised in user mode only (all that vm.unprivileged_userfaultfd=0
  // leaves an unprivileged process): a fault the kernel itself takes on a registered range (a
  // populate, get_user_pages) is not handed to the engine and fails with EFAULT instead.
  bool user_mode_only() const { return user_mode_only_; }
  // UFFDIO_REGISTER (MISSING | WP) of [start, start + len) for an owner (a Region's or a device
  // pool's id), counted per owner: an address range can be unmapped and mapped again for another
  // owner while a stale entry lingers, and that one must be registered anew. -EBUSY: the range is
  // registered with another userfaultfd (the user's own).
  int register_range(uint64_t start, uint64_t len, uint64_t owner, bool minor = false);
  // still_mapped false: the range was unmapped (moved away by mremap): only the bookkeeping goes,
  // since another mapping may have taken those addresses.
  void unregister_range(uint64_t start, uint64_t len, uint64_t owner, bool still_mapped = true);
  // Ids for owners that are not Regions (device pools); Regions take theirs from the same counter.
  static uint64_t next_owner_id();

  void add_mirror(Mirror* m);
  void remove_mirror(Mirror* m);
  // Every live mirror, registered or not (fork must reach them all).
  void track(Mirror* m);
  void untrack(Mirror* m);
  // Before fork(): device-resident pages come home (a child must see the data; without EVENT_FORK
  // the engine's registration does not follow it) and every mirror of private memory loses its
  // entries (the pages become copy-on-write, so device write access must fault again).
  void before_fork();
  // How many live mirrors a region has, and how many of them must be its only one (single-writer,
  // and copy/bounce file mirrors, whose device copies the others would not see).
  void region_mirrors(const Region* r, int* total, int* single_writers);
  // Before mremap of a region: its mirrors' device pages come home.
  void bring_home(const Region* r);
  // How many of a region's registrations (Region::registered) are the engine's, one per mirror.
  int registered_mirrors(const Region* r);
  // Whether a mirror other than self holds addr's data in its device memory.
  bool owned_by_other(Mirror* self, uint64_t addr);
  // Whether another mirror pins addr (a pinned page cannot migrate, as in the kernel).
  bool pinned_by_other(Mirror* self, uint64_t addr);
  // Every other mirror's entry for addr goes and stays gone until release_others() (a migration is
  // taking the page). Returns the mirrors held.
  std::vector<Mirror*> hold_others(Mirror* self, uint64_t addr);
  static void release_others(const std::vector<Mirror*>& held);

  void on_batch(const sys::FaultMsg* faults, size_t n, const sys::EventMsg* events, size_t nevents) override;
  // Resolves a missing-page fault at addr as a CPU fault on it would be, for a caller whose own
  // access would not reach the engine (a kernel-mode fault on a user-mode-only descriptor). A
  // page already present is left as it is. The caller holds no mirror's change mutex.
  void resolve_cpu_fault(uint64_t addr, uint32_t flags = 0) { handle(sys::FaultMsg{addr, flags, 0}); }

  // Locks the change mutex of every live mirror covering [start, end) (self included), in address
  // order, for this thread; they are released when the returned object goes. Two migrations of one
  // page, a migration and the CPU-fault handler, take turns this way.
  class Holding {
   public:
    Holding() = default;
    Holding(Holding&&) = default;
    ~Holding();
    std::vector<Mirror*> mirrors;
   private:
    friend class Engine;
    std::vector<std::unique_lock<std::mutex>> locks_;
  };
  Holding lock_covering(Mirror* self, uint64_t start, uint64_t end);
  // The same for self's pages [first, last), chosen at self's address once its mutex is held (the
  // mirror may move by mremap until then).
  Holding lock_pages(Mirror* self, uint64_t first, uint64_t last);
  // Whether this thread holds m's change mutex through lock_covering().
  static bool holds(Mirror* m);

 private:
  Engine() = default;
  void lock_into(Holding& h, Mirror* self, uint64_t start, uint64_t end);
  void handle(const sys::FaultMsg& f);
  void resolve_uncovered(uint64_t page);

  std::mutex mu_;
  int fd_ = -1;
  bool has_move_ = false;
  bool user_mode_only_ = false;
  int open_error_ = 0;
  std::unique_ptr<sys::FaultService> service_;
  // Serialises configure() against ensure() and stats(); never held by a service thread (they take
  // mu_), so stopping the workers under it cannot wait on them.
  std::mutex config_mu_;
  unsigned workers_ = 1;
  sys::PollOptions poll_;
  std::vector<Mirror*> mirrors_;
  std::vector<Mirror*> all_;
  struct Range {
    uint64_t start, len, owner;
  };
  std::vector<Range> registered_;
};

}  // namespace pm::engine
