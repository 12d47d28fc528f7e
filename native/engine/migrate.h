// Migration: one unit owns a migration's whole sequence, in both directions, as the kernel's
// mm/migrate_device.c does. The phases are the kernel's:
//
//   collect   which pages of the range can move, one MigratePfn word per page (the kernel's src[]
//             entries: VALID, MIGRATE, WRITE), and why the others cannot (MigrateSkip);
//   setup /   the locks, in the order below; the other mirrors' entries for the page held cleared
//   unmap     (Engine::hold_others), this mirror's entry cleared and its device accesses drained
//             (the kernel's migration entries and TLB flush);
//   copy      the data into device slots (UFFDIO_MOVE, or a copy under uffd write protection, or a
//             zero page), or home again (MOVE, else COPY), batched where slots are consecutive;
//   finalize  the new entries installed, or the old restored on failure; held mirrors released;
//             accounting (Device::on_migrate: counters, the link's charge, the trace event), the
//             watermark, and the wake of CPU faulters.
//
// Mirror keeps its page table and sequence count, Engine the list of mirrors and their locks,
// Device its slots, eviction, counters, link and trace; this unit calls their small operations.
// Entry points: MigrateToDevice::run (explicit, device fault, prefetch), MigrateToHost::range
// (explicit, release, fork), MigrateToHost::cpu_fault (the engine's CPU fault on a device page),
// MigrateToHost::evict (Device::evict_one).
//
// Lock order, outermost first. No path takes an earlier lock while it holds a later one.
//   1. Mirror::change_mu_ of every mirror covering the pages, in the address order of the Mirror
//      objects: Engine::lock_pages (to device), the engine's fault handler (CPU fault; it lists and
//      locks as lock_covering does), this mirror's alone (to host), or already held by the caller
//      (eviction inside a migration, Engine::holds()). Eviction of a page of any other mirror only
//      try_locks that mirror's mutex and passes over a busy one: it never waits out of order.
//   2. Engine::mu_, only while listing mirrors (owned_by_other, pinned_by_other, hold_others),
//      released before anything else is locked.
//   3. Mirror::mu_ (the sequence count: begin_change/end_change, hold_page/release_page), a leaf.
//   4. Device::slot_mu_ (slots, the resident queue), Device::trace_mu_, Region::mu (protection):
//      leaves.
//
// Progress. A migration never touches registered memory in a way that can fault: slots are filled
// by the resolve ioctls (or by plain copies where they have pages), host pages are read only while
// present and write-protected, with DONTWAKE. So it never waits on the engine's workers, while a
// worker (a CPU fault on one of the pages) waits for the change mutexes it holds; the CPU writers
// that met the copy path's write protection are woken in finalize. Between begin_change and
// end_change no range fault of this mirror programs an entry (it waits, then retries).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "engine.h"
#include "mirror.h"

namespace pm::engine {

class Device;

// Why a page did not move to the device. kNone: it moved (or was already on this device).
// kUnregistrable: a page the CPU copied on write in a private mapping of a file system
// userfaultfd cannot register (ext4, xfs): nothing would catch the CPU's next touch of its hole.
enum class MigrateSkip : uint8_t { kNone, kShared, kFileBacked, kDax, kOtherDevice, kNoMemory, kPinned, kError, kUnregistrable };

struct MigrateResult {
  uint64_t moved = 0;      // pages whose data moved into device memory
  uint64_t resident = 0;   // pages on this device afterwards (the kernel device's cpages)
  uint64_t moved_by_move = 0, moved_by_copy = 0, zero_filled = 0;
  std::vector<std::pair<uint64_t, MigrateSkip>> skipped;  // page index, reason
  int error = 0;           // -EINVAL: a page with no access (PROT_NONE) or hugetlb; -ENOENT: nothing moved
};

struct MigrateOptions {
  // Try UFFDIO_MOVE first (the page itself moves); false: copy under write protection, then zap.
  bool use_move = true;
  // make_device_exclusive: the page also leaves the CPU mapping (any CPU access faults and
  // revokes it) and the entry carries kAtomic until then.
  bool atomic = false;
  Trigger trigger = Trigger::kExplicit;
  // Pages moved per ioctl where a whole aligned chunk can move at once (64 KiB = 16, 2 MiB = 512);
  // single pages otherwise.
  uint64_t granule_pages = 512;
};

// A page's state in a migration to the device: the kernel's MIGRATE_PFN_* bits.
enum MigratePfn : uint8_t {
  kPfnValid = 1 << 0,     // MIGRATE_PFN_VALID: the CPU maps a page here (else never touched: a zeroed slot)
  kPfnMigrate = 1 << 1,   // MIGRATE_PFN_MIGRATE: collected, the page can move
  kPfnWrite = 1 << 3,     // MIGRATE_PFN_WRITE: the mapping allows writes, so the device entry does
  kPfnResident = 1 << 5,  // already in this device's memory: counted as resident, nothing moves
};

// migrate_vma to device-private memory: data moved (UFFDIO_MOVE) or copied into device slots, the
// CPU mapping zapped; later CPU touches fault and migrate back (MigrateToHost::cpu_fault).
class MigrateToDevice {
 public:
  static void run(Mirror* mirror, uint64_t first, uint64_t last, const MigrateOptions& options, MigrateResult* out);

 private:
  struct Page {
    uint64_t entry = 0;  // this mirror's entry when collected
    uint8_t pfn = 0;     // MigratePfn
    MigrateSkip reason = MigrateSkip::kNone;
  };
  MigrateToDevice(Mirror& m, uint64_t first, uint64_t last, const MigrateOptions& options, MigrateResult* out);
  bool refuse();  // the range as a whole cannot migrate (out says why): true when done
  void refuse_private_file();
  bool setup();   // under the locks: registration, buffers, which pages are present
  uint64_t pagemap(uint64_t i) const { return pm_[i - first_]; }
  Page collect(uint64_t i, uint64_t pm_entry);
  uint64_t migrate_chunk(uint64_t a, uint64_t b);
  void migrate_page(uint64_t i);
  uint64_t copy(uint64_t host, uint64_t slot, uint64_t n, bool present, bool use_move);
  void finalize();

  Mirror& m_;
  Device& device_;
  const uint64_t first_, last_;
  const MigrateOptions options_;
  MigrateResult* const out_;
  std::vector<uint64_t> pm_;    // pagemap of [first_, last_), read under the locks
  std::vector<uint64_t> src_;   // a chunk's entries as unmap took them
  std::vector<uint8_t> pfn_;    // a chunk's MigratePfn words
};

// Device pages back to host memory: UFFDIO_MOVE of the page itself (a run of consecutive slots in
// one ioctl), else UFFDIO_COPY; the slot is freed.
class MigrateToHost {
 public:
  // This device's pages in [first, last); returns pages moved. Takes the mirror's change mutex
  // (unless this thread holds it through Engine::lock_covering).
  static uint64_t range(Mirror* mirror, uint64_t first, uint64_t last, Trigger trigger = Trigger::kExplicit);
  // The engine's CPU-fault path (caller holds the covering mirrors' change mutexes): if page i is
  // in this device's memory, bring it back, then wake the faulter. True if it was (the fault is
  // resolved), false if not this mirror's page.
  static bool cpu_fault(Mirror* mirror, uint64_t i, uint64_t flags = 0);
  // Eviction (caller holds the mirror's change mutex): page i's data goes home and the device's
  // entry goes, so its next access faults. False if the page was not in device memory.
  static bool evict(Mirror* mirror, uint64_t i);

 private:
  // What the device's entry becomes once the page is home: a valid host entry (an explicit
  // migration keeps mapping the page), or none (the CPU took it, or eviction: the device faults).
  enum class After { kHostEntry, kNoEntry };
  static bool move_page(Mirror& m, uint64_t i, uint64_t e, bool wake, After after);
  static bool move_run(Mirror& m, uint64_t a, uint64_t b);
};

}  // namespace pm::engine
