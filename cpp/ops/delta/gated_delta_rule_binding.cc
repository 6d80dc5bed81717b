// N-API glue of the gated delta rule: re-checks every size against the configuration that
// lib/ops/gatedDeltaRule.ts sends, builds the sequence table, allocates the outputs and runs the CPU
// kernels or the CUDA launchers.
#include "ops/registry.h"

#include <string>
#include <vector>

#include "ops/delta/gated_delta_rule_cpu.h"
#include "napi/args.h"
#include "napi/tensor.h"

namespace rk {
namespace {

struct DeltaCall {
  Device dev = Device::CPU;
  rkcuda::GatedDeltaRuleArgs a;
  std::vector<rkcuda::ScanSegment> segments;
  int64_t qk = 0, vo = 0, gb = 0, stateElems = 0, savedElems = 0;
};

// The request's tensors {q, k, v, g, beta, h0} and config {batch, T, H, HV, K, V, scale, l2norm,
// cuSeqlens: Int32Array | null} (napi/args.h: Request).
DeltaCall parseDelta(Napi::Env env, const Request& r, const char* op) {
  DeltaCall c;
  c.dev = r.device;
  const DType dt = r.dtype;
  const Napi::Object t = r.tensors, cfg = r.config;
  rkcuda::GatedDeltaRuleArgs& a = c.a;
  a.dt = dt;
  a.batch = intField(env, cfg, "batch", op, 1);
  a.T = intField(env, cfg, "T", op, 1);
  a.H = intField(env, cfg, "H", op, 1);
  a.HV = intField(env, cfg, "HV", op, 1);
  a.K = intField(env, cfg, "K", op, 1);
  a.V = intField(env, cfg, "V", op, 1);
  if (a.HV % a.H != 0) throwError(env, code::kShape, std::string(op) + ": HV must be a multiple of H");
  a.scale = scaleField(env, cfg, op);
  a.l2norm = flagField(cfg, "l2norm");
  // q first: its real storage bounds the claimed sizes before the sequence table is built for them.
  c.qk = product(env, {a.batch, a.T, a.H, a.K}, op);
  a.q = tensorArg(env, t.Get("q"), op, "q", c.dev, dt, c.qk).data;
  int64_t chunk = delta::kGatedDeltaRuleChunk;
  if (c.dev == Device::CUDA) {
#ifdef RK_WITH_CUDA
    chunk = rkcuda::gatedDeltaRuleChunk();
#else
    throwNoCuda(env, op);
#endif
  }
  c.segments = parseSegments(env, cfg.Get("cuSeqlens"), a.batch, a.T, chunk, op, &a.totalChunks, &a.packed);
  a.nseq = int64_t(c.segments.size());
  a.segments = c.segments.data();
  a.chunk = chunk;
  c.vo = product(env, {a.batch, a.T, a.HV, a.V}, op);
  c.gb = product(env, {a.batch, a.T, a.HV}, op);
  c.stateElems = product(env, {a.nseq, a.HV, a.K, a.V}, op);
  // What the forward keeps for the backward: the state checkpoints, and on the CPU after them the
  // delta-rule correction of every token (as v).
  c.savedElems = product(env, {a.totalChunks, a.HV, a.K, a.V}, op);
  if (c.dev == Device::CPU) {
    if (c.vo > INT64_MAX - c.savedElems) throwError(env, code::kShape, std::string(op) + ": tensor size overflows");
    c.savedElems += c.vo;
  }
  a.k = tensorArg(env, t.Get("k"), op, "k", c.dev, dt, c.qk).data;
  a.v = tensorArg(env, t.Get("v"), op, "v", c.dev, dt, c.vo).data;
  a.g = static_cast<const float*>(tensorArg(env, t.Get("g"), op, "g", c.dev, DType::F32, c.gb).data);
  a.beta = tensorArg(env, t.Get("beta"), op, "beta", c.dev, dt, c.gb).data;
  a.h0 = static_cast<const float*>(
      tensorArg(env, t.Get("h0"), op, "initialState", c.dev, DType::F32, c.stateElems, true).data);
  return c;
}

// gatedDeltaRuleForward({ device, dtype, tensors, config: { ..., returnFinal, keepStates } })
//   -> { o, states | null, finalState | null }
// Without keepStates (a forward that no backward follows) the CPU saves no checkpoints; the CUDA
// kernels always do.
Napi::Value GatedDeltaRuleForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "gatedDeltaRule";
  const Request r = parseRequest(env, info, op, "q");
  DeltaCall c = parseDelta(env, r, op);
  const bool wantFinal = flagField(r.config, "returnFinal");
  void* o = nullptr;
  float *states = nullptr, *fin = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("o", allocOutput(env, c.dev, c.a.dt, c.vo, &o, Init::Overwritten));
  const bool keepStates = c.dev == Device::CUDA || flagField(r.config, "keepStates");
  out.Set("states",
          keepStates ? allocOutput(env, c.dev, DType::F32, c.savedElems, &states, Init::Overwritten) : env.Null());
  out.Set("finalState", optionalOutput(env, wantFinal, c.dev, DType::F32, c.stateElems, &fin));

  auto k = std::make_shared<DeltaCall>(std::move(c));  // the kernel's arguments, kept for an async call
  return launch(
      env, op, k->dev, out, [&] { return rkcuda::gatedDeltaRuleForward(k->a, o, states, fin); },
      [k, o, states, fin] { delta::gatedDeltaRuleForwardCpu(k->a, o, states, fin); });
}

// gatedDeltaRuleBackward({ device, dtype, tensors, grads: { states, dO, dFinal }, config: { ..., needDh0 } })
//   -> { dq, dk, dv, dg, dbeta, dh0 | null }
Napi::Value GatedDeltaRuleBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "gatedDeltaRule.backward";
  const Request r = parseRequest(env, info, op, "q", true);
  DeltaCall c = parseDelta(env, r, op);
  const Napi::Object gi = r.grads;
  const bool needDh0 = flagField(r.config, "needDh0");
  const DType dt = c.a.dt;
  rkcuda::GatedDeltaRuleGrads g;
  g.states = static_cast<const float*>(
      tensorArg(env, gi.Get("states"), op, "states (saved for backward)", c.dev, DType::F32, c.savedElems).data);
  g.dO = tensorArg(env, gi.Get("dO"), op, "grad of o", c.dev, dt, c.vo, true).data;
  g.dFinal = static_cast<const float*>(
      tensorArg(env, gi.Get("dFinal"), op, "grad of finalState", c.dev, DType::F32, c.stateElems, true).data);
  // The kernels write every element (zeros at positions in no sequence).
  Napi::Object out = Napi::Object::New(env);
  out.Set("dq", allocOutput(env, c.dev, dt, c.qk, &g.dq, Init::Overwritten));
  out.Set("dk", allocOutput(env, c.dev, dt, c.qk, &g.dk, Init::Overwritten));
  out.Set("dv", allocOutput(env, c.dev, dt, c.vo, &g.dv, Init::Overwritten));
  out.Set("dg", allocOutput(env, c.dev, DType::F32, c.gb, &g.dg, Init::Overwritten));
  out.Set("dbeta", allocOutput(env, c.dev, dt, c.gb, &g.dbeta, Init::Overwritten));
  out.Set("dh0", optionalOutput(env, needDh0, c.dev, DType::F32, c.stateElems, &g.dh0));
  auto k = std::make_shared<DeltaCall>(std::move(c));
  return launch(
      env, op, k->dev, out, [&] { return rkcuda::gatedDeltaRuleBackward(k->a, g); },
      [k, g] { delta::gatedDeltaRuleBackwardCpu(k->a, g); });
}

// gatedDeltaRuleStep({ device, dtype, tensors: { state, q, k, v, g, beta },
//   config: { batch, tokens, H, HV, K, V, scale, l2norm, updateState, returnIntermediate } })
//   -> { o, intermediate | null }
Napi::Value GatedDeltaRuleStep(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "gatedDeltaRuleStep";
  const Request r = parseRequest(env, info, op, "q");
  Device dev = r.device;
  const DType dt = r.dtype;
  const Napi::Object t = r.tensors, cfg = r.config;
  rkcuda::GatedDeltaRuleStepArgs a;
  a.dt = dt;
  a.batch = intField(env, cfg, "batch", op, 1);
  a.tokens = intField(env, cfg, "tokens", op, 1);
  a.H = intField(env, cfg, "H", op, 1);
  a.HV = intField(env, cfg, "HV", op, 1);
  a.K = intField(env, cfg, "K", op, 1);
  a.V = intField(env, cfg, "V", op, 1);
  if (a.HV % a.H != 0) throwError(env, code::kShape, std::string(op) + ": HV must be a multiple of H");
  a.scale = scaleField(env, cfg, op);
  a.l2norm = flagField(cfg, "l2norm");
  a.updateState = flagField(cfg, "updateState");
  const bool wantIntermediate = flagField(cfg, "returnIntermediate");
  const int64_t qk = product(env, {a.batch, a.tokens, a.H, a.K}, op);
  const int64_t vo = product(env, {a.batch, a.tokens, a.HV, a.V}, op);
  const int64_t gb = product(env, {a.batch, a.tokens, a.HV}, op);
  const int64_t stateElems = product(env, {a.batch, a.HV, a.K, a.V}, op);
  const int64_t inter = product(env, {a.tokens, stateElems}, op);
  a.state = static_cast<float*>(
      tensorArg(env, t.Get("state"), op, "state", dev, DType::F32, stateElems, false, Access::Update).data);
  a.q = tensorArg(env, t.Get("q"), op, "q", dev, dt, qk).data;
  a.k = tensorArg(env, t.Get("k"), op, "k", dev, dt, qk).data;
  a.v = tensorArg(env, t.Get("v"), op, "v", dev, dt, vo).data;
  a.g = static_cast<const float*>(tensorArg(env, t.Get("g"), op, "g", dev, DType::F32, gb).data);
  a.beta = tensorArg(env, t.Get("beta"), op, "beta", dev, dt, gb).data;
  Napi::Object out = Napi::Object::New(env);
  out.Set("o", allocOutput(env, dev, dt, vo, &a.o, Init::Overwritten));
  out.Set("intermediate",
          optionalOutput(env, wantIntermediate, dev, DType::F32, inter, &a.intermediate, Init::Overwritten));
  return launch(
      env, op, dev, out, [&] { return rkcuda::gatedDeltaRuleStep(a); }, [a] { delta::gatedDeltaRuleStepCpu(a); });
}

}  // namespace

void registerGatedDeltaRule(Napi::Env env, Napi::Object exports) {
  exportFunction(env, exports, "gatedDeltaRuleForward", GatedDeltaRuleForward);
  exportFunction(env, exports, "gatedDeltaRuleBackward", GatedDeltaRuleBackward);
  exportFunction(env, exports, "gatedDeltaRuleStep", GatedDeltaRuleStep);
}

}  // namespace rk
