#include "fork_device.h"

#include <cerrno>
#include <csetjmp>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../sys/access.h"
#include "../sys/mem.h"
#include "../sys/pagemap.h"
#include "../sys/uapi.h"
#include "../sys/uffd.h"
#include "migrate.h"

namespace pm::engine {

void fork_plan_prepare(ForkPlan* plan) {
  plan->table.assign(plan->npages, 0);
  plan->pagemap.assign(plan->npages, 0);
  plan->slot_used.assign(plan->slots, 0);
}

namespace {

constexpr uint64_t kSwapped = 1ull << 62;

// The child's device. Static storage: the SIGBUS handler reaches it, and what a step recorded
// survives the siglongjmp out of a failed access.
struct Child {
  ForkPlan* plan = nullptr;
  int uffd = -1;
  int uffd_error = 0;
  int pagemap = -1;  // our own /proc/self/pagemap (sys::pagemap_read's shared one has a lock)
  bool has_move = false;
  uint8_t* pool = nullptr;
  uint64_t cursor = 0;
  ForkCounters counters{};
  ForkStepReport report{};
  sigjmp_buf jump;
  volatile sig_atomic_t guarded = 0;
  volatile uint64_t bad_addr = 0;
  uint64_t last_fault = ~0ull;
  unsigned repeats = 0;
};
Child g_child;

uint64_t host(const Child& c, uint64_t i) { return c.plan->start + i * c.plan->page; }
uint8_t* slot_addr(const Child& c, uint64_t s) { return c.pool + s * c.plan->page; }

// A fresh userfaultfd of the child's own: the parent's engine descriptor acts on the parent's mm,
// and its registrations did not follow the fork (it negotiates no EVENT_FORK). SIGBUS mode: the
// child has no second thread to read faults, so a fault is a signal to the faulting thread itself.
int ensure_uffd(Child& c) {
  if (c.uffd >= 0) return 0;
  if (c.uffd_error) return c.uffd_error;
  const uint64_t len = c.plan->npages * c.plan->page, pool_len = c.plan->slots * c.plan->page;
  sys::UffdOpenResult r;
  uint64_t offered = 0;
  int fd = -1;
  void* pool = nullptr;
  int rc = sys::uffd_open(false, false, &r);
  if (rc == 0) {
    // A descriptor negotiates once: the first asks what there is, the second takes it.
    rc = sys::uffd_api(r.fd, 0, &offered, nullptr);
    sys::close_fd(r.fd);
  }
  if (rc == 0 && !(offered & UFFD_FEATURE_SIGBUS)) rc = -EOPNOTSUPP;
  if (rc == 0 && (rc = sys::uffd_open(false, false, &r)) == 0) fd = r.fd;
  if (rc == 0) rc = sys::uffd_api(fd, UFFD_FEATURE_SIGBUS | (offered & (UFFD_FEATURE_MOVE | UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_MISSING_SHMEM)), nullptr, nullptr);
  if (rc == 0) rc = sys::map(&pool, nullptr, pool_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  // UFFDIO_MOVE's destination must be registered: the pool too.
  // A private tmpfs mapping: the hole a moved copied-on-write page leaves lies over the file's
  // page-cache page, and touching it is a MINOR fault, not a MISSING one.
  const uint64_t mode = UFFDIO_REGISTER_MODE_MISSING | (c.plan->private_shmem ? UFFDIO_REGISTER_MODE_MINOR : 0);
  if (rc == 0) rc = sys::uffd_register(fd, c.plan->start, len, mode, nullptr);
  if (rc == 0) rc = sys::uffd_register(fd, reinterpret_cast<uint64_t>(pool), pool_len, UFFDIO_REGISTER_MODE_MISSING, nullptr);
  if (rc) {
    if (pool) sys::unmap(pool, pool_len);
    if (fd >= 0) sys::close_fd(fd);
    return c.uffd_error = rc;
  }
  c.uffd = fd;
  c.pool = static_cast<uint8_t*>(pool);
  c.has_move = (offered & UFFD_FEATURE_MOVE) != 0;
  return 0;
}

bool alloc_slot(Child& c, uint64_t* slot) {
  for (uint64_t k = 0; k < c.plan->slots; k++) {
    const uint64_t s = (c.cursor + k) % c.plan->slots;
    if (!c.plan->slot_used[s]) {
      c.plan->slot_used[s] = 1;
      c.cursor = s + 1;
      *slot = s;
      return true;
    }
  }
  return false;
}

// Page i's data goes from its slot back to its host address (MOVE, else COPY); the slot becomes
// a hole again, as every free slot is (the resolve ioctls fill only holes).
bool move_home(Child& c, uint64_t i, uint64_t e) {
  const uint64_t slot = e >> kSlotShift, page = c.plan->page;
  const uint64_t src = reinterpret_cast<uint64_t>(slot_addr(c, slot)), dst = host(c, i);
  int64_t done = 0;
  int rc = c.has_move ? sys::uffd_move(c.uffd, dst, src, page, 0, &done) : -EOPNOTSUPP;
  if (rc) {
    rc = sys::uffd_copy(c.uffd, dst, src, page, 0, &done);
    if (rc == -EEXIST) {  // mapped meanwhile by something else: the device's copy is the newer data
      std::memcpy(reinterpret_cast<void*>(dst), reinterpret_cast<void*>(src), page);
      rc = 0;
    }
    if (rc == 0) sys::advise(reinterpret_cast<void*>(src), page, MADV_DONTNEED);
  }
  if (rc) return false;
  c.plan->slot_used[slot] = 0;
  return true;
}

// A page of the registered range with nothing mapped, and not in the device's memory: what the
// kernel's own fault would have given (the file's page-cache page of a private tmpfs mapping, else
// the zero page). Our registration turns that fault into SIGBUS.
int fill_hole(Child& c, uint64_t i) {
  int64_t done = 0;
  int rc = -ENOENT;
  if (c.plan->private_shmem) rc = sys::uffd_continue(c.uffd, host(c, i), c.plan->page, 0, &done);
  if (rc && rc != -EEXIST) rc = sys::uffd_zero_fill(c.uffd, host(c, i), c.plan->page, 0, &done, nullptr);
  return rc == -EEXIST ? 0 : rc;
}

// A range fault met such holes (the kernel's fault path raises SIGBUS there: populate fails).
int fill_holes(Child& c, uint64_t a, uint64_t b) {
  if (c.uffd < 0) return -EFAULT;
  uint64_t* pm = c.plan->pagemap.data();
  if (int rc = sys::pagemap_read_fd(c.pagemap, host(c, a), b - a, pm)) return rc;
  for (uint64_t i = a; i < b; i++) {
    if ((pm[i - a] & (sys::kPagemapPresent | kSwapped)) || (c.plan->table[i] & kOnDevice)) continue;
    if (int rc = fill_hole(c, i)) return rc;
  }
  return 0;
}

// The device fault: makes the CPU side of [first, last) present with the access asked for and
// programs the entries (hmm_range_fault, serviced inline: the child has no service thread).
int range_fault(Child& c, uint64_t first, uint64_t last, bool write, int prot) {
  if (!(prot & PROT_READ)) return -EFAULT;
  if (write && !(prot & PROT_WRITE)) return -EPERM;
  c.counters.fault_rounds++;
  uint64_t* t = c.plan->table.data();
  const uint64_t page = c.plan->page;
  for (uint64_t i = first; i < last;) {
    if (t[i] & kOnDevice) {
      i++;
      continue;
    }
    uint64_t j = i;
    while (j < last && !(t[j] & kOnDevice)) j++;
    void* a = reinterpret_cast<void*>(host(c, i));
    const int advice = write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ;
    int rc = sys::advise(a, (j - i) * page, advice);
    if (rc == -EFAULT && c.uffd >= 0 && fill_holes(c, i, j) == 0) rc = sys::advise(a, (j - i) * page, advice);
    if (rc) return rc == -EINVAL ? -EFAULT : rc;
    i = j;
  }
  for (uint64_t k = first; k < last; k++)
    t[k] = (t[k] & (kOnDevice | (~0ull << kSlotShift))) | kValid | (write ? static_cast<uint64_t>(kWrite) : (t[k] & kWrite));
  c.counters.faulted_pages += last - first;
  return 0;
}

// Words are seed + word index within the step's range, as the device kernels write them.
void touch_page(uint64_t* p, uint64_t base, ForkOp op, uint64_t seed, uint64_t words, ForkStepReport* r) {
  volatile uint64_t* w = p;
  switch (op) {
    case ForkOp::kRead:
    case ForkOp::kCpuRead:
      for (uint64_t k = 0; k < words; k++) r->checksum += w[k];
      break;
    case ForkOp::kWrite:
    case ForkOp::kCpuWrite:
      for (uint64_t k = 0; k < words; k++) {
        w[k] = seed + base + k;
        r->checksum += seed + base + k;
      }
      break;
    default:
      for (uint64_t k = 0; k < words; k++) {
        const uint64_t v = w[k];
        r->checksum += v;
        if (v != seed + base + k) r->mismatches++;
      }
      break;
  }
}

void device_access(Child& c, const ForkStep& s, ForkStepReport* r) {
  const bool write = s.op == ForkOp::kWrite;
  const uint64_t last = s.first + s.npages, words = c.plan->page / 8;
  uint64_t* t = c.plan->table.data();
  for (uint64_t i = s.first; i < last; i++) {
    if (!(t[i] & kValid) || (write && !(t[i] & kWrite))) {
      // A miss faults everything from here to the end of the step's range in one round.
      r->faults++;
      if (int rc = range_fault(c, i, last, write, s.prot)) {
        r->error = rc;
        r->error_page = i - s.first;
        return;
      }
    }
    const uint64_t e = t[i];
    auto* p = reinterpret_cast<uint64_t*>((e & kOnDevice) ? slot_addr(c, e >> kSlotShift) : reinterpret_cast<uint8_t*>(host(c, i)));
    touch_page(p, (i - s.first) * words, s.op, s.seed, words, r);
    r->cpages++;
  }
}

void cpu_access(Child& c, const ForkStep& s, ForkStepReport* r) {
  const uint64_t words = c.plan->page / 8;
  for (uint64_t i = s.first; i < s.first + s.npages; i++) {
    touch_page(reinterpret_cast<uint64_t*>(host(c, i)), (i - s.first) * words, s.op, s.seed, words, r);
    r->cpages++;
  }
}

void migrate(Child& c, const ForkStep& s, ForkStepReport* r) {
  if (c.plan->hugetlb || !(s.prot & PROT_READ)) {
    r->error = -EINVAL;  // as the kernel: hugetlb, or a page with no access
    return;
  }
  if (c.plan->shared) {
    r->skipped[static_cast<unsigned>(MigrateSkip::kShared)] = s.npages;
    r->error = -ENOENT;
    return;
  }
  uint64_t* t = c.plan->table.data();
  uint64_t* pm = c.plan->pagemap.data();
  if (int rc = sys::pagemap_read_fd(c.pagemap, host(c, s.first), s.npages, pm)) {
    r->error = rc;
    return;
  }
  int rc = c.plan->private_file && !c.plan->private_shmem ? -EINVAL : ensure_uffd(c);
  if (rc == -EINVAL && c.plan->private_file) {
    // As in the parent: no registration, no way to catch the CPU's touch of a moved page's hole.
    for (uint64_t k = 0; k < s.npages; k++)
      r->skipped[static_cast<unsigned>(sys::pagemap_anon_present(pm[k]) ? MigrateSkip::kUnregistrable : MigrateSkip::kFileBacked)]++;
    r->error = -ENOENT;
    return;
  }
  if (rc) {
    r->error = rc;
    return;
  }
  const uint64_t page = c.plan->page;
  for (uint64_t i = s.first; i < s.first + s.npages; i++) {
    if (t[i] & kOnDevice) {
      r->cpages++;
      continue;
    }
    uint64_t entry = pm[i - s.first];
    if (c.plan->private_file && !sys::pagemap_anon_present(entry)) {
      r->skipped[static_cast<unsigned>(MigrateSkip::kFileBacked)]++;  // the file's page, not the mapping's
      continue;
    }
    uint64_t slot;
    if (!alloc_slot(c, &slot)) {
      r->skipped[static_cast<unsigned>(MigrateSkip::kNoMemory)]++;
      continue;
    }
    const uint64_t h = host(c, i), dst = reinterpret_cast<uint64_t>(slot_addr(c, slot));
    // A swapped-out page has data: bring it in rather than give the device a zero page.
    if ((entry & kSwapped) && sys::advise(reinterpret_cast<void*>(h), page, MADV_POPULATE_READ) == 0) entry |= sys::kPagemapPresent;
    int64_t done = 0;
    int rc;
    if (!(entry & sys::kPagemapPresent)) {
      rc = sys::uffd_zeropage(c.uffd, dst, page, 0, &done);
      if (rc == 0) r->zero_filled++;
    } else {
      // MOVE refuses a page still shared with the parent after fork (EBUSY): copy it, and drop
      // the child's mapping of it (the parent keeps its own).
      // (UFFDIO_MOVE takes anonymous VMAs only: a private file mapping's page is copied too.)
      rc = c.has_move && !c.plan->private_file ? sys::uffd_move(c.uffd, dst, h, page, 0, &done) : -EOPNOTSUPP;
      if (rc == 0) {
        r->by_move++;
      } else if ((rc = sys::uffd_copy(c.uffd, dst, h, page, 0, &done)) == 0) {
        sys::advise(reinterpret_cast<void*>(h), page, MADV_DONTNEED);
        r->by_copy++;
      }
    }
    if (rc) {
      c.plan->slot_used[slot] = 0;
      r->skipped[static_cast<unsigned>(MigrateSkip::kError)]++;
      continue;
    }
    t[i] = (slot << kSlotShift) | kOnDevice | kValid | ((s.prot & PROT_WRITE) ? static_cast<uint64_t>(kWrite) : 0);
    r->moved++;
    r->cpages++;
  }
  c.counters.to_device += r->moved;
  if (r->cpages == 0) r->error = -ENOENT;
}

void migrate_back(Child& c, const ForkStep& s, ForkStepReport* r) {
  uint64_t* t = c.plan->table.data();
  for (uint64_t i = s.first; i < s.first + s.npages; i++) {
    const uint64_t e = t[i];
    if (!(e & kOnDevice)) continue;
    if (!move_home(c, i, e)) {
      r->skipped[static_cast<unsigned>(MigrateSkip::kError)]++;
      continue;
    }
    t[i] = kValid | (e & kWrite);
    r->moved++;
    r->cpages++;
  }
  c.counters.to_host_explicit += r->moved;
}

// The CPU touched a page of the registered range with no page there: one of the device's (it
// comes home, and the device's entry goes, as the device-private page fault does), or a hole
// (fill_hole). False: not ours to resolve.
bool cpu_fault(Child& c, uint64_t addr) {
  if (c.uffd < 0 || addr < c.plan->start || addr >= c.plan->start + c.plan->npages * c.plan->page) return false;
  const uint64_t i = (addr - c.plan->start) / c.plan->page;
  // Resolved, yet faulting again at once: something other than a hole (give up, do not spin).
  if (i == c.last_fault && ++c.repeats > 4) return false;
  if (i != c.last_fault) c.repeats = 0;
  c.last_fault = i;
  const uint64_t e = c.plan->table[i];
  if (e & kOnDevice) {
    if (!move_home(c, i, e)) return false;
    c.plan->table[i] = 0;
    c.counters.to_host_cpu_fault++;
    c.report.cpu_faults++;
    return true;
  }
  return fill_hole(c, i) == 0;
}

void on_sigbus(int, siginfo_t* si, void*) {
  Child& c = g_child;
  const uint64_t a = reinterpret_cast<uint64_t>(si->si_addr);
  if (c.guarded && cpu_fault(c, a)) return;  // the access is retried and finds the page
  if (c.guarded) {
    c.bad_addr = a;
    siglongjmp(c.jump, 1);
  }
  signal(SIGBUS, SIG_DFL);  // not during a step: the default action, on return
}

bool write_all(int fd, const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  while (n) {
    const ssize_t w = ::write(fd, b, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    b += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

}  // namespace

int fork_device_main(void* arg, int fd) {
  Child& c = g_child;
  c.plan = static_cast<ForkPlan*>(arg);
  struct sigaction sa {};
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGBUS, &sa, nullptr);
  sigset_t bus;
  sigemptyset(&bus);
  sigaddset(&bus, SIGBUS);
  ::sigprocmask(SIG_UNBLOCK, &bus, nullptr);
  sys::open_file(&c.pagemap, "/proc/self/pagemap", O_RDONLY | O_CLOEXEC, 0);  // if not, each read says why
  for (size_t k = 0; k < c.plan->steps.size(); k++) {
    const ForkStep& s = c.plan->steps[k];
    c.report = ForkStepReport{};
    c.report.index = static_cast<uint32_t>(k);
    c.last_fault = ~0ull;
    c.repeats = 0;
    const uint64_t t0 = sys::now_ns();
    if (sigsetjmp(c.jump, 1) == 0) {
      c.guarded = 1;
      switch (s.op) {
        case ForkOp::kRead:
        case ForkOp::kWrite:
        case ForkOp::kVerify: device_access(c, s, &c.report); break;
        case ForkOp::kMigrate: migrate(c, s, &c.report); break;
        case ForkOp::kMigrateBack: migrate_back(c, s, &c.report); break;
        default: cpu_access(c, s, &c.report); break;
      }
    } else {
      // A SIGBUS nobody could resolve (a file truncated under a shared mapping, a page that
      // could not come home): this step ends with EFAULT at that page.
      const uint64_t from = host(c, s.first);
      c.report.error = -EFAULT;
      c.report.error_page = c.bad_addr >= from ? (c.bad_addr - from) / c.plan->page : 0;
    }
    c.guarded = 0;
    c.report.elapsed_ns = sys::now_ns() - t0;
    if (!write_all(fd, &c.report, sizeof c.report)) return 2;
  }
  return write_all(fd, &c.counters, sizeof c.counters) ? 0 : 2;
}

}  // namespace pm::engine
