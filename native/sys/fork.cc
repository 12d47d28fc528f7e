#include "fork.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

namespace pm::sys {

namespace {
thread_local volatile int tl_primed = 0;
}  // namespace

void prepare_child_tls() { tl_primed = 1; }

int fork_collect(int (*child)(void*, int), void* arg, int timeout_ms, std::vector<uint8_t>* out, ForkOutcome* res) {
  *res = ForkOutcome{};
  prepare_child_tls();
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) return -errno;
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    ::close(p[0]);
    ::close(p[1]);
    return -err;
  }
  if (pid == 0) {
    ::close(p[0]);
    // The death signal is armed after fork: a parent that died in between is checked by hand.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    ::_exit(child(arg, p[1]));
  }
  ::close(p[1]);
  res->pid = pid;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  uint8_t buf[4096];
  bool reaped = false;
  // Reads what is there now; false at end of file.
  auto drain = [&](int wait_ms) {
    pollfd pfd{p[0], POLLIN, 0};
    while (::poll(&pfd, 1, wait_ms) > 0) {
      const ssize_t got = ::read(p[0], buf, sizeof buf);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) return false;
      out->insert(out->end(), buf, buf + got);
      wait_ms = 0;
    }
    return true;
  };
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
    if (left <= 0) {
      res->timed_out = true;
      break;
    }
    if (!drain(static_cast<int>(std::min<long long>(left, 20)))) break;  // end of file: the child is done
    // End of file alone is not enough: a process forked meanwhile by another thread may hold a
    // copy of the pipe's write end. The child's own exit is.
    if (::waitpid(pid, &res->status, WNOHANG) == pid) {
      reaped = true;
      drain(0);  // everything it wrote is in the pipe by now
      break;
    }
  }
  ::close(p[0]);
  if (res->timed_out) ::kill(pid, SIGKILL);
  if (!reaped)
    while (::waitpid(pid, &res->status, 0) < 0 && errno == EINTR) {
    }
  return 0;
}

}  // namespace pm::sys
