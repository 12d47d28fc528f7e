/*
 * uffd_baseline: reference cost of userfaultfd fault round trips in plain C.
 *
 * The handler thread does poll() + read() + one resolving ioctl per fault and
 * nothing else, so the numbers are the floor any higher-level implementation
 * (e.g. the project's Node addon) can be compared against.
 *
 * Build: gcc -O2 -pthread -o uffd_baseline uffd_baseline.c
 * Usage: uffd_baseline <scenario> [--pages N] [--reps R] [--threads T]
 * Output: one JSON object on stdout. Exit 2 on error; exit 0 with
 * {"scenario":..,"skipped":..} when the kernel lacks the needed feature.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* System headers are from Linux 6.1; the running kernel is newer. */
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
struct uffdio_move {
	__u64 dst;
	__u64 src;
	__u64 len;
	__u64 mode;
	__s64 move;
};
#endif
#ifndef UFFDIO_MOVE
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1 << 1)
#endif

#define MSG_BATCH 64   /* uffd_msg per read() */
#define QCAP 256       /* room to read further messages while retrying EAGAIN */
#define ALIGN_2M (2UL << 20)

enum how { R_NONE, R_COPY, R_COPYBLK, R_ZERO, R_MOVE, R_WP, R_CONT };
enum work { W_WRITE, W_READ, W_BATCH, W_BULK, W_MEMCPY };

struct scenario {
	const char *name;
	uint64_t features;  /* UFFDIO_API features the scenario must have */
	uint64_t regmode;   /* UFFDIO_REGISTER mode; 0 = no uffd at all */
	int ioctl_bit;      /* _UFFDIO_* that REGISTER must report for the range */
	enum how how;
	size_t blk;         /* R_COPYBLK block size */
	enum work work;
};

static const struct scenario scenarios[] = {
	{"missing-copy", 0, UFFDIO_REGISTER_MODE_MISSING, _UFFDIO_COPY, R_COPY, 0, W_WRITE},
	{"zeropage", 0, UFFDIO_REGISTER_MODE_MISSING, _UFFDIO_ZEROPAGE, R_ZERO, 0, W_READ},
	{"move", UFFD_FEATURE_MOVE, UFFDIO_REGISTER_MODE_MISSING, _UFFDIO_MOVE, R_MOVE, 0, W_WRITE},
	{"wp", UFFD_FEATURE_PAGEFAULT_FLAG_WP, UFFDIO_REGISTER_MODE_WP, _UFFDIO_WRITEPROTECT, R_WP, 0, W_WRITE},
	{"minor-continue", UFFD_FEATURE_MINOR_SHMEM, UFFDIO_REGISTER_MODE_MINOR, _UFFDIO_CONTINUE, R_CONT, 0, W_READ},
	{"around-64k", 0, UFFDIO_REGISTER_MODE_MISSING, _UFFDIO_COPY, R_COPYBLK, 64UL << 10, W_WRITE},
	{"around-2m", 0, UFFDIO_REGISTER_MODE_MISSING, _UFFDIO_COPY, R_COPYBLK, 2UL << 20, W_WRITE},
	{"bulk-copy", 0, UFFDIO_REGISTER_MODE_MISSING, _UFFDIO_COPY, R_NONE, 0, W_BULK},
	{"memcpy", 0, 0, 0, R_NONE, 0, W_MEMCPY},
	{"batch", 0, UFFDIO_REGISTER_MODE_MISSING, _UFFDIO_COPY, R_COPY, 0, W_BATCH},
};

struct handler {
	int uffd, efd;
	enum how how;
	uintptr_t base, len;  /* registered range, for block clamping/offsets */
	uintptr_t src;        /* COPY: one page; COPYBLK/MOVE: same offsets as dst */
	size_t blk;
	pthread_t tid;
	size_t n;
	struct uffd_msg q[QCAP];
};

static size_t ps;
static const char *scen_name = "?";
static volatile unsigned sink;

static void die(const char *fmt, ...)
{
	va_list ap;
	int e = errno;
	fprintf(stderr, "uffd_baseline %s: ", scen_name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	if (e)
		fprintf(stderr, " (errno %d: %s)", e, strerror(e));
	fputc('\n', stderr);
	exit(2);
}

static void skip(const char *reason)
{
	printf("{\"scenario\":\"%s\",\"skipped\":\"%s\"}\n", scen_name, reason);
	exit(0);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int uffd_open(void)
{
	int fd, dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev >= 0) {
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		close(dev);
		if (fd >= 0)
			return fd;
	}
	fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	/* Unprivileged with vm.unprivileged_userfaultfd=0: user faults only,
	 * which is all this benchmark generates. */
	if (fd < 0 && errno == EPERM)
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
	if (fd < 0)
		die("cannot create userfaultfd");
	return fd;
}

/* UFFDIO_API may only be issued once per fd, so probe on a throwaway fd
 * and then enable exactly the features the scenario needs on a fresh one. */
static int uffd_new(uint64_t want)
{
	struct uffdio_api api = {.api = UFFD_API, .features = 0};
	int fd = uffd_open();
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		die("UFFDIO_API probe");
	close(fd);
	if ((api.features & want) != want)
		skip("kernel lacks required UFFD_FEATURE");
	fd = uffd_open();
	api.api = UFFD_API;
	api.features = want;
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		die("UFFDIO_API features=0x%llx", (unsigned long long)want);
	return fd;
}

/* 2 MiB aligned so 64K/2M blocks never straddle the region edges; THP off so
 * every scenario measures 4 KiB PTE work rather than huge-page splits. */
static char *map_anon(size_t len)
{
	char *raw = mmap(NULL, len + ALIGN_2M, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED)
		die("mmap %zu", len);
	uintptr_t p = ((uintptr_t)raw + ALIGN_2M - 1) & ~(ALIGN_2M - 1);
	if (p > (uintptr_t)raw)
		munmap(raw, p - (uintptr_t)raw);
	size_t tail = (uintptr_t)raw + len + ALIGN_2M - (p + len);
	if (tail)
		munmap((char *)(p + len), tail);
	if (madvise((char *)p, len, MADV_NOHUGEPAGE) < 0)
		die("madvise NOHUGEPAGE");
	return (char *)p;
}

static void uffd_register(int uffd, void *p, size_t len, const struct scenario *sc)
{
	struct uffdio_register r = {
		.range = {.start = (uintptr_t)p, .len = len}, .mode = sc->regmode};
	if (ioctl(uffd, UFFDIO_REGISTER, &r) < 0) {
		if (errno == EINVAL && sc->regmode != UFFDIO_REGISTER_MODE_MISSING)
			skip("UFFDIO_REGISTER mode not supported for this memory");
		die("UFFDIO_REGISTER");
	}
	if (!(r.ioctls & (1ull << sc->ioctl_bit)))
		skip("resolving ioctl not available on registered range");
}

static void wake(struct handler *h, uintptr_t dst, size_t len)
{
	struct uffdio_range r = {.start = dst, .len = len};
	if (ioctl(h->uffd, UFFDIO_WAKE, &r) < 0)
		die("UFFDIO_WAKE");
}

/* EAGAIN means the mm changed under us; the kernel wants pending messages
 * read before a retry can succeed. Append them to the current queue. */
static void drain(struct handler *h)
{
	if (h->n < QCAP) {
		ssize_t r = read(h->uffd, h->q + h->n, (QCAP - h->n) * sizeof h->q[0]);
		if (r > 0)
			h->n += (size_t)r / sizeof h->q[0];
		else if (r < 0 && errno != EAGAIN)
			die("read uffd (drain)");
	}
	sched_yield();
}

static void resolve(struct handler *h, uintptr_t addr)
{
	uintptr_t dst = addr & ~(uintptr_t)(ps - 1), src = 0, len = ps;

	switch (h->how) {
	case R_COPY:
		src = h->src;
		break;
	case R_COPYBLK: {
		uintptr_t end;
		dst = addr & ~(uintptr_t)(h->blk - 1);
		if (dst < h->base)
			dst = h->base;
		end = dst + h->blk;
		if (end > h->base + h->len)
			end = h->base + h->len;
		len = end - dst;
		src = h->src + (dst - h->base);
		break;
	}
	case R_MOVE:
		src = h->src + (dst - h->base);
		break;
	default:
		break;
	}

	for (;;) {
		long long done = 0;
		int rc = -1;
		switch (h->how) {
		case R_COPY:
		case R_COPYBLK: {
			struct uffdio_copy c = {.dst = dst, .src = src, .len = len};
			rc = ioctl(h->uffd, UFFDIO_COPY, &c);
			done = c.copy;
			break;
		}
		case R_ZERO: {
			struct uffdio_zeropage z = {.range = {dst, len}};
			rc = ioctl(h->uffd, UFFDIO_ZEROPAGE, &z);
			done = z.zeropage;
			break;
		}
		case R_MOVE: {
			struct uffdio_move m = {.dst = dst, .src = src, .len = len};
			rc = ioctl(h->uffd, UFFDIO_MOVE, &m);
			done = m.move;
			break;
		}
		case R_WP: {
			struct uffdio_writeprotect w = {.range = {dst, len}, .mode = 0};
			rc = ioctl(h->uffd, UFFDIO_WRITEPROTECT, &w);
			break;
		}
		case R_CONT: {
			struct uffdio_continue c = {.range = {dst, len}};
			rc = ioctl(h->uffd, UFFDIO_CONTINUE, &c);
			done = c.mapped;
			break;
		}
		case R_NONE:
			die("fault in a scenario without a handler");
		}
		if (rc == 0)
			return;
		/* Someone else mapped it; the kernel does not wake on error. */
		if (errno == EEXIST) {
			wake(h, dst, len);
			return;
		}
		if (errno != EAGAIN)
			die("resolve ioctl at 0x%lx len %lu", (unsigned long)dst, (unsigned long)len);
		/* Partial progress is reported in the out field; resume after it. */
		if (done > 0) {
			dst += (uintptr_t)done;
			src += (uintptr_t)done;
			len -= (uintptr_t)done;
		}
		drain(h);
	}
}

static void *handler_main(void *arg)
{
	struct handler *h = arg;
	struct pollfd pf[2] = {{.fd = h->uffd, .events = POLLIN},
			       {.fd = h->efd, .events = POLLIN}};
	for (;;) {
		if (poll(pf, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (pf[0].revents & (POLLERR | POLLHUP))
			die("uffd poll error");
		if (pf[0].revents & POLLIN) {
			ssize_t r = read(h->uffd, h->q, MSG_BATCH * sizeof h->q[0]);
			if (r < 0) {
				if (errno == EAGAIN)
					continue;
				die("read uffd");
			}
			h->n = (size_t)r / sizeof h->q[0];
			for (size_t i = 0; i < h->n; i++) /* n may grow in drain() */
				if (h->q[i].event == UFFD_EVENT_PAGEFAULT)
					resolve(h, (uintptr_t)h->q[i].arg.pagefault.address);
			continue; /* empty the uffd before honouring a stop request */
		}
		if (pf[1].revents & POLLIN)
			return NULL;
	}
}

static void handler_stop(struct handler *h)
{
	uint64_t one = 1;
	if (write(h->efd, &one, sizeof one) != sizeof one)
		die("eventfd write");
	pthread_join(h->tid, NULL);
	if (read(h->efd, &one, sizeof one) != sizeof one) /* reset for next rep */
		die("eventfd read");
}

static void touch_write(char *p, size_t pages)
{
	volatile char *v = p;
	for (size_t i = 0; i < pages; i++)
		v[i * ps] = 1;
}

static void touch_read(char *p, size_t pages)
{
	volatile char *v = p;
	unsigned s = 0;
	for (size_t i = 0; i < pages; i++)
		s += (unsigned char)v[i * ps];
	sink = s;
}

/* Batch state is shared read-only by the workers; one batch runs at a time. */
static struct {
	pthread_barrier_t bar;
	char *dst;
	size_t threads, rounds;
} bt;

static void *batch_worker(void *arg)
{
	size_t idx = (size_t)(uintptr_t)arg;
	for (size_t r = 0; r < bt.rounds; r++) {
		pthread_barrier_wait(&bt.bar);
		((volatile char *)bt.dst)[(r * bt.threads + idx) * ps] = 1;
	}
	pthread_barrier_wait(&bt.bar);
	return NULL;
}

/* Each round's barrier also guarantees the previous round fully resolved,
 * so every round is T genuinely concurrent faults on fresh pages. */
static uint64_t run_batch(char *dst, size_t threads, size_t rounds)
{
	pthread_t *tids = calloc(threads, sizeof *tids);
	pthread_attr_t attr;
	uint64_t t0, t1;

	if (!tids)
		die("calloc");
	bt.dst = dst;
	bt.threads = threads;
	bt.rounds = rounds;
	if (pthread_barrier_init(&bt.bar, NULL, (unsigned)threads + 1) != 0)
		die("pthread_barrier_init");
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 64 << 10);
	for (size_t i = 0; i < threads; i++)
		if (pthread_create(&tids[i], &attr, batch_worker, (void *)(uintptr_t)i) != 0)
			die("pthread_create worker %zu", i);
	t0 = now_ns();
	for (size_t r = 0; r <= rounds; r++)
		pthread_barrier_wait(&bt.bar);
	t1 = now_ns();
	for (size_t i = 0; i < threads; i++)
		pthread_join(tids[i], NULL);
	pthread_attr_destroy(&attr);
	pthread_barrier_destroy(&bt.bar);
	free(tids);
	return t1 - t0;
}

/* One rep: fresh mappings, register, time only the work, tear down. */
static uint64_t run_rep(const struct scenario *sc, int uffd, int efd,
			size_t pages, size_t threads)
{
	size_t len = pages * ps;
	char *dst = NULL, *src = NULL, *alias = NULL;
	int memfd = -1;
	uint64_t t0, t1;
	struct handler *h = NULL;

	if (sc->work == W_MEMCPY) {
		dst = map_anon(len);
		src = map_anon(len);
		memset(src, 0x5a, len);
		memset(dst, 0, len); /* exclude first-touch faults on dst */
		t0 = now_ns();
		memcpy(dst, src, len);
		__asm__ volatile("" ::"r"(dst) : "memory");
		t1 = now_ns();
		munmap(dst, len);
		munmap(src, len);
		return t1 - t0;
	}

	if (sc->how == R_CONT) {
		memfd = memfd_create("uffd_baseline", MFD_CLOEXEC);
		if (memfd < 0)
			die("memfd_create");
		if (ftruncate(memfd, (off_t)len) < 0)
			die("ftruncate");
		dst = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
		alias = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
		if (dst == MAP_FAILED || alias == MAP_FAILED)
			die("mmap memfd");
		/* Page cache populated through the alias so dst takes minor faults. */
		memset(alias, 0x5a, len);
	} else {
		dst = map_anon(len);
	}

	switch (sc->how) {
	case R_COPY:
		src = map_anon(ps);
		memset(src, 0x5a, ps);
		break;
	case R_COPYBLK:
	case R_MOVE:
		src = map_anon(len);
		memset(src, 0x5a, len);
		break;
	case R_WP:
		memset(dst, 0x5a, len); /* WP needs present pages to protect */
		break;
	default:
		if (sc->work == W_BULK) {
			src = map_anon(len);
			memset(src, 0x5a, len);
		}
		break;
	}

	uffd_register(uffd, dst, len, sc);
	if (sc->how == R_WP) {
		struct uffdio_writeprotect w = {
			.range = {(uintptr_t)dst, len}, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
		if (ioctl(uffd, UFFDIO_WRITEPROTECT, &w) < 0)
			die("UFFDIO_WRITEPROTECT (protect)");
	}

	if (sc->how != R_NONE) {
		h = calloc(1, sizeof *h);
		if (!h)
			die("calloc");
		*h = (struct handler){.uffd = uffd, .efd = efd, .how = sc->how,
				      .base = (uintptr_t)dst, .len = len,
				      .src = (uintptr_t)src, .blk = sc->blk};
		if (pthread_create(&h->tid, NULL, handler_main, h) != 0)
			die("pthread_create handler");
	}

	switch (sc->work) {
	case W_WRITE:
		t0 = now_ns();
		touch_write(dst, pages);
		t1 = now_ns();
		break;
	case W_READ:
		t0 = now_ns();
		touch_read(dst, pages);
		t1 = now_ns();
		break;
	case W_BATCH:
		t0 = 0;
		t1 = run_batch(dst, threads, pages / threads);
		break;
	case W_BULK: {
		uintptr_t d = (uintptr_t)dst, s = (uintptr_t)src, n = len;
		t0 = now_ns();
		while (n) {
			struct uffdio_copy c = {.dst = d, .src = s, .len = n};
			if (ioctl(uffd, UFFDIO_COPY, &c) == 0)
				break;
			if (errno != EAGAIN)
				die("UFFDIO_COPY bulk");
			if (c.copy > 0) { /* partial: continue after what landed */
				d += (uintptr_t)c.copy;
				s += (uintptr_t)c.copy;
				n -= (uintptr_t)c.copy;
			}
		}
		t1 = now_ns();
		break;
	}
	default:
		die("unreachable");
	}

	if (h) {
		handler_stop(h);
		free(h);
	}
	/* munmap of a registered range unregisters it implicitly. */
	munmap(dst, len);
	if (alias)
		munmap(alias, len);
	if (memfd >= 0)
		close(memfd);
	if (src)
		munmap(src, sc->how == R_COPY ? ps : len);
	return t1 - t0;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static size_t parse_pos(const char *opt, const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || *end || !*s || v == 0 || v > (1ull << 30))
		die("bad value for %s: '%s'", opt, s);
	return (size_t)v;
}

int main(int argc, char **argv)
{
	const struct scenario *sc = NULL;
	size_t pages = 4096, reps = 7, threads = 64;
	int uffd = -1, efd = -1;

	if (argc < 2) {
		fprintf(stderr, "usage: %s <scenario> [--pages N] [--reps R] [--threads T]\n", argv[0]);
		return 2;
	}
	scen_name = argv[1];
	for (size_t i = 0; i < sizeof scenarios / sizeof scenarios[0]; i++)
		if (!strcmp(argv[1], scenarios[i].name))
			sc = &scenarios[i];
	errno = 0;
	if (!sc)
		die("unknown scenario");
	for (int i = 2; i < argc; i += 2) {
		size_t *dst = !strcmp(argv[i], "--pages") ? &pages
			    : !strcmp(argv[i], "--reps")  ? &reps
			    : !strcmp(argv[i], "--threads") ? &threads : NULL;
		errno = 0;
		if (!dst)
			die("unknown option %s", argv[i]);
		if (i + 1 >= argc)
			die("missing value for %s", argv[i]);
		*dst = parse_pos(argv[i], argv[i + 1]);
	}

	ps = (size_t)sysconf(_SC_PAGESIZE);
	if (sc->work == W_BATCH) /* whole rounds of T fresh pages */
		pages = (pages + threads - 1) / threads * threads;
	if (sc->blk == (2UL << 20)) { /* >= 16 MiB of whole 2 MiB blocks */
		size_t per = (2UL << 20) / ps;
		if (pages < (16UL << 20) / ps)
			pages = (16UL << 20) / ps;
		pages = (pages + per - 1) / per * per;
	}

	if (sc->regmode) {
		uffd = uffd_new(sc->features);
		efd = eventfd(0, EFD_CLOEXEC);
		if (efd < 0)
			die("eventfd");
	}

	double *samples = calloc(reps, sizeof *samples);
	double *sorted = calloc(reps, sizeof *sorted);
	if (!samples || !sorted)
		die("calloc");
	for (size_t r = 0; r < reps; r++)
		samples[r] = (double)run_rep(sc, uffd, efd, pages, threads) / (double)pages;
	memcpy(sorted, samples, reps * sizeof *sorted);
	qsort(sorted, reps, sizeof *sorted, cmp_double);
	double median = reps % 2 ? sorted[reps / 2]
				 : (sorted[reps / 2 - 1] + sorted[reps / 2]) / 2;

	printf("{\"scenario\":\"%s\",\"pageSize\":%zu,\"pages\":%zu,\"reps\":%zu,",
	       sc->name, ps, pages, reps);
	if (sc->work == W_BATCH)
		printf("\"threads\":%zu,", threads);
	printf("\"samplesNsPerPage\":[");
	for (size_t r = 0; r < reps; r++)
		printf("%s%.1f", r ? "," : "", samples[r]);
	printf("],\"medianNsPerPage\":%.1f,\"minNsPerPage\":%.1f,\"maxNsPerPage\":%.1f}\n",
	       median, sorted[0], sorted[reps - 1]);
	free(samples);
	free(sorted);
	if (uffd >= 0)
		close(uffd);
	if (efd >= 0)
		close(efd);
	return 0;
}
