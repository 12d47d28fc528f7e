/* pagemirror_client_demo: a process that hands memory to a fault server and checks its data.
 *   pagemirror_client_demo SOCKET PAGES alloc|attach|detach|hammer [READ_DELAY_US | HAMMER_MS [THREADS]]
 * Connects, gets PAGES pages (pm_alloc, or anonymous memory through pm_attach), writes a pattern
 * to every page, prints "READY <address> <bytes>", waits for a line on stdin, then reads every page
 * back and writes a second pattern (sleeping READ_DELAY_US between pages), reads that back, and
 * prints "OK <bad words> <server lost 0|1>", then "CLOSED <pm_close result>". detach: memory of
 * pm_alloc taken back with pm_detach after the line on stdin, before reading. hammer: after the
 * line, adds 1 to the first word of each page in turn for HAMMER_MS milliseconds (read-modify-write:
 * a lost write stays lost), with THREADS threads (default 1) each taking every THREADS-th page,
 * then counts pages whose word is not the number of additions. Any failed call
 * prints "ERR <call> <errno>" and exits 1. The test suite drives it (test/fault-server.test.ts). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "pagemirror_client.h"

static uint64_t word(uint64_t seed, uint64_t page, uint64_t i) { return seed * 0x9E3779B97F4A7C15ull + page * 1000003ull + i; }

static void fill(uint64_t *p, uint64_t pages, uint64_t words, uint64_t seed, unsigned delay_us) {
  for (uint64_t g = 0; g < pages; g++) {
    for (uint64_t i = 0; i < words; i += 64) p[g * words + i] = word(seed, g, i);
    if (delay_us) usleep(delay_us);
  }
}

static uint64_t check(const volatile uint64_t *p, uint64_t pages, uint64_t words, uint64_t seed, unsigned delay_us) {
  uint64_t bad = 0;
  for (uint64_t g = 0; g < pages; g++) {
    for (uint64_t i = 0; i < words; i += 64)
      if (p[g * words + i] != word(seed, g, i)) bad++;
    if (delay_us) usleep(delay_us);
  }
  return bad;
}

#define HAMMER_MAX_THREADS 16

/* One hammering thread: adds 1 to the first word of pages t, t + T, t + 2T, ... in turn, for ms
 * milliseconds (so no two threads write one word, and each page's count is exact). */
struct hammer {
  volatile uint64_t *p;
  uint64_t *adds, pages, words;
  unsigned t, threads, ms;
};

static void *hammer(void *arg) {
  struct hammer *h = arg;
  struct timespec t0, t;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  do {
    for (uint64_t g = h->t; g < h->pages; g += h->threads) {
      h->p[g * h->words] = h->p[g * h->words] + 1;
      h->adds[g]++;
    }
    clock_gettime(CLOCK_MONOTONIC, &t);
  } while ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 < (long)h->ms);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s SOCKET PAGES alloc|attach|detach|hammer [READ_DELAY_US | HAMMER_MS [THREADS]]\n", argv[0]);
    return 2;
  }
  setvbuf(stdout, NULL, _IONBF, 0);
  const uint64_t pages = strtoull(argv[2], NULL, 10);
  const unsigned delay = argc > 4 ? (unsigned)strtoul(argv[4], NULL, 10) : 0;
  const unsigned threads = argc > 5 ? (unsigned)strtoul(argv[5], NULL, 10) : 1;
  if (threads < 1 || threads > HAMMER_MAX_THREADS) {
    fprintf(stderr, "THREADS must be 1..%d\n", HAMMER_MAX_THREADS);
    return 2;
  }
  const uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE), words = page / 8, bytes = pages * page;
  pm_client *c;
  int rc = pm_connect(argv[1], 0, &c);
  if (rc) {
    printf("ERR pm_connect %d\n", -rc);
    return 1;
  }
  void *mem;
  if (strcmp(argv[3], "attach") == 0) {
    mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return 1;
    rc = pm_attach(c, mem, bytes);
  } else {
    rc = pm_alloc(c, bytes, 0, &mem);
  }
  if (rc) {
    printf("ERR %s %d\n", argv[3], -rc);
    return 1;
  }
  fill(mem, pages, words, 1, 0);
  printf("READY %#llx %llu\n", (unsigned long long)(uintptr_t)mem, (unsigned long long)bytes);
  char line[64];
  if (!fgets(line, sizeof line, stdin)) return 1;
  if (strcmp(argv[3], "detach") == 0 && (rc = pm_detach(c, mem, bytes)) != 0) {
    printf("ERR pm_detach %d\n", -rc);
    return 1;
  }
  uint64_t bad = check(mem, pages, words, 1, strcmp(argv[3], "hammer") == 0 ? 0 : delay);
  if (strcmp(argv[3], "hammer") == 0) {
    volatile uint64_t *p = mem;
    uint64_t *adds = calloc(pages, sizeof *adds), *base = calloc(pages, sizeof *base);
    for (uint64_t g = 0; g < pages; g++) base[g] = p[g * words];
    struct hammer h[HAMMER_MAX_THREADS];
    pthread_t t[HAMMER_MAX_THREADS];
    for (unsigned i = 0; i < threads; i++) {
      h[i] = (struct hammer){p, adds, pages, words, i, threads, delay};
      if (pthread_create(&t[i], NULL, hammer, &h[i])) {
        printf("ERR pthread_create 0\n");
        return 1;
      }
    }
    for (unsigned i = 0; i < threads; i++) pthread_join(t[i], NULL);
    for (uint64_t g = 0; g < pages; g++)
      if (p[g * words] != base[g] + adds[g]) bad++;
    printf("OK %llu %d\n", (unsigned long long)bad, pm_server_lost(c));
    printf("CLOSED %d\n", pm_close(c));
    return bad ? 1 : 0;
  }
  fill(mem, pages, words, 2, delay);
  bad += check(mem, pages, words, 2, 0);
  printf("OK %llu %d\n", (unsigned long long)bad, pm_server_lost(c));
  rc = pm_close(c);
  printf("CLOSED %d\n", rc);
  return bad ? 1 : 0;
}
