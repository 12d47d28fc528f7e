// Plain wrappers over userfaultfd(2) and its ioctls. Return 0 or -errno; the resolve ioctls also
// report partial progress in bytes through *done (the kernel's copy/zeropage/mapped/move/updated
// field), because EAGAIN and ENOENT can arrive after part of the range was resolved.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pm::sys {

enum class UffdOpenedBy { kDevice = 0, kSyscall = 1 };
// How to obtain the descriptor: kAuto tries the device node, then the system call (the kernel's
// selftests run every test both ways, uffd-unit-tests.c's "dev" and "syscall" variants).
enum class UffdVia { kAuto = 0, kDevice = 1, kSyscall = 2 };

struct UffdOpenResult {
  int fd = -1;
  UffdOpenedBy opened_by = UffdOpenedBy::kDevice;
  bool user_mode_only = false;
  // Why each earlier attempt failed (-errno), so a final EPERM can explain the whole path.
  int device_error = 0;
  int syscall_error = 0;
  // device_error came from USERFAULTFD_IOC_NEW (the node opened), not from open().
  bool device_ioctl_failed = false;
};

// Opens a userfaultfd: /dev/userfaultfd first (works for non-root when the node's mode allows,
// whatever vm.unprivileged_userfaultfd says), then the syscall, then the syscall with
// UFFD_USER_MODE_ONLY (what vm.unprivileged_userfaultfd=0 still allows unprivileged callers).
// force_user_mode_only skips straight to the user-mode-only variants.
// Errors: the last attempt's -errno (-EPERM typically), with every attempt in *out.
int uffd_open(bool nonblocking, bool force_user_mode_only, UffdOpenResult* out);
// One way only (kDevice: /dev/userfaultfd; kSyscall: userfaultfd(2)), full or user-mode-only as
// asked, with no fallback; kAuto is the chain above. Errors: -ENOENT (no device node), -EACCES (the
// node is not ours to open), -EPERM (the system call refused full faults to an unprivileged user),
// -ENOSYS (no userfaultfd at all), with the failed attempt in *out.
int uffd_open_via(UffdVia via, bool nonblocking, bool user_mode_only, UffdOpenResult* out);

// Whether fd is a userfaultfd (its /proc/self/fd link reads "anon_inode:[userfaultfd]"): 1 yes,
// 0 no, or -errno (-EBADF: not an open descriptor). *what gets the link, to say what it is instead.
int uffd_is_userfaultfd(int fd, char* what, size_t what_len);

// UFFDIO_API. Errors: -EINVAL (a feature the kernel lacks, or API already negotiated on this fd),
// -EPERM (UFFD_FEATURE_EVENT_FORK without CAP_SYS_PTRACE in user-mode-only contexts).
int uffd_api(int fd, uint64_t features, uint64_t* out_features, uint64_t* out_ioctls);
// Errors: -EINVAL (mode unsupported for this memory, e.g. MINOR on anonymous memory, or
// unaligned), -EBUSY (range registered with another uffd), -ENOMEM, -EPERM.
int uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t* out_ioctls);
// UFFDIO_UNREGISTER, then UFFDIO_WAKE over the range: every thread that faulted there is woken and
// faults again, now with the kernel's default handling (see uffd.cc for the race the wake closes).
// Errors: UNREGISTER's: -EINVAL (unaligned, or a VMA there the kernel cannot track), -ENOMEM
// (splitting a VMA).
int uffd_unregister(int fd, uint64_t start, uint64_t len);
int uffd_wake(int fd, uint64_t start, uint64_t len);
// Errors for the resolvers: -EEXIST (already present: another thread won the race), -EAGAIN
// (an event is unread, or the mm is changing: *done says how far it got), -ENOENT (layout
// changed / source hole for MOVE), -ESRCH (the process is gone), -EFAULT, -EINVAL, -ENOMEM,
// -EBUSY (MOVE on a page shared after fork).
int uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t* done);
int uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t* done);
// UFFDIO_ZEROPAGE that also fills pages holding a uffd-wp marker (what UFFDIO_WRITEPROTECT leaves
// on a none pte of anonymous memory with a page table, with WP_UNPOPULATED, and on shmem/hugetlb).
// A fault on a marker is reported as MISSING, but ZEROPAGE wants a none pte and says EEXIST, so a
// service that takes EEXIST for "someone else installed it" wakes the faulter into the same fault
// forever. Where ZEROPAGE says EEXIST, the page is filled by UFFDIO_COPY of zeros with
// UFFDIO_COPY_MODE_WP (COPY may replace a marker), so it stays write-protected as the marker said;
// only when that COPY says EEXIST too (or EINVAL: the range is not registered for WP, so there was
// no marker) is the page really present, and -EEXIST is returned with *done at that page, as from
// ZEROPAGE. mode: UFFDIO_ZEROPAGE_MODE_DONTWAKE or 0. *markers (may be null) gets the pages filled
// over a marker. Pages up to 64 KiB (ZEROPAGE does not apply to hugetlb at all).
int uffd_zero_fill(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t* done, uint64_t* markers);
// The same for shared shmem registered for WP. There ZEROPAGE does not refuse a marker: it goes
// through shmem_mfill_atomic_pte, whose mfill_atomic_install_pte replaces it (pte_none_mostly)
// with a writable page, and the write protection the marker held is lost without a word. So this
// reads /proc/self/pagemap first (one pread per 64 pages): pages whose entry has the uffd-wp bit
// and no page (a marker) get a write-protected zero page by COPY; the runs between them,
// uffd_zero_fill. A marker set between the read and the fill is not seen (a writeProtect() racing
// its own faults). Own process only. Errors: as uffd_zero_fill, or pagemap's.
int uffd_zero_fill_shmem(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t* done, uint64_t* markers);
// A source of zeros for UFFDIO_COPY, kZeroSourceBytes long (at least any base page size Linux
// has but hexagon's 256 KiB), in .bss: only read, so where the kernel maps untouched .bss reads to
// the shared zero page it costs no memory; a kernel without one (a PVM guest booted with
// pvm_no_zero_page) gives it 64 KiB of real pages on first use.
constexpr uint64_t kZeroSourceBytes = 1 << 16;
const void* zero_source();
int uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t* done);
int uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t* done);
int uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t* done);
// UFFDIO_WRITEPROTECT: mode UFFDIO_WRITEPROTECT_MODE_WP protects; 0 unprotects and wakes.
int uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);

}  // namespace pm::sys
