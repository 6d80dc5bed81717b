// Device buffers, argument checks, and the runtime entry points (devices, copies, conversions).
#include "napi/tensor.h"

#include <climits>
#include <cstring>
#ifdef __linux__
#include <sys/mman.h>
#endif
#include <vector>

#include "common/parallel.h"

namespace rk {

// The largest ArrayBuffer the engine can make (2^53 - 1 bytes); larger outputs are ERR_OUT_OF_MEMORY.
constexpr uint64_t kMaxHostBytes = (uint64_t(1) << 53) - 1;

Instance& instance(Napi::Env env) { return *env.GetInstanceData<Instance>(); }

static const char* const kNoCudaBuild =
    "this build of recurrent-kernels has no CUDA support (the prebuilt package has it; a source build needs "
    "nvcc on PATH and RK_CUDA=ON, or a GPU for RK_CUDA=AUTO)";

bool cudaUsable(Napi::Env env, std::string* reason) {
  Instance& inst = instance(env);
  if (!inst.cudaChecked) {
#ifdef RK_WITH_CUDA
    inst.cudaOk = rkcuda::available(&inst.cudaReason);
#else
    inst.cudaOk = false;
    inst.cudaReason = kNoCudaBuild;
#endif
    inst.cudaChecked = true;
  }
  if (reason) *reason = inst.cudaReason;
  return inst.cudaOk;
}

// ---------------------------------------------------------------- DeviceBuffer

Napi::Function DeviceBuffer::Define(Napi::Env env) {
  return DefineClass(
      env, "DeviceBuffer",
      {InstanceMethod<&DeviceBuffer::Dispose>("dispose"), InstanceAccessor<&DeviceBuffer::GetBytes>("bytes"),
       InstanceAccessor<&DeviceBuffer::GetDisposed>("disposed")});
}

DeviceBuffer::DeviceBuffer(const Napi::CallbackInfo& info) : Napi::ObjectWrap<DeviceBuffer>(info) {
  Napi::Env env = info.Env();
  state_ = instance(env).state;
  int64_t bytes = parseCount(env, info[0], "DeviceBuffer", "bytes");
#ifdef RK_WITH_CUDA
  std::string reason;
  if (!cudaUsable(env, &reason)) throwError(env, code::kDevice, "CUDA is not available: " + reason);
  throwIfFailed(env, rkcuda::deviceMalloc(&ptr_, size_t(bytes)), "allocating device memory");
  bytes_ = size_t(bytes);
  disposed_ = false;  // owns memory from here on
  state_->deviceBytes += bytes;
  state_->deviceBuffers += 1;
  if (bytes_ > 0) Napi::MemoryManagement::AdjustExternalMemory(env, int64_t(bytes_));
#else
  (void)bytes;
  throwNoCuda(env, "DeviceBuffer");
#endif
}

void DeviceBuffer::release() {
  if (disposed_) return;
  disposed_ = true;
#ifdef RK_WITH_CUDA
  if (state_ && state_->alive) {
    if (ptr_) rkcuda::deviceFree(ptr_);
    state_->deviceBytes -= int64_t(bytes_);
    state_->deviceBuffers -= 1;
    if (bytes_ > 0) Napi::MemoryManagement::AdjustExternalMemory(Env(), -int64_t(bytes_));
  }
#endif
  ptr_ = nullptr;
}

DeviceBuffer::~DeviceBuffer() {
  // Finalizer of a buffer that was never disposed. release() skips CUDA (and V8) once the
  // environment's cleanup hook has run: the process or worker is exiting. Otherwise the external
  // memory V8 was told about is given back too (allowed from finalizers).
  release();
}

Napi::Object DeviceBuffer::Allocate(Napi::Env env, size_t bytes, void** ptr) {
  Napi::Object obj = instance(env).deviceBufferCtor.New({Napi::Number::New(env, double(bytes))});
  *ptr = Napi::ObjectWrap<DeviceBuffer>::Unwrap(obj)->ptr_;
  return obj;
}

DeviceBuffer* DeviceBuffer::Unwrap(Napi::Value v) {
  if (!v.IsObject()) return nullptr;
  Napi::Object o = v.As<Napi::Object>();
  if (!o.InstanceOf(instance(v.Env()).deviceBufferCtor.Value())) return nullptr;
  return Napi::ObjectWrap<DeviceBuffer>::Unwrap(o);
}

Napi::Value DeviceBuffer::Dispose(const Napi::CallbackInfo& info) {
  release();
  return info.Env().Undefined();
}
Napi::Value DeviceBuffer::GetBytes(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), double(bytes_));
}
Napi::Value DeviceBuffer::GetDisposed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), disposed_);
}

// ---------------------------------------------------------------- pins (see sealPins)

// Whether an ArrayBuffer was detached (transferred away). Runs no JavaScript.
static bool isDetached(Napi::Env env, napi_value buffer) {
  bool detached = true;
  return napi_is_detached_arraybuffer(env, buffer, &detached) != napi_ok || detached;
}

static void pin(Napi::Env env, Napi::Value v, DeviceBuffer* device, const void* data, size_t length,
                const std::string& what) {
  Instance::Pin p;
  p.value = v;
  p.device = device;
  p.data = data;
  p.length = length;
  p.what = what;
  instance(env).pins.push_back(std::move(p));
}

void* pinnedData(Napi::Env env, Napi::TypedArray ta, const char* what) {
  void* data = static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
  pin(env, ta, nullptr, data, ta.ElementLength(), what);
  return data;
}

void sealPins(Napi::Env env, const char* op) {
  Instance& inst = instance(env);
  for (size_t i = inst.pinBase; i < inst.pins.size(); ++i) {
    const Instance::Pin& p = inst.pins[i];
    bool ok;
    if (p.device) {
      ok = !p.device->disposed() && p.device->data() == p.data;
    } else {
      // napi_get_typedarray_info runs no JavaScript.
      napi_typedarray_type type;
      size_t length = 0;
      void* data = nullptr;
      napi_value buffer;
      size_t offset = 0;
      ok = napi_get_typedarray_info(env, p.value, &type, &length, &data, &buffer, &offset) == napi_ok &&
           !isDetached(env, buffer) && (data == p.data || p.length == 0) && length == p.length;
    }
    if (!ok)
      throwError(
          env, code::kDisposed,
          std::string(op) + ": " + p.what + " was detached, resized or disposed while the call read its arguments");
  }
}

namespace {

// The pins of one native call, dropped when it returns or throws.
class CallScope {
 public:
  explicit CallScope(Instance& inst) : inst_(inst), saved_(inst.pinBase) {
    inst_.pinBase = inst_.pins.size();
    ++inst_.callDepth;
  }
  ~CallScope() {
    inst_.pins.resize(inst_.pinBase);
    inst_.pinBase = saved_;
    --inst_.callDepth;
  }
  CallScope(const CallScope&) = delete;
  CallScope& operator=(const CallScope&) = delete;

 private:
  Instance& inst_;
  size_t saved_;
};

}  // namespace

void exportFunction(Napi::Env env, Napi::Object exports, const char* name,
                    Napi::Value (*fn)(const Napi::CallbackInfo&)) {
  const std::string fname = name;
  exports.Set(name, Napi::Function::New(
                        env,
                        [fn, fname](const Napi::CallbackInfo& info) -> Napi::Value {
                          Napi::Env e = info.Env();
                          CallScope scope(instance(e));
                          try {
                            return fn(info);
                          } catch (const Napi::Error&) {
                            throw;
                          } catch (const std::bad_alloc&) {
                            throwError(e, code::kOutOfMemory, fname + ": out of host memory");
                          } catch (const std::length_error&) {
                            throwError(e, code::kOutOfMemory, fname + ": out of host memory (size too large)");
                          } catch (const std::exception& ex) {
                            throwError(e, code::kArgument, fname + ": " + ex.what());
                          }
                        },
                        name));
}

// ---------------------------------------------------------------- argument checks

Device parseDevice(Napi::Env env, Napi::Value v, const char* op) {
  if (v.IsString()) {
    std::string s = v.As<Napi::String>();
    if (s == "cpu") return Device::CPU;
    if (s == "cuda") return Device::CUDA;
  }
  throwError(env, code::kDevice, std::string(op) + ": device must be 'cpu' or 'cuda'");
}

DType parseDType(Napi::Env env, Napi::Value v, const char* op, const char* arg) {
  if (v.IsString()) {
    std::string s = v.As<Napi::String>();
    if (s == "float32") return DType::F32;
    if (s == "float16") return DType::F16;
    if (s == "bfloat16") return DType::BF16;
  }
  throwError(env, code::kDType, std::string(op) + ": " + arg + " dtype must be 'float32', 'float16' or 'bfloat16'");
}

int64_t checkedProduct(Napi::Env env, int64_t x, int64_t y, const char* op) {
  if (x < 0 || y < 0 || (y != 0 && x > INT64_MAX / y))
    throwError(env, code::kShape, std::string(op) + ": tensor size overflows");
  return x * y;
}

int64_t parseCount(Napi::Env env, Napi::Value v, const char* op, const char* arg) {
  if (v.IsNumber()) {
    double d = v.As<Napi::Number>().DoubleValue();
    if (d >= 0 && d <= 9007199254740991.0 && d == double(int64_t(d))) return int64_t(d);
  }
  throwError(env, code::kArgument, std::string(op) + ": " + arg + " must be a non-negative integer");
}

View tensorArg(Napi::Env env, Napi::Value v, const char* op, const char* arg, Device device, DType dtype,
               int64_t elements, bool optional, Access access) {
  View view;
  if (optional && (v.IsNull() || v.IsUndefined())) return view;
  std::string where = std::string(op) + ": " + arg;
  if (elements < 0) throwError(env, code::kShape, where + " is too large");
  if (device == Device::CPU) {
    if (!v.IsTypedArray()) throwError(env, code::kDevice, where + " must be CPU storage (a TypedArray)");
    Napi::TypedArray ta = v.As<Napi::TypedArray>();
    napi_typedarray_type want = dtype == DType::F32 ? napi_float32_array : napi_uint16_array;
    if (ta.TypedArrayType() != want)
      throwError(env, code::kDType, where + " storage does not match dtype " + dtypeName(dtype));
    if (isDetached(env, ta.ArrayBuffer()))
      throwError(env, code::kDisposed, where + " storage is detached (its ArrayBuffer was transferred)");
    if (int64_t(ta.ElementLength()) != elements)
      throwError(
          env, code::kShape,
          where + " has " + std::to_string(ta.ElementLength()) + " elements, expected " + std::to_string(elements));
    view.data = static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
    view.elements = elements;
    pin(env, ta, nullptr, view.data, ta.ElementLength(), where);
    if (asyncMode(env)) {
      const size_t bytes = ta.ByteLength();
      view.data = stageInput(env, ta, view.data, bytes, access == Access::Update);
    }
    return view;
  }
  DeviceBuffer* buf = DeviceBuffer::Unwrap(v);
  if (!buf) throwError(env, code::kDevice, where + " must be CUDA storage (a DeviceBuffer)");
  if (buf->disposed()) throwError(env, code::kDisposed, where + " was disposed");
  if (int64_t(buf->bytes()) != elements * int64_t(dtypeSize(dtype)))
    throwError(env, code::kShape,
               where + " holds " + std::to_string(buf->bytes()) + " bytes, expected " + std::to_string(elements) +
                   " elements of " + dtypeName(dtype));
  view.data = buf->data();
  view.elements = elements;
  pin(env, v, buf, view.data, buf->bytes(), where);
  return view;
}

// Large outputs are written once, right away: on Linux, ask for transparent huge pages so that the
// first touch costs one page fault per 2 MiB instead of one per 4 KiB.
static void adviseHugePages(void* data, size_t bytes) {
#ifdef __linux__
  constexpr size_t kHuge = size_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// A JS ArrayBuffer of `bytes`, made through the ArrayBuffer constructor (or the JS pool, which uses
// it): that throws a RangeError when the memory cannot be had, where the engine's native
// allocation would abort the process. Either becomes ERR_OUT_OF_MEMORY.
static Napi::ArrayBuffer hostBuffer(Napi::Env env, size_t bytes, Init init) {
  Instance& inst = instance(env);
  const auto fail = [&](const std::string& why) {
    throwError(env, code::kOutOfMemory,
               "allocating an output: cannot allocate an output of " + std::to_string(bytes) + " bytes" + why);
  };
  if (bytes > kMaxHostBytes) fail(" (larger than an ArrayBuffer can be)");
  Napi::Value v;
  try {
    if (init == Init::Overwritten && !inst.bufferSource.IsEmpty() && bytes >= inst.bufferSourceMinBytes)
      v = inst.bufferSource.Call({Napi::Number::New(env, double(bytes))});
    else
      v = inst.arrayBufferCtor.New({Napi::Number::New(env, double(bytes))});
  } catch (const Napi::Error& e) {
    fail(": " + e.Message());
  }
  if (!v.IsArrayBuffer() || v.As<Napi::ArrayBuffer>().ByteLength() != bytes)
    fail(" (the buffer source returned something else)");
  return v.As<Napi::ArrayBuffer>();
}

Napi::Value allocOutput(Napi::Env env, Device device, DType dtype, int64_t elements, void** data, Init init) {
  if (elements < 0 || uint64_t(elements) > kMaxHostBytes / dtypeSize(dtype))
    throwError(env, code::kOutOfMemory, "cannot allocate an output of " + std::to_string(elements) + " elements");
  size_t bytes = size_t(elements) * dtypeSize(dtype);
  if (device == Device::CUDA) {
    Napi::Object obj = DeviceBuffer::Allocate(env, bytes, data);
    pin(env, obj, Napi::ObjectWrap<DeviceBuffer>::Unwrap(obj), *data, bytes, "an output");
    return obj;
  }
  Napi::ArrayBuffer ab = hostBuffer(env, bytes, init);
  *data = ab.Data();
  adviseHugePages(*data, bytes);
  Napi::TypedArray out = dtype == DType::F32 ? Napi::TypedArray(Napi::Float32Array::New(env, size_t(elements), ab, 0))
                                             : Napi::TypedArray(Napi::Uint16Array::New(env, size_t(elements), ab, 0));
  pin(env, out, nullptr, *data, size_t(elements), "an output");
  return out;
}

#ifdef RK_WITH_CUDA
void submitDeviceWait(Napi::Env env, const char* op, Napi::Value out) {
  void* ev = nullptr;
  throwIfFailed(env, rkcuda::eventRecord(&ev), op);
  submitJob(env, op, Queue::Device, out, [ev] {
    const rkcuda::Status st = rkcuda::eventWait(ev);
    if (!st.ok()) throw JobError(st.outOfMemory ? code::kOutOfMemory : code::kCuda, st.message);
  });
}

void throwIfFailed(Napi::Env env, const rkcuda::Status& st, const char* what) {
  if (st.ok()) return;
  throwError(env, st.outOfMemory ? code::kOutOfMemory : code::kCuda, std::string(what) + ": " + st.message);
}
#endif

void throwNoCuda(Napi::Env env, const char* op) {
  throwError(env, code::kDevice, std::string(op) + ": " + kNoCudaBuild);
}

// ---------------------------------------------------------------- runtime entry points

namespace {

Napi::Value CudaStatus(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object r = Napi::Object::New(env);
  std::string reason;
  bool ok = cudaUsable(env, &reason);
#ifdef RK_WITH_CUDA
  r.Set("built", true);
#else
  r.Set("built", false);
#endif
  r.Set("available", ok);
  r.Set("reason", ok ? std::string() : reason);
  return r;
}

Napi::Value CudaProperties(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
#ifdef RK_WITH_CUDA
  rkcuda::DeviceProps p;
  throwIfFailed(env, rkcuda::deviceProperties(&p), "reading device properties");
  Napi::Object r = Napi::Object::New(env);
  r.Set("name", p.name);
  r.Set("computeCapability", std::to_string(p.major) + "." + std::to_string(p.minor));
  r.Set("multiProcessorCount", p.multiProcessorCount);
  r.Set("totalMemory", double(p.totalGlobalMem));
  r.Set("l2CacheSize", double(p.l2CacheSize));
  r.Set("sharedMemoryPerBlockOptin", double(p.sharedMemPerBlockOptin));
  // Theoretical DRAM bandwidth (double data rate): clock * 2 * bus width.
  r.Set("peakBandwidthGBs", double(p.memoryClockRateKHz) * 1e3 * 2.0 * (p.memoryBusWidth / 8.0) / 1e9);
  r.Set("driverVersion", p.driverVersion);
  r.Set("runtimeVersion", p.runtimeVersion);
  return r;
#else
  throwNoCuda(env, "cuda.deviceProperties");
#endif
}

Napi::Value CudaSynchronize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
#ifdef RK_WITH_CUDA
  throwIfFailed(env, rkcuda::synchronize(), "cuda.synchronize");
  return env.Undefined();
#else
  throwNoCuda(env, "cuda.synchronize");
#endif
}

// copy(storage, fromDevice, toDevice, dtype, elements) -> new storage on toDevice, same contents.
Napi::Value Copy(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Device from = parseDevice(env, info[1], "copy");
  Device to = parseDevice(env, info[2], "copy");
  DType dt = parseDType(env, info[3], "copy", "tensor");
  int64_t n = parseCount(env, info[4], "copy", "elements");
  View src = tensorArg(env, info[0], "copy", "tensor", from, dt, n);
  void* dst = nullptr;
  Napi::Value out = allocOutput(env, to, dt, n, &dst, Init::Overwritten);
  sealPins(env, "copy");
  const size_t bytes = size_t(n) * dtypeSize(dt);
  if (from == Device::CPU && to == Device::CPU) {
    constexpr int64_t kPiece = 1 << 16;
    auto* d = static_cast<uint8_t*>(dst);
    auto* s = static_cast<const uint8_t*>(src.data);
    const int64_t total = int64_t(bytes);
    parallelFor((total + kPiece - 1) / kPiece, 16, [&](int64_t b, int64_t e) {
      std::memcpy(d + b * kPiece, s + b * kPiece, size_t(std::min(total, e * kPiece) - b * kPiece));
    });
    return out;
  }
#ifdef RK_WITH_CUDA
  if (from == Device::CUDA && to == Device::CPU && asyncMode(env)) {
    // await t.data(): the copy (which waits for the queued work) runs on the device queue's thread.
    const void* from = src.data;
    submitJob(env, "to('cpu')", Queue::Device, out, [dst, from, bytes] {
      const rkcuda::Status st = rkcuda::copyDeviceToHost(dst, from, bytes);
      if (!st.ok()) throw JobError(st.outOfMemory ? code::kOutOfMemory : code::kCuda, st.message);
    });
    return out;
  }
  rkcuda::Status st = from == Device::CPU ? rkcuda::copyHostToDevice(dst, src.data, bytes)
                      : to == Device::CPU ? rkcuda::copyDeviceToHost(dst, src.data, bytes)
                                          : rkcuda::copyDeviceToDevice(dst, src.data, bytes);
  throwIfFailed(env, st, to == Device::CPU ? "to('cpu')" : "to('cuda')");
  return out;
#else
  throwNoCuda(env, "to('cuda')");
#endif
}

template <typename From, typename To> void convertHost(const void* src, void* dst, int64_t n) {
  const From* s = static_cast<const From*>(src);
  To* d = static_cast<To*>(dst);
  parallelFor(n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) d[i] = Storage<To>::store(Storage<From>::load(s[i]));
  });
}

// convert(device, storage, fromDtype, toDtype, elements) -> new storage of toDtype
Napi::Value Convert(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Device dev = parseDevice(env, info[0], "convert");
  DType from = parseDType(env, info[2], "convert", "source");
  DType to = parseDType(env, info[3], "convert", "target");
  int64_t n = parseCount(env, info[4], "convert", "elements");
  View src = tensorArg(env, info[1], "convert", "tensor", dev, from, n);
  void* dst = nullptr;
  Napi::Value out = allocOutput(env, dev, to, n, &dst, Init::Overwritten);
  return launch(
      env, "convert", dev, out, [&] { return rkcuda::convert(from, src.data, to, dst, n); },
      [&] {
        dispatchDType(from, [&](auto f) {
          dispatchDType(to, [&](auto t) { convertHost<decltype(f), decltype(t)>(src.data, dst, n); });
        });
      });
}

// setBufferSource(fn, minBytes): fn(bytes) -> ArrayBuffer supplies large CPU outputs that the
// kernel overwrites entirely (lib/pool.ts reuses disposed ones).
Napi::Value SetBufferSource(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsFunction()) throwError(env, code::kArgument, "setBufferSource: expected a function");
  Instance& inst = instance(env);
  inst.bufferSource = Napi::Persistent(info[0].As<Napi::Function>());
  inst.bufferSourceMinBytes = size_t(parseCount(env, info[1], "setBufferSource", "minBytes"));
  return env.Undefined();
}

Napi::Value MemoryStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto& st = *instance(env).state;
  Napi::Object r = Napi::Object::New(env);
  r.Set("deviceBytes", double(st.deviceBytes.load()));
  r.Set("deviceBuffers", double(st.deviceBuffers.load()));
  return r;
}

Napi::Value NumThreads(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), numThreads()); }

// Benchmark timing with CUDA events: timerStart() -> handle; timerStop(handle) -> milliseconds.
Napi::Value TimerStart(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
#ifdef RK_WITH_CUDA
  void* ev = nullptr;
  throwIfFailed(env, rkcuda::eventRecordStart(&ev), "cuda timer");
  return Napi::External<void>::New(env, ev);
#else
  throwNoCuda(env, "cuda timer");
#endif
}
Napi::Value TimerStop(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
#ifdef RK_WITH_CUDA
  if (!info[0].IsExternal()) throwError(env, code::kArgument, "cuda timer: expected a handle from timerStart");
  float ms = 0;
  throwIfFailed(env, rkcuda::eventElapsedMs(info[0].As<Napi::External<void>>().Data(), &ms), "cuda timer");
  return Napi::Number::New(env, ms);
#else
  throwNoCuda(env, "cuda timer");
#endif
}

}  // namespace

void registerTensor(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DeviceBuffer::Define(env);
  instance(env).deviceBufferCtor = Napi::Persistent(ctor);
  instance(env).arrayBufferCtor = Napi::Persistent(env.Global().Get("ArrayBuffer").As<Napi::Function>());
  exports.Set("DeviceBuffer", ctor);
  exportFunction(env, exports, "cudaStatus", CudaStatus);
  exportFunction(env, exports, "cudaProperties", CudaProperties);
  exportFunction(env, exports, "cudaSynchronize", CudaSynchronize);
  exportFunction(env, exports, "copy", Copy);
  exportFunction(env, exports, "convert", Convert);
  exportFunction(env, exports, "setBufferSource", SetBufferSource);
  exportFunction(env, exports, "memoryStats", MemoryStats);
  exportFunction(env, exports, "numThreads", NumThreads);
  exportFunction(env, exports, "timerStart", TimerStart);
  exportFunction(env, exports, "timerStop", TimerStop);
}

}  // namespace rk
