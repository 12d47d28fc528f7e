#include "lease.h"

#include <cerrno>
#include <condition_variable>
#include <csignal>
#include <fcntl.h>
#include <map>
#include <mutex>
#include <thread>
#include <unistd.h>

#include "mirror.h"

namespace pm::engine {

namespace {

int g_pipe[2] = {-1, -1};

void on_lease_signal(int, siginfo_t* si, void*) {
  const int saved = errno;
  const int fd = si->si_fd;
  ssize_t n = ::write(g_pipe[1], &fd, sizeof fd);  // async-signal-safe; a full pipe drops a duplicate
  (void)n;
  errno = saved;
}

struct State {
  std::mutex mu;
  std::condition_variable idle;
  std::map<int, Mirror*> by_fd;
  Mirror* breaking = nullptr;
  int error = 0;
  bool started = false;
};

State& state() {
  static State* s = new State();  // never destroyed: its thread runs until exit
  return *s;
}

void serve() {
  State& s = state();
  for (;;) {
    int fd;
    ssize_t n = ::read(g_pipe[0], &fd, sizeof fd);
    if (n < 0 && errno == EINTR) continue;
    if (n != sizeof fd) return;
    Mirror* m = nullptr;
    {
      std::lock_guard<std::mutex> lock(s.mu);
      auto it = s.by_fd.find(fd);
      if (it == s.by_fd.end()) continue;
      m = it->second;
      s.by_fd.erase(it);  // before the break: a lease taken again meanwhile stays listed
      s.breaking = m;
    }
    m->break_lease();
    std::lock_guard<std::mutex> lock(s.mu);
    s.breaking = nullptr;
    s.idle.notify_all();
  }
}

int start_locked(State& s) {
  if (s.started) return s.error;
  s.started = true;
  if (::pipe2(g_pipe, O_CLOEXEC) != 0) return s.error = -errno;
  // The handler must never block: with the pipe full (breaks piling up), a duplicate is dropped.
  ::fcntl(g_pipe[1], F_SETFL, O_NONBLOCK);
  struct sigaction sa = {};
  sa.sa_sigaction = on_lease_signal;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  if (::sigaction(Leases::signal_number(), &sa, nullptr) != 0) return s.error = -errno;
  try {
    std::thread(serve).detach();
  } catch (...) {
    return s.error = -EAGAIN;
  }
  return 0;
}

}  // namespace

int Leases::signal_number() { return SIGRTMIN + 6; }

int Leases::add(Mirror* m, int fd) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (int rc = start_locked(s)) return rc;
  if (::fcntl(fd, F_SETSIG, signal_number()) != 0) return -errno;
  if (::fcntl(fd, F_SETLEASE, F_WRLCK) != 0) return -errno;
  s.by_fd[fd] = m;
  return 0;
}

void Leases::remove(Mirror* m) {
  State& s = state();
  std::unique_lock<std::mutex> lock(s.mu);
  s.idle.wait(lock, [&] { return s.breaking != m; });
  for (auto it = s.by_fd.begin(); it != s.by_fd.end();)
    it = it->second == m ? s.by_fd.erase(it) : std::next(it);
}

}  // namespace pm::engine
