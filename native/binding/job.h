// A native job: work on a dedicated thread, completion on the JavaScript thread, a Promise in
// between. Dedicated threads rather than libuv's pool because the work may sleep on a page fault
// for as long as the user's handler takes: four of those would starve every fs call in Node.
#pragma once

#include <napi.h>

#include <functional>
#include <memory>
#include <thread>

namespace pm {

template <typename State>
class NativeJob {
 public:
  using Work = std::function<void(State&)>;
  using Complete = std::function<Napi::Value(Napi::Env, State&)>;  // may throw Napi::Error

  static Napi::Promise Start(Napi::Env env, std::unique_ptr<State> state, Work work, Complete complete) {
    auto* job = new NativeJob{Napi::Promise::Deferred::New(env), std::move(state), std::move(work),
                              std::move(complete), {}};
    Napi::Promise promise = job->deferred.Promise();
    job->tsfn = Tsfn::New(env, "pagemirror-job", 0, 1, job);
    try {
      std::thread([job] {
        job->work(*job->state);
        // Finish() may delete the job as soon as the call is queued: keep our own handle.
        Tsfn tsfn = job->tsfn;
        if (tsfn.BlockingCall(job) != napi_ok) delete job;  // environment is closing
        tsfn.Release();
      }).detach();
    } catch (...) {
      job->tsfn.Release();
      job->deferred.Reject(Napi::Error::New(env, "could not start a native thread").Value());
    }
    return promise;
  }

 private:
  static void Finish(Napi::Env env, Napi::Function, NativeJob* context, NativeJob* job) {
    std::unique_ptr<NativeJob> owned(job);
    (void)context;
    if (env == nullptr) return;  // environment torn down; nobody is waiting
    try {
      job->deferred.Resolve(job->complete(env, *job->state));
    } catch (const Napi::Error& e) {
      job->deferred.Reject(e.Value());
    }
  }
  using Tsfn = Napi::TypedThreadSafeFunction<NativeJob, NativeJob, &NativeJob::Finish>;

 public:
  Napi::Promise::Deferred deferred;
  std::unique_ptr<State> state;
  Work work;
  Complete complete;
  Tsfn tsfn;
};

}  // namespace pm
