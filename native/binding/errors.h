// Errors shaped the way Node users expect: a kernel error becomes an Error with `code`, `errno`
// (negative, as libuv reports it), `syscall`, `path` when there is one, and a message of the form
// "ENOENT: no such file or directory, open '/x'". Misuse is a TypeError or RangeError with Node's
// ERR_* codes, thrown before any system call.
#pragma once

#include <napi.h>

#include <cstdint>
#include <string>

namespace pm {

struct ErrorExtra {
  const char* path = nullptr;
  const char* hint = nullptr;   // appended to the message: what to do about it
  int64_t bytes = -1;           // partial progress of a resolve ioctl
  uint64_t address = 0;         // the address it concerned, when there is one
};

Napi::Error SystemError(Napi::Env env, int neg_errno, const char* syscall, const ErrorExtra& extra = {});
[[noreturn]] void ThrowSystemError(Napi::Env env, int neg_errno, const char* syscall,
                                   const ErrorExtra& extra = {});
Napi::Error CodedTypeError(Napi::Env env, const char* code, const std::string& message);
Napi::Error CodedRangeError(Napi::Env env, const char* code, const std::string& message);
// An Error with a pagemirror code (ERR_PAGEMIRROR_*) for states that are not kernel errors.
Napi::Error StateError(Napi::Env env, const char* code, const std::string& message);

const char* ErrnoName(int positive_errno);

}  // namespace pm
