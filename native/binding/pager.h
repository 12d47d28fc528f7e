// The pager for JavaScript: a thin wrapper over native/engine/pager.
#pragma once

#include <napi.h>

#include <memory>

#include "../engine/pager.h"
#include "../engine/region.h"

namespace pm {

class PagerWrap : public Napi::ObjectWrap<PagerWrap> {
 public:
  static Napi::Function Init(Napi::Env env);
  // createPager(mapping, {fd, fileOffset, dataLength, granule, mode, residentLimit, policy,
  // prefetch, fill, seed, confirm, path, swapFd})
  static Napi::Value Create(const Napi::CallbackInfo& info);
  explicit PagerWrap(const Napi::CallbackInfo& info);
  ~PagerWrap() override = default;

 private:
  std::shared_ptr<engine::Pager> live(Napi::Env env);
  Napi::Value Attach(const Napi::CallbackInfo& info);
  Napi::Value Flush(const Napi::CallbackInfo& info);
  Napi::Value Prefetch(const Napi::CallbackInfo& info);
  Napi::Value Install(const Napi::CallbackInfo& info);
  Napi::Value Poison(const Napi::CallbackInfo& info);
  Napi::Value Stats(const Napi::CallbackInfo& info);
  Napi::Value LastError(const Napi::CallbackInfo& info);
  Napi::Value AcknowledgeLoss(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  std::shared_ptr<engine::Pager> pager_;
  std::unique_ptr<RegionPin> pin_;  // the region stays mapped while the engine may write into it
  friend std::shared_ptr<sys::FaultHandler> PagerHandler(Napi::Value v);
};

// The engine behind a PagerWrap, for a handler rule (setRules); TypeError for anything else.
std::shared_ptr<sys::FaultHandler> PagerHandler(Napi::Value v);

}  // namespace pm
