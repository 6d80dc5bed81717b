#include "napi/async.h"

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <new>
#include <thread>
#ifdef __linux__
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "common/parallel.h"
#include "napi/errors.h"
#include "napi/tensor.h"

namespace rk {

struct AsyncEnv;

// One async call, from its submission to its settlement.
struct AsyncJob : std::enable_shared_from_this<AsyncJob> {
  std::string op;
  Queue queue = Queue::Cpu;
  std::function<void()> run;
  std::shared_ptr<std::atomic<bool>> cancel;
  std::vector<AsyncStaging::Input> inputs;
  napi_ref out = nullptr;
  napi_deferred deferred = nullptr;
  std::shared_ptr<AsyncEnv> env;
  bool queued = false;                // JS thread: handed to its queue (or settled without running)
  bool settled = false;               // JS thread
  std::atomic<bool> finished{false};  // the queue thread is done with it (set before it is handed back)
  bool counted = false;               // JS thread: counted in AsyncEnv::unsettled
  // The outcome (written by the queue thread before the job is handed back).
  bool failed = false;
  std::string code, message;
  void fail(const char* c, const std::string& m) {
    failed = true;
    code = c;
    message = op + ": " + m;
  }
};
using Job = AsyncJob;

// The async calls of one environment (main thread or worker).
struct AsyncEnv {
  std::mutex m;
  std::condition_variable cv;
  bool closing = false;                    // guarded by m: the environment is shutting down
  int inQueue = 0;                         // guarded by m: queued or running
  std::vector<std::shared_ptr<Job>> done;  // guarded by m: finished, to settle on the JS thread
  // JS thread only:
  Napi::ThreadSafeFunction wake;  // calls settle() on the JS thread
  bool wakeMade = false;
  int unsettled = 0;  // while > 0, the wake-up keeps the event loop alive
};

namespace {

// How long a queue thread stays awake after a job, looking for the next one.
constexpr auto kStayAwake = std::chrono::milliseconds(1);

void settle(Napi::Env env, const std::shared_ptr<AsyncEnv>& ae);

// A queue thread running one job at a time (process-wide, never destroyed, started on first use).
class Executor {
 public:
  static Executor& get(Queue q) {
    static Executor* cpu = new Executor();
    static Executor* device = new Executor();
    return q == Queue::Cpu ? *cpu : *device;
  }

  void push(std::shared_ptr<Job> job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!started_) {
        std::thread([this] { loop(); }).detach();
        started_ = true;
      }
      jobs_.push_back(std::move(job));
      queued_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_one();
  }

  // Drops the queued jobs of ae and cancels its running one; returns how many were dropped.
  int dropEnv(const AsyncEnv* ae) {
    std::lock_guard<std::mutex> lock(mutex_);
    int dropped = 0;
    for (auto it = jobs_.begin(); it != jobs_.end();) {
      if ((*it)->env.get() == ae) {
        it = jobs_.erase(it);
        queued_.fetch_sub(1, std::memory_order_relaxed);
        ++dropped;
      } else {
        ++it;
      }
    }
    if (running_ && running_->env.get() == ae) running_->cancel->store(true);
    return dropped;
  }

 private:
  void loop() {
    // Async work is background work: the JavaScript thread (whose event loop the async forms exist to
    // keep free) wins the core when both want it. The pool threads that help a call keep theirs.
#ifdef __linux__
    setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 5);
#endif
    for (;;) {
      std::shared_ptr<Job> job;
      // Right after a job, look for the next one for a while before sleeping: a loop of awaited
      // calls then finds this thread awake (waking a sleeping one costs tens of microseconds).
      const auto until = std::chrono::steady_clock::now() + kStayAwake;
      while (queued_.load(std::memory_order_acquire) == 0 && std::chrono::steady_clock::now() < until)
        std::this_thread::yield();
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [this] { return !jobs_.empty(); });
        queued_.fetch_sub(1, std::memory_order_relaxed);
        job = std::move(jobs_.front());
        jobs_.pop_front();
        running_ = job;
      }
      execute(*job);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        running_.reset();
      }
      finish(job);
    }
  }

  static void execute(Job& job) {
    const auto fail = [&job](const char* code, const std::string& message) { job.fail(code, message); };
    CancelScope scope(job.cancel.get());
    try {
      // A CPU call cancelled while queued never starts. Device work already launched cannot be
      // stopped: its wait runs, and the call then counts as aborted.
      if (job.queue == Queue::Cpu) cancelPoint();
      job.run();
      if (job.queue == Queue::Device && job.cancel->load()) throw Cancelled();
    } catch (const Cancelled&) {
      fail(code::kAborted, "aborted");
    } catch (const JobError& e) {
      job.fail(e.code.c_str(), e.message);
    } catch (const std::bad_alloc&) {
      fail(code::kOutOfMemory, "out of host memory");
    } catch (const std::length_error&) {
      fail(code::kOutOfMemory, "out of host memory (size too large)");
    } catch (const std::exception& e) {
      fail(code::kArgument, e.what());
    }
    job.run = nullptr;  // what the kernel captured goes now, on this thread
  }

  static void finish(const std::shared_ptr<Job>& job) {
    AsyncEnv& ae = *job->env;
    std::lock_guard<std::mutex> lock(ae.m);
    ae.done.push_back(job);
    job->finished.store(true, std::memory_order_release);
    --ae.inQueue;
    ae.cv.notify_all();
    // Under the lock: once the environment is closing, its wake-up may be gone.
    if (!ae.closing) {
      std::shared_ptr<AsyncEnv> keep = job->env;
      ae.wake.NonBlockingCall([keep](Napi::Env env, Napi::Function) {
        try {
          settle(env, keep);
        } catch (...) {  // the environment is shutting down: nothing is left to settle for
        }
      });
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> jobs_;
  std::atomic<int> queued_{0};  // jobs_.size(), for the spinning thread
  std::shared_ptr<Job> running_;
  bool started_ = false;
};

napi_value refValue(napi_env env, napi_ref ref) {
  napi_value v = nullptr;
  if (ref != nullptr) napi_get_reference_value(env, ref, &v);
  return v;
}

// Whether the caller's array of an input still holds in.bytes bytes (it was not detached); *data
// receives where (JS thread).
bool attached(Napi::Env env, const AsyncStaging::Input& in, void** data) {
  napi_value v = refValue(env, in.array);
  size_t length = 0;
  napi_typedarray_type type;
  napi_value ab;
  size_t offset = 0;
  return napi_get_typedarray_info(env, v, &type, &length, data, &ab, &offset) == napi_ok &&
         Napi::TypedArray(env, v).ByteLength() == in.bytes;
}

// Settles one job (JS thread): copies in-place inputs back, then resolves with the binding's result
// or rejects with a typed error.
void settleOne(Napi::Env env, AsyncEnv& ae, Job& job) {
  if (job.settled) return;
  job.settled = true;
  Napi::HandleScope scope(env);
  for (const AsyncStaging::Input& in : job.inputs) {
    if (in.update && !job.failed) {
      void* data = nullptr;
      if (attached(env, in, &data) && data != nullptr) {
        std::memcpy(data, in.copy.get(), in.bytes);
      } else {
        job.fail(code::kDisposed, "the storage of a tensor it updates in place was detached meanwhile");
      }
    }
    if (in.array != nullptr) napi_delete_reference(env, in.array);
  }
  job.inputs.clear();
  napi_value out = refValue(env, job.out);
  napi_delete_reference(env, job.out);
  job.out = nullptr;
  if (job.failed) {
    Napi::Error err = Napi::Error::New(env, job.message);
    err.Set("code", Napi::String::New(env, job.code));
    napi_reject_deferred(env, job.deferred, err.Value());
  } else {
    napi_resolve_deferred(env, job.deferred, out);
  }
  if (job.counted && --ae.unsettled == 0) ae.wake.Unref(env);
  job.counted = false;
}

// Settles the finished jobs of ae (JS thread).
void settle(Napi::Env env, const std::shared_ptr<AsyncEnv>& ae) {
  std::vector<std::shared_ptr<Job>> jobs;
  {
    std::lock_guard<std::mutex> lock(ae->m);
    jobs.swap(ae->done);
  }
  for (const std::shared_ptr<Job>& job : jobs) settleOne(env, *ae, *job);
}

// copy(maxBytes) of asyncCall's result (JS thread): copies up to maxBytes more of the job's inputs;
// once all are copied, queues the job. True once the job is queued or settled.
bool copySlice(Napi::Env env, Job& job, size_t maxBytes) {
  if (job.queued) return true;
  AsyncEnv& ae = *job.env;
  const auto giveUp = [&](const char* code, const std::string& why) {
    job.fail(code, why);
    job.queued = true;
    settleOne(env, ae, job);
    return true;
  };
  if (job.cancel->load()) return giveUp(code::kAborted, "aborted");
  size_t budget = std::max<size_t>(maxBytes, 1);
  for (AsyncStaging::Input& in : job.inputs) {
    if (in.copied == in.bytes) continue;
    // Only JavaScript (this thread) can detach the source, so it stays put during this memcpy.
    void* data = nullptr;
    if (!attached(env, in, &data) || data != in.source)
      return giveUp(code::kDisposed,
                    "an input's storage was detached (its ArrayBuffer transferred) before the call "
                    "had copied it");
    const size_t n = std::min(budget, in.bytes - in.copied);
    std::memcpy(static_cast<uint8_t*>(in.copy.get()) + in.copied, static_cast<const uint8_t*>(data) + in.copied, n);
    in.copied += n;
    budget -= n;
    if (in.copied < in.bytes) return false;
    if (!in.update) {  // the caller's array is no longer needed
      napi_delete_reference(env, in.array);
      in.array = nullptr;
    }
    if (budget == 0) break;
  }
  for (const AsyncStaging::Input& in : job.inputs)
    if (in.copied < in.bytes) return false;
  {
    std::lock_guard<std::mutex> lock(ae.m);
    ++ae.inQueue;
  }
  job.queued = true;
  job.counted = true;  // until it settles, the pending wake-up keeps the event loop alive
  if (ae.unsettled++ == 0) ae.wake.Ref(env);
  Executor::get(job.queue).push(job.shared_from_this());
  return true;
}

AsyncStaging& staging(Napi::Env env) { return *instance(env).staging; }

// Drops a prepared call that will not run (its binding failed after staging inputs): its references
// go, and its promise (which no one holds) resolves, since a rejection no one handles is reported.
void drop(Napi::Env env, AsyncStaging& st) {
  for (const AsyncStaging::Input& in : st.inputs) napi_delete_reference(env, in.array);
  st.inputs.clear();
  if (Job* job = st.job.get()) {
    for (const AsyncStaging::Input& in : job->inputs) napi_delete_reference(env, in.array);
    job->inputs.clear();
    napi_delete_reference(env, job->out);
    job->out = nullptr;
    job->queued = true;
    napi_resolve_deferred(env, job->deferred, env.Undefined());
  }
  st.job.reset();
  if (st.promise != nullptr) napi_delete_reference(env, st.promise);
  st.promise = nullptr;
}

// asyncCall(fn, ...args) -> { out, promise, cancel, copy } (promise, cancel and copy only when fn
// queued a kernel): calls the native function fn with args as the async form of the call.
Napi::Value AsyncCall(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Instance& inst = instance(env);
  if (!info[0].IsFunction()) throwError(env, code::kArgument, "asyncCall: fn must be a function");
  if (inst.staging) throwError(env, code::kArgument, "asyncCall: async calls cannot nest");
  std::vector<napi_value> args;
  for (size_t i = 1; i < info.Length(); ++i) args.push_back(info[i]);
  auto st = std::make_shared<AsyncStaging>();
  st->depth = inst.callDepth + 1;
  inst.staging = st;
  Napi::Value out;
  try {
    out = info[0].As<Napi::Function>().Call(args);
  } catch (...) {
    inst.staging.reset();
    drop(env, *st);
    throw;
  }
  inst.staging.reset();
  Napi::Object r = Napi::Object::New(env);
  r.Set("out", out);
  if (!st->job) {  // nothing queued: the result is complete
    drop(env, *st);
    return r;
  }
  r.Set("promise", Napi::Value(env, refValue(env, st->promise)));
  napi_delete_reference(env, st->promise);
  st->promise = nullptr;
  r.Set("job", Napi::External<std::shared_ptr<Job>>::New(env, new std::shared_ptr<Job>(st->job),
                                                         [](Napi::Env, std::shared_ptr<Job>* p) { delete p; }));
  return r;
}

// The job handle of an asyncCall result (ERR_ARGUMENT for anything else).
Job& jobArg(const Napi::CallbackInfo& info, const char* fn) {
  Napi::Value v = info[0];
  napi_valuetype type;
  napi_typeof(info.Env(), v, &type);
  if (type != napi_external)
    throwError(info.Env(), code::kArgument, std::string(fn) + ": job must be an async call's job");
  // Externals of this addon are only made here, for jobs.
  return **v.As<Napi::External<std::shared_ptr<Job>>>().Data();
}

// asyncCopy(job, maxBytes) -> true once the job is queued (or settled): see copySlice.
Napi::Value AsyncCopy(const Napi::CallbackInfo& info) {
  Job& job = jobArg(info, "asyncCopy");
  const double max = info[1].IsNumber() ? info[1].As<Napi::Number>().DoubleValue() : 0;
  return Napi::Boolean::New(info.Env(), copySlice(info.Env(), job, max > 0 && max < 9e15 ? size_t(max) : 1));
}

// asyncCancel(job): asks the kernel to stop at its next cancel point.
Napi::Value AsyncCancel(const Napi::CallbackInfo& info) {
  jobArg(info, "asyncCancel").cancel->store(true);
  return info.Env().Undefined();
}

// asyncPoll(job, microseconds) -> whether the job has settled: waits up to that long for a queued job
// to finish and then settles the environment's finished jobs at once (a short call's result then
// comes back without a wake-up of the event loop, which costs tens of microseconds).
Napi::Value AsyncPoll(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Job& job = jobArg(info, "asyncPoll");
  const double us = info[1].IsNumber() ? info[1].As<Napi::Number>().DoubleValue() : 0;
  if (job.settled || !job.queued) return Napi::Boolean::New(env, job.settled);
  const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(int64_t(std::min(us, 1e4) * 1e3));
  while (!job.finished.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < until) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  if (!job.finished.load(std::memory_order_acquire)) return Napi::Boolean::New(env, false);
  settle(env, job.env);
  return Napi::Boolean::New(env, job.settled);
}

// asyncStats() -> { pending }: this environment's calls not yet settled.
Napi::Value AsyncStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object r = Napi::Object::New(env);
  r.Set("pending", instance(env).asyncEnv->unsettled);
  return r;
}

}  // namespace

bool asyncMode(Napi::Env env) {
  const Instance& inst = instance(env);
  return inst.staging != nullptr && inst.callDepth == inst.staging->depth;
}

void* stageInput(Napi::Env env, Napi::TypedArray array, const void* data, size_t bytes, bool update) {
  AsyncStaging::Input in;
  void* p = std::aligned_alloc(64, (std::max<size_t>(bytes, 1) + 63) / 64 * 64);
  if (p == nullptr) throwError(env, code::kOutOfMemory, "cannot copy an input of " + std::to_string(bytes) + " bytes");
  in.copy = std::shared_ptr<void>(p, std::free);

  in.source = data;
  in.bytes = bytes;
  in.update = update;
  if (napi_create_reference(env, array, 1, &in.array) != napi_ok)
    throwError(env, code::kOutOfMemory, "cannot reference an input");
  staging(env).inputs.push_back(std::move(in));
  return p;
}

void submitJob(Napi::Env env, const char* op, Queue queue, Napi::Value out, std::function<void()> run) {
  Instance& inst = instance(env);
  AsyncStaging& st = *inst.staging;
  if (st.job) throwError(env, code::kArgument, std::string(op) + ": one kernel per async call");
  std::shared_ptr<AsyncEnv> ae = inst.asyncEnv;
  if (!ae->wakeMade) {
    ae->wake = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}),
                                             "recurrent-kernels async", 0, 1);
    ae->wake.Unref(env);
    ae->wakeMade = true;
  }
  auto job = std::make_shared<Job>();
  job->op = op;
  job->queue = queue;
  job->run = std::move(run);
  job->cancel = st.cancel;
  job->inputs = std::move(st.inputs);
  job->env = ae;
  napi_value promise = nullptr;
  if (napi_create_reference(env, out, 1, &job->out) != napi_ok ||
      napi_create_promise(env, &job->deferred, &promise) != napi_ok ||
      napi_create_reference(env, promise, 1, &st.promise) != napi_ok)
    throwError(env, code::kOutOfMemory, std::string(op) + ": cannot make a promise");
  st.job = std::move(job);  // queued by copySlice once its inputs are copied
}

void registerAsync(Napi::Env env, Napi::Object exports) {
  Instance& inst = instance(env);
  inst.asyncEnv = std::make_shared<AsyncEnv>();
  std::shared_ptr<AsyncEnv> ae = inst.asyncEnv;
  // At shutdown no call of this environment may still touch its memory: drop the queued ones,
  // cancel the running one and wait for it. They are never settled (the environment is gone).
  env.AddCleanupHook([ae]() {
    std::unique_lock<std::mutex> lock(ae->m);
    ae->closing = true;
    lock.unlock();
    const int dropped = Executor::get(Queue::Cpu).dropEnv(ae.get()) + Executor::get(Queue::Device).dropEnv(ae.get());
    lock.lock();
    ae->inQueue -= dropped;
    ae->cv.wait(lock, [&] { return ae->inQueue == 0; });
    ae->done.clear();
  });
  exportFunction(env, exports, "asyncCall", AsyncCall);
  exportFunction(env, exports, "asyncCopy", AsyncCopy);
  exportFunction(env, exports, "asyncCancel", AsyncCancel);
  exportFunction(env, exports, "asyncPoll", AsyncPoll);
  exportFunction(env, exports, "asyncStats", AsyncStats);
}

}  // namespace rk
