// N-API glue of the fused recurrent cells: re-checks every size against the configuration that
// lib/ops/fusedRnn.ts sends, copies the lengths, allocates the outputs and runs the CPU kernels or
// the CUDA launchers.
#include "ops/registry.h"

#include <iterator>
#include <string>
#include <vector>

#include "ops/cells/fused_rnn_cpu.h"
#include "napi/args.h"
#include "napi/tensor.h"

namespace rk {
namespace {

struct CellsCall {
  Device dev = Device::CPU;
  rkcuda::FusedRnnArgs a;
  std::vector<int32_t> lengths;
  int64_t wx = 0, R = 0, b = 0, states = 0, h = 0, savedStates = 0, savedPre = 0;
};

// The request's tensors {wx, R, b, states0} and config {cell, batch, T, heads, headDim, returnLastOnly,
// lengths: Int32Array | null} (napi/args.h: Request).
CellsCall parseCells(Napi::Env env, const Request& r, const char* op) {
  CellsCall c;
  c.dev = r.device;
#ifndef RK_WITH_CUDA
  if (c.dev == Device::CUDA) throwNoCuda(env, op);
#endif
  const DType dt = r.dtype;
  const Napi::Object t = r.tensors, cfg = r.config;
  rkcuda::FusedRnnArgs& a = c.a;
  a.dt = dt;
  const int64_t cell = intField(env, cfg, "cell", op, 0);
  if (cell > int64_t(rkcuda::CellKind::Slstm))
    throwError(env, code::kArgument, std::string(op) + ": unknown cell " + std::to_string(cell));
  a.cell = rkcuda::CellKind(int(cell));
  a.batch = intField(env, cfg, "batch", op, 1);
  a.T = intField(env, cfg, "T", op, 1);
  a.heads = intField(env, cfg, "heads", op, 1);
  a.headDim = intField(env, cfg, "headDim", op, 1);
  a.returnLastOnly = flagField(cfg, "returnLastOnly");
  const int64_t G = rkcuda::cellGates(a.cell), S = rkcuda::cellStates(a.cell);
  c.wx = product(env, {a.batch, a.T, G, a.heads, a.headDim}, op);
  c.R = product(env, {G, a.heads, a.headDim, a.headDim}, op);
  c.b = product(env, {G, a.heads, a.headDim}, op);
  c.states = product(env, {S, a.batch, a.heads, a.headDim}, op);
  c.h = a.returnLastOnly ? product(env, {a.batch, a.heads, a.headDim}, op)
                         : product(env, {a.batch, a.T, a.heads, a.headDim}, op);
  c.savedStates = product(env, {a.T, c.states}, op);
  c.savedPre = product(env, {a.T, a.batch, G, a.heads, a.headDim}, op);
  Napi::Value lv = cfg.Get("lengths");
  if (!lv.IsNull() && !lv.IsUndefined()) {
    if (!lv.IsTypedArray() || lv.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
      throwError(env, code::kArgument, std::string(op) + ": lengths must be an Int32Array");
    Napi::Int32Array arr = lv.As<Napi::Int32Array>();
    if (int64_t(arr.ElementLength()) != a.batch)
      throwError(env, code::kShape,
                 std::string(op) + ": lengths has " + std::to_string(arr.ElementLength()) +
                     " entries, expected batch = " + std::to_string(a.batch));
    c.lengths.resize(size_t(a.batch));
    for (size_t i = 0; i < c.lengths.size(); ++i) {
      if (arr[i] < 0 || arr[i] > a.T)
        throwError(env, code::kArgument,
                   std::string(op) + ": lengths[" + std::to_string(i) + "] = " + std::to_string(arr[i]) +
                       " is outside [0, " + std::to_string(a.T) + "]");
      c.lengths[i] = arr[i];
    }
    a.lengths = c.lengths.data();
  }
  a.wx = tensorArg(env, t.Get("wx"), op, "wx", c.dev, dt, c.wx).data;
  a.R = tensorArg(env, t.Get("R"), op, "R", c.dev, dt, c.R).data;
  a.b = static_cast<const float*>(tensorArg(env, t.Get("b"), op, "b", c.dev, DType::F32, c.b).data);
  a.states0 = static_cast<const float*>(
      tensorArg(env, t.Get("states0"), op, "states0", c.dev, DType::F32, c.states, true).data);
  return c;
}

// fusedRnnForward({ device, dtype, tensors, config: { ..., training } })
//   -> { h, finalStates, savedStates | null, savedPre | null }
Napi::Value FusedRnnForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "fusedRnn";
  const Request r = parseRequest(env, info, op, "wx");
  CellsCall c = parseCells(env, r, op);
  const bool training = flagField(r.config, "training");
  rkcuda::FusedRnnOutputs o;
  Napi::Object out = Napi::Object::New(env);
  out.Set("h", allocOutput(env, c.dev, c.a.dt, c.h, &o.h, Init::Overwritten));
  out.Set("finalStates", allocOutput(env, c.dev, DType::F32, c.states, &o.finalStates, Init::Overwritten));
  out.Set("savedStates",
          optionalOutput(env, training, c.dev, DType::F32, c.savedStates, &o.savedStates, Init::Overwritten));
  out.Set("savedPre", optionalOutput(env, training, c.dev, DType::F32, c.savedPre, &o.savedPre, Init::Overwritten));
  auto k = std::make_shared<CellsCall>(std::move(c));  // the kernel's arguments, kept for an async call
  return launch(
      env, op, k->dev, out, [&] { return rkcuda::fusedRnnForward(k->a, o); },
      [k, o] { cells::fusedRnnForwardCpu(k->a, o); });
}

// fusedRnnBackward({ device, dtype, tensors, grads: { savedStates, savedPre, dh, dFinal },
//                    config: { ..., needDStates0 } })
//   -> { dwx, dR, db, dStates0 | null }
Napi::Value FusedRnnBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "fusedRnn.backward";
  const Request r = parseRequest(env, info, op, "wx", true);
  CellsCall c = parseCells(env, r, op);
  const Napi::Object gi = r.grads;
  const bool needDStates0 = flagField(r.config, "needDStates0");
  const DType dt = c.a.dt;
  rkcuda::FusedRnnGrads g;
  g.savedStates = static_cast<const float*>(
      tensorArg(env, gi.Get("savedStates"), op, "savedStates (saved for backward)", c.dev, DType::F32, c.savedStates)
          .data);
  g.savedPre = static_cast<const float*>(
      tensorArg(env, gi.Get("savedPre"), op, "savedPre (saved for backward)", c.dev, DType::F32, c.savedPre).data);
  g.dh = tensorArg(env, gi.Get("dh"), op, "grad of h", c.dev, dt, c.h, true).data;
  g.dFinal = static_cast<const float*>(
      tensorArg(env, gi.Get("dFinal"), op, "grad of finalStates", c.dev, DType::F32, c.states, true).data);
  Napi::Object out = Napi::Object::New(env);
  out.Set("dwx", allocOutput(env, c.dev, dt, c.wx, &g.dwx, Init::Overwritten));
  out.Set("dR", allocOutput(env, c.dev, dt, c.R, &g.dR, Init::Overwritten));
  out.Set("db", allocOutput(env, c.dev, DType::F32, c.b, &g.db, Init::Overwritten));
  out.Set("dStates0", optionalOutput(env, needDStates0, c.dev, DType::F32, c.states, &g.dStates0, Init::Overwritten));
  auto k = std::make_shared<CellsCall>(std::move(c));
  return launch(
      env, op, k->dev, out, [&] { return rkcuda::fusedRnnBackward(k->a, g); },
      [k, g] { cells::fusedRnnBackwardCpu(k->a, g); });
}

// fusedRnnCells() -> [{ name, code, gates, states }] (rkcuda::CellKind, kCellNames)
Napi::Value FusedRnnCells(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array out = Napi::Array::New(env, std::size(rkcuda::kCellNames));
  for (size_t i = 0; i < std::size(rkcuda::kCellNames); ++i) {
    const auto kind = rkcuda::CellKind(int(i));
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", rkcuda::kCellNames[i]);
    o.Set("code", int(i));
    o.Set("gates", rkcuda::cellGates(kind));
    o.Set("states", rkcuda::cellStates(kind));
    out.Set(uint32_t(i), o);
  }
  return out;
}

}  // namespace

void registerFusedRnn(Napi::Env env, Napi::Object exports) {
  exportFunction(env, exports, "fusedRnnCells", FusedRnnCells);
  exportFunction(env, exports, "fusedRnnForward", FusedRnnForward);
  exportFunction(env, exports, "fusedRnnBackward", FusedRnnBackward);
}

}  // namespace rk
