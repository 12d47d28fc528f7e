#include "engine.h"

#include <algorithm>
#include <atomic>
#include <cerrno>

#include "../sys/mem.h"
#include "../sys/uapi.h"
#include "../sys/uffd.h"
#include "device.h"
#include "migrate.h"
#include "mirror.h"

namespace pm::engine {

Engine& Engine::get() {
  static Engine* e = new Engine();  // deliberately never destroyed: its thread lives until exit
  return *e;
}

int Engine::ensure() {
  {
    // Once open, config_mu_ is not taken here: a caller may hold a mirror's change mutex, which a
    // worker that configure() is joining may be waiting for.
    std::lock_guard<std::mutex> lock(mu_);
    if (fd_ >= 0) return 0;
  }
  // Opening: no worker exists yet, so nothing can wait on this; configure() must not see half of it.
  std::lock_guard<std::mutex> config(config_mu_);
  std::lock_guard<std::mutex> lock(mu_);
  if (fd_ >= 0) return 0;
  if (open_error_) return open_error_;
  sys::UffdOpenResult r;
  int rc = sys::uffd_open(true, false, &r);
  if (rc) return open_error_ = rc;
  uint64_t offered = 0;
  // The first UFFDIO_API asks for nothing to learn what there is; a descriptor negotiates once,
  // so the real one is a second descriptor.
  rc = sys::uffd_api(r.fd, 0, &offered, nullptr);
  sys::close_fd(r.fd);
  if (rc) return open_error_ = rc;
  if (!(offered & UFFD_FEATURE_PAGEFAULT_FLAG_WP)) return open_error_ = -EOPNOTSUPP;
  uint64_t want = UFFD_FEATURE_PAGEFAULT_FLAG_WP | (offered & (UFFD_FEATURE_MOVE | UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_POISON |
                                                               UFFD_FEATURE_WP_HUGETLBFS_SHMEM));
  rc = sys::uffd_open(true, false, &r);
  if (rc) return open_error_ = rc;
  rc = sys::uffd_api(r.fd, want, nullptr, nullptr);
  if (rc) {
    sys::close_fd(r.fd);
    return open_error_ = rc;
  }
  has_move_ = (want & UFFD_FEATURE_MOVE) != 0;
  user_mode_only_ = r.user_mode_only;
  service_ = std::make_unique<sys::FaultService>(r.fd, sys::page_size());
  rc = service_->start(this, 64, workers_, poll_);
  if (rc) {
    service_.reset();
    sys::close_fd(r.fd);
    return open_error_ = rc;
  }
  fd_ = r.fd;
  return 0;
}

int Engine::configure(unsigned workers, sys::PollOptions poll) {
  if (workers < 1 || workers > sys::FaultService::kMaxWorkers || poll.spin_us > sys::FaultService::kMaxSpinUs) return -EINVAL;
  std::lock_guard<std::mutex> config(config_mu_);
  workers_ = workers;
  poll_ = poll;
  // service_ is set once, by ensure() under config_mu_: safe to use without mu_, which the workers
  // take and must stay free while they are joined.
  if (!service_) return 0;
  service_->stop();  // no rules here: every fault a worker read is handled before it stops
  int rc = service_->start(this, 64, workers_, poll_);
  if (rc && service_->start(this, 64, 1, {}) == 0) workers_ = 1, poll_ = {};  // never left unserved
  return rc;
}

sys::ServiceStats Engine::stats() {
  std::lock_guard<std::mutex> config(config_mu_);
  return service_ ? service_->stats() : sys::ServiceStats{};
}

std::vector<sys::ServiceStats> Engine::worker_stats() {
  std::lock_guard<std::mutex> config(config_mu_);
  return service_ ? service_->worker_stats() : std::vector<sys::ServiceStats>{};
}

uint64_t Engine::next_owner_id() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1);
}

int Engine::register_range(uint64_t start, uint64_t len, uint64_t owner, bool minor) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const Range& r : registered_)
    if (r.start == start && r.len == len && r.owner == owner) {
      registered_.push_back(r);  // counted: one entry per user
      return 0;
    }
  // Re-registering a range this descriptor already has is allowed (the kernel updates the mode);
  // a fresh mapping at a reused address needs it.
  const uint64_t mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP | (minor ? UFFDIO_REGISTER_MODE_MINOR : 0);
  int rc = sys::uffd_register(fd_, start, len, mode, nullptr);
  if (rc) return rc;
  registered_.push_back({start, len, owner});
  return 0;
}

void Engine::unregister_range(uint64_t start, uint64_t len, uint64_t owner, bool still_mapped) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = std::find_if(registered_.begin(), registered_.end(),
                         [&](const Range& r) { return r.start == start && r.len == len && r.owner == owner; });
  if (it == registered_.end()) return;
  registered_.erase(it);
  for (const Range& r : registered_)
    if (r.start < start + len && start < r.start + r.len) return;  // someone still needs (part of) it
  if (still_mapped) sys::uffd_unregister(fd_, start, len);  // ENOMEM/EINVAL once unmapped: nothing left to undo
}

void Engine::add_mirror(Mirror* m) {
  std::lock_guard<std::mutex> lock(mu_);
  mirrors_.push_back(m);
}

void Engine::remove_mirror(Mirror* m) {
  std::lock_guard<std::mutex> lock(mu_);
  mirrors_.erase(std::remove(mirrors_.begin(), mirrors_.end(), m), mirrors_.end());
}

void Engine::track(Mirror* m) {
  std::lock_guard<std::mutex> lock(mu_);
  all_.push_back(m);
}

void Engine::untrack(Mirror* m) {
  std::lock_guard<std::mutex> lock(mu_);
  all_.erase(std::remove(all_.begin(), all_.end(), m), all_.end());
}

namespace {
thread_local std::vector<Mirror*>* tl_holding = nullptr;
}

Engine::Holding::~Holding() {
  locks_.clear();
  for (Mirror* m : mirrors) m->release();
  tl_holding = nullptr;
}

void Engine::lock_into(Holding& h, Mirror* self, uint64_t start, uint64_t end) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (Mirror* m : all_)
      if (m == self || (m->start() < end && start < m->start() + m->npages() * m->page())) {
        m->acquire();
        h.mirrors.push_back(m);
      }
  }
  std::sort(h.mirrors.begin(), h.mirrors.end());
  for (Mirror* m : h.mirrors) h.locks_.emplace_back(m->change_mutex());
}

Engine::Holding Engine::lock_covering(Mirror* self, uint64_t start, uint64_t end) {
  Holding h;
  lock_into(h, self, start, end);
  tl_holding = &h.mirrors;
  return h;
}

Engine::Holding Engine::lock_pages(Mirror* self, uint64_t first, uint64_t last) {
  Holding h;
  for (;;) {
    const uint64_t at = self->start();
    lock_into(h, self, at + first * self->page(), at + last * self->page());
    // A remap moves a mirror only under its change mutex, ours now: if it moved before we had it,
    // the mirrors were chosen at the old address.
    if (self->start() == at) break;
    h.locks_.clear();
    for (Mirror* m : h.mirrors) m->release();
    h.mirrors.clear();
  }
  tl_holding = &h.mirrors;
  return h;
}

bool Engine::holds(Mirror* m) {
  return tl_holding && std::find(tl_holding->begin(), tl_holding->end(), m) != tl_holding->end();
}

void Engine::before_fork() {
  std::vector<Mirror*> all;
  {
    std::lock_guard<std::mutex> lock(mu_);
    all = all_;
    for (Mirror* m : all) m->acquire();
  }
  struct Release {
    std::vector<Mirror*>& v;
    ~Release() {
      for (Mirror* m : v) m->release();
    }
  } guard{all};
  for (Mirror* m : all) {
    MigrateToHost::range(m, 0, m->npages(), Trigger::kFork);
    if (!m->region()->shared) m->invalidate_whole(InvalidateCause::kFork);
  }
}

void Engine::bring_home(const Region* r) {
  std::vector<Mirror*> ms;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (Mirror* m : all_)
      if (m->region() == r) {
        m->acquire();
        ms.push_back(m);
      }
  }
  for (Mirror* m : ms) {
    MigrateToHost::range(m, 0, m->npages(), Trigger::kRelease);
    m->release();
  }
}

int Engine::registered_mirrors(const Region* r) {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(std::count_if(mirrors_.begin(), mirrors_.end(), [&](Mirror* m) { return m->region() == r; }));
}

void Engine::region_mirrors(const Region* r, int* total, int* single_writers) {
  std::lock_guard<std::mutex> lock(mu_);
  *total = *single_writers = 0;
  for (Mirror* m : all_)
    if (m->region() == r && !m->dead()) {
      ++*total;
      if (m->single_writer() || m->file_copies()) ++*single_writers;
    }
}

bool Engine::owned_by_other(Mirror* self, uint64_t addr) {
  std::lock_guard<std::mutex> lock(mu_);
  for (Mirror* m : mirrors_)
    if (m != self && m->covers(addr) && (m->entry(m->index_of(addr)) & kOnDevice)) return true;
  return false;
}

bool Engine::pinned_by_other(Mirror* self, uint64_t addr) {
  std::lock_guard<std::mutex> lock(mu_);
  for (Mirror* m : all_)
    if (m != self && m->pinned() && m->covers(addr)) return true;
  return false;
}

std::vector<Mirror*> Engine::hold_others(Mirror* self, uint64_t addr) {
  std::vector<Mirror*> others;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (Mirror* m : all_)
      if (m != self && m->covers(addr) && !m->pinned()) {
        m->acquire();
        others.push_back(m);
      }
  }
  for (Mirror* m : others) m->hold_page(m->index_of(addr));
  return others;
}

void Engine::release_others(const std::vector<Mirror*>& held) {
  for (Mirror* m : held) {
    m->release_page();
    m->release();
  }
}

// The engine's descriptor negotiates no events (EVENT_FORK in particular), so no fork waits on these
// threads and the handler may allocate. With several workers, handlers run concurrently: each
// takes mu_ only to list the covering mirrors, then their change mutexes in address order (as
// lock_covering() does), so two handlers, or a handler and a migration, cannot deadlock.
void Engine::on_batch(const sys::FaultMsg* faults, size_t n, const sys::EventMsg*, size_t) {
  for (size_t i = 0; i < n; i++) handle(faults[i]);
}

// A CPU fault on a range the engine registered. The owner of a device-resident page brings it
// back (that wakes the faulter); otherwise it is an ordinary first touch (a zero page) or a write
// that met the copy path's write protection after the page had already gone (un-protect).
void Engine::handle(const sys::FaultMsg& f) {
  const uint64_t page = f.address & ~(sys::page_size() - 1);
  std::vector<Mirror*> covering;
  struct Release {
    std::vector<Mirror*>& v;
    ~Release() {
      for (Mirror* m : v) m->release();
    }
  } guard{covering};
  // Decide and resolve under every covering mirror's change mutex (in address order, so two
  // handlers or a migration cannot deadlock): a migration or invalidation must not run between
  // "nobody owns this page" and the zero-fill or un-protect that follows, or a write-protect
  // lifted here could let a CPU write slip past a copy in progress.
  std::vector<std::unique_lock<std::mutex>> locks;
  auto unlisted = [&](Mirror* m) { return m->covers(page) && std::find(covering.begin(), covering.end(), m) == covering.end(); };
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (Mirror* m : mirrors_)
        if (m->covers(page)) {
          m->acquire();  // a mirror closing meanwhile waits for this before it goes
          covering.push_back(m);
        }
    }
    std::sort(covering.begin(), covering.end());
    for (Mirror* m : covering) locks.emplace_back(m->change_mutex());
    // A mirror that moved here (mremap re-bases a region's mirrors one by one) after the list was
    // made is not locked, and its device page could be taken for a first touch: list again.
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (std::none_of(mirrors_.begin(), mirrors_.end(), unlisted)) break;
    }
    locks.clear();
    for (Mirror* m : covering) m->release();
    covering.clear();
  }
  // A mirror moved by mremap before its lock was ours covers other addresses now.
  std::vector<Mirror*> now;
  for (Mirror* m : covering)
    if (m->covers(page)) now.push_back(m);
  if (now.empty() && !(f.flags & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR))) {
    resolve_uncovered(page);
    return;
  }
  for (Mirror* m : now) {
    if (MigrateToHost::cpu_fault(m, m->index_of(page), f.flags)) return;  // counted by its device (migratedToHost)
  }
  int64_t done = 0;
  if (f.flags & UFFD_PAGEFAULT_FLAG_WP) {
    // Single-writer mirrors give up the page first, and no range fault of theirs may take it
    // back (re-protecting it) until the CPU's write access is restored: held across the
    // un-protect, as an invalidation would be.
    std::vector<Mirror*> held;
    for (Mirror* m : now)
      if (m->single_writer()) {
        m->hold_page(m->index_of(page), InvalidateCause::kCpuWrite);
        held.push_back(m);
      }
    sys::uffd_writeprotect(fd_, page, sys::page_size(), 0);
    for (Mirror* m : held) m->release_page();
    return;
  }
  if (f.flags & UFFD_PAGEFAULT_FLAG_MINOR) {
    // A file strategy's CPU mapping (shmem): the page is in the page cache, not the device's; map it.
    int rc = sys::uffd_continue(fd_, page, sys::page_size(), 0, &done);
    if (rc) sys::uffd_wake(fd_, page, sys::page_size());
    return;
  }
  int rc = sys::uffd_zero_fill(fd_, page, sys::page_size(), 0, &done, nullptr);
  // EEXIST: resolved by someone else. Any other failure (the range moved or went since the fault
  // was queued: ENOENT, EINVAL) wakes the faulter too, whose retried access then meets the new
  // layout; a failed resolve wakes nobody, and the faulter would sleep forever.
  if (rc) sys::uffd_wake(fd_, page, sys::page_size());
}

// A missing fault no mirror covers: a device pool's hole, or a fault queued at an address a
// mirror has moved away from. Decided and resolved under mu_: a mirror that moves here covers the
// address before it registers the range (Mirror::remapped, register_range takes mu_), so either it
// covers the page now (wake: the retried fault finds it) or the zero-fill meets an unregistered
// range and fails (wake too), never a device page's hole.
void Engine::resolve_uncovered(uint64_t page) {
  std::lock_guard<std::mutex> lock(mu_);
  int rc = -EAGAIN;
  if (std::none_of(mirrors_.begin(), mirrors_.end(), [&](Mirror* m) { return m->covers(page); })) {
    int64_t done = 0;
    rc = sys::uffd_zero_fill(fd_, page, sys::page_size(), 0, &done, nullptr);
  }
  if (rc) sys::uffd_wake(fd_, page, sys::page_size());
}

}  // namespace pm::engine
