// fork() for native work in a child, bounded from the parent's side. No Node-API: the child of a
// threaded process has one thread and must not take a lock another thread held at fork time, so
// it runs a plain function and _exit()s; the parent collects what it wrote through a pipe.
#pragma once

#include <cstdint>
#include <sys/types.h>
#include <vector>

namespace pm::sys {

struct ForkOutcome {
  pid_t pid = 0;
  int status = 0;          // waitpid status
  bool timed_out = false;  // the child was killed (SIGKILL) at the deadline
};

// Gives the calling thread this module's thread-local storage now, so that a child it forks next
// never has to. The addon's thread_local variables live in dynamic TLS (it is dlopen()ed): a
// thread's first use of any of them allocates the module's block through malloc (__tls_get_addr).
// In a forked child that malloc may wait forever on a lock another parent thread held at fork
// time (seen with ASan's allocator, whose locks fork() does not reset: the child slept in a
// futex). One variable primes the whole module's block. Call it before every fork of ours.
void prepare_child_tls();

// Forks (after prepare_child_tls()). The child gets PR_SET_PDEATHSIG(SIGKILL) (it never outlives this process), runs
// child(arg, fd) with fd the pipe's write end, and _exit()s with what it returns. The parent reads
// everything the child writes into *out until the pipe closes or timeout_ms passes (then the child
// is killed), and reaps it. Call from a thread that may block. Errors: -errno of pipe2/fork.
int fork_collect(int (*child)(void* arg, int fd), void* arg, int timeout_ms, std::vector<uint8_t>* out, ForkOutcome* res);

}  // namespace pm::sys
