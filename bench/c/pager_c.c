/*
 * pager_c: a plain C user-space pager, the baseline of `pagemirror bench pager`.
 *
 * One userfaultfd, N fill threads reading it, pread + UFFDIO_COPY of one granule per fault, and,
 * with a resident limit, FIFO eviction in the pager's batches (an eighth of the limit): pwrite
 * (write workloads) then MADV_DONTNEED, one call each per run of adjacent granules. No dirty tracking (every evicted granule of a write workload is written) and no
 * protection against a write racing the eviction: the floor of the work, not a safe pager. It
 * keeps the pager's progress rule (docs/pager.md, "Progress"), without which a limit smaller than
 * the threads' granules livelocks: the granule of a thread's last fault is not evicted until that
 * thread faults again or exits (fault messages carry the thread id).
 *
 * Build: by node-gyp (binding.gyp), or gcc -O2 -pthread -o pager_c pager_c.c
 * Usage:
 *   pager_c run FILE --granule G --threads T --fillers N --op read|write --pattern seq|random
 *               [--limit GRANULES] [--seed S] [--spin-us US] [--track-dirty 1]
 *       maps FILE's size in a fresh region, T application threads touch one word per 4 KiB page
 *       of their share (seq: in order; random: as many words of the whole file, at random: the
 *       library's access kernel's sequence for --seed S, default 1, see app()), timed. Prints
 *       {"ns":..,"pages":..,"faults":..,"evictions":..}. --spin-us: each fill thread polls the
 *       descriptor without sleeping for up to US microseconds before it sleeps in poll(), the way
 *       the fault service's fixed polling does (ServeOptions.poll { spinUs }). --track-dirty 1:
 *       the pager's dirty tracking: registered MISSING|WP, a read fault's granule copied in
 *       write-protected, a write to it a WP fault that marks it dirty, and only dirty granules
 *       written back on eviction (write-protected first); without the pager's protection against a
 *       write racing the eviction. Without it every evicted granule of a write workload is written.
 *   pager_c pwrite FILE --granule G --batch B
 *       pwrites the whole file in granules, sync_file_range (wait) after every B granules, the way
 *       the pager writes back under eviction. Prints {"ns":..,"bytes":..}.
 *   pager_c drop FILE
 *       fdatasync, then POSIX_FADV_DONTNEED: the next read comes from the disk.
 * Exit 2 on error with a message on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

static void die(const char *what) {
	fprintf(stderr, "pager_c: %s: %s\n", what, strerror(errno));
	exit(2);
}

static uint64_t now_ns(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int fd_file, uffd, stop_fd;
static uint8_t *base;
static uint64_t size, region, granule, limit, ngran;
static int writing, random_pattern;
static uint64_t spin_ns;
static int track_dirty; /* --track-dirty: the pager's dirty tracking (WP), without its race protection */
static uint8_t *dirty;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static uint8_t *state;     /* 0 absent, 1 filling, 2 resident */
static uint64_t *ring, ring_head, ring_len, resident, faults, evictions;
static uint64_t *victims, batch;

#define MAX_PINS 64
static struct {
	uint32_t tid;
	uint64_t g, seq;
} pins[MAX_PINS];
static int npins;
static uint64_t pin_seq;

static void pin(uint32_t tid, uint64_t g) {
	/* mu held */
	int i, oldest = 0;
	for (i = 0; i < npins; i++) {
		if (pins[i].tid == tid) break;
		if (pins[i].seq < pins[oldest].seq) oldest = i;
	}
	if (i == npins) i = npins < MAX_PINS ? npins++ : oldest;
	pins[i].tid = tid;
	pins[i].g = g;
	pins[i].seq = ++pin_seq;
}

static int pinned(uint64_t g) {
	/* mu held */
	for (int i = 0; i < npins;) {
		char path[48];
		if (pins[i].g != g) {
			i++;
			continue;
		}
		snprintf(path, sizeof(path), "/proc/self/task/%u", pins[i].tid);
		if (access(path, F_OK) == 0) return 1;
		pins[i] = pins[--npins]; /* the thread exited */
	}
	return 0;
}

static int cmp_u64(const void *a, const void *b) {
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* Evicts up to `want` of the oldest resident granules, as the pager does: in one batch (an
 * eighth of the limit), adjacent granules written and dropped with one pwrite and one madvise
 * per run. Returns the granules evicted, 0 if every resident one is pinned. */
static uint64_t evict_batch(uint64_t want) {
	/* mu held */
	uint64_t n = 0;
	for (uint64_t left = ring_len; left > 0 && n < want; left--) {
		uint64_t g = ring[ring_head];
		ring_head = (ring_head + 1) % ngran;
		ring_len--;
		if (state[g] != 2) continue;
		if (pinned(g)) {
			ring[(ring_head + ring_len) % ngran] = g;
			ring_len++;
			continue;
		}
		victims[n++] = g;
	}
	qsort(victims, n, sizeof(*victims), cmp_u64);
	for (uint64_t i = 0; i < n;) {
		uint64_t j = i + 1;
		/* With tracking a run is of granules alike (all dirty or all clean): only dirty ones are
		 * written, write-protected first as the pager does. */
		while (j < n && victims[j] == victims[j - 1] + 1 && (!track_dirty || dirty[victims[j]] == dirty[victims[i]])) j++;
		uint64_t off = victims[i] * granule, len = (j - i) * granule;
		int write_it = writing && (!track_dirty || dirty[victims[i]]);
		if (track_dirty && dirty[victims[i]]) {
			struct uffdio_writeprotect wp = {{(uint64_t)base + off, len}, UFFDIO_WRITEPROTECT_MODE_WP};
			if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp)) die("UFFDIO_WRITEPROTECT");
			for (uint64_t k = i; k < j; k++) dirty[victims[k]] = 0;
		}
		if (write_it && off < size) {
			uint64_t in_file = size - off < len ? size - off : len;
			if (pwrite(fd_file, base + off, in_file, (off_t)off) != (ssize_t)in_file) die("pwrite");
		}
		if (madvise(base + off, len, MADV_DONTNEED)) die("madvise");
		for (uint64_t k = i; k < j; k++) state[victims[k]] = 0;
		i = j;
	}
	resident -= n;
	evictions += n;
	return n;
}

/* The fault service's fixed polling (native/sys/fault_service.cc, FaultService::wait): poll
 * without sleeping, yielding between polls so that a faulter just woken on this CPU runs, until
 * the budget is spent or the thread was off the CPU for longer than the whole budget (a busy
 * CPU: sleeping is then cheaper); then sleep. */
static int wait_for_fault(struct pollfd *p) {
	if (spin_ns) {
		uint64_t t0 = now_ns(), t = t0, before;
		do {
			int pr = poll(p, 2, 0);
			if (pr != 0) return pr;
			sched_yield();
			before = t;
			t = now_ns();
		} while (t - t0 < spin_ns && t - before <= spin_ns);
	}
	return poll(p, 2, -1);
}

static void *filler(void *arg) {
	(void)arg;
	uint8_t *buf = aligned_alloc(4096, granule);
	struct uffd_msg msgs[64];
	struct pollfd p[2] = {{uffd, POLLIN, 0}, {stop_fd, POLLIN, 0}};
	for (;;) {
		if (wait_for_fault(p) < 0 && errno != EINTR) die("poll");
		if (p[1].revents) break;
		ssize_t n = read(uffd, msgs, sizeof(msgs));
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR) continue;
			die("read");
		}
		for (int i = 0; i < (int)(n / (ssize_t)sizeof(msgs[0])); i++) {
			if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
			uint64_t a = msgs[i].arg.pagefault.address & ~4095ull;
			uint64_t g = (a - (uint64_t)base) / granule;
			uint64_t flags = msgs[i].arg.pagefault.flags;
			if (flags & UFFD_PAGEFAULT_FLAG_WP) {
				/* A write to a clean granule: dirty now, writable again (wakes the writer). */
				pthread_mutex_lock(&mu);
				__atomic_fetch_add(&faults, 1, __ATOMIC_RELAXED);
				dirty[g] = 1;
				pthread_mutex_unlock(&mu);
				struct uffdio_writeprotect wp = {{(uint64_t)base + g * granule, granule}, 0};
				ioctl(uffd, UFFDIO_WRITEPROTECT, &wp);
				continue;
			}
			pthread_mutex_lock(&mu);
			__atomic_fetch_add(&faults, 1, __ATOMIC_RELAXED);
			pin(msgs[i].arg.pagefault.feat.ptid, g);
			if (state[g] != 0) {
				pthread_mutex_unlock(&mu);
				if (state[g] == 2) {
					struct uffdio_range r = {a, 4096};
					ioctl(uffd, UFFDIO_WAKE, &r);
				}
				continue;
			}
			state[g] = 1;
			/* Tracking: a write fault's granule goes in writable and dirty, a read fault's
			 * write-protected (clean), as in the pager. */
			int protect = track_dirty && !(flags & UFFD_PAGEFAULT_FLAG_WRITE);
			if (track_dirty && !protect) dirty[g] = 1;
			if (limit)
				while (resident >= limit && evict_batch(resident - limit + 1 > batch ? resident - limit + 1 : batch)) {
				}
			pthread_mutex_unlock(&mu);
			uint64_t off = g * granule;
			uint64_t in_file = off >= size ? 0 : (size - off < granule ? size - off : granule);
			if (in_file && pread(fd_file, buf, in_file, (off_t)off) < 0) die("pread");
			memset(buf + in_file, 0, granule - in_file);
			struct uffdio_copy c = {(uint64_t)base + off, (uint64_t)buf, granule, protect ? UFFDIO_COPY_MODE_WP : 0, 0};
			while (ioctl(uffd, UFFDIO_COPY, &c) && errno == EAGAIN) c.copy = 0;
			pthread_mutex_lock(&mu);
			state[g] = 2;
			resident++;
			ring[(ring_head + ring_len) % ngran] = g;
			ring_len++;
			pthread_mutex_unlock(&mu);
		}
	}
	free(buf);
	return NULL;
}

/* The application threads do exactly what the library's access kernel (native/sys/access.cc) does
 * for the pager's side of the comparison: thread i of T takes accesses [pages*i/T, pages*(i+1)/T);
 * seq: one word at the start of each of those pages; random: as many words drawn from the whole
 * file by xorshift64 seeded seed*0x9E3779B97F4A7C15 + i + 1. So both pagers fault the same pages
 * in the same order per thread; a write stores seed + word index, as the kernel's does. */
struct app {
	uint64_t first, count, index, sum;
	pthread_barrier_t *bar;
};

static uint64_t app_seed = 1;

static void *app(void *arg) {
	struct app *a = arg;
	const uint64_t nwords = size / 8;
	uint64_t rng = app_seed * 0x9E3779B97F4A7C15ull + a->index + 1, sum = 0;
	pthread_barrier_wait(a->bar);
	for (uint64_t i = 0; i < a->count; i++) {
		uint64_t word = (a->first + i) * 512;
		if (random_pattern) {
			rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
			word = rng % nwords;
		}
		volatile uint64_t *w = (volatile uint64_t *)(base + word * 8);
		if (writing) *w = app_seed + word;
		else sum += *w;
	}
	a->sum = sum;
	return NULL;
}

static uint64_t opt(int argc, char **argv, const char *name, uint64_t def) {
	for (int i = 0; i + 1 < argc; i++)
		if (!strcmp(argv[i], name)) return strtoull(argv[i + 1], NULL, 0);
	return def;
}
static const char *sopt(int argc, char **argv, const char *name, const char *def) {
	for (int i = 0; i + 1 < argc; i++)
		if (!strcmp(argv[i], name)) return argv[i + 1];
	return def;
}

int main(int argc, char **argv) {
	if (argc < 3) {
		fprintf(stderr, "usage: pager_c run|pwrite|drop FILE [options]\n");
		return 2;
	}
	const char *cmd = argv[1], *file = argv[2];
	fd_file = open(file, O_RDWR | O_CLOEXEC);
	if (fd_file < 0) die(file);
	struct stat st;
	if (fstat(fd_file, &st)) die("fstat");
	size = (uint64_t)st.st_size;
	granule = opt(argc, argv, "--granule", 65536);
	if (!strcmp(cmd, "drop")) {
		if (fdatasync(fd_file)) die("fdatasync");
		if (posix_fadvise(fd_file, 0, 0, POSIX_FADV_DONTNEED)) die("posix_fadvise");
		printf("{\"dropped\":true}\n");
		return 0;
	}
	if (!strcmp(cmd, "pwrite")) {
		uint64_t batch = opt(argc, argv, "--batch", 1);
		uint8_t *buf = aligned_alloc(4096, granule);
		memset(buf, 7, granule);
		uint64_t t0 = now_ns(), lo = 0, n = 0;
		for (uint64_t off = 0; off < size; off += granule) {
			uint64_t len = size - off < granule ? size - off : granule;
			if (pwrite(fd_file, buf, len, (off_t)off) != (ssize_t)len) die("pwrite");
			if (++n % batch == 0 || off + len >= size) {
				if (sync_file_range(fd_file, (off_t)lo, (off_t)(off + len - lo),
				                    SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER))
					die("sync_file_range");
				lo = off + len;
			}
		}
		printf("{\"ns\":%llu,\"bytes\":%llu}\n", (unsigned long long)(now_ns() - t0), (unsigned long long)size);
		return 0;
	}
	if (strcmp(cmd, "run")) {
		fprintf(stderr, "pager_c: unknown command %s\n", cmd);
		return 2;
	}
	int threads = (int)opt(argc, argv, "--threads", 1), fillers = (int)opt(argc, argv, "--fillers", 1);
	limit = opt(argc, argv, "--limit", 0);
	writing = !strcmp(sopt(argc, argv, "--op", "read"), "write");
	random_pattern = !strcmp(sopt(argc, argv, "--pattern", "seq"), "random");
	app_seed = opt(argc, argv, "--seed", 1);
	spin_ns = opt(argc, argv, "--spin-us", 0) * 1000;
	track_dirty = (int)opt(argc, argv, "--track-dirty", 0);
	region = (size + granule - 1) / granule * granule;
	ngran = region / granule;
	state = calloc(ngran, 1);
	ring = calloc(ngran, sizeof(*ring));
	victims = calloc(ngran, sizeof(*victims));
	dirty = calloc(ngran, 1);
	batch = limit / 8 > 1 ? limit / 8 : 1; /* the pager's eviction batch */
	/* A region aligned to the granule, as the pager's. */
	uint8_t *raw = mmap(NULL, region + granule, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (raw == MAP_FAILED) die("mmap");
	base = (uint8_t *)(((uint64_t)raw + granule - 1) & ~(granule - 1));
	uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
	if (uffd < 0) die("userfaultfd");
	struct uffdio_api api = {UFFD_API, UFFD_FEATURE_THREAD_ID, 0};
	if (ioctl(uffd, UFFDIO_API, &api)) die("UFFDIO_API");
	struct uffdio_register reg = {{(uint64_t)base, region}, UFFDIO_REGISTER_MODE_MISSING | (track_dirty ? UFFDIO_REGISTER_MODE_WP : 0), 0};
	if (ioctl(uffd, UFFDIO_REGISTER, &reg)) die("UFFDIO_REGISTER");
	stop_fd = eventfd(0, EFD_CLOEXEC);
	pthread_t f[64], a[64];
	struct app apps[64];
	if (fillers < 1 || fillers > 64 || threads < 1 || threads > 64) {
		fprintf(stderr, "pager_c: 1-64 threads and fillers\n");
		return 2;
	}
	for (int i = 0; i < fillers; i++) pthread_create(&f[i], NULL, filler, NULL);
	pthread_barrier_t bar;
	pthread_barrier_init(&bar, NULL, (unsigned)threads + 1);
	const uint64_t pages = size / 4096;
	for (int i = 0; i < threads; i++) {
		const uint64_t first = pages * (uint64_t)i / (uint64_t)threads, last = pages * (uint64_t)(i + 1) / (uint64_t)threads;
		apps[i] = (struct app){first, last - first, (uint64_t)i, 0, &bar};
		pthread_create(&a[i], NULL, app, &apps[i]);
	}
	pthread_barrier_wait(&bar);
	uint64_t t0 = now_ns();
	for (int i = 0; i < threads; i++) pthread_join(a[i], NULL);
	uint64_t ns = now_ns() - t0;
	uint64_t one = 1;
	if (write(stop_fd, &one, sizeof(one)) < 0) die("write");
	for (int i = 0; i < fillers; i++) pthread_join(f[i], NULL);
	printf("{\"ns\":%llu,\"pages\":%llu,\"faults\":%llu,\"evictions\":%llu}\n", (unsigned long long)ns,
	       (unsigned long long)pages, (unsigned long long)faults, (unsigned long long)evictions);
	return 0;
}
