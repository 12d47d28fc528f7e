// Mapping: one mmap()ed region, owned once. See native/engine/region.h for the lifetime rules.
#pragma once

#include <napi.h>

#include <memory>
#include <optional>
#include <vector>

#include "../engine/region.h"

namespace pm {

namespace engine {
class Mirror;
struct WriteErrorReport;
}  // namespace engine

class Mapping : public Napi::ObjectWrap<Mapping> {
 public:
  static Napi::Function Init(Napi::Env env);
  // The native factory: map({kind, length, prot, shared, populate, hugetlb, hugePageSize, sync,
  // path, fd, offset, name, create, mode}).
  static Napi::Value Map(const Napi::CallbackInfo& info);
  static Mapping* Unwrap(Napi::Value v);  // throws TypeError when v is not a live Mapping

  explicit Mapping(const Napi::CallbackInfo& info);
  ~Mapping() override;

  std::shared_ptr<Region> region() const { return region_; }
  Region& live(Napi::Env env);      // throws ERR_PAGEMIRROR_CLOSED after close()
  void DetachBuffer();             // before anything that makes JS access unsafe: bytes and every view
  // Checks [off, off+len) lies inside and returns the absolute address.
  uint64_t Range(Napi::Env env, uint64_t off, uint64_t len, bool page_aligned = true);
  // For calls that fault [off, off+len) in on the JavaScript thread (a pin, advise('populate*'), a
  // UFFDIO_COPY reading this mapping): ERR_PAGEMIRROR_WOULD_FAULT if part of it is registered with a
  // Userfaultfd, whose faults JavaScript may have to resolve, and a page would fault. `what` names
  // the call in the message.
  void CheckNoJsFault(Napi::Env env, uint64_t off, uint64_t len, bool write, const std::string& what);

 private:
  Napi::Value Address(const Napi::CallbackInfo& info);
  Napi::Value Length(const Napi::CallbackInfo& info);
  Napi::Value Info(const Napi::CallbackInfo& info);
  Napi::Value Buffer(const Napi::CallbackInfo& info);
  Napi::Value Protect(const Napi::CallbackInfo& info);
  Napi::Value Advise(const Napi::CallbackInfo& info);
  Napi::Value Sync(const Napi::CallbackInfo& info);
  Napi::Value Remap(const Napi::CallbackInfo& info);
  Napi::Value Fallocate(const Napi::CallbackInfo& info);
  Napi::Value Truncate(const Napi::CallbackInfo& info);
  Napi::Value Residency(const Napi::CallbackInfo& info);
  Napi::Value Cachestat(const Napi::CallbackInfo& info);
  Napi::Value Pagemap(const Napi::CallbackInfo& info);
  Napi::Value Statx(const Napi::CallbackInfo& info);
  Napi::Value ReadInto(const Napi::CallbackInfo& info);
  Napi::Value WriteFrom(const Napi::CallbackInfo& info);
  Napi::Value Unmap(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  // Closes this environment's live mirrors of the region (pinned ones only give up their lease);
  // returns the first of them that lost data (copies the file could not take, or an
  // unacknowledged loss), with what it lost in *loss, or null.
  std::shared_ptr<engine::Mirror> CloseMirrors(Napi::Env env, engine::WriteErrorReport* loss);

  void CheckNoFault(Napi::Env env, uint64_t off, uint64_t len, bool write);
  void FileRangeInvalidation(std::optional<Region::Invalidation>* inv, uint64_t file_off, uint64_t len,
                             InvalidateCause cause);

  std::shared_ptr<Region> region_;
  Napi::Reference<Napi::ArrayBuffer> buffer_;  // weak: the one ArrayBuffer over the whole memory
  std::vector<Napi::Reference<Napi::ArrayBuffer>> views_;  // weak: windows handed out by view()
  Napi::ArrayBuffer NewView(Napi::Env env, uint64_t off, uint64_t len);
};

}  // namespace pm
