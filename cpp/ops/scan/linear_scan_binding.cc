// N-API glue of the linear scan: argument checks (again, after lib/) and dispatch to the CPU
// kernels or the CUDA launchers.
#include "ops/registry.h"

#include "cuda/scan/linear_scan.h"
#include "ops/scan/linear_scan_cpu.h"
#include "napi/args.h"
#include "napi/tensor.h"

namespace rk {
namespace {

constexpr const char* kFwd = "linearScan";

// The request's config { rows, length, reverse }.
scan::LinearScanShape parseShape(Napi::Env env, const Request& r, const char* op) {
  return {intField(env, r.config, "rows", op, 0), intField(env, r.config, "length", op, 0),
          flagField(r.config, "reverse")};
}

// linearScanForward({ device, dtype, tensors: { a, b, h0 | null },
//                     config: { rows, length, reverse, returnFinal } }) -> { h, finalState | null }
Napi::Value LinearScanForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Request r = parseRequest(env, info, kFwd, "a");
  const Device dev = r.device;
  const DType dt = r.dtype;
  const scan::LinearScanShape s = parseShape(env, r, kFwd);
  const int64_t rows = s.rows, length = s.length, n = checkedProduct(env, rows, length, kFwd);
  const bool wantFinal = flagField(r.config, "returnFinal");
  View a = tensorArg(env, r.tensors.Get("a"), kFwd, "a", dev, dt, n);
  View b = tensorArg(env, r.tensors.Get("b"), kFwd, "b", dev, dt, n);
  View h0 = tensorArg(env, r.tensors.Get("h0"), kFwd, "initialState", dev, DType::F32, rows, true);
  void* h = nullptr;
  void* fin = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("h", allocOutput(env, dev, dt, n, &h, Init::Overwritten));
  out.Set("finalState", optionalOutput(env, wantFinal, dev, DType::F32, rows, &fin));
  const auto cuda = [&] {
    return rkcuda::linearScanForward(dt, a.data, b.data, static_cast<const float*>(h0.data), h,
                                     static_cast<float*>(fin), rows, length, s.reverse);
  };
  return launch(env, kFwd, dev, out, cuda, [=] {
    scan::linearScanForwardCpu(dt, a.data, b.data, static_cast<const float*>(h0.data), h, static_cast<float*>(fin), s);
  });
}

// linearScanBackward({ device, dtype, tensors: { a, h0 | null }, grads: { h, gh | null, gFinal | null },
//                      config: { rows, length, reverse, needGh0 } }) -> { ga, gb, gh0 | null }
Napi::Value LinearScanBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "linearScan.backward";
  const Request r = parseRequest(env, info, op, "a", true);
  const Device dev = r.device;
  const DType dt = r.dtype;
  const scan::LinearScanShape s = parseShape(env, r, op);
  const int64_t rows = s.rows, length = s.length, n = checkedProduct(env, rows, length, op);
  const bool needGh0 = flagField(r.config, "needGh0");
  View a = tensorArg(env, r.tensors.Get("a"), op, "a", dev, dt, n);
  View h0 = tensorArg(env, r.tensors.Get("h0"), op, "initialState", dev, DType::F32, rows, true);
  View h = tensorArg(env, r.grads.Get("h"), op, "h", dev, dt, n);
  View gh = tensorArg(env, r.grads.Get("gh"), op, "grad of h", dev, dt, n, true);
  View gFinal = tensorArg(env, r.grads.Get("gFinal"), op, "grad of finalState", dev, DType::F32, rows, true);
  void *ga = nullptr, *gb = nullptr, *gh0 = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("ga", allocOutput(env, dev, dt, n, &ga, Init::Overwritten));
  out.Set("gb", allocOutput(env, dev, dt, n, &gb, Init::Overwritten));
  out.Set("gh0", optionalOutput(env, needGh0, dev, DType::F32, rows, &gh0));
  const auto cuda = [&] {
    return rkcuda::linearScanBackward(dt, a.data, h.data, static_cast<const float*>(h0.data), gh.data,
                                      static_cast<const float*>(gFinal.data), ga, gb, static_cast<float*>(gh0), rows,
                                      length, s.reverse);
  };
  return launch(env, op, dev, out, cuda, [=] {
    scan::linearScanBackwardCpu(dt, a.data, h.data, static_cast<const float*>(h0.data), gh.data,
                                static_cast<const float*>(gFinal.data), ga, gb, static_cast<float*>(gh0), s);
  });
}

}  // namespace

void registerLinearScan(Napi::Env env, Napi::Object exports) {
  exportFunction(env, exports, "linearScanForward", LinearScanForward);
  exportFunction(env, exports, "linearScanBackward", LinearScanBackward);
}

}  // namespace rk
