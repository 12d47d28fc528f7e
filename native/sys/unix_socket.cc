#include "unix_socket.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/vfs.h>
#include <unistd.h>

namespace pm::sys {

namespace {

int make_addr(const char* path, sockaddr_un* a) {
  std::memset(a, 0, sizeof *a);
  a->sun_family = AF_UNIX;
  const size_t n = std::strlen(path);
  if (n == 0) return -EINVAL;
  if (n >= sizeof a->sun_path) return -ENAMETOOLONG;
  std::memcpy(a->sun_path, path, n);
  return 0;
}

// A socket file nobody listens on: connect() is refused.
bool stale_socket(const sockaddr_un& a) {
  int s = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (s < 0) return false;
  int rc = ::connect(s, reinterpret_cast<const sockaddr*>(&a), sizeof a);
  int err = errno;
  ::close(s);
  return rc < 0 && err == ECONNREFUSED;
}

}  // namespace

int unix_listen(const char* path, int backlog, unsigned mode, int* out_fd) {
  sockaddr_un a;
  if (int rc = make_addr(path, &a)) return rc;
  struct stat st;
  if (::lstat(path, &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) return -EEXIST;
    if (!stale_socket(a)) return -EADDRINUSE;
    if (::unlink(path) < 0 && errno != ENOENT) return -errno;
  } else if (errno != ENOENT) {
    return -errno;
  }
  int s = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (s < 0) return -errno;
  // The socket file gets 0777 & ~umask at bind: bind under 0177 so it is never wider than 0600.
  const mode_t old = ::umask(0177);
  int rc = ::bind(s, reinterpret_cast<const sockaddr*>(&a), sizeof a);
  int err = errno;
  ::umask(old);
  if (rc < 0) {
    ::close(s);
    return -err;
  }
  if (::chmod(path, mode) < 0 || ::listen(s, backlog) < 0) {
    err = errno;
    ::unlink(path);
    ::close(s);
    return -err;
  }
  *out_fd = s;
  return 0;
}

int unix_accept(int listen_fd, int* out_fd) {
  int c = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  if (c < 0) return -errno;
  *out_fd = c;
  return 0;
}

int peer_credentials(int fd, int* pid, uint32_t* uid, uint32_t* gid) {
  ucred c{};
  socklen_t n = sizeof c;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c, &n) < 0) return -errno;
  *pid = c.pid;
  *uid = c.uid;
  *gid = c.gid;
  return 0;
}

int recv_packet(int fd, void* buf, size_t len, int* fds, int max_fds, RecvResult* out) {
  *out = RecvResult{};
  // Room for the most descriptors one packet may carry and then some: a larger cmsg is
  // MSG_CTRUNC, and the kernel closes what did not fit.
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 72)];
  iovec iov{buf, len};
  msghdr m{};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  m.msg_control = control;
  m.msg_controllen = sizeof control;
  ssize_t n;
  do n = ::recvmsg(fd, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n < 0) return -errno;
  out->bytes = static_cast<size_t>(n);
  out->truncated = (m.msg_flags & MSG_TRUNC) != 0;
  out->fds_truncated = (m.msg_flags & MSG_CTRUNC) != 0;
  for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) {
      out->foreign_cmsg = true;
      continue;
    }
    const size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < k; i++) {
      int d;
      std::memcpy(&d, CMSG_DATA(c) + i * sizeof(int), sizeof d);
      if (out->nfds < max_fds) fds[out->nfds++] = d;
      else {
        ::close(d);
        out->fds_truncated = true;
      }
    }
  }
  // A zero-length packet without descriptors is how SOCK_SEQPACKET reports the peer's shutdown.
  out->eof = n == 0 && out->nfds == 0 && !out->fds_truncated;
  return 0;
}

int send_packet(int fd, const void* buf, size_t len, const int* fds, int nfds, bool dontwait) {
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 72)];
  if (nfds < 0 || nfds > 72) return -EINVAL;
  iovec iov{const_cast<void*>(buf), len};
  msghdr m{};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  if (nfds > 0) {
    m.msg_control = control;
    m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    cmsghdr* c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    std::memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  ssize_t n;
  do n = ::sendmsg(fd, &m, MSG_NOSIGNAL | (dontwait ? MSG_DONTWAIT : 0));
  while (n < 0 && errno == EINTR);
  return n < 0 ? -errno : 0;
}

int check_shared_file(int fd, uint64_t min_size, bool need_seals, uint64_t* size) {
  struct stat st;
  if (::fstat(fd, &st) < 0) return -errno;
  struct statfs fs;
  if (::fstatfs(fd, &fs) < 0) return -errno;
  if (!S_ISREG(st.st_mode) || fs.f_type != TMPFS_MAGIC) return -EINVAL;
  *size = static_cast<uint64_t>(st.st_size);
  if (*size < min_size) return -ENOSPC;
  if (need_seals) {
    int seals = ::fcntl(fd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK)) return -EPERM;
  }
  // Opened for writing: a read-only descriptor cannot be written or punched.
  int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0) return -errno;
  if ((fl & O_ACCMODE) != O_RDWR) return -EBADF;
  return 0;
}

int has_data(int fd, uint64_t off) {
  off_t r = ::lseek(fd, static_cast<off_t>(off), SEEK_DATA);
  if (r < 0) return errno == ENXIO ? 0 : -errno;
  return static_cast<uint64_t>(r) == off ? 1 : 0;
}

}  // namespace pm::sys
