/* pagemirror_client_fuzz: a hostile client of the fault server's protocol (test/fault-server-fuzz.test.ts).
 *   pagemirror_client_fuzz SOCKET SEED MILLISECONDS
 * Opens connection after connection and sends each something wrong: random bytes, truncated or
 * oversized packets, wrong magic, version or size, descriptors of the wrong kind (a pipe, a regular
 * file, a socket, none, too many), bad ranges, a second HELLO, floods without reading replies,
 * half-closed connections. Never waits more than its socket timeouts. Prints "DONE <connections>
 * <replies> <refusals>" at the end; reproducible from the seed. The mode "undescribed" (below,
 * before main) is one hostile client of another kind: one that faults on memory it never described. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "pm_proto.h"

static uint64_t state;
static uint64_t rnd(void) {
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  return state;
}
static uint64_t below(uint64_t n) { return n ? rnd() % n : 0; }

static long now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static int send_fds(int s, const void *buf, size_t len, const int *fds, int nfds) {
  return pm_send_packet(s, buf, len, fds, nfds, MSG_DONTWAIT);
}

static void hdr(struct pm_hdr *h, uint16_t type, uint32_t size) {
  h->magic = PM_PROTO_MAGIC;
  h->version = PM_PROTO_VERSION;
  h->type = type;
  h->size = size;
  h->seq = (uint32_t)rnd();
}

static long replies, refusals;
static void drain(int s, int ms) {
  long end = now_ms() + ms;
  while (now_ms() < end) {
    struct pm_reply r;
    ssize_t n = recv(s, &r, sizeof r, MSG_DONTWAIT);
    if (n == 0) return;
    if (n < 0) {
      if (errno != EAGAIN) return;
      usleep(1000);
      continue;
    }
    replies++;
    if ((size_t)n == sizeof r && r.error) refusals++;
  }
}

static int memfd_of(uint64_t size, int seal) {
  int fd = memfd_create("fuzz", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return -1;
  if (ftruncate(fd, (off_t)size) < 0) {}
  if (seal) fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK);
  return fd;
}

static int a_uffd(void) {
  long fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | 1 /* user mode only */);
  return (int)fd;
}

static void hello(int s, int pool) {
  struct pm_hello m = {0};
  hdr(&m.h, PM_MSG_HELLO, sizeof m);
  m.pid = (uint32_t)getpid();
  m.page_size = (uint32_t)sysconf(_SC_PAGESIZE);
  int fd = -1;
  if (pool) {
    const uint32_t pages = 1 + (uint32_t)below(8);
    const uint64_t page = m.page_size, bytes = pm_pool_bytes(pages, page);
    fd = memfd_of(bytes, 1);
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p != MAP_FAILED) {
      struct pm_pool_header h = {PM_PROTO_MAGIC, PM_PROTO_VERSION, pages, (uint32_t)page};
      memcpy(p, &h, sizeof h);
      munmap(p, bytes);
    }
    m.flags = PM_HELLO_POOL;
    m.pool_pages = pages;
  }
  send_fds(s, &m, sizeof m, &fd, fd >= 0 ? 1 : 0);
  if (fd >= 0) close(fd);
  drain(s, 5);
}

/* A REGISTER of `count` ranges, mostly plausible, with one thing wrong when `bad`. */
static void reg(int s, int bad, int with_uffd) {
  unsigned char buf[sizeof(struct pm_register) + PM_MAX_RANGES * sizeof(struct pm_range) + 64];
  const uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
  uint32_t count = 1 + (uint32_t)below(4);
  struct pm_register m = {0};
  m.count = count;
  m.flags = with_uffd ? PM_REG_UFFD : 0;
  int fds[80], nfds = 0;
  if (with_uffd) fds[nfds++] = a_uffd();
  int mem = memfd_of(16 * page, 0);
  fds[nfds++] = mem;
  for (uint32_t i = 0; i < count; i++) {
    struct pm_range r = {0x10000000ull + (rnd() % 4096) * 0x100000ull, page * (1 + below(4)), PM_MODE_MISSING, -1, 0};
    if (below(2)) {
      r.fd_index = 0;
      r.offset = page * below(8);
      r.modes |= PM_MODE_MINOR;
    }
    if (bad) switch (below(10)) {
      case 0: r.addr += 1 + below(page - 1); break;
      case 1: r.len = 0; break;
      case 2: r.addr = UINT64_MAX - page + 1; r.len = 2 * page; break;
      case 3: r.addr = 0xffff800000000000ull; break;
      case 4: r.modes = below(2) ? 0 : 8 + (uint32_t)below(100); break;
      case 5: r.fd_index = 5 + (int32_t)below(100); break;
      case 6: r.fd_index = 0; r.offset = 1ull << 40; break;
      case 7: r.fd_index = -1; r.modes = PM_MODE_MINOR; break;
      case 8: r.len = page * (1 + below(1u << 20)); r.fd_index = 0; break;
      default: r.offset = 3; r.fd_index = 0; break;
    }
    memcpy(buf + sizeof m + i * sizeof r, &r, sizeof r);
  }
  size_t size = sizeof m + count * sizeof(struct pm_range);
  hdr(&m.h, PM_MSG_REGISTER, (uint32_t)size);
  if (bad && below(3) == 0) m.count = (uint32_t)below(2) ? 0 : PM_MAX_RANGES + 1 + (uint32_t)below(1000);
  memcpy(buf, &m, sizeof m);
  switch (bad ? below(6) : 9) {
    case 0: { int p[2]; if (pipe(p) == 0) { close(fds[0]); fds[0] = p[0]; close(p[1]); } break; } /* a pipe as the uffd */
    case 1: { int f = open("/proc/self/status", O_RDONLY | O_CLOEXEC); if (f >= 0) { close(fds[0]); fds[0] = f; } break; }
    case 2: { int sv[2]; if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0) { close(fds[nfds - 1]); fds[nfds - 1] = sv[0]; close(sv[1]); } break; }
    case 3: for (int i = 0; i < nfds; i++) close(fds[i]); nfds = 0; break; /* none */
    case 4: while (nfds < 75) fds[nfds++] = dup(mem); break; /* too many */
    default: break;
  }
  send_fds(s, buf, size, fds, nfds);
  for (int i = 0; i < nfds; i++) close(fds[i]);
  drain(s, 5);
}

/* pagemirror_client_fuzz SOCKET undescribed [WAIT_MS]: a client whose thread faults on memory it
 * registered with its userfaultfd but never described to the server (no REGISTER names it). The
 * server can only wake such a fault, and the thread faults again at once. Prints "FAULTING", then
 * "ENDED <ms>" when the server closed the connection (ms since FAULTING), or "NOT-ENDED" after
 * WAIT_MS (default 30000). The thread is left asleep: nobody serves it once the server let go. */
static volatile char *undescribed_page;
static void *touch_undescribed(void *arg) {
  (void)arg;
  (void)undescribed_page[0];
  return NULL;
}

static int undescribed(const char *path, long wait_ms) {
  const uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  strncpy(a.sun_path, path, sizeof a.sun_path - 1);
  int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
    printf("ERR connect %d\n", errno);
    return 1;
  }
  hello(s, 0);
  const int uffd = a_uffd();
  struct uffdio_api api = {.api = UFFD_API, .features = 0};
  char *mem = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  struct uffdio_register described = {{(uint64_t)mem, page}, UFFDIO_REGISTER_MODE_MISSING, 0};
  struct uffdio_register hidden = {{(uint64_t)mem + page, page}, UFFDIO_REGISTER_MODE_MISSING, 0};
  if (uffd < 0 || mem == MAP_FAILED || ioctl(uffd, UFFDIO_API, &api) < 0 || ioctl(uffd, UFFDIO_REGISTER, &described) < 0 ||
      ioctl(uffd, UFFDIO_REGISTER, &hidden) < 0) {
    printf("ERR userfaultfd %d\n", errno);
    return 1;
  }
  /* The first REGISTER (with the userfaultfd) names the first page only. */
  unsigned char m[sizeof(struct pm_register) + sizeof(struct pm_range)];
  struct pm_register r = {0};
  hdr(&r.h, PM_MSG_REGISTER, sizeof m);
  r.count = 1;
  r.flags = PM_REG_UFFD;
  struct pm_range range = {(uint64_t)mem, page, PM_MODE_MISSING, -1, 0};
  memcpy(m, &r, sizeof r);
  memcpy(m + sizeof r, &range, sizeof range);
  send_fds(s, m, sizeof m, &uffd, 1);
  undescribed_page = mem + page;
  pthread_t t;
  if (pthread_create(&t, NULL, touch_undescribed, NULL)) return 1;
  printf("FAULTING\n");
  const long t0 = now_ms();
  struct pollfd p = {s, POLLRDHUP, 0};
  while (now_ms() - t0 < wait_ms) {
    char buf[64];
    if (poll(&p, 1, 100) > 0) {
      if (p.revents & (POLLHUP | POLLRDHUP | POLLERR)) {
        printf("ENDED %ld\n", now_ms() - t0);
        _exit(0);
      }
      if (recv(s, buf, sizeof buf, MSG_DONTWAIT) == 0) { /* replies are read and dropped */
        printf("ENDED %ld\n", now_ms() - t0);
        _exit(0);
      }
    }
  }
  printf("NOT-ENDED\n");
  _exit(0);
}

int main(int argc, char **argv) {
  if (argc >= 3 && strcmp(argv[2], "undescribed") == 0) {
    setvbuf(stdout, NULL, _IONBF, 0);
    return undescribed(argv[1], argc > 3 ? atol(argv[3]) : 30000);
  }
  if (argc < 4) return 2;
  setvbuf(stdout, NULL, _IONBF, 0);
  state = strtoull(argv[2], NULL, 10) * 0x9E3779B97F4A7C15ull + 1;
  const long end = now_ms() + atol(argv[3]);
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
  long conns = 0;
  while (now_ms() < end) {
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s < 0) return 1;
    struct timeval tv = {1, 0};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
      close(s);
      usleep(1000);
      continue;
    }
    conns++;
    if (below(3)) hello(s, (int)below(2));
    unsigned char buf[70000];
    const int kind = (int)below(12);
    switch (kind) {
      case 0: { /* random bytes */
        size_t n = below(4200);
        for (size_t i = 0; i < n; i++) buf[i] = (unsigned char)rnd();
        send_fds(s, buf, n, NULL, 0);
        break;
      }
      case 1: case 2: case 3: { /* header wrong: magic, version, size */
        struct pm_hdr h;
        hdr(&h, (uint16_t)(1 + below(5)), sizeof h);
        if (kind == 1) h.magic ^= 1u << below(32);
        if (kind == 2) h.version = (uint16_t)(2 + below(1000));
        if (kind == 3) h.size = (uint32_t)rnd();
        memcpy(buf, &h, sizeof h);
        size_t n = sizeof h + below(64);
        send_fds(s, buf, kind == 3 ? below(sizeof h) + 1 : n, NULL, 0);
        break;
      }
      case 4: { /* oversized */
        size_t n = 5000 + below(sizeof buf - 5000);
        struct pm_hdr h;
        hdr(&h, PM_MSG_REGISTER, (uint32_t)n);
        memset(buf, 0x41, n);
        memcpy(buf, &h, sizeof h);
        send_fds(s, buf, n, NULL, 0);
        break;
      }
      case 5: case 6: reg(s, 1, (int)below(2)); break;
      case 7: { /* flood of well-framed requests (refused one by one) without reading a reply */
        hello(s, 0);
        unsigned char m[sizeof(struct pm_register) + sizeof(struct pm_range)];
        struct pm_register u = {0};
        struct pm_range r = {0x10000000ull, 4096, PM_MODE_MISSING, -1, 0};
        u.count = 1;
        for (int i = 0; i < 3000; i++) {
          hdr(&u.h, PM_MSG_UNREGISTER, sizeof m);
          memcpy(m, &u, sizeof u);
          memcpy(m + sizeof u, &r, sizeof r);
          if (send_fds(s, m, sizeof m, NULL, 0) < 0) break;
        }
        break;
      }
      case 8: { /* half-closed after part of a session */
        reg(s, (int)below(2), 1);
        shutdown(s, SHUT_WR);
        break;
      }
      case 9: hello(s, 1); hello(s, 0); break; /* a second HELLO */
      case 10: { /* a valid register, then garbage */
        reg(s, 0, 1);
        struct pm_hdr h;
        hdr(&h, PM_MSG_BYE, sizeof h);
        int p[2];
        if (pipe(p) == 0) {
          send_fds(s, &h, sizeof h, p, 2);
          close(p[0]);
          close(p[1]);
        }
        break;
      }
      default: { /* a HELLO that lies about its pid or page size */
        struct pm_hello m = {0};
        hdr(&m.h, PM_MSG_HELLO, sizeof m);
        m.pid = below(2) ? 1 : (uint32_t)getpid();
        m.page_size = below(2) ? 65536 : (uint32_t)sysconf(_SC_PAGESIZE);
        m.pool_pages = (uint32_t)rnd();
        m.flags = (uint32_t)below(4);
        int fd = memfd_of(4096, 0);
        send_fds(s, &m, sizeof m, &fd, (int)below(2));
        close(fd);
        break;
      }
    }
    drain(s, (int)below(20));
    close(s);
  }
  printf("DONE %ld %ld %ld\n", conns, replies, refusals);
  return 0;
}
