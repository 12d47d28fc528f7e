/* Holding the writes of a process's other threads to one range for a moment: the window in which
 * the client library or the preload shim copies a range and then replaces its mapping (pm_adopt;
 * the shim's release, docs/attach.md "Where shared is not private"). A write between the copy of a
 * page and the replacement would land in the old mapping and be lost with it.
 *
 * The hold is a userfaultfd of the window's own, registered write-protect on the range and
 * write-protecting all of it (present pages, and not-yet-populated ones by a PTE marker), never
 * read: a writer sleeps in the kernel on its WP fault (fs/userfaultfd.c, handle_userfault) and
 * reads go on. Releasing wakes every writer of the range (UFFDIO_WAKE) and closes the descriptor
 * (userfaultfd_release unregisters whatever is left and wakes the rest); a woken writer returns
 * VM_FAULT_RETRY and faults again from scratch, so its write lands in whatever is mapped there
 * now: the replacement. The descriptor is private, not the client's, because the client's is read
 * by the server, whose policy lifts every WP fault at once.
 *
 * Internal to the client library and the shim (not pagemirror_client.h's API). Plain C. */
#ifndef PAGEMIRROR_PM_HOLD_H
#define PAGEMIRROR_PM_HOLD_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include "pagemirror_client.h"

struct pm_write_hold {
  int uffd; /* -1: nothing held */
  uint64_t addr, len;
  sigset_t saved; /* the holder's signal mask before the hold */
};

/* 0 when writes to memory of this kind can be held here (shared: memfd/shmem; else private
 * anonymous), else why not: -EOPNOTSUPP (no userfaultfd write-protect for that kind: the kernel
 * lacks UFFD_FEATURE_PAGEFAULT_FLAG_WP, or WP_HUGETLBFS_SHMEM for shared memory, or WP_UNPOPULATED
 * for anonymous memory, without which a write to a page never touched would escape), -EPERM (the
 * client's userfaultfd is user-mode only, so a private one would be too: a read(2) into the range
 * would fail with EFAULT instead of waiting), -EINVAL (no client). */
int pm_hold_supported(const pm_client *c, int shared);

/* Holds every other thread's writes to [addr, addr + len) (page aligned) until pm_release_writes.
 * Blocks every signal on the calling thread meanwhile: a handler that wrote the range would
 * otherwise wait for its own thread. The caller must not write the range itself, nor wait for a
 * thread that may be writing it. Returns 0, or -errno with nothing held (pm_hold_supported's
 * errors; -EBUSY: the range is registered with another userfaultfd; -EMFILE, -ENOMEM). */
int pm_hold_writes(const pm_client *c, void *addr, size_t len, int shared, struct pm_write_hold *h);

/* Ends a hold: the held writers fault again on what is mapped at the range now. Safe on a hold
 * that failed. */
void pm_release_writes(struct pm_write_hold *h);

/* Why the last pm_adopt on c copied its range without holding writes (as pm_hold_writes answers),
 * or 0; reading it clears it. */
int pm_take_hold_error(pm_client *c);

#endif
