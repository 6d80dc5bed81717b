// N-API glue of Mamba-2: re-checks every size against the configuration that lib/ops/mamba2Scan.ts
// and mamba2StateUpdate.ts send, allocates the outputs and runs the CPU kernels or the CUDA
// launchers. The scan itself is linear attention's (linearAttentionForward / Backward).
#include <string>

#include "ops/registry.h"
#include "ops/ssd/mamba2_scan_cpu.h"
#include "napi/args.h"
#include "napi/tensor.h"

namespace rk {
namespace {

using rkcuda::Mamba2GateArgs;

struct GateCall {
  Mamba2GateArgs a;
  int64_t elems = 0, heads = 0, dWidth = 0;  // x's elements, dt's, and D's
};

// config { rows, validRows (optional), H, P, dtSoftplus, clamp, dtMin, dtMax, dPerChannel }; tensors { x, dt, A,
// dtBias, D, z } (each of dt, A, D, z read only where `need` names it: dtBias, D and z are optional where read).
enum Need { kDt = 1, kD = 2, kZ = 4, kZRequired = 8 };
GateCall parseGate(Napi::Env env, const Request& r, const char* op, int need) {
#ifndef RK_WITH_CUDA
  if (r.device == Device::CUDA) throwNoCuda(env, op);
#endif
  GateCall c;
  Mamba2GateArgs& a = c.a;
  const Napi::Object t = r.tensors, cfg = r.config;
  a.dt = r.dtype;
  a.rows = intField(env, cfg, "rows", op, 1);
  a.H = intField(env, cfg, "H", op, 1);
  a.P = intField(env, cfg, "P", op, 1);
  a.dtSoftplus = flagField(cfg, "dtSoftplus");
  a.clamp = flagField(cfg, "clamp");
  if (a.clamp) {
    a.dtMin = boundField(env, cfg, "dtMin", op);
    a.dtMax = boundField(env, cfg, "dtMax", op);
  }
  a.dPerChannel = flagField(cfg, "dPerChannel");
  if (!cfg.Get("validRows").IsUndefined()) {
    a.validRows = intField(env, cfg, "validRows", op, 0);
    if (a.validRows > a.rows) throwError(env, code::kShape, std::string(op) + ": validRows must be at most rows");
  }
  c.heads = product(env, {a.rows, a.H}, op);
  c.elems = product(env, {c.heads, a.P}, op);
  c.dWidth = a.dPerChannel ? product(env, {a.H, a.P}, op) : a.H;
  a.x = tensorArg(env, t.Get("x"), op, "x", r.device, a.dt, c.elems).data;
  if (need & kDt) {
    a.dtIn = tensorArg(env, t.Get("dt"), op, "dt", r.device, a.dt, c.heads).data;
    a.A = static_cast<const float*>(tensorArg(env, t.Get("A"), op, "A", r.device, DType::F32, a.H).data);
    a.dtBias =
        static_cast<const float*>(tensorArg(env, t.Get("dtBias"), op, "dtBias", r.device, DType::F32, a.H, true).data);
  }
  if (need & kD)
    a.D = static_cast<const float*>(tensorArg(env, t.Get("D"), op, "D", r.device, DType::F32, c.dWidth, true).data);
  if (need & (kZ | kZRequired))
    a.z = tensorArg(env, t.Get("z"), op, "z", r.device, a.dt, c.elems, !(need & kZRequired)).data;
  return c;
}

// mamba2Prepare({ device, dtype, tensors: { x, dt, A, dtBias }, config }) -> { g (fp32 [rows, H]), v (like x) }
Napi::Value Mamba2Prepare(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "mamba2Scan (gate)";
  const Request r = parseRequest(env, info, op, "x");
  const GateCall c = parseGate(env, r, op, kDt);
  float* g = nullptr;
  void* v = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("g", allocOutput(env, r.device, DType::F32, c.heads, &g, Init::Overwritten));
  out.Set("v", allocOutput(env, r.device, c.a.dt, c.elems, &v, Init::Overwritten));
  const Mamba2GateArgs a = c.a;
  return launch(
      env, op, r.device, out, [&] { return rkcuda::mamba2Prepare(a, g, v); },
      [a, g, v] { ssd::mamba2PrepareCpu(a, g, v); });
}

// mamba2Finish({ tensors: { x, o, D, z }, config }) -> { y }: y = (o + D x) * silu(z)
Napi::Value Mamba2Finish(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "mamba2Scan (output)";
  const Request r = parseRequest(env, info, op, "x");
  const GateCall c = parseGate(env, r, op, kD | kZ);
  const void* o = tensorArg(env, r.tensors.Get("o"), op, "o", r.device, c.a.dt, c.elems).data;
  void* y = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("y", allocOutput(env, r.device, c.a.dt, c.elems, &y, Init::Overwritten));
  const Mamba2GateArgs a = c.a;
  return launch(
      env, op, r.device, out, [&] { return rkcuda::mamba2Finish(a, o, y); },
      [a, o, y] { ssd::mamba2FinishCpu(a, o, y); });
}

// mamba2FinishBackward({ tensors: { x, o, D, z }, grads: { dy }, config }) -> { dO, dz }
Napi::Value Mamba2FinishBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "mamba2Scan (output).backward";
  const Request r = parseRequest(env, info, op, "x", true);
  const GateCall c = parseGate(env, r, op, kD | kZRequired);
  const void* o = tensorArg(env, r.tensors.Get("o"), op, "o", r.device, c.a.dt, c.elems).data;
  const void* dy = tensorArg(env, r.grads.Get("dy"), op, "grad of y", r.device, c.a.dt, c.elems).data;
  void *dO = nullptr, *dz = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("dO", allocOutput(env, r.device, c.a.dt, c.elems, &dO, Init::Overwritten));
  out.Set("dz", allocOutput(env, r.device, c.a.dt, c.elems, &dz, Init::Overwritten));
  const Mamba2GateArgs a = c.a;
  return launch(
      env, op, r.device, out, [&] { return rkcuda::mamba2FinishBackward(a, o, dy, dO, dz); },
      [a, o, dy, dO, dz] { ssd::mamba2FinishBackwardCpu(a, o, dy, dO, dz); });
}

// mamba2PrepareBackward({ tensors: { x, dt, A, dtBias, D }, grads: { dO, dv, dg }, config })
//   -> { dx, ddt, dA, dDtBias | null, dD | null }; dO (the gradient of y before the gate) is needed
//   only with D.
Napi::Value Mamba2PrepareBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "mamba2Scan (gate).backward";
  const Request r = parseRequest(env, info, op, "x", true);
  const GateCall c = parseGate(env, r, op, kDt | kD);
  const Mamba2GateArgs& a0 = c.a;
  const void* dO = tensorArg(env, r.grads.Get("dO"), op, "grad of y", r.device, a0.dt, c.elems, a0.D == nullptr).data;
  const void* dv = tensorArg(env, r.grads.Get("dv"), op, "grad of v", r.device, a0.dt, c.elems).data;
  const float* dg =
      static_cast<const float*>(tensorArg(env, r.grads.Get("dg"), op, "grad of g", r.device, DType::F32, c.heads).data);
  void *dx = nullptr, *ddt = nullptr;
  float *dA = nullptr, *dDtBias = nullptr, *dD = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("dx", allocOutput(env, r.device, a0.dt, c.elems, &dx, Init::Overwritten));
  out.Set("ddt", allocOutput(env, r.device, a0.dt, c.heads, &ddt, Init::Overwritten));
  out.Set("dA", allocOutput(env, r.device, DType::F32, a0.H, &dA));
  out.Set("dDtBias", optionalOutput(env, a0.dtBias != nullptr, r.device, DType::F32, a0.H, &dDtBias));
  out.Set("dD", optionalOutput(env, a0.D != nullptr, r.device, DType::F32, c.dWidth, &dD));
  const Mamba2GateArgs a = c.a;
  return launch(
      env, op, r.device, out, [&] { return rkcuda::mamba2PrepareBackward(a, dO, dv, dg, dx, ddt, dA, dDtBias, dD); },
      [a, dO, dv, dg, dx, ddt, dA, dDtBias, dD] {
        ssd::mamba2PrepareBackwardCpu(a, dO, dv, dg, dx, ddt, dA, dDtBias, dD);
      });
}

// mamba2TransposeStates({ device, dtype: 'float32', tensors: { src }, config: { count, rows, cols } })
//   -> { dst }: dst[m][c][r] = src[m][r][c]
Napi::Value Mamba2TransposeStates(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "mamba2Scan (states)";
  const Request r = parseRequest(env, info, op, "src");
#ifndef RK_WITH_CUDA
  if (r.device == Device::CUDA) throwNoCuda(env, op);
#endif
  const int64_t count = intField(env, r.config, "count", op, 0), rows = intField(env, r.config, "rows", op, 1),
                cols = intField(env, r.config, "cols", op, 1);
  const int64_t n = product(env, {count, rows, cols}, op);
  const float* src =
      static_cast<const float*>(tensorArg(env, r.tensors.Get("src"), op, "states", r.device, DType::F32, n).data);
  float* dst = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("dst", allocOutput(env, r.device, DType::F32, n, &dst, Init::Overwritten));
  return launch(
      env, op, r.device, out, [&] { return rkcuda::mamba2TransposeStates(src, dst, count, rows, cols); },
      [src, dst, count, rows, cols] { ssd::mamba2TransposeStatesCpu(src, dst, count, rows, cols); });
}

// mamba2Step({ device, dtype, tensors: { state, x, dt, A, B, C, D, z, dtBias }, config: { batch, tokens,
//   rows (= batch * tokens), H, P, G, N, dtSoftplus, clamp, dtMin, dtMax, dPerChannel, updateState, returnIntermediate
//   } })
//   -> { y, intermediate | null }; state fp32 [batch, H, P, N] updated in place (updateState).
Napi::Value Mamba2Step(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "mamba2StateUpdate";
  const Request r = parseRequest(env, info, op, "x");
  const Napi::Object cfg = r.config;
  rkcuda::Mamba2StepArgs s;
  s.batch = intField(env, cfg, "batch", op, 1);
  s.T = intField(env, cfg, "tokens", op, 1);
  s.G = intField(env, cfg, "G", op, 1);
  s.N = intField(env, cfg, "N", op, 1);
  GateCall c = parseGate(env, r, op, kDt | kD | kZ);
  s.gate = c.a;
  if (s.gate.rows != s.batch * s.T) throwError(env, code::kShape, std::string(op) + ": rows must be batch * tokens");
  if (s.gate.H % s.G != 0) throwError(env, code::kShape, std::string(op) + ": G must divide H");
  const int64_t bc = product(env, {s.batch, s.T, s.G, s.N}, op);
  const int64_t stateElems = product(env, {s.batch, s.gate.H, s.gate.P, s.N}, op);
  s.B = tensorArg(env, r.tensors.Get("B"), op, "B", r.device, s.gate.dt, bc).data;
  s.C = tensorArg(env, r.tensors.Get("C"), op, "C", r.device, s.gate.dt, bc).data;
  s.state = static_cast<float*>(
      tensorArg(env, r.tensors.Get("state"), op, "state", r.device, DType::F32, stateElems, false, Access::Update)
          .data);
  s.update = flagField(cfg, "updateState");
  void* y = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("y", allocOutput(env, r.device, s.gate.dt, c.elems, &y, Init::Overwritten));
  out.Set("intermediate", optionalOutput(env, flagField(cfg, "returnIntermediate"), r.device, DType::F32,
                                         product(env, {s.T, stateElems}, op), &s.intermediate, Init::Overwritten));
  return launch(
      env, op, r.device, out, [&] { return rkcuda::mamba2Step(s, y); }, [s, y] { ssd::mamba2StepCpu(s, y); });
}

}  // namespace

void registerMamba2Scan(Napi::Env env, Napi::Object exports) {
  exportFunction(env, exports, "mamba2Prepare", Mamba2Prepare);
  exportFunction(env, exports, "mamba2Finish", Mamba2Finish);
  exportFunction(env, exports, "mamba2FinishBackward", Mamba2FinishBackward);
  exportFunction(env, exports, "mamba2PrepareBackward", Mamba2PrepareBackward);
  exportFunction(env, exports, "mamba2TransposeStates", Mamba2TransposeStates);
  exportFunction(env, exports, "mamba2Step", Mamba2Step);
}

}  // namespace rk
