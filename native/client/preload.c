/* pagemirror_preload.so: attaches an unmodified, dynamically linked program to a pagemirror fault
 * server (`pagemirror run -- PROGRAM`, docs/attach.md). Plain C, no Node.
 *
 * Environment: PAGEMIRROR_SOCKET (the server; unset: the shim does nothing), PAGEMIRROR_THRESHOLD
 * (bytes; anonymous private mappings at least this large are attached; default 1 MiB),
 * PAGEMIRROR_POOL_PAGES (slots of "device memory" the server may fill; default the library's).
 *
 * Representation: an attached mapping is pm_alloc memory (a memfd mapped shared, registered
 * MISSING|MINOR|WP) returned in place of the private anonymous mapping the program asked for, so the
 * server can migrate its pages to the pool and back. Shared is not private, so everything that could
 * tell the difference releases the range first: the pages come home (pm_detach), the contents are
 * copied into a private anonymous mapping moved over the range (privatise), and only then does the
 * program's call run on ordinary private memory. That covers munmap, mremap, madvise, mprotect and
 * fork (each attached range is released in the parent before the child is created, so the child gets
 * private copy-on-write memory as without the shim; the parent attaches the ranges again after).
 * While a range changes hands (copied, then replaced) the program's other threads' writes to it are
 * held (pm_hold.h), or one made between the copy and the replacement would be lost.
 *
 * Every real memory call goes straight to the kernel (syscall), so the wrappers need no dlsym (which
 * may malloc) and never recurse; the client library's own mmap calls come back here with the
 * thread's guard set and are forwarded untouched. Nothing here calls malloc after the constructor. */
#define _GNU_SOURCE
#undef _FILE_OFFSET_BITS /* node-gyp sets 64, which renames mmap to mmap64: the shim defines both */
#include <errno.h>
#include <stdarg.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "pagemirror_client.h"
#include "pm_hold.h"

#define PM_SHIM_MAX_REGIONS 1024 /* the server's limit of ranges per client */
#define PM_SHIM_DEFAULT_THRESHOLD (1u << 20)
#define PM_MALLOC_MMAP_MAX (32u << 20) /* glibc's largest M_MMAP_THRESHOLD on 64-bit */

struct shim_region {
  uintptr_t addr;
  size_t len;
  int attached; /* served; 0 once released (a malloc block stays listed until freed) */
  int block;    /* made by malloc below, not by a direct mmap */
};

static pm_client *client;
static int disabled = 1; /* until connected; for good in a forked child */
static size_t threshold = PM_SHIM_DEFAULT_THRESHOLD;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct shim_region regions[PM_SHIM_MAX_REGIONS];
static size_t nregions;
/* Set while this thread runs the client library, whose own mmap/munmap calls land in the wrappers. */
static __thread int guard __attribute__((tls_model("initial-exec")));

static void *sys_mmap(void *a, size_t l, int prot, int flags, int fd, off_t off) {
  return (void *)syscall(SYS_mmap, a, l, prot, flags, fd, off);
}
static int sys_munmap(void *a, size_t l) { return (int)syscall(SYS_munmap, a, l); }
static void *sys_mremap(void *a, size_t ol, size_t nl, int flags, void *na) {
  return (void *)syscall(SYS_mremap, a, ol, nl, flags, na);
}
static int sys_madvise(void *a, size_t l, int advice) { return (int)syscall(SYS_madvise, a, l, advice); }
static int sys_mprotect(void *a, size_t l, int prot) { return (int)syscall(SYS_mprotect, a, l, prot); }

static void say(const char *what, int err) {
  char buf[256];
  int n = snprintf(buf, sizeof buf, "pagemirror: %s%s%s\n", what, err ? ": " : "", err ? strerror(err) : "");
  if (n > 0) (void)!write(2, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

/* Says once that a range changed hands without its writers held (pm_hold.h), and why. */
static void say_unheld(int err) {
  static int said;
  if (!err || said) return;
  said = 1;
  say("a range changes hands without holding the program's other threads: a write one of them makes meanwhile may be lost", -err);
}

/* Turns shared memfd memory back into private anonymous memory with the same contents at the same
 * address. The range is no longer registered, so reading it faults nothing to the server. Other
 * threads' writes are held from before the copy until the private memory is in place. */
static int privatise(uintptr_t addr, size_t len) {
  void *tmp = sys_mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (tmp == MAP_FAILED) return -errno;
  struct pm_write_hold hold;
  say_unheld(pm_hold_writes(client, (void *)addr, len, 1, &hold));
  memcpy(tmp, (void *)addr, len);
  int rc = sys_mremap(tmp, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)addr) == MAP_FAILED ? -errno : 0;
  pm_release_writes(&hold);
  if (rc) sys_munmap(tmp, len);
  return rc;
}

/* Takes region i back from the server; keep = 0 when the caller unmaps all of it anyway. Called
 * with mu held. On failure the region stays attached and the caller's operation is refused. */
static int release(size_t i, int keep) {
  struct shim_region r = regions[i];
  if (r.attached) {
    guard = 1;
    int rc = pm_detach(client, (void *)r.addr, r.len);
    guard = 0;
    if (rc && rc != -ENOENT) return rc;
    if (keep) {
      rc = privatise(r.addr, r.len);
      if (rc) return rc;
    }
  }
  if (r.block && keep) regions[i].attached = 0;
  else regions[i] = regions[--nregions];
  return 0;
}

/* Releases every region overlapping [a, a + len); whole = 1 when the caller removes [a, a + len). */
static int release_overlapping(uintptr_t a, size_t len, int whole) {
  int rc = 0;
  for (size_t i = 0; i < nregions && !rc;) {
    struct shim_region r = regions[i];
    if (r.attached && r.addr < a + len && a < r.addr + r.len) {
      rc = release(i, !(whole && a <= r.addr && r.addr + r.len <= a + len));
    } else {
      i++;
    }
  }
  return rc;
}

static int overlaps(uintptr_t a, size_t len) {
  for (size_t i = 0; i < nregions; i++)
    if (regions[i].attached && regions[i].addr < a + len && a < regions[i].addr + regions[i].len) return 1;
  return 0;
}

/* Attached memory of len bytes, or NULL (not connected, too many ranges, the server refused). */
static void *attach_new(size_t len, int block) {
  pthread_mutex_lock(&mu);
  void *p = NULL;
  int rc = nregions < PM_SHIM_MAX_REGIONS && !disabled ? 0 : -ENOSPC;
  if (!rc) {
    guard = 1;
    rc = pm_alloc(client, len, 0, &p);
    guard = 0;
  }
  if (!rc) regions[nregions++] = (struct shim_region){(uintptr_t)p, (len + 4095) & ~(size_t)4095, 1, block};
  pthread_mutex_unlock(&mu);
  return rc ? NULL : p;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
  if (guard || disabled || addr || len < threshold || prot != (PROT_READ | PROT_WRITE) ||
      (flags & ~MAP_NORESERVE) != (MAP_PRIVATE | MAP_ANONYMOUS))
    return sys_mmap(addr, len, prot, flags, fd, off);
  void *p = attach_new(len, 0);
  /* Not attached: ordinary memory, as without the shim. */
  return p ? p : sys_mmap(addr, len, prot, flags, fd, off);
}
void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) { return mmap(addr, len, prot, flags, fd, off); }

/* The wrappers below release first, then forward; a release that fails (the server would not give
 * the pages back) refuses the call with its errno rather than act on memory still away. */
#define RELEASE_THEN(a, l, whole, call)                                   \
  do {                                                                    \
    if (guard || !nregions) return call;                                  \
    pthread_mutex_lock(&mu);                                              \
    int rc_ = overlaps((uintptr_t)(a), (l)) ? release_overlapping((uintptr_t)(a), (l), (whole)) : 0; \
    pthread_mutex_unlock(&mu);                                            \
    if (rc_) {                                                            \
      errno = -rc_;                                                       \
      return FAIL;                                                        \
    }                                                                     \
    return call;                                                          \
  } while (0)

int munmap(void *addr, size_t len) {
#define FAIL -1
  RELEASE_THEN(addr, len, 1, sys_munmap(addr, len));
}

void *mremap(void *old, size_t old_len, size_t new_len, int flags, ...) {
  void *na = NULL;
  if (flags & MREMAP_FIXED) {
    va_list ap;
    va_start(ap, flags);
    na = va_arg(ap, void *);
    va_end(ap);
  }
#undef FAIL
#define FAIL MAP_FAILED
  RELEASE_THEN(old, old_len ? old_len : 1, 0, sys_mremap(old, old_len, new_len, flags, na));
}

int madvise(void *addr, size_t len, int advice) {
#undef FAIL
#define FAIL -1
  if (advice == MADV_NORMAL || advice == MADV_RANDOM || advice == MADV_SEQUENTIAL || advice == MADV_WILLNEED ||
      advice == MADV_HUGEPAGE || advice == MADV_NOHUGEPAGE)
    return sys_madvise(addr, len, advice);
  RELEASE_THEN(addr, len, 0, sys_madvise(addr, len, advice));
}

int mprotect(void *addr, size_t len, int prot) {
  RELEASE_THEN(addr, len, 0, sys_mprotect(addr, len, prot));
}


/* glibc's malloc maps its large blocks with an internal mmap no wrapper sees, so large blocks are
 * made here: attached memory after a BLOCK_HDR header (16 keeps malloc's alignment).
 * Everything else goes to glibc's own allocator (its exported __libc_* entry points). */
#define BLOCK_HDR 16u
extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_calloc(size_t, size_t);

/* The listed block whose data starts at p, or -1. Called with mu held. */
static long block_of(const void *p) {
  for (size_t i = 0; i < nregions; i++)
    if (regions[i].block && regions[i].addr + BLOCK_HDR == (uintptr_t)p) return (long)i;
  return -1;
}

static void *block_new(size_t n) {
  if (guard || disabled || n < threshold || n > SIZE_MAX / 2) return NULL;
  char *p = attach_new(n + BLOCK_HDR, 1);
  if (!p) return NULL;
  /* The header reads as a glibc mmapped chunk (size | IS_MMAPPED), so glibc's malloc_usable_size
   * answers right for our blocks too. */
  ((size_t *)p)[0] = n;
  ((size_t *)p)[1] = ((n + BLOCK_HDR + 4095) & ~(size_t)4095) | 2;
  return p + BLOCK_HDR;
}

void *malloc(size_t n) {
  void *p = block_new(n);
  return p ? p : __libc_malloc(n);
}

void *calloc(size_t k, size_t n) {
  size_t total;
  if (__builtin_mul_overflow(k, n, &total)) return __libc_calloc(k, n);
  void *p = block_new(total); /* attached memory starts as zeros */
  return p ? p : __libc_calloc(k, n);
}

void free(void *p) {
  if (!p) return;
  if (nregions) {
    pthread_mutex_lock(&mu);
    long i = block_of(p);
    if (i >= 0) {
      struct shim_region r = regions[i];
      int rc = release((size_t)i, 0);
      pthread_mutex_unlock(&mu);
      if (!rc) sys_munmap((void *)r.addr, r.len);
      return; /* a block the server would not give back stays mapped rather than vanish under it */
    }
    pthread_mutex_unlock(&mu);
  }
  __libc_free(p);
}

void *realloc(void *p, size_t n) {
  if (!p) return malloc(n);
  if (nregions) {
    pthread_mutex_lock(&mu);
    long i = block_of(p);
    size_t have = i >= 0 ? *(size_t *)regions[i].addr : 0, cap = i >= 0 ? regions[i].len - BLOCK_HDR : 0;
    pthread_mutex_unlock(&mu);
    if (i >= 0) {
      if (n && n <= cap) {
        *(size_t *)((char *)p - BLOCK_HDR) = n;
        return p;
      }
      void *q = malloc(n ? n : 1);
      if (!q) return NULL;
      memcpy(q, p, have < n ? have : n);
      free(p);
      return q;
    }
  }
  if (n >= threshold && !guard && !disabled) {
    size_t have = malloc_usable_size(p);
    void *q = block_new(n);
    if (q) {
      memcpy(q, p, have < n ? have : n);
      __libc_free(p);
      return q;
    }
  }
  return __libc_realloc(p, n);
}


/* fork: a child would share the memfd pages (and see holes where the server took pages away), so
 * each attached range becomes private anonymous memory first, and the child gets private
 * copy-on-write memory as without the shim; the child never attaches. Once fork has returned, the
 * parent hands the ranges back (pm_adopt: copied into a new memfd of its own, which the child never
 * had), so a program that shells out keeps its memory on the device. */
static struct {
  uintptr_t addr;
  size_t len;
  int block;
} forked[PM_SHIM_MAX_REGIONS];
static size_t nforked;

static void before_fork(void) {
  pthread_mutex_lock(&mu);
  nforked = 0;
  /* release() removes a direct mapping's entry and keeps a malloc block's (unattached). */
  for (size_t i = 0; i < nregions;) {
    struct shim_region r = regions[i];
    if (!r.attached) {
      i++;
    } else if (release(i, 1)) {
      say("fork: a range could not be taken back from the server; the child shares it", 0);
      i++;
    } else {
      forked[nforked].addr = r.addr;
      forked[nforked].len = r.len;
      forked[nforked++].block = r.block;
      if (r.block) i++; /* kept in place; a direct mapping's slot now holds another entry */
    }
  }
}

static void after_fork_parent(void) {
  for (size_t k = 0; k < nforked; k++) {
    guard = 1;
    int rc = pm_adopt(client, (void *)forked[k].addr, forked[k].len);
    guard = 0;
    say_unheld(pm_take_hold_error(client));
    if (rc) {
      /* The range goes on as ordinary memory: correct, only no longer on the device. */
      if (k == 0) say("fork: a range could not be handed back to the server after the fork", -rc);
      continue;
    }
    if (!forked[k].block) {
      regions[nregions++] = (struct shim_region){forked[k].addr, forked[k].len, 1, 0};
      continue;
    }
    for (size_t i = 0; i < nregions; i++)
      if (regions[i].block && regions[i].addr == forked[k].addr) regions[i].attached = 1;
  }
  nforked = 0;
  pthread_mutex_unlock(&mu);
}
static void after_fork_child(void) {
  disabled = 1; /* released blocks stay listed: free() must still recognise them */
  nforked = 0;
  pthread_mutex_unlock(&mu);
}

__attribute__((constructor)) static void shim_init(void) {
  const char *sock = getenv("PAGEMIRROR_SOCKET");
  if (!sock || !*sock) return;
  const char *t = getenv("PAGEMIRROR_THRESHOLD");
  if (t && *t) {
    char *end;
    unsigned long long v = strtoull(t, &end, 0);
    if (*end || v < 4096) {
      say("not attached: PAGEMIRROR_THRESHOLD must be a number of bytes, at least 4096", 0);
      return;
    }
    threshold = (size_t)v;
  }
  unsigned long pool = 0;
  const char *pp = getenv("PAGEMIRROR_POOL_PAGES");
  if (pp && *pp) pool = strtoul(pp, NULL, 0);
  guard = 1;
  int rc = pm_connect(sock, (uint32_t)pool, &client);
  guard = 0;
  if (rc == -ENOSYS || rc == -EPERM) {
    /* The server may well be there (pm_connect opens the userfaultfd after connecting): qemu-user,
     * a seccomp filter or a kernel without userfaultfd refuses it to this process. */
    say("not attached: no userfaultfd for this process (the program runs without it)", -rc);
    return;
  }
  if (rc) {
    say("not attached: cannot connect to the fault server (the program runs without it)", -rc);
    return;
  }
  if (pm_user_mode_only(client)) {
    /* read(2) into attached memory would fail with EFAULT instead of faulting to the server. */
    say("not attached: userfaultfd is user-mode only here (vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE)", 0);
    guard = 1;
    pm_close(client);
    guard = 0;
    client = NULL;
    return;
  }
  /* glibc raises its mmap threshold as large blocks are freed, after which they come from the heap
   * and escape the shim: fix it at ours (capped at glibc's maximum). */
  mallopt(M_MMAP_THRESHOLD, (int)(threshold < PM_MALLOC_MMAP_MAX ? threshold : PM_MALLOC_MMAP_MAX));
  pthread_atfork(before_fork, after_fork_parent, after_fork_child);
  disabled = 0;
}
