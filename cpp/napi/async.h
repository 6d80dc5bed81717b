// The Promise form of the native calls. lib/ makes an op's native call through asyncCall(fn, ...args):
// the op binding runs as usual (argument checks, outputs allocated on the JS thread), except that
//   - every CPU input is copied (tensorArg), so that nothing the caller does to its arrays meanwhile
//     (dispose, a transfer of the ArrayBuffer) can reach the kernel; inputs the kernel updates in
//     place are copied back when the call completes. The copies are made on the JS thread (only
//     there can an ArrayBuffer be detached, so a copy never races a transfer), in slices;
//   - launch() hands the kernel to a queue instead of running it: CPU kernels run one call at a time
//     on one queue thread, which is the calling thread of the persistent pool's parallelFor (so
//     concurrent async calls share the pool's threads instead of multiplying them); CUDA calls are
//     launched on the JS thread as in the sync form and a second queue thread waits for their
//     completion.
// asyncCall returns { out, promise, job }: out is the binding's result; promise and job only when it
// submitted a kernel. asyncCopy(job, maxBytes) copies up to maxBytes more of the inputs and returns
// true once the kernel is queued (lib/ calls it until then, yielding to the event loop in between);
// asyncCancel(job) asks the kernel to stop; asyncPoll(job, us) waits briefly for a short call. The promise
// settles on the JS thread once the kernel has stopped: resolved (the outputs, which lib/ got back
// from the binding and holds unseen, are complete) or rejected with a typed error (ERR_ABORTED after
// asyncCancel(), ERR_OUT_OF_MEMORY, ERR_CUDA, ...). A cancelled kernel stops at its next cancelPoint().
// The outputs are referenced until then. When an environment shuts down (a worker terminated), its
// queued calls are dropped and the running one is cancelled and waited for.
#pragma once
#include <napi.h>

#include <atomic>
#include <cstddef>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace rk {

// A typed failure of a queued call (e.g. a CUDA error), rejected with this code and message.
struct JobError : std::exception {
  JobError(std::string c, std::string m) : code(std::move(c)), message(std::move(m)) {}
  const char* what() const noexcept override { return message.c_str(); }
  std::string code, message;
};

struct AsyncJob;

// An async call being prepared (during asyncCall).
struct AsyncStaging {
  // A CPU input of the call. Its copy is made on the JS thread in slices (asyncCopy), so
  // that a large input does not hold up the event loop, and the kernel is queued once every copy is
  // complete; a copy that finds its source detached (transferred) meanwhile fails the call.
  struct Input {
    napi_ref array = nullptr;  // the caller's TypedArray
    const void* source = nullptr;
    size_t bytes = 0, copied = 0;
    std::shared_ptr<void> copy;
    bool update = false;  // written by the kernel: copied back when the call completes
  };
  std::shared_ptr<std::atomic<bool>> cancel = std::make_shared<std::atomic<bool>>(false);
  std::vector<Input> inputs;
  std::shared_ptr<AsyncJob> job;  // set once a kernel is submitted
  napi_ref promise = nullptr;     // held until asyncCall returns it
  int depth = 0;                  // the native call depth of the call that is the async one
};

// Whether the binding running now prepares an async call: only the call that asyncCall makes does (a
// getter run by it that calls the addon again runs synchronously).
bool asyncMode(Napi::Env env);
// In async mode: the (not yet filled) copy of a CPU input of `bytes` bytes at data, owned by the
// call; update: the kernel writes it, and it is copied back into array when the call completes.
void* stageInput(Napi::Env env, Napi::TypedArray array, const void* data, size_t bytes, bool update);

enum class Queue { Cpu, Device };
// Queues run (on the CPU queue: the kernel; on the device queue: a wait for the device, or a copy)
// for the call being prepared, keeping out referenced until it settles. run reports failure by
// throwing (Cancelled, JobError, std::bad_alloc).
void submitJob(Napi::Env env, const char* op, Queue queue, Napi::Value out, std::function<void()> run);

// asyncCall(), asyncStats(); and the cleanup of the environment's calls at shutdown.
void registerAsync(Napi::Env env, Napi::Object exports);

}  // namespace rk
