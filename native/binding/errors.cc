#include "errors.h"

#include <cstring>
#include <string>

namespace pm {

const char* ErrnoName(int e) {
  switch (e) {
#define E(x) case x: return #x;
    E(EPERM) E(ENOENT) E(ESRCH) E(EINTR) E(EIO) E(ENXIO) E(E2BIG) E(ENOEXEC) E(EBADF) E(ECHILD)
    E(EAGAIN) E(ENOMEM) E(EACCES) E(EFAULT) E(EBUSY) E(EEXIST) E(EXDEV) E(ENODEV) E(ENOTDIR)
    E(EISDIR) E(EINVAL) E(ENFILE) E(EMFILE) E(ENOTTY) E(ETXTBSY) E(EFBIG) E(ENOSPC) E(ESPIPE)
    E(EROFS) E(EMLINK) E(EPIPE) E(ERANGE) E(ENAMETOOLONG) E(ENOSYS) E(EOVERFLOW) E(EOPNOTSUPP)
    E(ETIMEDOUT) E(EHWPOISON) E(ECANCELED) E(ENOTEMPTY)
    E(ENODATA) E(EBADFD) E(ELOOP) E(EDEADLK) E(ENOLCK)
    E(EADDRINUSE) E(ECONNREFUSED) E(ENOTCONN) E(ESHUTDOWN) E(EPROTO) E(EBADMSG) E(EMSGSIZE) E(EUSERS)
    E(EPROTONOSUPPORT) E(ENOTSOCK)
#undef E
    default: return "UNKNOWN";
  }
}

static Napi::Error Decorate(Napi::Env env, Napi::Error err, const char* code) {
  err.Value().Set("code", Napi::String::New(env, code));
  return err;
}

Napi::Error SystemError(Napi::Env env, int neg_errno, const char* syscall, const ErrorExtra& extra) {
  const int e = neg_errno < 0 ? -neg_errno : neg_errno;
  const char* name = ErrnoName(e);
  std::string msg = std::string(name) + ": " + std::strerror(e) + ", " + syscall;
  if (extra.path) msg += std::string(" '") + extra.path + "'";
  if (extra.hint) msg += std::string(" (") + extra.hint + ")";
  Napi::Error err = Napi::Error::New(env, msg);
  Napi::Object o = err.Value();
  o.Set("errno", Napi::Number::New(env, -e));
  o.Set("code", Napi::String::New(env, name));
  o.Set("syscall", Napi::String::New(env, syscall));
  if (extra.path) o.Set("path", Napi::String::New(env, extra.path));
  if (extra.bytes >= 0) o.Set("bytes", Napi::Number::New(env, static_cast<double>(extra.bytes)));
  if (extra.address) o.Set("address", Napi::BigInt::New(env, extra.address));
  return err;
}

void ThrowSystemError(Napi::Env env, int neg_errno, const char* syscall, const ErrorExtra& extra) {
  throw SystemError(env, neg_errno, syscall, extra);
}

Napi::Error CodedTypeError(Napi::Env env, const char* code, const std::string& message) {
  return Decorate(env, Napi::TypeError::New(env, message), code);
}

Napi::Error CodedRangeError(Napi::Env env, const char* code, const std::string& message) {
  return Decorate(env, Napi::RangeError::New(env, message), code);
}

Napi::Error StateError(Napi::Env env, const char* code, const std::string& message) {
  return Decorate(env, Napi::Error::New(env, message), code);
}

}  // namespace pm
