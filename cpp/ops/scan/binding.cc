// N-API glue of the scan family: argument checks (again, after lib/) and dispatch to the CPU
// kernels or the CUDA launchers.
#include "ops/scan/binding.h"

#include "ops/scan/linear_scan_cpu.h"
#include "tensor/tensor.h"

namespace rk {
namespace {

constexpr const char* kFwd = "linearScan";

// linearScanForward(device, dtype, a, b, h0|null, rows, length, reverse, returnFinalState)
//   -> { h, finalState|null }
Napi::Value LinearScanForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Device dev = parseDevice(env, info[0], kFwd);
  DType dt = parseDType(env, info[1], kFwd, "a");
  int64_t rows = parseCount(env, info[5], kFwd, "rows");
  int64_t length = parseCount(env, info[6], kFwd, "length");
  scan::LinearScanShape s{rows, length, info[7].ToBoolean().Value()};
  bool wantFinal = info[8].ToBoolean().Value();
  int64_t n = checkedProduct(env, rows, length, kFwd);
  View a = tensorArg(env, info[2], kFwd, "a", dev, dt, n);
  View b = tensorArg(env, info[3], kFwd, "b", dev, dt, n);
  View h0 = tensorArg(env, info[4], kFwd, "initialState", dev, DType::F32, rows, true);
  void* h = nullptr;
  void* fin = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("h", allocOutput(env, dev, dt, n, &h, Init::Overwritten));
  out.Set("finalState", optionalOutput(env, wantFinal, dev, DType::F32, rows, &fin));
  const auto cuda = [&] {
    return rkcuda::linearScanForward(toCuda(dt), a.data, b.data, static_cast<const float*>(h0.data), h,
                                     static_cast<float*>(fin), rows, length, s.reverse);
  };
  return launch(env, kFwd, dev, out, cuda, [=] {
    scan::linearScanForwardCpu(dt, a.data, b.data, static_cast<const float*>(h0.data), h, static_cast<float*>(fin), s);
  });
}

// linearScanBackward(device, dtype, a, h, h0|null, gh|null, gFinal|null, rows, length, reverse, needGh0)
//   -> { ga, gb, gh0|null }
Napi::Value LinearScanBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "linearScan.backward";
  Device dev = parseDevice(env, info[0], op);
  DType dt = parseDType(env, info[1], op, "a");
  int64_t rows = parseCount(env, info[7], op, "rows");
  int64_t length = parseCount(env, info[8], op, "length");
  scan::LinearScanShape s{rows, length, info[9].ToBoolean().Value()};
  bool needGh0 = info[10].ToBoolean().Value();
  int64_t n = checkedProduct(env, rows, length, op);
  View a = tensorArg(env, info[2], op, "a", dev, dt, n);
  View h = tensorArg(env, info[3], op, "h", dev, dt, n);
  View h0 = tensorArg(env, info[4], op, "initialState", dev, DType::F32, rows, true);
  View gh = tensorArg(env, info[5], op, "grad of h", dev, dt, n, true);
  View gFinal = tensorArg(env, info[6], op, "grad of finalState", dev, DType::F32, rows, true);
  void *ga = nullptr, *gb = nullptr, *gh0 = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("ga", allocOutput(env, dev, dt, n, &ga, Init::Overwritten));
  out.Set("gb", allocOutput(env, dev, dt, n, &gb, Init::Overwritten));
  out.Set("gh0", optionalOutput(env, needGh0, dev, DType::F32, rows, &gh0));
  const auto cuda = [&] {
    return rkcuda::linearScanBackward(toCuda(dt), a.data, h.data, static_cast<const float*>(h0.data), gh.data,
                                      static_cast<const float*>(gFinal.data), ga, gb, static_cast<float*>(gh0), rows,
                                      length, s.reverse);
  };
  return launch(env, op, dev, out, cuda, [=] {
    scan::linearScanBackwardCpu(dt, a.data, h.data, static_cast<const float*>(h0.data), gh.data,
                                static_cast<const float*>(gFinal.data), ga, gb, static_cast<float*>(gh0), s);
  });
}

}  // namespace

void registerScan(Napi::Env env, Napi::Object exports) {
  exportFunction(env, exports, "linearScanForward", LinearScanForward);
  exportFunction(env, exports, "linearScanBackward", LinearScanBackward);
  registerSelectiveScan(env, exports);
}

}  // namespace rk
