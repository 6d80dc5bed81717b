// Tensor storage as seen by native code: CPU tensors are JS TypedArrays (Float32Array, or a
// Uint16Array holding fp16/bf16 bits); CUDA tensors are DeviceBuffer objects. Ops receive raw
// storage plus dtype and shape from lib/, and re-check sizes here so that no native call can read
// or write out of bounds.
#pragma once
#include <napi.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "napi/async.h"
#include "common/dtype.h"
#include "napi/errors.h"

#include "cuda/common/api.h"

namespace rk {

enum class Device : int { CPU = 0, CUDA = 1 };

// Per-environment state (one per Node.js environment / worker thread), shared with every
// DeviceBuffer so that finalizers that run after the environment's cleanup never touch CUDA.
struct EnvState {
  std::atomic<bool> alive{true};
  std::atomic<int64_t> deviceBytes{0};
  std::atomic<int64_t> deviceBuffers{0};
};

struct Instance {
  std::shared_ptr<EnvState> state = std::make_shared<EnvState>();
  Napi::FunctionReference deviceBufferCtor;
  Napi::FunctionReference bufferSource;  // JS pool of reusable CPU output buffers (lib/pool.ts)
  size_t bufferSourceMinBytes = 0;
  Napi::FunctionReference arrayBufferCtor;  // the ArrayBuffer constructor, taken when the addon loads
  // Storage pinned by the native calls in progress (see sealPins); pinBase is where the innermost
  // call's pins start (a getter run by one call may itself make a call).
  struct Pin {
    napi_value value = nullptr;
    class DeviceBuffer* device = nullptr;  // CUDA storage, else a TypedArray
    const void* data = nullptr;
    size_t length = 0;
    std::string what;
  };
  std::vector<Pin> pins;
  size_t pinBase = 0;
  int callDepth = 0;  // native calls in progress (a getter run by one call may make another)
  // The async call being prepared (napi/async.h), and this environment's queued calls.
  std::shared_ptr<AsyncStaging> staging;
  std::shared_ptr<struct AsyncEnv> asyncEnv;
  // Whether CUDA can be used, and why not: asked of the driver once per environment.
  bool cudaChecked = false, cudaOk = false;
  std::string cudaReason;
};
// CUDA availability for this environment (cached); reason says why not.
bool cudaUsable(Napi::Env env, std::string* reason);
Instance& instance(Napi::Env env);

// A block of device memory owned by JS. Freed by dispose() or, as a backup, by the finalizer.
class DeviceBuffer : public Napi::ObjectWrap<DeviceBuffer> {
 public:
  static Napi::Function Define(Napi::Env env);
  static Napi::Object Allocate(Napi::Env env, size_t bytes, void** ptr);
  static DeviceBuffer* Unwrap(Napi::Value v);  // nullptr when v is not a DeviceBuffer
  explicit DeviceBuffer(const Napi::CallbackInfo& info);
  ~DeviceBuffer() override;
  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  bool disposed() const { return disposed_; }

 private:
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value GetBytes(const Napi::CallbackInfo& info);
  Napi::Value GetDisposed(const Napi::CallbackInfo& info);
  void release();
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  bool disposed_ = true;  // until the allocation succeeds
  std::shared_ptr<EnvState> state_;
};

// Raw view of one tensor argument after its checks.
struct View {
  void* data = nullptr;
  int64_t elements = 0;
};

Device parseDevice(Napi::Env env, Napi::Value v, const char* op);
DType parseDType(Napi::Env env, Napi::Value v, const char* op, const char* arg);
int64_t parseCount(Napi::Env env, Napi::Value v, const char* op, const char* arg);
// x * y, throwing ERR_SHAPE instead of overflowing.
int64_t checkedProduct(Napi::Env env, int64_t x, int64_t y, const char* op);

// How a kernel uses a tensor argument: Read, or Update (written in place).
enum class Access { Read, Update };
// Checks that v is storage of the given device and dtype with exactly `elements` elements.
// When optional and v is null/undefined, returns an empty view. For an async call, the view of a
// CPU tensor is a copy (copied back after the kernel for Update; see napi/async.h).
View tensorArg(Napi::Env env, Napi::Value v, const char* op, const char* arg, Device device, DType dtype,
               int64_t elements, bool optional = false, Access access = Access::Read);

// How an output will be written: Zeroed outputs start as zeros; Overwritten ones are filled
// entirely by the kernel, so a large CPU one may reuse a pooled buffer with stale contents.
enum class Init { Zeroed, Overwritten };
// Allocates output storage: a TypedArray on CPU, a DeviceBuffer on CUDA (uninitialised).
Napi::Value allocOutput(Napi::Env env, Device device, DType dtype, int64_t elements, void** data,
                        Init init = Init::Zeroed);
// The same for a typed pointer (e.g. a float* field of a kernel's argument struct).
template <class P>
Napi::Value allocOutput(Napi::Env env, Device device, DType dtype, int64_t elements, P** data,
                        Init init = Init::Zeroed) {
  void* p = nullptr;
  Napi::Value v = allocOutput(env, device, dtype, elements, &p, init);
  *data = static_cast<P*>(p);
  return v;
}
// An output that only some calls want: null (and *data left null) when not wanted.
template <class P>
Napi::Value optionalOutput(Napi::Env env, bool want, Device device, DType dtype, int64_t elements, P** data,
                           Init init = Init::Zeroed) {
  return want ? allocOutput(env, device, dtype, elements, data, init) : Napi::Value(env.Null());
}

// Raw pointers into JS memory stay valid only while no JavaScript runs. Reading an argument object
// can run a getter, and allocating an output can call the JS buffer pool; either could detach
// storage whose pointer was already taken. So every storage that tensorArg and allocOutput hand out
// is pinned, and sealPins re-checks them all after the call's last contact with JavaScript, right
// before its kernel: storage detached, shrunk or disposed meanwhile is ERR_DISPOSED, never a dangling
// pointer. Nothing may call into JavaScript between sealPins and the end of the kernel.
void sealPins(Napi::Env env, const char* op);
// The data of a TypedArray the binding made itself, pinned like the outputs of allocOutput.
void* pinnedData(Napi::Env env, Napi::TypedArray ta, const char* what);

// Exports fn as name. Every native entry point goes through this: it scopes the call's pins, and
// turns C++ failures into typed errors (std::bad_alloc and friends: ERR_OUT_OF_MEMORY) instead of
// letting them terminate the process.
void exportFunction(Napi::Env env, Napi::Object exports, const char* name,
                    Napi::Value (*fn)(const Napi::CallbackInfo&));

#ifdef RK_WITH_CUDA
void throwIfFailed(Napi::Env env, const rkcuda::Status& st, const char* what);
#endif
[[noreturn]] void throwNoCuda(Napi::Env env, const char* op);

#ifdef RK_WITH_CUDA
// For an async call: queues a wait for the device work launched so far.
void submitDeviceWait(Napi::Env env, const char* op, Napi::Value out);
#endif

// The tail every op binding shares: seals the call's pins (see sealPins), runs the kernel on the
// tensors' device -- cuda() returns the rkcuda::Status of its launch, cpu() runs on the host -- and
// returns out. Without the CUDA path, cuda is never called (and never compiled into the binary).
// For an async call (napi/async.h) cpu is queued and runs later on another thread, so it must
// capture by value (views, argument structs), never references to the binding's locals.
template <class Cuda, class Cpu>
Napi::Value launch(Napi::Env env, const char* op, Device device, Napi::Value out, Cuda&& cuda, Cpu&& cpu) {
  sealPins(env, op);
  if (device == Device::CUDA) {
#ifdef RK_WITH_CUDA
    throwIfFailed(env, cuda(), op);
    if (asyncMode(env)) submitDeviceWait(env, op, out);
#else
    (void)cuda;
    throwNoCuda(env, op);
#endif
  } else if (asyncMode(env)) {
    submitJob(env, op, Queue::Cpu, out, std::function<void()>(std::forward<Cpu>(cpu)));
  } else {
    cpu();
  }
  return out;
}

void registerTensor(Napi::Env env, Napi::Object exports);

}  // namespace rk
