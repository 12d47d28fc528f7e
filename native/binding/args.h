// Argument checks shared by the binding classes. The TypeScript layer validates first and gives
// the friendlier message; these keep a direct caller of the addon from crashing the process.
#pragma once

#include <napi.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "errors.h"

namespace pm {

inline uint64_t ToU64(const Napi::Value& v, const char* name) {
  Napi::Env env = v.Env();
  if (v.IsBigInt()) {
    bool lossless = true;
    uint64_t x = v.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) throw CodedRangeError(env, "ERR_OUT_OF_RANGE", std::string(name) + " is out of range");
    return x;
  }
  if (!v.IsNumber()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", std::string(name) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0) || d > 9007199254740991.0 || std::floor(d) != d)
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE", std::string(name) + " must be a non-negative safe integer");
  return static_cast<uint64_t>(d);
}

inline int64_t ToI64(const Napi::Value& v, const char* name) {
  Napi::Env env = v.Env();
  if (!v.IsNumber()) throw CodedTypeError(env, "ERR_INVALID_ARG_TYPE", std::string(name) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (std::floor(d) != d || std::fabs(d) > 9007199254740991.0)
    throw CodedRangeError(env, "ERR_OUT_OF_RANGE", std::string(name) + " must be an integer");
  return static_cast<int64_t>(d);
}

inline bool OptBool(const Napi::Object& o, const char* key, bool def = false) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return def;
  if (!v.IsBoolean()) throw CodedTypeError(o.Env(), "ERR_INVALID_ARG_TYPE", std::string(key) + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

inline uint64_t OptU64(const Napi::Object& o, const char* key, uint64_t def) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return def;
  return ToU64(v, key);
}

inline std::string OptString(const Napi::Object& o, const char* key, const std::string& def = "") {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return def;
  if (!v.IsString()) throw CodedTypeError(o.Env(), "ERR_INVALID_ARG_TYPE", std::string(key) + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

inline Napi::Object ArgObject(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (info.Length() <= i || !info[i].IsObject())
    throw CodedTypeError(info.Env(), "ERR_INVALID_ARG_TYPE", std::string(name) + " must be an object");
  return info[i].As<Napi::Object>();
}

inline void CheckAligned(Napi::Env env, uint64_t v, uint64_t page, const char* name) {
  if (v % page != 0)
    throw CodedRangeError(env, "ERR_PAGEMIRROR_UNALIGNED",
                          std::string(name) + " (" + std::to_string(v) + ") is not a multiple of the page size " +
                              std::to_string(page));
}

}  // namespace pm
