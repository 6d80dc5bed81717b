// N-API glue of the Newton-iteration parallel RNN: re-checks every size and scalar against the
// configuration that lib/ops/newtonRnn.ts sends, allocates the outputs (the per-row statistics as
// host typed arrays on either device) and runs the CPU kernels or the CUDA launchers.
#include "ops/registry.h"

#include <cmath>
#include <iterator>
#include <string>

#include "ops/newton/newton_rnn_cpu.h"
#include "napi/args.h"
#include "napi/tensor.h"

namespace rk {
namespace {

struct NewtonCall {
  Device dev = Device::CPU;
  rkcuda::NewtonRnnArgs a;
  int64_t G = 0, S = 0, N = 0, wxElems = 0, rElems = 0, bElems = 0, stateElems = 0, trajElems = 0, yElems = 0;
};

float nonNegativeField(Napi::Env env, const Napi::Object& cfg, const char* name, const char* op) {
  Napi::Value v = cfg.Get(name);
  double s = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : NAN;
  if (!std::isfinite(s) || s < 0 || s > 3.0e38)
    throwError(env, code::kArgument, std::string(op) + ": " + name + " must be a finite non-negative number");
  return float(s);
}

// The request's tensors {wx, R, b, h0, guess} and config {cell, batch, T, heads, headDim, fullJacobian,
// sequential, fallbackSequential, maxIters, tolAbs, tolRel, damping, guess} (napi/args.h: Request).
NewtonCall parseNewton(Napi::Env env, const Request& r, const char* op) {
  NewtonCall c;
  c.dev = r.device;
  const DType dt = r.dtype;
  const Napi::Object t = r.tensors, cfg = r.config;
  rkcuda::NewtonRnnArgs& a = c.a;
  a.dt = dt;
  const int64_t cell = intField(env, cfg, "cell", op, 0);
  if (cell >= int64_t(std::size(rkcuda::kNewtonCells)))
    throwError(env, code::kArgument, std::string(op) + ": unknown cell " + std::to_string(cell));
  a.cell = rkcuda::NewtonCell(int(cell));
  const rkcuda::NewtonCellInfo& info = rkcuda::kNewtonCells[cell];
  const bool diag = info.diagonal;
  c.G = info.gates;
  c.S = info.states;
  a.batch = intField(env, cfg, "batch", op, 1);
  a.T = intField(env, cfg, "T", op, 1);
  a.heads = intField(env, cfg, "heads", op, 1);
  a.headDim = intField(env, cfg, "headDim", op, 1);
  a.fullJacobian = flagField(cfg, "fullJacobian");
  a.sequential = flagField(cfg, "sequential");
  a.fallbackSequential = flagField(cfg, "fallbackSequential");
  const int64_t maxIters = intField(env, cfg, "maxIters", op, 0);
  if (maxIters > 1000000) throwError(env, code::kArgument, std::string(op) + ": maxIters must be at most 1000000");
  a.maxIters = int(maxIters);
  a.tolAbs = nonNegativeField(env, cfg, "tolAbs", op);
  a.tolRel = nonNegativeField(env, cfg, "tolRel", op);
  a.damping = nonNegativeField(env, cfg, "damping", op);
  if (a.damping > 0 && a.fullJacobian && !diag)
    throwError(env, code::kArgument,
               std::string(op) +
                   ": damping needs per-channel Jacobians (jacobian 'diagonal' or a "
                   "diagonal cell); it is not supported with the full Jacobian");
  const int64_t guess = intField(env, cfg, "guess", op, 0);
  if (guess > 2) throwError(env, code::kArgument, std::string(op) + ": unknown guess " + std::to_string(guess));
  a.guess = rkcuda::NewtonGuess(int(guess));
  c.N = product(env, {a.heads, a.headDim}, op);
  c.wxElems = product(env, {a.batch, a.T, c.G, c.N}, op);
  c.rElems = diag ? product(env, {c.G, c.N}, op) : product(env, {c.G, a.heads, a.headDim, a.headDim}, op);
  c.bElems = product(env, {c.G, c.N}, op);
  c.stateElems = product(env, {c.S, a.batch, c.N}, op);
  c.trajElems = product(env, {a.batch, a.T, c.S, c.N}, op);
  c.yElems = product(env, {a.batch, a.T, c.N}, op);
  a.wx = tensorArg(env, t.Get("wx"), op, "wx", c.dev, dt, c.wxElems).data;
  a.R = static_cast<const float*>(tensorArg(env, t.Get("R"), op, "R", c.dev, DType::F32, c.rElems).data);
  a.b = static_cast<const float*>(tensorArg(env, t.Get("b"), op, "b", c.dev, DType::F32, c.bElems).data);
  a.h0 = static_cast<const float*>(tensorArg(env, t.Get("h0"), op, "h0", c.dev, DType::F32, c.stateElems, true).data);
  a.guessTraj = static_cast<const float*>(tensorArg(env, t.Get("guess"), op, "initialGuess", c.dev, DType::F32,
                                                    c.trajElems, a.guess != rkcuda::NewtonGuess::Provided)
                                              .data);
  if (a.guess != rkcuda::NewtonGuess::Provided) a.guessTraj = nullptr;
  return c;
}

// newtonRnnForward({ device, dtype, tensors, config })
//   -> { y, traj, finalStates, iterations: Int32Array, residual: Float32Array, converged, fellBack: Uint8Array }
Napi::Value NewtonRnnForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "newtonRnn";
  const Request r = parseRequest(env, info, op, "wx");
  NewtonCall c = parseNewton(env, r, op);
  rkcuda::NewtonRnnOutputs o;
  Napi::Object out = Napi::Object::New(env);
  out.Set("y", allocOutput(env, c.dev, c.a.dt, c.yElems, &o.y, Init::Overwritten));
  out.Set("traj", allocOutput(env, c.dev, DType::F32, c.trajElems, &o.traj, Init::Overwritten));
  out.Set("finalStates", allocOutput(env, c.dev, DType::F32, c.stateElems, &o.finalStates, Init::Overwritten));
  const size_t rows = size_t(c.a.batch);
  Napi::Int32Array iterations = Napi::Int32Array::New(env, rows);
  Napi::Float32Array residual = Napi::Float32Array::New(env, rows);
  Napi::Uint8Array converged = Napi::Uint8Array::New(env, rows), fellBack = Napi::Uint8Array::New(env, rows);
  o.iterations = static_cast<int32_t*>(pinnedData(env, iterations, "iterations"));
  o.residual = static_cast<float*>(pinnedData(env, residual, "residual"));
  o.converged = static_cast<uint8_t*>(pinnedData(env, converged, "converged"));
  o.fellBack = static_cast<uint8_t*>(pinnedData(env, fellBack, "fellBack"));
  out.Set("iterations", iterations);
  out.Set("residual", residual);
  out.Set("converged", converged);
  out.Set("fellBack", fellBack);
  return launch(
      env, op, c.dev, out, [&] { return rkcuda::newtonRnnForward(c.a, o); },
      [a = c.a, o] { newton::newtonRnnForwardCpu(a, o); });
}

// newtonRnnBackward({ device, dtype, tensors, grads: { traj, dy, dFinal }, config: { ..., needDh0 } })
//   -> { dwx, dR, db, dh0 | null }
Napi::Value NewtonRnnBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "newtonRnn.backward";
  const Request r = parseRequest(env, info, op, "wx", true);
  NewtonCall c = parseNewton(env, r, op);
  const Napi::Object gi = r.grads;
  const bool needDh0 = flagField(r.config, "needDh0");
  const DType dt = c.a.dt;
  rkcuda::NewtonRnnGrads g;
  g.traj = static_cast<const float*>(
      tensorArg(env, gi.Get("traj"), op, "trajectory (saved for backward)", c.dev, DType::F32, c.trajElems).data);
  g.dy = tensorArg(env, gi.Get("dy"), op, "grad of y", c.dev, dt, c.yElems, true).data;
  g.dFinal = static_cast<const float*>(
      tensorArg(env, gi.Get("dFinal"), op, "grad of finalStates", c.dev, DType::F32, c.stateElems, true).data);
  Napi::Object out = Napi::Object::New(env);
  out.Set("dwx", allocOutput(env, c.dev, dt, c.wxElems, &g.dwx, Init::Overwritten));
  out.Set("dR", allocOutput(env, c.dev, DType::F32, c.rElems, &g.dR, Init::Overwritten));
  out.Set("db", allocOutput(env, c.dev, DType::F32, c.bElems, &g.db, Init::Overwritten));
  out.Set("dh0", optionalOutput(env, needDh0, c.dev, DType::F32, c.stateElems, &g.dh0, Init::Overwritten));
  return launch(
      env, op, c.dev, out, [&] { return rkcuda::newtonRnnBackward(c.a, g); },
      [a = c.a, g] { newton::newtonRnnBackwardCpu(a, g); });
}

// newtonRnnCells() -> [{ name, code, gates, states, diagonal }] (rkcuda::kNewtonCells)
Napi::Value NewtonRnnCells(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array out = Napi::Array::New(env, std::size(rkcuda::kNewtonCells));
  for (size_t i = 0; i < std::size(rkcuda::kNewtonCells); ++i) {
    const rkcuda::NewtonCellInfo& c = rkcuda::kNewtonCells[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", c.name);
    o.Set("code", int(i));
    o.Set("gates", c.gates);
    o.Set("states", c.states);
    o.Set("diagonal", c.diagonal);
    out.Set(uint32_t(i), o);
  }
  return out;
}

}  // namespace

void registerNewtonRnn(Napi::Env env, Napi::Object exports) {
  exportFunction(env, exports, "newtonRnnCells", NewtonRnnCells);
  exportFunction(env, exports, "newtonRnnForward", NewtonRnnForward);
  exportFunction(env, exports, "newtonRnnBackward", NewtonRnnBackward);
}

}  // namespace rk
