#include "fault_server.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>

#include "../client/pm_proto.h"
#include "../sys/access.h"
#include "../sys/file.h"
#include "../sys/mem.h"
#include "../sys/uapi.h"
#include "../sys/uffd.h"
#include "../sys/unix_socket.h"

namespace pm::engine {

namespace {

// The top of the user address space a client may name (x86-64 and arm64 with 4-level tables; a
// range above it is no memory of the client's).
constexpr uint64_t kUserTop = 1ull << 47;
constexpr size_t kMsgMax = sizeof(pm_register) + PM_MAX_RANGES * sizeof(pm_range);
constexpr int kPacketsPerWakeup = 64;

void close_all(int* fds, int n) {
  for (int i = 0; i < n; i++)
    if (fds[i] >= 0) {
      ::close(fds[i]);
      fds[i] = -1;
    }
}

bool aligned(uint64_t v, uint64_t page) { return v % page == 0; }

}  // namespace

// ---- RemoteClient ----

RemoteClient::RemoteClient(uint64_t id_, int pid_, uint32_t uid_, uint32_t gid_) : id(id_), pid(pid_), uid(uid_), gid(gid_) {
  page_ = sys::page_size();
  touches_.reserve(kTouchLogCapacity);
}

RemoteClient::~RemoteClient() { release(); }

void RemoteClient::release() {
  std::lock_guard<std::mutex> lock(mu_);
  if (released_) return;
  released_ = true;
  if (uffd_ >= 0) ::close(uffd_);
  uffd_ = -1;
  for (RemoteRange& r : ranges_)
    if (r.memfd >= 0) {
      ::close(r.memfd);
      r.memfd = -1;
    }
  if (pool_map_) sys::unmap(pool_map_, pool_map_len_);
  pool_map_ = nullptr;
  table_ = nullptr;
  slots_ = nullptr;
  if (pool_fd_ >= 0) ::close(pool_fd_);
  pool_fd_ = -1;
  recorder_.reset();
}

namespace {

TraceRange recorded_range(const RemoteRange& r) {
  return {r.addr, r.len, static_cast<uint8_t>((r.modes & kRangeModesMask) | (r.memfd >= 0 ? kRangeShared : 0))};
}

}  // namespace

int RemoteClient::set_recorder(std::shared_ptr<TraceRecorder> recorder) {
  std::lock_guard<std::mutex> lock(mu_);
  if (released_) return -ESHUTDOWN;
  recorder_ = std::move(recorder);
  if (!recorder_) return 0;
  int first_error = 0;
  auto note = [&](int rc) {
    if (rc < 0 && !first_error) first_error = rc;
  };
  for (const TraceRange& live : recorder_->live_ranges()) {
    const bool kept = std::any_of(ranges_.begin(), ranges_.end(), [&](const RemoteRange& r) { return r.addr == live.start && r.len == live.length; });
    if (!kept) note(recorder_->remove_range(live.start, live.length));
  }
  const std::vector<TraceRange> live = recorder_->live_ranges();
  for (const RemoteRange& r : ranges_) {
    const bool known = std::any_of(live.begin(), live.end(), [&](const TraceRange& l) { return l.start == r.addr && l.length == r.len; });
    if (!known) note(recorder_->add_range(recorded_range(r)));
  }
  return first_error;
}

int RemoteClient::set_pool(int fd, uint64_t pages, uint64_t page) {
  const uint64_t bytes = pm_pool_bytes(pages, page);
  uint64_t size = 0;
  if (int rc = sys::check_shared_file(fd, bytes, true, &size)) return rc;
  if (size != bytes) return -EINVAL;
  void* p = nullptr;
  if (int rc = sys::map(&p, nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) return rc;
  auto* h = static_cast<pm_pool_header*>(p);
  auto* table = reinterpret_cast<uint64_t*>(static_cast<char*>(p) + sizeof(pm_pool_header));
  // The table is only written here (the server's own index, held_, says what it holds): reading
  // it would fault its holes in, at the client's expense.
  const bool ok = h->magic == PM_PROTO_MAGIC && h->version == PM_PROTO_VERSION && h->pool_pages == pages && h->page_size == page;
  if (!ok) {
    sys::unmap(p, bytes);
    return -EINVAL;
  }
  pool_fd_ = fd;
  pool_map_ = p;
  pool_map_len_ = bytes;
  pool_pages_ = pages;
  table_ = table;
  slots_ = static_cast<char*>(p) + pm_pool_table_bytes(pages, page);
  free_.reserve(pages);
  for (uint64_t i = pages; i-- > 0;) free_.push_back(static_cast<uint32_t>(i));
  held_.reserve(pages);
  return 0;
}

const RemoteRange* RemoteClient::range_at(uint64_t addr) const {
  for (const RemoteRange& r : ranges_)
    if (addr >= r.addr && addr - r.addr < r.len) return &r;
  return nullptr;
}

void RemoteClient::log_touch(uint64_t entry) {
  if (touches_.size() < kTouchLogCapacity) touches_.push_back(entry);
  else counters_.touches_dropped++;
}

int RemoteClient::copy_back(int uffd, std::unordered_map<uint64_t, uint32_t>::iterator it, uint64_t mode) {
  const uint32_t slot = it->second;
  int64_t done = 0;
  int rc = sys::uffd_copy(uffd, it->first, reinterpret_cast<uint64_t>(slots_ + slot * page_), page_, mode, &done);
  // Present now (ours, or EEXIST: the memfd's page is current, pm_proto.h): the slot is free.
  if (rc == 0 || rc == -EEXIST) {
    __atomic_store_n(&table_[slot], 0, __ATOMIC_RELEASE);
    held_.erase(it);
    free_.push_back(slot);
    counters_.restored++;
  }
  return rc;
}

int RemoteClient::resolve(int uffd, const sys::FaultMsg& msg, uint64_t* pages) {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t a = msg.address & ~(page_ - 1);
  if (released_) {
    // Let go of the client: its watchdog, which the connection's close wakes, resolves this fault
    // (a zero page here, for a page the pool holds, would be taken for the current copy).
    *pages = 0;
    return 0;
  }
  *pages = 1;
  const RemoteRange* r = range_at(a);
  if (!r) {
    // A fault read after its range was unregistered (the client released it: UNREGISTER took the
    // range out under mu before its answer, and the client's unregister already woke the faulter).
    // The address may already be the client's again under another owner: the shim holds its other
    // threads' writes there with a userfaultfd of its own (native/client/pm_hold.h), and the kernel
    // lets any userfaultfd of the process unprotect or fill a page of a range registered with
    // another (mwriteprotect_range and mfill_atomic check only that the VMA is registered), which
    // would let a held write escape. So nothing but a wake: the faulter, if any, faults again.
    counters_.retried++;
    sys::uffd_wake(uffd, a, page_);
    return 0;
  }
  const uint64_t write = (msg.flags & UFFD_PAGEFAULT_FLAG_WRITE) ? static_cast<uint64_t>(kTouchWrite) : 0;
  const bool track = protect_reads_ && (r->modes & PM_MODE_WP);
  const bool protect = track && !write;
  int64_t done = 0;
  int rc;
  uint64_t kind;
  if (msg.flags & UFFD_PAGEFAULT_FLAG_WP) {
    kind = kTouchWp | kTouchWrite;
    rc = sys::uffd_writeprotect(uffd, a, page_, 0);
    if (rc == 0) counters_.unprotected++;
  } else if (msg.flags & UFFD_PAGEFAULT_FLAG_MINOR) {
    kind = kTouchMinor | write;
    rc = sys::uffd_continue(uffd, a, page_, protect ? UFFDIO_CONTINUE_MODE_WP : 0, &done);
    if (rc == 0) counters_.continued++;
  } else {
    auto it = held_.find(a);
    if (it != held_.end()) {
      kind = kTouchPool | write;
      // The following pages first, without waking: the faulter, woken last, finds them present
      // instead of faulting on each (the slots are scattered, so one UFFDIO_COPY each, but all in
      // this one fault's round trip).
      for (uint64_t k = 1; k <= prefetch_ && a + k * page_ < r->addr + r->len; k++) {
        auto next = held_.find(a + k * page_);
        if (next == held_.end()) continue;
        const uint64_t b = next->first;
        if (copy_back(uffd, next, UFFDIO_COPY_MODE_DONTWAKE | (track ? UFFDIO_COPY_MODE_WP : 0)) != 0) break;
        counters_.prefetched++;
        log_touch(b | kTouchPool | kTouchPrefetch);
      }
      rc = copy_back(uffd, it, protect ? UFFDIO_COPY_MODE_WP : 0);
    } else {
      kind = kTouchZero | write;
      // UFFDIO_ZEROPAGE has no WP mode: a read that must stay write-protected copies zeros instead.
      rc = protect ? sys::uffd_copy(uffd, a, reinterpret_cast<uint64_t>(sys::zero_source()), page_, UFFDIO_COPY_MODE_WP, &done)
                   : sys::uffd_zero_fill(uffd, a, page_, 0, &done, nullptr);
      if (rc == 0) counters_.zero_filled++;
    }
  }
  if (rc == -EAGAIN) return rc;  // an event is unread: the service retries after its next read
  if (rc == 0) log_touch(a | kind);
  if (rc) {
    // A pool page found present was counted as restored by copy_back (its slot is freed).
    if (rc != -EEXIST) counters_.retried++;
    else if (kind != (kTouchPool | write)) counters_.raced++;
    sys::uffd_wake(uffd, a, page_);
  }
  return 0;
}

int RemoteClient::check_wp_span(uint64_t addr, uint64_t len) const {
  if (!aligned(addr, page_) || !aligned(len, page_) || len == 0 || addr + len < addr) return -EINVAL;
  for (uint64_t a = addr; a < addr + len;) {
    const RemoteRange* r = range_at(a);
    if (!r || r->memfd < 0 || !(r->modes & PM_MODE_WP)) return -EINVAL;
    a = r->addr + r->len;
  }
  return 0;
}

int RemoteClient::write_protect(uint64_t addr, uint64_t len, uint64_t* pages) {
  std::lock_guard<std::mutex> lock(mu_);
  *pages = 0;
  if (released_) return -ESHUTDOWN;
  if (int rc = check_wp_span(addr, len)) return rc;
  // Under mu, so never inside an eviction's write-protect..unprotect of a page: a round cannot
  // lift an eviction's protection, and an eviction's final unprotect only lifts a round's from a
  // page that is a hole by then (its next access is a missing fault, not a write to track).
  if (int rc = sys::uffd_writeprotect(uffd_, addr, len, UFFDIO_WRITEPROTECT_MODE_WP)) return rc;
  *pages = len / page_;
  counters_.protected_pages += *pages;
  return 0;
}

void RemoteClient::configure(uint32_t prefetch, bool protect_reads) {
  std::lock_guard<std::mutex> lock(mu_);
  prefetch_ = prefetch;
  protect_reads_ = protect_reads;
}

void RemoteClient::take_touches(std::vector<uint64_t>* out) {
  std::lock_guard<std::mutex> lock(mu_);
  out->assign(touches_.begin(), touches_.end());
  touches_.clear();
}

int RemoteClient::evict(uint64_t addr, uint64_t len, uint64_t* pages) {
  std::lock_guard<std::mutex> lock(mu_);
  *pages = 0;
  if (released_) return -ESHUTDOWN;
  if (!aligned(addr, page_) || !aligned(len, page_) || len == 0 || addr + len < addr) return -EINVAL;
  if (!pool_map_) return -ENOSPC;
  if (int rc = check_wp_span(addr, len)) return rc;
  for (uint64_t a = addr; a < addr + len; a += page_) {
    if (held_.count(a)) continue;
    const RemoteRange* r = range_at(a);
    const uint64_t off = r->offset + (a - r->addr);
    int d = sys::has_data(r->memfd, off);
    if (d < 0) return d;
    if (d == 0) continue;  // a hole: nothing to take
    if (free_.empty()) return *pages ? 0 : -ENOSPC;
    const uint32_t slot = free_.back();
    // Writes wait from here until the page is gone; they then fault it back from the pool.
    int rc = sys::uffd_writeprotect(uffd_, a, page_, UFFDIO_WRITEPROTECT_MODE_WP);
    if (rc) return rc;
    rc = sys::pread_full(r->memfd, slots_ + slot * page_, page_, off);
    if (rc == 0) {
      __atomic_store_n(&table_[slot], a, __ATOMIC_RELEASE);
      rc = sys::punch_hole(r->memfd, off, page_);
      if (rc) __atomic_store_n(&table_[slot], 0, __ATOMIC_RELEASE);
    }
    if (rc == 0) {
      free_.pop_back();
      held_[a] = slot;
      counters_.evicted++;
      ++*pages;
    }
    // Lifts the protection (and its marker on the hole) and wakes writers that waited.
    sys::uffd_writeprotect(uffd_, a, page_, 0);
    if (rc) return rc;
  }
  return 0;
}

void RemoteClient::bring_home(const RemoteRange& r) {
  for (auto it = held_.begin(); it != held_.end();) {
    if (it->first < r.addr || it->first - r.addr >= r.len) {
      ++it;
      continue;
    }
    const uint32_t slot = it->second;
    const uint64_t off = r.offset + (it->first - r.addr);
    // Written through the file, not through the client's registered mapping: present wins.
    if (r.memfd >= 0 && sys::has_data(r.memfd, off) == 0) {
      if (sys::pwrite_full(r.memfd, slots_ + slot * page_, page_, off) == 0) {
        counters_.restored++;
        counters_.released++;
      }
    }
    __atomic_store_n(&table_[slot], 0, __ATOMIC_RELEASE);
    free_.push_back(slot);
    it = held_.erase(it);
  }
}

RemoteClient::Counters RemoteClient::counters() {
  std::lock_guard<std::mutex> lock(mu_);
  return counters_;
}
std::vector<RemoteRange> RemoteClient::ranges() {
  std::lock_guard<std::mutex> lock(mu_);
  return ranges_;
}
int RemoteClient::uffd() {
  std::lock_guard<std::mutex> lock(mu_);
  return uffd_;
}
uint64_t RemoteClient::features() {
  std::lock_guard<std::mutex> lock(mu_);
  return features_;
}
uint64_t RemoteClient::pool_pages() {
  std::lock_guard<std::mutex> lock(mu_);
  return pool_pages_;
}
uint64_t RemoteClient::pool_held() {
  std::lock_guard<std::mutex> lock(mu_);
  return held_.size();
}

// ---- FaultServer ----

FaultServer::~FaultServer() { stop(); }

int FaultServer::start(const std::string& path, Options options, std::function<void()> notify) {
  // A read kept write-protected is filled by copying sys::zero_source(), which must hold a page.
  if (sys::page_size() > sys::kZeroSourceBytes) return -EOPNOTSUPP;
  options_ = std::move(options);
  notify_ = std::move(notify);
  int rc = sys::unix_listen(path.c_str(), 64, 0600, &listen_fd_);
  if (rc) return rc;
  path_ = path;
  epfd_ = ::epoll_create1(EPOLL_CLOEXEC);
  stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (epfd_ < 0 || stop_fd_ < 0) {
    rc = -errno;
    stop();
    return rc;
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;  // the listener
  ::epoll_ctl(epfd_, EPOLL_CTL_ADD, listen_fd_, &ev);
  ev.data.u64 = UINT64_MAX;  // stop
  ::epoll_ctl(epfd_, EPOLL_CTL_ADD, stop_fd_, &ev);
  try {
    thread_ = std::thread([this] { loop(); });
  } catch (const std::system_error&) {
    stop();
    return -EAGAIN;
  }
  return 0;
}

void FaultServer::stop() {
  if (thread_.joinable()) {
    uint64_t one = 1;
    (void)!::write(stop_fd_, &one, sizeof one);
    thread_.join();
  }
  std::vector<std::shared_ptr<RemoteClient>> clients;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, c] : conns_) {
      if (c.client) clients.push_back(c.client);
      if (c.fd >= 0) ::close(c.fd);
    }
    conns_.clear();
  }
  // Released before anything else could race a watchdog (the caller released them already when
  // it could; this is the backstop).
  for (auto& c : clients) c->release();
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    ::unlink(path_.c_str());
  }
  listen_fd_ = -1;
  if (epfd_ >= 0) ::close(epfd_);
  if (stop_fd_ >= 0) ::close(stop_fd_);
  epfd_ = stop_fd_ = -1;
}

std::vector<ServerEvent> FaultServer::take() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<ServerEvent> out;
  out.swap(events_);
  return out;
}

void FaultServer::push(ServerEvent ev) {
  events_.push_back(std::move(ev));
}

FaultServer::Stats FaultServer::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  Stats s = stats_;
  s.clients = conns_.size();
  return s;
}

void FaultServer::drop(uint64_t id) {
  std::shared_ptr<RemoteClient> client;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = conns_.find(id);
    if (it == conns_.end()) return;
    client = it->second.client;
    if (it->second.fd >= 0) {
      if (epfd_ >= 0) ::epoll_ctl(epfd_, EPOLL_CTL_DEL, it->second.fd, nullptr);
      ::close(it->second.fd);
    }
    conns_.erase(it);
  }
  if (client) client->release();
}

void FaultServer::end(uint64_t id) {
  auto it = conns_.find(id);
  if (it == conns_.end() || it->second.ended) return;
  Conn& c = it->second;
  c.ended = true;
  stats_.ended++;
  ::epoll_ctl(epfd_, EPOLL_CTL_DEL, c.fd, nullptr);
  if (c.announced) {
    // JavaScript closes its Userfaultfd and releases the client, then drop() closes the socket.
    push({ServerEvent::kClosed, c.client, false});
    return;
  }
  if (c.client) c.client->release();
  ::close(c.fd);
  conns_.erase(it);
}

void FaultServer::loop() {
  epoll_event evs[32];
  int timeout_ms = -1;
  for (;;) {
    int n = ::epoll_wait(epfd_, evs, 32, timeout_ms);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    bool notify = false;
    for (int i = 0; i < n; i++) {
      const uint64_t key = evs[i].data.u64;
      if (key == UINT64_MAX) return;
      size_t before;
      {
        std::lock_guard<std::mutex> lock(mu_);
        before = events_.size();
      }
      if (key == 0) accept_all();
      else serve_conn(key);
      std::lock_guard<std::mutex> lock(mu_);
      notify |= events_.size() != before;
    }
    {
      // After the accepts: a connection accepted just now has its deadline in the next wait.
      std::lock_guard<std::mutex> lock(mu_);
      timeout_ms = end_silent();
    }
    if (notify && notify_) notify_();
  }
}

int FaultServer::end_silent() {
  const uint64_t now = sys::now_ns(), limit = options_.hello_timeout_ms * 1000000ull;
  uint64_t next = UINT64_MAX;
  std::vector<uint64_t> silent;
  for (const auto& [id, c] : conns_) {
    if (c.hello || c.ended) continue;
    if (now - c.accepted_ns >= limit) silent.push_back(id);
    else next = std::min(next, c.accepted_ns + limit - now);
  }
  for (uint64_t id : silent) {
    pm_reply r{};
    r.h = {PM_PROTO_MAGIC, PM_PROTO_VERSION, PM_MSG_REPLY, sizeof r, 0};
    r.error = -ETIMEDOUT;
    sys::send_packet(conns_[id].fd, &r, sizeof r, nullptr, 0, true);
    stats_.hello_timeouts++;
    end(id);
  }
  return next == UINT64_MAX ? -1 : static_cast<int>(std::min<uint64_t>(next / 1000000 + 1, INT32_MAX));
}

void FaultServer::accept_all() {
  for (;;) {
    int fd = -1;
    int rc = sys::unix_accept(listen_fd_, &fd);
    if (rc == -EINTR || rc == -ECONNABORTED) continue;
    if (rc == -EMFILE || rc == -ENFILE) {
      ::usleep(10000);  // out of descriptors: let connections end rather than spin on the backlog
      return;
    }
    if (rc) return;
    int pid = 0;
    uint32_t uid = 0, gid = 0;
    std::lock_guard<std::mutex> lock(mu_);
    stats_.accepted++;
    int err = sys::peer_credentials(fd, &pid, &uid, &gid);
    if (err == 0) {
      const bool allowed = options_.allow_uids.empty()
                               ? uid == ::geteuid()
                               : std::find(options_.allow_uids.begin(), options_.allow_uids.end(), uid) != options_.allow_uids.end();
      if (!allowed) {
        err = -EACCES;
        stats_.refused_uid++;
      } else if (conns_.size() >= options_.max_clients) {
        err = -EUSERS;
        stats_.refused_full++;
      }
    }
    if (err) {
      pm_reply r{};
      r.h = {PM_PROTO_MAGIC, PM_PROTO_VERSION, PM_MSG_REPLY, sizeof r, 0};
      r.error = err;
      sys::send_packet(fd, &r, sizeof r, nullptr, 0, true);
      ::close(fd);
      continue;
    }
    const uint64_t id = next_id_++;
    Conn& c = conns_[id];
    c.id = id;
    c.fd = fd;
    c.pid = pid;
    c.uid = uid;
    c.gid = gid;
    c.accepted_ns = sys::now_ns();
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.u64 = id;
    if (::epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev) < 0) {
      ::close(fd);
      conns_.erase(id);
    }
  }
}

void FaultServer::serve_conn(uint64_t id) {
  alignas(8) unsigned char buf[kMsgMax + 8];
  for (int k = 0; k < kPacketsPerWakeup; k++) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = conns_.find(id);
    if (it == conns_.end() || it->second.ended) return;
    Conn& c = it->second;
    int fds[PM_MAX_FDS];
    sys::RecvResult r;
    int rc = sys::recv_packet(c.fd, buf, sizeof buf, fds, PM_MAX_FDS, &r);
    if (rc == -EAGAIN) return;
    if (rc || r.eof) {
      if (r.nfds) close_all(fds, r.nfds);
      end(id);
      return;
    }
    bool fatal = false;
    uint32_t value = 0;
    ServerEvent ev{ServerEvent::kClosed, nullptr, false};
    int err;
    if (r.truncated || r.bytes < sizeof(pm_hdr)) err = -EMSGSIZE, fatal = true;
    else if (r.fds_truncated || r.foreign_cmsg) err = -EBADMSG, fatal = true;
    else err = handle(c, buf, r.bytes, fds, r.nfds, &fatal, &value, &ev);
    close_all(fds, r.nfds);  // what handle() kept it set to -1
    if (err == 1) {          // BYE: no reply, the close says it
      end(id);
      return;
    }
    if (err) {
      stats_.refusals++;
      if (fatal) stats_.protocol_errors++;
    }
    if (ev.client) push(std::move(ev));
    pm_reply rep{};
    pm_hdr h{};
    if (r.bytes >= sizeof h) std::memcpy(&h, buf, sizeof h);
    rep.h = {PM_PROTO_MAGIC, PM_PROTO_VERSION, PM_MSG_REPLY, sizeof rep, h.seq};
    rep.error = err;
    rep.value = value;
    // A client that does not read its replies is ended, never waited for.
    if (sys::send_packet(c.fd, &rep, sizeof rep, nullptr, 0, true) != 0 || fatal) {
      end(id);
      return;
    }
  }
}

int FaultServer::handle(Conn& c, const unsigned char* buf, size_t n, int* fds, int nfds, bool* fatal, uint32_t* value, ServerEvent* ev) {
  pm_hdr h;
  std::memcpy(&h, buf, sizeof h);
  *fatal = true;
  if (h.magic != PM_PROTO_MAGIC) return -EBADMSG;
  if (h.version != PM_PROTO_VERSION) return -EPROTONOSUPPORT;
  if (h.size != n) return -EBADMSG;
  switch (h.type) {
    case PM_MSG_HELLO: {
      if (c.hello) return -EPROTO;
      if (n != sizeof(pm_hello)) return -EBADMSG;
      pm_hello m;
      std::memcpy(&m, buf, sizeof m);
      if (static_cast<int>(m.pid) != c.pid) return -EPERM;  // not who SO_PEERCRED says connected
      if (m.page_size != sys::page_size() || (m.flags & ~PM_HELLO_POOL)) return -EINVAL;
      const bool pool = m.flags & PM_HELLO_POOL;
      if (nfds != (pool ? 1 : 0)) return -EBADF;
      if (pool != (m.pool_pages != 0) || m.pool_pages > PM_MAX_POOL_PAGES) return -EINVAL;
      auto client = std::make_shared<RemoteClient>(c.id, c.pid, c.uid, c.gid);
      {
        std::lock_guard<std::mutex> lock(client->mu_);
        client->features_ = m.features;
        if (pool) {
          int rc = client->set_pool(fds[0], m.pool_pages, sys::page_size());
          if (rc) return rc;
          fds[0] = -1;
        }
      }
      c.client = std::move(client);
      c.hello = true;
      *fatal = false;
      return 0;
    }
    case PM_MSG_REGISTER:
    case PM_MSG_UNREGISTER: {
      if (!c.hello) return -EPROTO;
      if (n < sizeof(pm_register)) return -EBADMSG;
      pm_register m;
      std::memcpy(&m, buf, sizeof m);
      if (m.count == 0 || m.count > PM_MAX_RANGES || n != sizeof(pm_register) + m.count * sizeof(pm_range)) return -EBADMSG;
      *fatal = false;
      return h.type == PM_MSG_REGISTER ? handle_register(c, buf, n, fds, nfds, value, ev)
                                       : handle_unregister(c, buf, n, nfds, ev);
    }
    case PM_MSG_BYE:
      if (n != sizeof(pm_hdr) || nfds) return -EBADMSG;
      return 1;
    default:
      return -EBADMSG;
  }
}

int FaultServer::handle_register(Conn& c, const unsigned char* buf, size_t n, int* fds, int nfds, uint32_t* value, ServerEvent* ev) {
  (void)n;
  pm_register m;
  std::memcpy(&m, buf, sizeof m);
  const uint64_t page = sys::page_size();
  RemoteClient& cl = *c.client;
  std::lock_guard<std::mutex> lock(cl.mu_);
  if (cl.released_) return -ESHUTDOWN;
  if (m.flags & ~PM_REG_UFFD) return -EINVAL;
  const bool with_uffd = m.flags & PM_REG_UFFD;
  if (with_uffd == (cl.uffd_ >= 0)) return with_uffd ? -EEXIST : -EPROTO;  // exactly once, first
  const int first_memfd = with_uffd ? 1 : 0;
  if (nfds < first_memfd) return -EBADF;
  if (with_uffd) {
    char what[128];
    int rc = sys::uffd_is_userfaultfd(fds[0], what, sizeof what);
    if (rc != 1) return -EBADF;
  }
  const int nmem = nfds - first_memfd;
  if (cl.ranges_.size() + m.count > PM_MAX_CLIENT_RANGES) return -E2BIG;
  std::vector<RemoteRange> add;
  std::vector<bool> used(static_cast<size_t>(nmem), false);
  for (uint32_t i = 0; i < m.count; i++) {
    pm_range r;
    std::memcpy(&r, buf + sizeof(pm_register) + i * sizeof(pm_range), sizeof r);
    if (r.len == 0 || !aligned(r.addr, page) || !aligned(r.len, page) || r.addr == 0 || r.addr + r.len < r.addr ||
        r.addr + r.len > kUserTop)
      return -EINVAL;
    if (r.modes == 0 || (r.modes & ~(PM_MODE_MISSING | PM_MODE_WP | PM_MODE_MINOR))) return -EINVAL;
    RemoteRange rr{r.addr, r.len, r.modes, -1, 0};
    if (r.fd_index == -1) {
      if (r.modes & PM_MODE_MINOR) return -EINVAL;  // MINOR needs shared memory
    } else {
      if (r.fd_index < 0 || r.fd_index >= nmem) return -EBADF;
      if (!aligned(r.offset, page) || r.offset + r.len < r.offset) return -EINVAL;
      uint64_t size = 0;
      if (int rc = sys::check_shared_file(fds[first_memfd + r.fd_index], r.offset + r.len, false, &size)) return rc;
      used[static_cast<size_t>(r.fd_index)] = true;
      rr.offset = r.offset;
      rr.memfd = r.fd_index;  // an index until accepted
    }
    for (const RemoteRange& o : cl.ranges_)
      if (rr.addr < o.addr + o.len && o.addr < rr.addr + rr.len) return -EEXIST;
    for (const RemoteRange& o : add)
      if (rr.addr < o.addr + o.len && o.addr < rr.addr + rr.len) return -EEXIST;
    add.push_back(rr);
  }
  if (std::find(used.begin(), used.end(), false) != used.end()) return -EBADF;  // a memfd no range names
  // Accepted: each shared range owns a duplicate of its memfd.
  std::vector<int> dups(add.size(), -1);
  for (size_t i = 0; i < add.size(); i++) {
    if (add[i].memfd < 0) continue;
    dups[i] = ::fcntl(fds[first_memfd + add[i].memfd], F_DUPFD_CLOEXEC, 0);
    if (dups[i] < 0) {
      const int err = -errno;
      close_all(dups.data(), static_cast<int>(i));
      return err;
    }
  }
  for (size_t i = 0; i < add.size(); i++) add[i].memfd = dups[i];
  if (with_uffd) {
    cl.uffd_ = fds[0];
    fds[0] = -1;
  }
  cl.ranges_.insert(cl.ranges_.end(), add.begin(), add.end());
  // Before the reply: the client touches the range only once it is answered. A range the
  // recorder refuses (past its index limit) is counted there and its faults ignored.
  if (cl.recorder_)
    for (const RemoteRange& r : add) cl.recorder_->add_range(recorded_range(r));
  *value = static_cast<uint32_t>(cl.ranges_.size());
  ev->kind = ServerEvent::kRegister;
  ev->client = c.client;
  ev->first = !c.announced;
  c.announced = true;
  return 0;
}

int FaultServer::handle_unregister(Conn& c, const unsigned char* buf, size_t n, int nfds, ServerEvent* ev) {
  (void)n;
  if (nfds) return -EBADF;
  pm_register m;
  std::memcpy(&m, buf, sizeof m);
  if (m.flags) return -EINVAL;
  RemoteClient& cl = *c.client;
  std::lock_guard<std::mutex> lock(cl.mu_);
  if (cl.released_) return -ESHUTDOWN;
  std::vector<size_t> idx;
  for (uint32_t i = 0; i < m.count; i++) {
    pm_range r;
    std::memcpy(&r, buf + sizeof(pm_register) + i * sizeof(pm_range), sizeof r);
    size_t k = 0;
    while (k < cl.ranges_.size() && !(cl.ranges_[k].addr == r.addr && cl.ranges_[k].len == r.len)) k++;
    if (k == cl.ranges_.size() || std::find(idx.begin(), idx.end(), k) != idx.end()) return -ENOENT;
    idx.push_back(k);
  }
  std::sort(idx.rbegin(), idx.rend());
  for (size_t k : idx) {
    if (cl.recorder_) cl.recorder_->remove_range(cl.ranges_[k].addr, cl.ranges_[k].len);
    cl.bring_home(cl.ranges_[k]);
    if (cl.ranges_[k].memfd >= 0) ::close(cl.ranges_[k].memfd);
    cl.ranges_.erase(cl.ranges_.begin() + static_cast<long>(k));
  }
  if (c.announced) {
    ev->kind = ServerEvent::kUnregister;
    ev->client = c.client;
  }
  return 0;
}

}  // namespace pm::engine
