/* pagemirror client library (see pagemirror_client.h and docs/fault-server.md). */
#define _GNU_SOURCE
#include "pagemirror_client.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "pm_hold.h"
#include "pm_proto.h"

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef F_SEAL_SHRINK
#define F_ADD_SEALS 1033
#define F_SEAL_SEAL 0x0001
#define F_SEAL_SHRINK 0x0002
#define F_SEAL_GROW 0x0004
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13) /* Linux 6.4; the system headers may be older */
#endif

#define PM_REPLY_TIMEOUT_S 10

struct pm_region {
  uint64_t addr, len;
  uint32_t modes;
  int memfd; /* pm_alloc: ours; -1 for attached anonymous memory */
};

struct pm_client {
  int sock, uffd, stop_fd;
  uint64_t features;
  uint64_t kernel_features; /* all the kernel offers: a write hold (pm_hold.h) asks for others */
  int user_mode_only;
  int hold_error; /* why the last pm_adopt could not hold writes (pm_take_hold_error) */
  uint64_t page;
  int pool_fd;
  void *pool_map;
  uint64_t pool_len;
  uint32_t pool_pages;
  uint64_t *table;
  char *slots;
  pthread_mutex_t mu; /* requests, regions, takeover */
  struct pm_region *regions;
  size_t nregions, cap;
  int sent_uffd;
  uint32_t seq;
  pthread_t watchdog;
  int watchdog_started;
  atomic_int taken_over;
  /* Set as soon as the loss is seen, before the takeover (which the program's own faults may
   * wait for) starts: a thread whose faults the takeover resolved must find it set. */
  atomic_int lost;
};

static int open_uffd(int flags) {
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev >= 0) {
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    close(dev);
    if (fd >= 0) return fd;
  }
  long fd = syscall(SYS_userfaultfd, flags);
  return fd < 0 ? -errno : (int)fd;
}

/* A userfaultfd with every feature we use that the kernel offers (learnt on a throw-away one:
 * UFFDIO_API can be called once per descriptor). */
static int make_uffd(struct pm_client *c) {
  const int base = O_CLOEXEC | O_NONBLOCK;
  int umo = 0;
  int probe = open_uffd(base);
  if (probe < 0) {
    umo = 1;
    probe = open_uffd(base | UFFD_USER_MODE_ONLY);
    if (probe < 0) return probe;
  }
  struct uffdio_api api = {.api = UFFD_API, .features = 0};
  int rc = ioctl(probe, UFFDIO_API, &api) < 0 ? -errno : 0;
  close(probe);
  if (rc) return rc;
  const uint64_t want = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM |
                        UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_THREAD_ID;
  int fd = open_uffd(base | (umo ? UFFD_USER_MODE_ONLY : 0));
  if (fd < 0) return fd;
  struct uffdio_api a2 = {.api = UFFD_API, .features = want & api.features};
  if (ioctl(fd, UFFDIO_API, &a2) < 0) {
    rc = -errno;
    close(fd);
    return rc;
  }
  c->uffd = fd;
  c->features = want & api.features;
  c->kernel_features = api.features;
  c->user_mode_only = umo;
  return 0;
}

static void hdr(struct pm_client *c, struct pm_hdr *h, uint16_t type, uint32_t size) {
  h->magic = PM_PROTO_MAGIC;
  h->version = PM_PROTO_VERSION;
  h->type = type;
  h->size = size;
  h->seq = ++c->seq;
}

int pm_send_packet(int sock, const void *buf, size_t len, const int *fds, int nfds, int flags) {
  char control[CMSG_SPACE(sizeof(int) * 80)];
  if (nfds < 0 || nfds > 80) return -EINVAL;
  struct iovec iov = {(void *)buf, len};
  struct msghdr m = {0};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  if (nfds > 0) {
    memset(control, 0, sizeof control);
    m.msg_control = control;
    m.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
  }
  ssize_t n;
  do n = sendmsg(sock, &m, MSG_NOSIGNAL | flags);
  while (n < 0 && errno == EINTR);
  return n < 0 ? -errno : 0;
}

static int send_msg(int sock, const void *buf, size_t len, const int *fds, int nfds) {
  int rc = pm_send_packet(sock, buf, len, fds, nfds, 0);
  return rc == -EPIPE ? -ENOTCONN : rc;
}

/* A connection refused at accept (uid, too many clients): the server answered and closed, maybe
 * before we spoke; the socket reports ECONNRESET/EPIPE before the reply queued behind it. The
 * server's errno if it is there, else rc. */
static int refusal(int sock, int rc) {
  for (int i = 0; i < 2; i++) {
    struct pm_reply r;
    ssize_t n = recv(sock, &r, sizeof r, MSG_DONTWAIT);
    if (n == (ssize_t)sizeof r && r.h.magic == PM_PROTO_MAGIC && r.h.seq == 0 && r.error) return r.error;
    if (n >= 0) break;
  }
  return rc;
}

/* Sends one message and waits for its reply (under c->mu). The reply's error, or -ENOTCONN when
 * the server is gone, -ETIMEDOUT. */
static int request(struct pm_client *c, const void *msg, size_t len, const int *fds, int nfds, uint32_t *value) {
  if (atomic_load(&c->taken_over)) return -ENOTCONN;
  const struct pm_hdr *h = msg;
  int rc = send_msg(c->sock, msg, len, fds, nfds);
  if (rc) return refusal(c->sock, rc);
  for (;;) {
    struct pm_reply r;
    ssize_t n;
    do n = recv(c->sock, &r, sizeof r, 0);
    while (n < 0 && errno == EINTR);
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? -ETIMEDOUT : refusal(c->sock, -errno);
    if (n == 0) return -ENOTCONN;
    if ((size_t)n != sizeof r || r.h.magic != PM_PROTO_MAGIC || r.h.type != PM_MSG_REPLY) return -EBADMSG;
    if (r.h.seq != h->seq) {
      if (r.h.seq == 0 && r.error) return r.error; /* refused at accept (uid, full) */
      continue;
    }
    if (value) *value = r.value;
    return r.error;
  }
}

static struct pm_region *find_region(struct pm_client *c, uint64_t addr) {
  for (size_t i = 0; i < c->nregions; i++)
    if (addr >= c->regions[i].addr && addr - c->regions[i].addr < c->regions[i].len) return &c->regions[i];
  return NULL;
}

/* The region table grows with mmap/mremap, not malloc: pm_attach may be called from inside an
 * mmap wrapper that malloc itself called (a preload shim), with malloc's locks held. */
static int add_region(struct pm_client *c, struct pm_region r) {
  if (c->nregions == c->cap) {
    const size_t cap = c->cap ? c->cap * 2 : 256;
    void *n = c->regions ? mremap(c->regions, c->cap * sizeof *c->regions, cap * sizeof *c->regions, MREMAP_MAYMOVE)
                         : mmap(NULL, cap * sizeof *c->regions, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (n == MAP_FAILED) return -ENOMEM;
    c->regions = n;
    c->cap = cap;
  }
  c->regions[c->nregions++] = r;
  return 0;
}

static int has_data(int fd, uint64_t off) {
  off_t r = lseek(fd, (off_t)off, SEEK_DATA);
  if (r < 0) return errno == ENXIO ? 0 : -errno;
  return (uint64_t)r == off;
}

/* UFFDIO_UNREGISTER, then UFFDIO_WAKE: the kernel's own wake in UNREGISTER runs before the VMA is
 * write-locked, so a fault taken under the per-VMA lock (Linux 6.6 on) can queue after it and
 * sleep for good (1 in about 3,000 unregisters of a shared range with a fault racing it, here).
 * When UNREGISTER returns the VMA's write lock has waited that fault out, so it is queued: the
 * wake reaches it, and it faults again unregistered. */
static void uffd_unregister(struct pm_client *c, uint64_t addr, uint64_t len) {
  struct uffdio_range r = {addr, len};
  if (ioctl(c->uffd, UFFDIO_UNREGISTER, &r) == 0) ioctl(c->uffd, UFFDIO_WAKE, &r);
}

static void resolve_queued(struct pm_client *c) {
  struct uffd_msg msgs[64];
  for (;;) {
    ssize_t n = read(c->uffd, msgs, sizeof msgs);
    if (n <= 0) return;
    for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
      if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
      const uint64_t a = msgs[i].arg.pagefault.address & ~(c->page - 1);
      const uint64_t fl = msgs[i].arg.pagefault.flags;
      struct pm_region *r = find_region(c, a);
      int rc = -ENOENT;
      if (!r) {
        /* A fault of a range already detached is only woken: its address may be held by another
         * userfaultfd now (pm_hold.h), which an unprotect or a fill through this one would undo. */
      } else if (fl & UFFD_PAGEFAULT_FLAG_WP) {
        struct uffdio_writeprotect wp = {{a, c->page}, 0};
        rc = ioctl(c->uffd, UFFDIO_WRITEPROTECT, &wp);
      } else if ((fl & UFFD_PAGEFAULT_FLAG_MINOR) || (r->memfd >= 0 && has_data(r->memfd, a - r->addr) == 1)) {
        struct uffdio_continue k = {{a, c->page}, 0, 0};
        rc = ioctl(c->uffd, UFFDIO_CONTINUE, &k);
      } else {
        struct uffdio_zeropage z = {{a, c->page}, 0, 0};
        rc = ioctl(c->uffd, UFFDIO_ZEROPAGE, &z);
      }
      if (rc < 0) {
        struct uffdio_range w = {a, c->page};
        ioctl(c->uffd, UFFDIO_WAKE, &w);
      }
    }
  }
}

/* The server let go of us (it died, or answered BYE by closing): nothing on its side touches our
 * memory any more. Pages it held come home, queued faults are resolved, every range is
 * unregistered and woken (the faults the server had read and never resolved, and any that queued
 * while the range was unregistered). Under c->mu. */
static void take_over(struct pm_client *c) {
  if (atomic_load(&c->taken_over)) return;
  atomic_store(&c->lost, 1);
  for (uint32_t i = 0; c->table && i < c->pool_pages; i++) {
    const uint64_t a = __atomic_load_n(&c->table[i], __ATOMIC_ACQUIRE);
    if (!a) continue;
    struct pm_region *r = find_region(c, a);
    /* The memfd's page, when present, is current (pm_proto.h); a hole means the slot is. */
    if (r && r->memfd >= 0 && has_data(r->memfd, a - r->addr) == 0) {
      const char *src = c->slots + (uint64_t)i * c->page;
      uint64_t done = 0;
      while (done < c->page) {
        ssize_t w = pwrite(r->memfd, src + done, c->page - done, (off_t)(a - r->addr + done));
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break;
        done += (uint64_t)w;
      }
    }
    __atomic_store_n(&c->table[i], 0, __ATOMIC_RELEASE);
  }
  resolve_queued(c);
  for (size_t i = 0; i < c->nregions; i++) uffd_unregister(c, c->regions[i].addr, c->regions[i].len);
  atomic_store(&c->taken_over, 1);
}

static void *watchdog(void *arg) {
  struct pm_client *c = arg;
  struct pollfd p[2] = {{c->sock, POLLRDHUP, 0}, {c->stop_fd, POLLIN, 0}};
  for (;;) {
    int n = poll(p, 2, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || (p[1].revents & POLLIN)) return NULL;
    if (p[0].revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL)) break;
  }
  atomic_store(&c->lost, 1);
  pthread_mutex_lock(&c->mu);
  take_over(c);
  pthread_mutex_unlock(&c->mu);
  return NULL;
}

static void free_client(struct pm_client *c) {
  if (c->sock >= 0) close(c->sock);
  if (c->uffd >= 0) close(c->uffd);
  if (c->stop_fd >= 0) close(c->stop_fd);
  if (c->pool_map) munmap(c->pool_map, c->pool_len);
  if (c->pool_fd >= 0) close(c->pool_fd);
  for (size_t i = 0; i < c->nregions; i++)
    if (c->regions[i].memfd >= 0) close(c->regions[i].memfd);
  if (c->regions) munmap(c->regions, c->cap * sizeof *c->regions);
  pthread_mutex_destroy(&c->mu);
  free(c);
}

static int make_pool(struct pm_client *c, uint32_t pages) {
  const uint64_t bytes = pm_pool_bytes(pages, c->page);
  int fd = memfd_create("pagemirror-pool", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return -errno;
  c->pool_fd = fd;
  if (ftruncate(fd, (off_t)bytes) < 0) return -errno;
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return -errno;
  c->pool_map = p;
  c->pool_len = bytes;
  c->pool_pages = pages;
  struct pm_pool_header *h = p;
  h->magic = PM_PROTO_MAGIC;
  h->version = PM_PROTO_VERSION;
  h->pool_pages = pages;
  h->page_size = (uint32_t)c->page;
  c->table = (uint64_t *)((char *)p + sizeof *h);
  c->slots = (char *)p + pm_pool_table_bytes(pages, c->page);
  /* The server maps the pool: sealed so that nobody can shrink it under that mapping. */
  if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) return -errno;
  return 0;
}

int pm_connect(const char *socket_path, uint32_t pool_pages, pm_client **out) {
  if (!socket_path || !out) return -EINVAL;
  if (pool_pages == 0) pool_pages = PM_DEFAULT_POOL_PAGES;
  if (pool_pages > PM_MAX_POOL_PAGES) return -EINVAL;
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  const size_t plen = strlen(socket_path);
  if (plen == 0) return -EINVAL;
  if (plen >= sizeof a.sun_path) return -ENAMETOOLONG;
  memcpy(a.sun_path, socket_path, plen);
  struct pm_client *c = calloc(1, sizeof *c);
  if (!c) return -ENOMEM;
  c->sock = c->uffd = c->stop_fd = c->pool_fd = -1;
  c->page = (uint64_t)sysconf(_SC_PAGESIZE);
  pthread_mutex_init(&c->mu, NULL);
  int rc = 0;
  c->sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (c->sock < 0) rc = -errno;
  struct timeval tv = {PM_REPLY_TIMEOUT_S, 0};
  if (!rc) setsockopt(c->sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (!rc && connect(c->sock, (struct sockaddr *)&a, sizeof a) < 0) rc = -errno;
  if (!rc) rc = make_uffd(c);
  if (!rc) rc = make_pool(c, pool_pages);
  if (!rc) {
    struct pm_hello m = {0};
    hdr(c, &m.h, PM_MSG_HELLO, sizeof m);
    m.pid = (uint32_t)getpid();
    m.flags = PM_HELLO_POOL;
    m.features = c->features;
    m.pool_pages = pool_pages;
    m.page_size = (uint32_t)c->page;
    rc = request(c, &m, sizeof m, &c->pool_fd, 1, NULL);
  }
  if (!rc) {
    c->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (c->stop_fd < 0) rc = -errno;
  }
  if (!rc) {
    /* The watchdog takes no signal meant for the program. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = -pthread_create(&c->watchdog, NULL, watchdog, c);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    c->watchdog_started = rc == 0;
  }
  if (rc) {
    free_client(c);
    return rc;
  }
  *out = c;
  return 0;
}

/* REGISTER one range (the first carries our userfaultfd). Under c->mu. */
static int register_range(struct pm_client *c, uint64_t addr, uint64_t len, uint32_t modes, int memfd) {
  unsigned char buf[sizeof(struct pm_register) + sizeof(struct pm_range)];
  struct pm_register m = {0};
  hdr(c, &m.h, PM_MSG_REGISTER, sizeof buf);
  m.count = 1;
  m.flags = c->sent_uffd ? 0 : PM_REG_UFFD;
  struct pm_range r = {addr, len, modes, memfd >= 0 ? 0 : -1, 0};
  memcpy(buf, &m, sizeof m);
  memcpy(buf + sizeof m, &r, sizeof r);
  int fds[2], n = 0;
  if (!c->sent_uffd) fds[n++] = c->uffd;
  if (memfd >= 0) fds[n++] = memfd;
  int rc = request(c, buf, sizeof buf, fds, n, NULL);
  if (rc == 0) c->sent_uffd = 1;
  return rc;
}

static int uffd_register(struct pm_client *c, uint64_t addr, uint64_t len, uint32_t modes) {
  struct uffdio_register reg = {{addr, len}, modes, 0};
  return ioctl(c->uffd, UFFDIO_REGISTER, &reg) < 0 ? -errno : 0;
}

/* A memfd of bytes, sealed against resizing (the server maps and punches it). */
static int make_memfd(uint64_t bytes, int *out) {
  int fd = memfd_create("pagemirror-mem", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return -errno;
  if (ftruncate(fd, (off_t)bytes) < 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0) {
    int e = -errno;
    close(fd);
    return e;
  }
  *out = fd;
  return 0;
}

/* Registers shared memory [p, p + bytes) of memfd fd (MISSING | MINOR | WP as the kernel allows)
 * and hands it to the server; the region keeps fd. Called with mu held. */
static int attach_shared(struct pm_client *c, uint64_t p, uint64_t bytes, int fd) {
  uint32_t modes = 0;
  if (c->features & UFFD_FEATURE_MISSING_SHMEM) modes |= PM_MODE_MISSING;
  if (c->features & UFFD_FEATURE_MINOR_SHMEM) modes |= PM_MODE_MINOR;
  if ((c->features & UFFD_FEATURE_WP_HUGETLBFS_SHMEM) && (c->features & UFFD_FEATURE_PAGEFAULT_FLAG_WP)) modes |= PM_MODE_WP;
  if (!(modes & PM_MODE_MISSING)) return -EOPNOTSUPP;
  int rc = uffd_register(c, p, bytes, modes);
  if (rc) return rc;
  rc = register_range(c, p, bytes, modes, fd);
  if (!rc) rc = add_region(c, (struct pm_region){p, bytes, modes, fd});
  if (rc) uffd_unregister(c, p, bytes);
  return rc;
}

int pm_alloc(pm_client *c, size_t len, unsigned flags, void **out) {
  if (!c || !out || len == 0 || flags) return -EINVAL;
  const uint64_t bytes = ((uint64_t)len + c->page - 1) & ~(c->page - 1);
  if (bytes < len) return -EINVAL;
  pthread_mutex_lock(&c->mu);
  int rc = atomic_load(&c->taken_over) ? -ENOTCONN : 0;
  int fd = -1;
  void *p = MAP_FAILED;
  if (!rc) rc = make_memfd(bytes, &fd);
  if (!rc) {
    p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) rc = -errno;
  }
  if (!rc) rc = attach_shared(c, (uint64_t)p, bytes, fd);
  if (rc) {
    if (p != MAP_FAILED) munmap(p, bytes);
    if (fd >= 0) close(fd);
  } else {
    *out = p;
  }
  pthread_mutex_unlock(&c->mu);
  return rc;
}

/* Whether existing memory [a, a + len) may be handed over now (pm_attach, pm_adopt). Called with mu held. */
static int check_new_range(struct pm_client *c, uint64_t a, uint64_t len) {
  if (atomic_load(&c->taken_over)) return -ENOTCONN;
  for (size_t i = 0; i < c->nregions; i++)
    if (a < c->regions[i].addr + c->regions[i].len && c->regions[i].addr < a + len) return -EEXIST;
  return 0;
}

int pm_adopt(pm_client *c, void *addr, size_t len) {
  const uint64_t a = (uint64_t)addr;
  if (!c || len == 0 || a % c->page || len % c->page) return -EINVAL;
  pthread_mutex_lock(&c->mu);
  int rc = check_new_range(c, a, len);
  int fd = -1;
  if (!rc) rc = make_memfd(len, &fd);
  struct pm_write_hold hold = {.uffd = -1};
  if (!rc) c->hold_error = pm_hold_writes(c, addr, len, 0, &hold);
  /* Only resident pages are copied: the others read as zeros, which the memfd's holes are too. */
  unsigned char vec[256];
  for (uint64_t off = 0; !rc && off < len; off += sizeof vec * c->page) {
    const uint64_t n = len - off < sizeof vec * c->page ? len - off : sizeof vec * c->page;
    if (mincore((void *)(a + off), n, vec) < 0) rc = -errno;
    for (uint64_t k = 0; !rc && k < n / c->page; k++) {
      if (!(vec[k] & 1)) continue;
      const uint64_t o = off + k * c->page;
      if (pwrite(fd, (void *)(a + o), c->page, (off_t)o) != (ssize_t)c->page) rc = errno ? -errno : -EIO;
    }
  }
  if (!rc && mmap(addr, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) rc = -errno;
  /* Writers held meanwhile now write the memfd (or, if the mapping failed, the memory as it was). */
  pm_release_writes(&hold);
  /* From here the range is the memfd's, with the same contents: if attaching fails it stays so,
   * ordinary shared memory of this process only. */
  if (!rc) {
    rc = attach_shared(c, a, len, fd);
    if (!rc) fd = -1;
  }
  if (fd >= 0) close(fd);
  pthread_mutex_unlock(&c->mu);
  return rc;
}

int pm_attach(pm_client *c, void *addr, size_t len) {
  const uint64_t a = (uint64_t)addr;
  if (!c || len == 0 || a % c->page || len % c->page) return -EINVAL;
  pthread_mutex_lock(&c->mu);
  int rc = check_new_range(c, a, len);
  int registered = 0;
  if (!rc) {
    rc = uffd_register(c, a, len, PM_MODE_MISSING);
    registered = rc == 0;
  }
  if (!rc) rc = register_range(c, a, len, PM_MODE_MISSING, -1);
  if (!rc) rc = add_region(c, (struct pm_region){a, len, PM_MODE_MISSING, -1});
  if (rc && registered) uffd_unregister(c, a, len);
  pthread_mutex_unlock(&c->mu);
  return rc;
}

int pm_detach(pm_client *c, void *addr, size_t len) {
  if (!c || len == 0) return -EINVAL;
  const uint64_t a = (uint64_t)addr;
  pthread_mutex_lock(&c->mu);
  size_t i = 0;
  while (i < c->nregions && !(c->regions[i].addr == a && c->regions[i].len == len)) i++;
  int rc = i == c->nregions ? -ENOENT : 0;
  if (!rc && !atomic_load(&c->taken_over)) {
    unsigned char buf[sizeof(struct pm_register) + sizeof(struct pm_range)];
    struct pm_register m = {0};
    hdr(c, &m.h, PM_MSG_UNREGISTER, sizeof buf);
    m.count = 1;
    struct pm_range r = {a, len, 0, -1, 0};
    memcpy(buf, &m, sizeof m);
    memcpy(buf + sizeof m, &r, sizeof r);
    /* The server writes pages it held back into the memfd before it answers; if it died
     * meanwhile, the watchdog's takeover (below, under this lock) does the same. */
    int s = request(c, buf, sizeof buf, NULL, 0, NULL);
    if (s == -ENOTCONN) take_over(c);
    else if (s) rc = s;
  }
  if (!rc) {
    uffd_unregister(c, a, len);
    if (c->regions[i].memfd >= 0) close(c->regions[i].memfd);
    c->regions[i] = c->regions[--c->nregions];
  }
  pthread_mutex_unlock(&c->mu);
  return rc;
}

int pm_close(pm_client *c) {
  if (!c) return -EINVAL;
  int rc = 0;
  pthread_mutex_lock(&c->mu);
  if (!atomic_load(&c->taken_over)) {
    struct pm_hdr h;
    hdr(c, &h, PM_MSG_BYE, sizeof h);
    if (send_msg(c->sock, &h, sizeof h, NULL, 0) == 0) {
      /* The server closes the connection once it let go of our memory. */
      struct pollfd p = {c->sock, POLLRDHUP, 0};
      struct timespec end;
      clock_gettime(CLOCK_MONOTONIC, &end);
      end.tv_sec += PM_REPLY_TIMEOUT_S;
      for (;;) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long ms = (end.tv_sec - now.tv_sec) * 1000 + (end.tv_nsec - now.tv_nsec) / 1000000;
        if (ms <= 0) {
          rc = -ETIMEDOUT;
          break;
        }
        int n = poll(&p, 1, (int)ms);
        if (n < 0 && errno == EINTR) continue;
        if (n != 0 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR))) break;
        if (n < 0) break;
      }
    }
    take_over(c);
  }
  pthread_mutex_unlock(&c->mu);
  if (c->watchdog_started) {
    uint64_t one = 1;
    (void)!write(c->stop_fd, &one, sizeof one);
    pthread_join(c->watchdog, NULL);
  }
  free_client(c);
  return rc;
}

int pm_server_lost(const pm_client *c) { return c ? atomic_load(&((pm_client *)c)->lost) : 0; }
uint64_t pm_features(const pm_client *c) { return c ? c->features : 0; }
int pm_user_mode_only(const pm_client *c) { return c ? c->user_mode_only : 0; }

static uint64_t hold_features(int shared) {
  return UFFD_FEATURE_PAGEFAULT_FLAG_WP | (shared ? UFFD_FEATURE_WP_HUGETLBFS_SHMEM : UFFD_FEATURE_WP_UNPOPULATED);
}

int pm_hold_supported(const pm_client *c, int shared) {
  if (!c) return -EINVAL;
  if (c->user_mode_only) return -EPERM;
  const uint64_t need = hold_features(shared);
  return (c->kernel_features & need) == need ? 0 : -EOPNOTSUPP;
}

int pm_hold_writes(const pm_client *c, void *addr, size_t len, int shared, struct pm_write_hold *h) {
  h->uffd = -1;
  int rc = pm_hold_supported(c, shared);
  if (rc) return rc;
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &h->saved);
  const int fd = open_uffd(O_CLOEXEC | O_NONBLOCK);
  rc = fd < 0 ? fd : 0;
  struct uffdio_api api = {.api = UFFD_API, .features = hold_features(shared)};
  if (!rc && ioctl(fd, UFFDIO_API, &api) < 0) rc = -errno;
  struct uffdio_register reg = {{(uint64_t)addr, len}, UFFDIO_REGISTER_MODE_WP, 0};
  if (!rc && ioctl(fd, UFFDIO_REGISTER, &reg) < 0) rc = -errno;
  struct uffdio_writeprotect wp = {{(uint64_t)addr, len}, UFFDIO_WRITEPROTECT_MODE_WP};
  if (!rc && ioctl(fd, UFFDIO_WRITEPROTECT, &wp) < 0) rc = -errno;
  if (rc) {
    if (fd >= 0) close(fd); /* unregisters and lifts any protection already set */
    pthread_sigmask(SIG_SETMASK, &h->saved, NULL);
    return rc;
  }
  h->uffd = fd;
  h->addr = (uint64_t)addr;
  h->len = len;
  return 0;
}

void pm_release_writes(struct pm_write_hold *h) {
  if (h->uffd < 0) return;
  /* The wake reaches the writers even while another process still holds the descriptor (a
   * posix_spawn child between its clone and its exec), whose close would then not release it. */
  struct uffdio_range r = {h->addr, h->len};
  ioctl(h->uffd, UFFDIO_WAKE, &r);
  close(h->uffd);
  h->uffd = -1;
  pthread_sigmask(SIG_SETMASK, &h->saved, NULL);
}

int pm_take_hold_error(pm_client *c) {
  if (!c) return 0;
  const int e = c->hold_error;
  c->hold_error = 0;
  return e;
}
