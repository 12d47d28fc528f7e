// Unix-domain sockets for the fault server: listen, accept, peer credentials and messages that
// carry descriptors (SCM_RIGHTS). Every call returns 0 / a value or -errno; no Node-API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <sys/types.h>

namespace pm::sys {

// A SOCK_SEQPACKET socket bound at path and listening, its file mode set to `mode` (0600) before
// anyone can connect (bound under a umask of 0177, so there is no window with a wider mode).
// A path that exists is refused with -EEXIST unless it is a socket nobody listens on (a stale one
// left by a killed server), which is removed first. Errors: -ENAMETOOLONG (sun_path holds 107
// bytes), -EEXIST, -EACCES, -ENOENT (no such directory), -EADDRINUSE (a live server listens there).
int unix_listen(const char* path, int backlog, unsigned mode, int* out_fd);
// accept4(CLOEXEC | NONBLOCK). -EAGAIN when nobody is waiting; -EMFILE/-ENFILE.
int unix_accept(int listen_fd, int* out_fd);
// SO_PEERCRED: who connected (as of connect()).
int peer_credentials(int fd, int* pid, uint32_t* uid, uint32_t* gid);

struct RecvResult {
  size_t bytes = 0;     // bytes of the packet received (0 with eof: the peer closed or shut down)
  bool eof = false;
  bool truncated = false;      // MSG_TRUNC: the packet was larger than the buffer
  bool fds_truncated = false;  // MSG_CTRUNC: more descriptors than room (those are closed by the kernel)
  bool foreign_cmsg = false;   // a control message other than SCM_RIGHTS (closed/ignored)
  int nfds = 0;
};
// One packet without blocking (MSG_DONTWAIT | MSG_CMSG_CLOEXEC); descriptors it carried (at most
// max_fds are taken) land in fds[]: the caller owns them, whatever it decides about the packet.
// -EAGAIN: nothing queued.
int recv_packet(int fd, void* buf, size_t len, int* fds, int max_fds, RecvResult* out);
// One packet, with nfds descriptors (may be 0), MSG_NOSIGNAL; blocking unless dontwait.
int send_packet(int fd, const void* buf, size_t len, const int* fds, int nfds, bool dontwait);

// A memfd or tmpfs file the server may use as shared memory: a regular file on tmpfs of at least
// min_size bytes; with need_seals, sealed against shrinking (F_SEAL_SHRINK), so mapping it is safe
// from a client that truncates it afterwards. 0, -EBADF, -EINVAL (not a tmpfs regular file),
// -ENOSPC (smaller than min_size), -EPERM (not sealed). *size gets its size.
int check_shared_file(int fd, uint64_t min_size, bool need_seals, uint64_t* size);
// lseek(SEEK_DATA) says the file holds data at off (1) or a hole there (0); -errno otherwise.
int has_data(int fd, uint64_t off);

}  // namespace pm::sys
