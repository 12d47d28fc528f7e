// The fault server (docs/fault-server.md): other processes hand it their userfaultfd and a
// description of their ranges over a Unix socket; it checks each message and each descriptor, and
// keeps one RemoteClient per connection. An I/O thread (epoll) accepts, reads and answers; the
// JavaScript side learns of clients through events and serves their descriptors with the usual
// fault service. Plain C++, no Node-API.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "../sys/fault_service.h"
#include "trace_recorder.h"

namespace pm::engine {

struct RemoteRange {
  uint64_t addr = 0, len = 0;
  uint32_t modes = 0;
  int memfd = -1;  // shared memory: the client's memfd (owned by the RemoteClient), else -1
  uint64_t offset = 0;
};

// One client: its userfaultfd, ranges and pool. Shared by the I/O thread (registration), the
// JavaScript thread (evict, release) and the fault service's workers (resolve, the default policy),
// all under mu.
class RemoteClient : public sys::FaultHandler {
 public:
  RemoteClient(uint64_t id, int pid, uint32_t uid, uint32_t gid);
  ~RemoteClient() override;

  const uint64_t id;
  const int pid;
  const uint32_t uid, gid;

  struct Counters {
    uint64_t evicted = 0;      // pages taken to the pool
    uint64_t restored = 0;     // pages brought back from the pool (a fault, or an unregister)
    uint64_t released = 0;     // of those, by an unregister (the client took the range back)
    uint64_t zero_filled = 0;  // missing faults resolved with a zero page
    uint64_t continued = 0;    // minor faults resolved with UFFDIO_CONTINUE
    uint64_t unprotected = 0;  // WP faults resolved by lifting the protection
    uint64_t retried = 0;      // resolves that failed and woke the faulter to fault again
    uint64_t raced = 0;        // faults whose page another thread's fault had filled first (EEXIST): woken
    uint64_t prefetched = 0;   // of restored: pages brought back with a fault on a page before them
    uint64_t protected_pages = 0;  // pages write-protected by write_protect() (rounds)
    uint64_t touches_dropped = 0;  // resolved faults the touch log had no room for
  };

  // A resolved fault as the touch log keeps it: the page address with the kind in its low bits.
  enum Touch : uint64_t {
    kTouchWrite = 1,       // the access was a write (a WP fault, or a missing/minor fault flagged WRITE)
    kTouchZero = 0 << 1,   // missing, zero-filled
    kTouchPool = 1 << 1,   // missing, copied back from the pool
    kTouchMinor = 2 << 1,  // minor, continued
    kTouchWp = 3 << 1,     // write-protect, lifted
    kTouchKindMask = 3 << 1,
    kTouchPrefetch = 1 << 3,  // not a fault: brought back from the pool with the fault before it
  };
  static constexpr size_t kTouchLogCapacity = 1 << 16;

  // The default policy (a kHandler rule over the client's ranges): a missing page comes from the
  // pool when the server holds it there, else a zero page; a minor fault is continued; a WP fault
  // un-protected. A resolve that fails wakes the faulter, which faults again.
  int resolve(int uffd, const sys::FaultMsg& msg, uint64_t* pages) override;

  // Takes the pages of [addr, addr + len) that the client's memfd holds to the pool ("migrated to
  // device memory"): the order in pm_proto.h. The range must lie in shared ranges registered for
  // WP (so no write can slip between the copy and the punch). *pages: pages taken (holes and pages
  // already held are skipped; stops early when the pool is full). Errors: -EINVAL (not inside
  // such ranges, unaligned), -ENOSPC (no pool, or full before the first page), -ESHUTDOWN
  // (released), and those of the ioctls and file calls.
  int evict(uint64_t addr, uint64_t len, uint64_t* pages);

  // Write-protects [addr, addr + len) of the client (UFFDIO_WRITEPROTECT acts on the mm of the
  // process that opened the userfaultfd, whoever calls it: fs/userfaultfd.c
  // userfaultfd_writeprotect() takes ctx->mm). The next write to each page is a WP fault, which
  // resolve() lifts and logs as a write: one round of pages-dirtied sampling. Same range rules and
  // errors as evict(); serialized with it and with resolve() under mu.
  int write_protect(uint64_t addr, uint64_t len, uint64_t* pages);

  // prefetch: pages after a page brought back from the pool by a fault that come back with it (0:
  // none). protect_reads: a read fault maps its page write-protected (in WP ranges), so a write
  // after it is a WP fault too and write tracking (write_protect rounds) misses no write.
  void configure(uint32_t prefetch, bool protect_reads);

  // Moves the touch log (resolved faults and prefetches since the last call, oldest first) to *out.
  void take_touches(std::vector<uint64_t>* out);

  // Stops touching the client's memory: closes the descriptors and unmaps the pool. Called before
  // the connection closes, so that the client's watchdog, which takes over at EOF, never races us.
  void release();

  // Records the client's faults with `recorder` (nullptr: no longer): its ranges are made the
  // client's ranges now, and follow each REGISTER and UNREGISTER from then on, changed before the
  // reply, so no fault in a range the client was told is attached can come before the recorder
  // knows it. Returns the first error of the recorder's add_range/remove_range (0: none).
  int set_recorder(std::shared_ptr<TraceRecorder> recorder);

  Counters counters();
  std::vector<RemoteRange> ranges();
  int uffd();  // the server's duplicate of the client's userfaultfd, -1 before REGISTER
  uint64_t features();
  uint64_t pool_pages();
  uint64_t pool_held();

 private:
  friend class FaultServer;
  // I/O thread, under mu.
  int set_pool(int fd, uint64_t pages, uint64_t page);
  const RemoteRange* range_at(uint64_t addr) const;
  // Checks that [addr, addr + len) lies in shared ranges registered for WP (evict, write_protect).
  int check_wp_span(uint64_t addr, uint64_t len) const;
  // Copies the pooled page at a back into the client (mode: UFFDIO_COPY's) and frees its slot.
  int copy_back(int uffd, std::unordered_map<uint64_t, uint32_t>::iterator it, uint64_t mode);
  void log_touch(uint64_t entry);
  // Writes pooled pages of the range back into its memfd (holes only) and frees their slots.
  void bring_home(const RemoteRange& r);

  std::mutex mu_;
  bool released_ = false;
  int uffd_ = -1;
  uint64_t features_ = 0;
  uint64_t page_ = 4096;
  std::vector<RemoteRange> ranges_;
  int pool_fd_ = -1;
  void* pool_map_ = nullptr;
  uint64_t pool_map_len_ = 0;
  uint64_t pool_pages_ = 0;
  uint64_t* table_ = nullptr;
  char* slots_ = nullptr;
  std::vector<uint32_t> free_;                  // reserved to pool_pages_: resolve never allocates
  std::unordered_map<uint64_t, uint32_t> held_; // client address -> slot
  Counters counters_;
  std::shared_ptr<TraceRecorder> recorder_;
  uint32_t prefetch_ = 0;
  bool protect_reads_ = false;
  std::vector<uint64_t> touches_;  // reserved to kTouchLogCapacity: resolve never allocates
};

struct ServerEvent {
  enum Kind { kRegister, kUnregister, kClosed } kind;
  std::shared_ptr<RemoteClient> client;
  bool first = false;  // kRegister: the client's first (it has a userfaultfd from now on)
};

class FaultServer {
 public:
  struct Options {
    std::vector<uint32_t> allow_uids;  // empty: the server's own effective uid only
    unsigned max_clients = 64;
    // A connection that has not said HELLO this long after it was accepted is ended: a peer that
    // connects and stays silent would otherwise hold one of max_clients' slots for good.
    uint64_t hello_timeout_ms = 10000;
  };
  struct Stats {
    uint64_t accepted = 0, refused_uid = 0, refused_full = 0, protocol_errors = 0, refusals = 0, ended = 0;
    uint64_t hello_timeouts = 0;  // connections ended for saying nothing within hello_timeout_ms
    uint64_t clients = 0;  // connections open now
  };

  FaultServer() = default;
  ~FaultServer();
  FaultServer(const FaultServer&) = delete;
  FaultServer& operator=(const FaultServer&) = delete;

  // Creates the socket (sys::unix_listen, mode 0600) and starts the I/O thread; notify is called on
  // that thread whenever events are queued. Errors: those of unix_listen, epoll, eventfd, thread.
  int start(const std::string& path, Options options, std::function<void()> notify);
  // Stops the I/O thread, closes every connection and the socket, removes the socket file. The
  // caller releases the clients first (their descriptors) so no client's watchdog races us.
  void stop();
  std::vector<ServerEvent> take();
  // The JavaScript side is done with a client whose connection ended (its Userfaultfd closed, the
  // client released): close the connection, which the client's watchdog sees as EOF.
  void drop(uint64_t id);
  Stats stats();
  const std::string& path() const { return path_; }

 private:
  struct Conn {
    uint64_t id = 0;
    int fd = -1;
    int pid = 0;
    uint32_t uid = 0, gid = 0;
    bool hello = false;
    uint64_t accepted_ns = 0;  // for the HELLO deadline
    bool announced = false;  // JavaScript has the client: it must release it before the close
    bool ended = false;
    std::shared_ptr<RemoteClient> client;
  };
  void loop();
  void accept_all();
  // Ends the connections past their HELLO deadline; returns the ms until the next one's, or -1.
  int end_silent();
  void serve_conn(uint64_t id);
  // Handles one packet; closes every descriptor it does not keep. Returns 0 or -errno to reply;
  // *fatal: the connection ends after the reply.
  int handle(Conn& c, const unsigned char* buf, size_t n, int* fds, int nfds, bool* fatal, uint32_t* value, ServerEvent* ev);
  int handle_register(Conn& c, const unsigned char* buf, size_t n, int* fds, int nfds, uint32_t* value, ServerEvent* ev);
  int handle_unregister(Conn& c, const unsigned char* buf, size_t n, int nfds, ServerEvent* ev);
  void end(uint64_t id);  // under mu_
  void push(ServerEvent ev);

  std::string path_;
  Options options_;
  std::function<void()> notify_;
  int listen_fd_ = -1, epfd_ = -1, stop_fd_ = -1;
  std::thread thread_;
  std::mutex mu_;  // conns_, events_, stats_
  std::map<uint64_t, Conn> conns_;
  std::vector<ServerEvent> events_;
  Stats stats_;
  uint64_t next_id_ = 1;
};

}  // namespace pm::engine
