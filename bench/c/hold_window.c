/* hold_window: what holding other threads' writes (native/client/pm_hold.h) adds to the window in
 * which a range changes hands (docs/attach.md, "Writes while a range changes hands"), per MiB.
 *
 * For each size and state (resident: every page written first; untouched), each rep takes a fresh
 * pm_alloc range back from the server (pm_detach, not timed) and times, as the preload shim does:
 * the release's window without the hold (copy into private memory, mremap over the range) and with
 * it (hold, copy, mremap, release); the hold alone on the shared range and on the private range it
 * became; and pm_adopt, which holds, copies the resident pages into a new memfd and maps it.
 *
 * Build (after node-gyp built the client library):
 *   cc -O2 -I native/client -o hold_window bench/c/hold_window.c build/Release/pagemirror_client.a -pthread
 * Run against a server:  pagemirror serve --socket /tmp/hw.sock &  ./hold_window /tmp/hw.sock [MIB...]
 * Output: one line per size and state, medians of REPS reps in ms per MiB. Exit 1 on an error. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "pagemirror_client.h"
#include "pm_hold.h"

#define REPS 11

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}
static int by_value(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}
static double median(double *v) {
  qsort(v, REPS, sizeof *v, by_value);
  return v[REPS / 2];
}
static int fail(const char *what, int rc) {
  fprintf(stderr, "hold_window: %s: %s\n", what, strerror(-rc));
  return 1;
}

/* The release's window on [p, p + len): copy into private memory and move it over the range. */
static double release_window(pm_client *c, void *p, size_t len, int hold) {
  const double t0 = now_ms();
  void *tmp = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  struct pm_write_hold h = {.uffd = -1};
  if (hold) pm_hold_writes(c, p, len, 1, &h);
  memcpy(tmp, p, len);
  mremap(tmp, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, p);
  pm_release_writes(&h);
  return now_ms() - t0;
}

static double hold_alone(pm_client *c, void *p, size_t len, int shared, int *rc) {
  struct pm_write_hold h;
  const double t0 = now_ms();
  *rc = pm_hold_writes(c, p, len, shared, &h);
  pm_release_writes(&h);
  return now_ms() - t0;
}

int main(int argc, char **argv) {
  if (argc < 2) return fail("usage: hold_window SOCKET [MIB...]", -22);
  pm_client *c;
  int rc = pm_connect(argv[1], 0, &c);
  if (rc) return fail("connect", rc);
  const char *deflt[] = {"4", "64"};
  const char **sizes = argc > 2 ? (const char **)argv + 2 : deflt;
  const int nsizes = argc > 2 ? argc - 2 : 2;
  for (int si = 0; si < nsizes; si++) {
    const size_t mib = (size_t)atol(sizes[si]), len = mib << 20;
    for (int resident = 0; resident < 2 && mib; resident++) {
      double unheld[REPS], held[REPS], shared[REPS], anon[REPS], adopt[REPS];
      for (int r = 0; r < REPS; r++) {
        for (int hold = 0; hold < 2; hold++) {
          void *p;
          if ((rc = pm_alloc(c, len, 0, &p))) return fail("pm_alloc", rc);
          if (resident) memset(p, 1, len);
          if ((rc = pm_detach(c, p, len))) return fail("pm_detach", rc);
          if (hold) {
            shared[r] = hold_alone(c, p, len, 1, &rc);
            if (rc) return fail("hold on shared memory", rc);
          }
          (hold ? held : unheld)[r] = release_window(c, p, len, hold);
          if (hold) {
            if (!resident) madvise(p, len, MADV_DONTNEED); /* the copy wrote every page */
            anon[r] = hold_alone(c, p, len, 0, &rc);
            if (rc) return fail("hold on anonymous memory", rc);
            const double t0 = now_ms();
            if ((rc = pm_adopt(c, p, len))) return fail("pm_adopt", rc);
            adopt[r] = now_ms() - t0;
            if ((rc = pm_take_hold_error(c))) return fail("pm_adopt held nothing", rc);
            pm_detach(c, p, len);
          }
          munmap(p, len);
        }
      }
      printf("%zu MiB %s, ms per MiB (median of %d): release window without hold %.3f, with hold %.3f; hold alone on shared %.4f, on anonymous %.4f; pm_adopt %.3f\n",
             mib, resident ? "resident" : "untouched", REPS, median(unheld) / mib, median(held) / mib, median(shared) / mib, median(anon) / mib,
             median(adopt) / mib);
    }
  }
  return pm_close(c) ? 1 : 0;
}
