// N-API glue of the selective scan (Mamba-1): re-checks every size against the configuration that
// lib/ops/selectiveScan.ts sends, builds the sequence table, allocates the outputs and runs the
// CPU kernels or the CUDA launchers.
#include <string>
#include <vector>

#include "ops/registry.h"
#include "ops/scan/selective_scan_cpu.h"
#include "napi/args.h"
#include "napi/tensor.h"

namespace rk {
namespace {

using rkcuda::ScanSegment;

// Everything one selective-scan call needs, checked.
struct ScanCall {
  Device dev = Device::CPU;
  rkcuda::SelectiveScanArgs a;
  std::vector<ScanSegment> segments;
  int64_t elements = 0;  // batch * dim * seqlen
  int64_t bcVariable = 0, params = 0, stateElems = 0, checkpointElems = 0;
};

// The request's tensors {u, delta, A, B, C, D, z, deltaBias, h0} and config {batch, dim, seqlen, dstate,
// groups, variableB, variableC, deltaSoftplus, cuSeqlens: Int32Array | null} (napi/args.h: Request).
ScanCall parseScan(Napi::Env env, const Request& r, const char* op) {
  ScanCall c;
  c.dev = r.device;
  const DType dt = r.dtype;
  const Napi::Object t = r.tensors, cfg = r.config;
  rkcuda::SelectiveScanArgs& a = c.a;
  a.dt = dt;
  a.batch = intField(env, cfg, "batch", op, 1);
  a.dim = intField(env, cfg, "dim", op, 1);
  a.seqlen = intField(env, cfg, "seqlen", op, 1);
  a.dstate = intField(env, cfg, "dstate", op, 1);
  a.groups = intField(env, cfg, "groups", op, 1);
  if (a.dim % a.groups != 0) throwError(env, code::kShape, std::string(op) + ": dim must be a multiple of groups");
  a.variableB = flagField(cfg, "variableB");
  a.variableC = flagField(cfg, "variableC");
  a.deltaSoftplus = flagField(cfg, "deltaSoftplus");
  c.elements = product(env, {a.batch, a.dim, a.seqlen}, op);
  c.params = product(env, {a.dim, a.dstate}, op);
  c.bcVariable = product(env, {a.batch, a.groups, a.dstate, a.seqlen}, op);

  // u first: its real storage bounds the claimed sizes before the sequence table is built for them.
  a.u = tensorArg(env, t.Get("u"), op, "u", c.dev, dt, c.elements).data;

  // Sequences.
  int64_t chunk = scan::kSelectiveChunk;
  if (c.dev == Device::CUDA) {
#ifdef RK_WITH_CUDA
    chunk = rkcuda::selectiveScanChunk();
#else
    throwNoCuda(env, op);
#endif
  }
  c.segments = parseSegments(env, cfg.Get("cuSeqlens"), a.batch, a.seqlen, chunk, op, &a.totalChunks, &a.packed);
  a.nseq = int64_t(c.segments.size());
  a.chunk = chunk;
  a.segments = c.segments.data();
  const int64_t total = a.totalChunks;
  c.stateElems = product(env, {a.nseq, a.dim, a.dstate}, op);
  c.checkpointElems = product(env, {total, a.dim, a.dstate}, op);

  a.delta = tensorArg(env, t.Get("delta"), op, "delta", c.dev, dt, c.elements).data;
  a.A = static_cast<const float*>(tensorArg(env, t.Get("A"), op, "A", c.dev, DType::F32, c.params).data);
  a.B = tensorArg(env, t.Get("B"), op, "B", c.dev, a.variableB ? dt : DType::F32, a.variableB ? c.bcVariable : c.params)
            .data;
  a.C = tensorArg(env, t.Get("C"), op, "C", c.dev, a.variableC ? dt : DType::F32, a.variableC ? c.bcVariable : c.params)
            .data;
  a.D = static_cast<const float*>(tensorArg(env, t.Get("D"), op, "D", c.dev, DType::F32, a.dim, true).data);
  a.z = tensorArg(env, t.Get("z"), op, "z", c.dev, dt, c.elements, true).data;
  a.deltaBias = static_cast<const float*>(
      tensorArg(env, t.Get("deltaBias"), op, "deltaBias", c.dev, DType::F32, a.dim, true).data);
  a.h0 = static_cast<const float*>(
      tensorArg(env, t.Get("h0"), op, "initialState", c.dev, DType::F32, c.stateElems, true).data);
  return c;
}

// selectiveScanForward({ device, dtype, tensors, config: { ..., returnFinal } })
//   -> { y, states, finalState | null }
Napi::Value SelectiveScanForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "selectiveScan";
  const Request r = parseRequest(env, info, op, "u");
  auto k = std::make_shared<ScanCall>(parseScan(env, r, op));  // the kernel's arguments, kept for an async call
  const ScanCall& c = *k;
  const rkcuda::SelectiveScanArgs& a = c.a;
  const bool wantFinal = flagField(r.config, "returnFinal");
  void* y = nullptr;
  float *states = nullptr, *fin = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("y", allocOutput(env, c.dev, a.dt, c.elements, &y, Init::Overwritten));
  out.Set("states", allocOutput(env, c.dev, DType::F32, c.checkpointElems, &states, Init::Overwritten));
  out.Set("finalState", optionalOutput(env, wantFinal, c.dev, DType::F32, c.stateElems, &fin));

  return launch(
      env, op, c.dev, out, [&] { return rkcuda::selectiveScanForward(a, y, states, fin); },
      [k, y, states, fin] { scan::selectiveScanForwardCpu(k->a, y, states, fin); });
}

// selectiveScanBackward({ device, dtype, tensors, grads: { states, dy, dFinal }, config: { ..., needDh0 } })
//   -> { du, ddelta, dA, dB, dC, dD | null, dz | null, dDeltaBias | null, dh0 | null }
Napi::Value SelectiveScanBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "selectiveScan.backward";
  const Request r = parseRequest(env, info, op, "u", true);
  auto k = std::make_shared<ScanCall>(parseScan(env, r, op));
  const ScanCall& c = *k;
  const rkcuda::SelectiveScanArgs& a = c.a;
  const Napi::Object gi = r.grads;
  const bool needDh0 = flagField(r.config, "needDh0");
  const DType dt = a.dt;
  rkcuda::SelectiveScanGrads g;
  g.states = static_cast<const float*>(
      tensorArg(env, gi.Get("states"), op, "states (saved for backward)", c.dev, DType::F32, c.checkpointElems).data);
  g.dy = tensorArg(env, gi.Get("dy"), op, "grad of y", c.dev, dt, c.elements, true).data;
  g.dFinal = static_cast<const float*>(
      tensorArg(env, gi.Get("dFinal"), op, "grad of finalState", c.dev, DType::F32, c.stateElems, true).data);
  // Packed input leaves positions after the last sequence untouched by the kernels: start at zero.
  const Init big = a.packed ? Init::Zeroed : Init::Overwritten;
  Napi::Object out = Napi::Object::New(env);
  out.Set("du", allocOutput(env, c.dev, dt, c.elements, &g.du, big));
  out.Set("ddelta", allocOutput(env, c.dev, dt, c.elements, &g.ddelta, big));
  out.Set("dA", allocOutput(env, c.dev, DType::F32, c.params, &g.dA));
  out.Set("dB", allocOutput(env, c.dev, a.variableB ? dt : DType::F32, a.variableB ? c.bcVariable : c.params, &g.dB));
  out.Set("dC", allocOutput(env, c.dev, a.variableC ? dt : DType::F32, a.variableC ? c.bcVariable : c.params, &g.dC));
  out.Set("dD", optionalOutput(env, a.D != nullptr, c.dev, DType::F32, a.dim, &g.dD));
  out.Set("dz", optionalOutput(env, a.z != nullptr, c.dev, dt, c.elements, &g.dz, big));
  out.Set("dDeltaBias", optionalOutput(env, a.deltaBias != nullptr, c.dev, DType::F32, a.dim, &g.dDeltaBias));
  out.Set("dh0", optionalOutput(env, needDh0, c.dev, DType::F32, c.stateElems, &g.dh0));
  return launch(
      env, op, c.dev, out, [&] { return rkcuda::selectiveScanBackward(a, g); },
      [k, g] { scan::selectiveScanBackwardCpu(k->a, g); });
}

// selectiveStateUpdate({ device, dtype, tensors: { state, x, dt, A, B, C, D, z, dtBias },
//   config: { batch, dim, dstate, groups, tokens, deltaSoftplus, updateState, returnIntermediate } })
//   -> { y, intermediate | null }
Napi::Value SelectiveStateUpdate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "selectiveStateUpdate";
  const Request r = parseRequest(env, info, op, "x");
  Device dev = r.device;
  const DType dt = r.dtype;
  const Napi::Object t = r.tensors, cfg = r.config;
  rkcuda::SelectiveStateUpdateArgs a;
  a.dt = dt;
  a.batch = intField(env, cfg, "batch", op, 1);
  a.dim = intField(env, cfg, "dim", op, 1);
  a.dstate = intField(env, cfg, "dstate", op, 1);
  a.groups = intField(env, cfg, "groups", op, 1);
  a.tokens = intField(env, cfg, "tokens", op, 1);
  if (a.dim % a.groups != 0) throwError(env, code::kShape, std::string(op) + ": dim must be a multiple of groups");
  a.deltaSoftplus = flagField(cfg, "deltaSoftplus");
  a.updateState = flagField(cfg, "updateState");
  const bool wantIntermediate = flagField(cfg, "returnIntermediate");
  const int64_t elements = product(env, {a.batch, a.dim, a.tokens}, op);
  const int64_t stateElems = product(env, {a.batch, a.dim, a.dstate}, op);
  const int64_t bc = product(env, {a.batch, a.groups, a.dstate, a.tokens}, op);
  const int64_t inter = product(env, {a.tokens, stateElems}, op);
  a.state = static_cast<float*>(
      tensorArg(env, t.Get("state"), op, "state", dev, DType::F32, stateElems, false, Access::Update).data);
  a.x = tensorArg(env, t.Get("x"), op, "x", dev, dt, elements).data;
  a.delta = tensorArg(env, t.Get("dt"), op, "dt", dev, dt, elements).data;
  a.A = static_cast<const float*>(
      tensorArg(env, t.Get("A"), op, "A", dev, DType::F32, product(env, {a.dim, a.dstate}, op)).data);
  a.B = tensorArg(env, t.Get("B"), op, "B", dev, dt, bc).data;
  a.C = tensorArg(env, t.Get("C"), op, "C", dev, dt, bc).data;
  a.D = static_cast<const float*>(tensorArg(env, t.Get("D"), op, "D", dev, DType::F32, a.dim, true).data);
  a.z = tensorArg(env, t.Get("z"), op, "z", dev, dt, elements, true).data;
  a.deltaBias =
      static_cast<const float*>(tensorArg(env, t.Get("dtBias"), op, "dtBias", dev, DType::F32, a.dim, true).data);
  Napi::Object out = Napi::Object::New(env);
  out.Set("y", allocOutput(env, dev, dt, elements, &a.y, Init::Overwritten));
  out.Set("intermediate",
          optionalOutput(env, wantIntermediate, dev, DType::F32, inter, &a.intermediate, Init::Overwritten));
  return launch(
      env, op, dev, out, [&] { return rkcuda::selectiveStateUpdate(a); }, [a] { scan::selectiveStateUpdateCpu(a); });
}

}  // namespace

void registerSelectiveScan(Napi::Env env, Napi::Object exports) {
  exportFunction(env, exports, "selectiveScanForward", SelectiveScanForward);
  exportFunction(env, exports, "selectiveScanBackward", SelectiveScanBackward);
  exportFunction(env, exports, "selectiveStateUpdate", SelectiveStateUpdate);
}

}  // namespace rk
