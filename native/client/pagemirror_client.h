/* pagemirror client library: hand this process's memory to a pagemirror fault server
 * (`pagemirror serve --socket PATH`, or FaultServer.listen) over a Unix socket. Plain C, no Node.
 * Link with the static library shipped beside the addon and -pthread: in an installed package
 * prebuilds/linux-<arch>/pagemirror_client.a, after a source build or in a checkout
 * build/Release/pagemirror_client.a (docs/fault-server.md, "Building a client").
 *
 * Every call returns 0 or -errno and never exits or aborts. A client is safe to use from several
 * threads (calls are serialized). Only pm_connect allocates with malloc: pm_attach and pm_detach
 * may be called from inside an mmap wrapper that malloc itself called (a preload shim). Memory handed to the server must not be touched by the thread
 * that would have to serve it: here that is nobody in this process while the server lives.
 *
 * If the server dies (or closes the connection), a watchdog thread of this library takes over at
 * once: pages the server took away into the pool come home, faults waiting in the queue are
 * resolved (minor: continue; missing: the page, or a zero page for memory never written), and every
 * range is unregistered, so no thread sleeps forever and no data written is lost. From then on the
 * memory is ordinary memory, and calls that need the server fail with -ENOTCONN. */
#ifndef PAGEMIRROR_CLIENT_H
#define PAGEMIRROR_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pm_client pm_client;

/* Pool slots by default: pages the server may take away at once (4096: 16 MiB of 4 KiB pages,
 * allocated only as the server fills it). */
#define PM_DEFAULT_POOL_PAGES 4096u

/* Connects to the server at socket_path, opens this process's userfaultfd, shares a pool of
 * pool_pages slots (0: PM_DEFAULT_POOL_PAGES) and starts the watchdog. *out gets the client.
 * Errors: -EINVAL (NULL argument, pool_pages too large), -ENAMETOOLONG (path over 107 bytes),
 * -ENOENT / -ECONNREFUSED (no server there), -EACCES (the socket is not ours to open, or the server
 * refused our uid), -EUSERS (the server has its maximum of clients), -EPERM / -ENOSYS (no
 * userfaultfd for this process: see pagemirror probe), -EPROTONOSUPPORT (server speaks another
 * protocol version), -ETIMEDOUT (no answer within 10 s), -ENOMEM. */
int pm_connect(const char *socket_path, uint32_t pool_pages, pm_client **out);

/* Allocates len bytes (rounded up to pages) of shared memory the server can serve and migrate: a
 * memfd mapped MAP_SHARED, registered MISSING | MINOR | WP as the kernel allows. flags: 0 (reserved).
 * The memory starts as zeros. *out gets its address. Errors: -EINVAL (len 0, flags not 0),
 * -ENOTCONN (the server is gone), -ENOMEM, -EMFILE, the server's refusal (-E2BIG: too many ranges),
 * -EBUSY (already registered elsewhere). */
int pm_alloc(pm_client *c, size_t len, unsigned flags, void **out);

/* Turns existing private anonymous memory [addr, addr + len) into memory of pm_alloc, in place: its
 * resident pages are copied into a new memfd, which is mapped shared over the range (MAP_FIXED)
 * and handed to the server, so the server can migrate it. Other threads' writes to the range are held
 * (they wait in the kernel) from before the copy until the memfd is mapped, so none is lost; where
 * the kernel has no UFFD_FEATURE_WP_UNPOPULATED, or this client's userfaultfd is user-mode only, the
 * copy goes on unheld and a write in between is lost. On an error after
 * the mapping (-ENOTCONN, the server's refusal) the range keeps its contents as ordinary shared
 * memory. Errors: -EINVAL (unaligned, zero), -EEXIST (overlaps an attached range), -ENOMEM, -EMFILE,
 * -EOPNOTSUPP (no userfaultfd on shared memory here), those of pm_alloc's registration. */
int pm_adopt(pm_client *c, void *addr, size_t len);

/* Hands existing private anonymous memory [addr, addr + len) to the server (MISSING faults only:
 * the server cannot migrate private memory of another process). Errors: -EINVAL (unaligned, zero,
 * not anonymous private memory the kernel lets us register), -EBUSY (registered elsewhere),
 * -ENOTCONN, -EEXIST (overlaps a range already attached). */
int pm_attach(pm_client *c, void *addr, size_t len);

/* Takes a range back from the server, exactly as pm_alloc or pm_attach gave it: pages the server
 * held come home first. The memory stays mapped and is ordinary memory again (munmap(addr, len)
 * frees memory of pm_alloc). Errors: -ENOENT (no such range), -EINVAL. */
int pm_detach(pm_client *c, void *addr, size_t len);

/* Ends the session: tells the server goodbye, waits (up to 10 s) until it has let go of our
 * memory, takes everything back as the watchdog would, and frees the client. Memory of pm_alloc
 * stays mapped (munmap it). Returns 0, or -ETIMEDOUT if the server did not let go in time (the
 * memory was taken back anyway). */
int pm_close(pm_client *c);

/* 1 once the server is known to be gone (it died or closed the connection): from the moment the
 * watchdog sees the hang-up, before its takeover resolves any fault; else 0. */
int pm_server_lost(const pm_client *c);

/* The UFFD_FEATURE_* mask negotiated on this client's userfaultfd, and whether it is user-mode
 * only (faults raised inside the kernel, e.g. read(2) into attached memory, fail with EFAULT). */
uint64_t pm_features(const pm_client *c);
int pm_user_mode_only(const pm_client *c);

#ifdef __cplusplus
}
#endif

#endif
