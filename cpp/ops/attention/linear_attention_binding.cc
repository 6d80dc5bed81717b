// N-API glue of linear attention: re-checks every size against the configuration that
// lib/ops/linearAttention.ts sends, builds the sequence table, allocates the outputs and runs the
// CPU kernels or the CUDA launchers.
#include <string>
#include <vector>

#include "ops/attention/linear_attention_cpu.h"
#include "ops/registry.h"
#include "napi/args.h"
#include "napi/tensor.h"

namespace rk {
namespace {

using rkcuda::LinearAttentionArgs;

struct AttentionCall {
  Device dev = Device::CPU;
  LinearAttentionArgs a;
  std::vector<rkcuda::ScanSegment> segments;
  int64_t q = 0, k = 0, v = 0, o = 0, g = 0, gb = 0, stateElems = 0, savedElems = 0;
};

// config { rule, batch, T, Hq, Hk, Hv, K, V, perKeyDecay, scale, l2norm } and the tensors
// { q, k, v, g, beta } (napi/args.h: Request); `tokens` names the time field (T, or tokens for a
// decode step).
AttentionCall parseAttention(Napi::Env env, const Request& r, const char* op, const char* tokens, bool segmented) {
  AttentionCall c;
  c.dev = r.device;
  const Napi::Object t = r.tensors, cfg = r.config;
  LinearAttentionArgs& a = c.a;
  a.dt = r.dtype;
  const int64_t rule = intField(env, cfg, "rule", op, 0);
  if (rule > 3) throwError(env, code::kArgument, std::string(op) + ": rule must be 0-3");
  a.rule = rkcuda::LinearRule(rule);
  a.batch = intField(env, cfg, "batch", op, 1);
  a.T = intField(env, cfg, tokens, op, 1);
  a.Hq = intField(env, cfg, "Hq", op, 1);
  a.Hk = intField(env, cfg, "Hk", op, 1);
  a.Hv = intField(env, cfg, "Hv", op, 1);
  a.K = intField(env, cfg, "K", op, 1);
  a.V = intField(env, cfg, "V", op, 1);
  if (a.Hv % a.Hk != 0 || (a.Hq >= a.Hv ? a.Hq % a.Hv : a.Hv % a.Hq) != 0)
    throwError(env, code::kShape, std::string(op) + ": Hk must divide Hv, and Hq divide or be a multiple of Hv");
  a.perKeyDecay = flagField(cfg, "perKeyDecay");
  a.l2norm = flagField(cfg, "l2norm");
  a.scale = scaleField(env, cfg, op);
  c.q = product(env, {a.batch, a.T, a.Hq, a.K}, op);
  a.q = tensorArg(env, t.Get("q"), op, "q", c.dev, a.dt, c.q).data;
  int64_t chunk = attention::kLinearAttentionChunk;
  if (c.dev == Device::CUDA) {
#ifdef RK_WITH_CUDA
    chunk = rkcuda::linearAttentionChunk();
#else
    throwNoCuda(env, op);
#endif
  }
  if (segmented) {
    c.segments = parseSegments(env, cfg.Get("cuSeqlens"), a.batch, a.T, chunk, op, &a.totalChunks, &a.packed);
  } else {
    // A decode step: one sequence per batch row (it keeps no checkpoints).
    const int64_t chunks = (a.T + chunk - 1) / chunk;
    for (int64_t b = 0; b < a.batch; ++b) c.segments.push_back({b, 0, a.T, b * chunks});
    a.totalChunks = a.batch * chunks;
  }
  a.nseq = int64_t(c.segments.size());
  a.segments = c.segments.data();
  a.chunk = chunk;
  c.k = product(env, {a.batch, a.T, a.Hk, a.K}, op);
  c.v = product(env, {a.batch, a.T, a.Hv, a.V}, op);
  c.o = product(env, {a.batch, a.T, a.outHeads(), a.V}, op);
  c.gb = product(env, {a.batch, a.T, a.Hv}, op);
  c.g = product(env, {c.gb, a.perKeyDecay ? a.K : 1}, op);
  c.stateElems = product(env, {a.nseq, a.Hv, a.K, a.V}, op);
  c.savedElems = product(env, {a.totalChunks, a.Hv, a.K, a.V}, op);
  a.k = tensorArg(env, t.Get("k"), op, "k", c.dev, a.dt, c.k).data;
  a.v = tensorArg(env, t.Get("v"), op, "v", c.dev, a.dt, c.v).data;
  if (rkcuda::ruleDecays(a.rule))
    a.g = static_cast<const float*>(tensorArg(env, t.Get("g"), op, "decay", c.dev, DType::F32, c.g).data);
  if (rkcuda::ruleCorrects(a.rule)) a.beta = tensorArg(env, t.Get("beta"), op, "beta", c.dev, a.dt, c.gb).data;
  return c;
}

// linearAttentionForward({ device, dtype, tensors: { q, k, v, g, beta, h0 }, config: { ..., cuSeqlens,
//   returnFinal, keepStates, window } }) -> { o, states | null, finalState | null, windowStates | null }
// windowStates: fp32 [window, nseq, Hv, K, V] (slot-major, as ONNX's state window).
Napi::Value LinearAttentionForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "linearAttention";
  const Request r = parseRequest(env, info, op, "q");
  AttentionCall c = parseAttention(env, r, op, "T", true);
  LinearAttentionArgs& a = c.a;
  a.h0 = static_cast<const float*>(
      tensorArg(env, r.tensors.Get("h0"), op, "initialState", c.dev, DType::F32, c.stateElems, true).data);
  a.window = intField(env, r.config, "window", op, 0);
  if (a.window > 8) throwError(env, code::kArgument, std::string(op) + ": stateWindow must be 0-8");
  void* o = nullptr;
  float *states = nullptr, *fin = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("o", allocOutput(env, c.dev, a.dt, c.o, &o, Init::Overwritten));  // zeros at positions in no sequence
  out.Set("states", optionalOutput(env, flagField(r.config, "keepStates"), c.dev, DType::F32, c.savedElems, &states,
                                   Init::Overwritten));
  out.Set("finalState", optionalOutput(env, flagField(r.config, "returnFinal"), c.dev, DType::F32, c.stateElems, &fin));
  out.Set("windowStates", optionalOutput(env, a.window > 0, c.dev, DType::F32,
                                         product(env, {a.window, c.stateElems}, op), &a.windowStates));
  a.windowSlotStride = c.stateElems;
  a.windowSeqStride = a.Hv * a.K * a.V;
  auto k = std::make_shared<AttentionCall>(std::move(c));
  return launch(
      env, op, k->dev, out, [&] { return rkcuda::linearAttentionForward(k->a, o, states, fin); },
      [k, o, states, fin] { attention::linearAttentionForwardCpu(k->a, o, states, fin); });
}

// linearAttentionBackward({ device, dtype, tensors, grads: { states, dO, dFinal }, config: { ..., needDh0 } })
//   -> { dq, dk, dv, dg | null, dbeta | null, dh0 | null }
Napi::Value LinearAttentionBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "linearAttention.backward";
  const Request r = parseRequest(env, info, op, "q", true);
  AttentionCall c = parseAttention(env, r, op, "T", true);
  LinearAttentionArgs& a = c.a;
  a.h0 = static_cast<const float*>(
      tensorArg(env, r.tensors.Get("h0"), op, "initialState", c.dev, DType::F32, c.stateElems, true).data);
  const Napi::Object gi = r.grads;
  rkcuda::LinearAttentionGrads g;
  g.states = static_cast<const float*>(
      tensorArg(env, gi.Get("states"), op, "states (saved for backward)", c.dev, DType::F32, c.savedElems).data);
  g.dO = tensorArg(env, gi.Get("dO"), op, "grad of o", c.dev, a.dt, c.o, true).data;
  g.dFinal = static_cast<const float*>(
      tensorArg(env, gi.Get("dFinal"), op, "grad of finalState", c.dev, DType::F32, c.stateElems, true).data);
  Napi::Object out = Napi::Object::New(env);
  // The kernels write every element (zeros at positions in no sequence).
  out.Set("dq", allocOutput(env, c.dev, a.dt, c.q, &g.dq, Init::Overwritten));
  out.Set("dk", allocOutput(env, c.dev, a.dt, c.k, &g.dk, Init::Overwritten));
  out.Set("dv", allocOutput(env, c.dev, a.dt, c.v, &g.dv, Init::Overwritten));
  out.Set("dg", optionalOutput(env, rkcuda::ruleDecays(a.rule), c.dev, DType::F32, c.g, &g.dg, Init::Overwritten));
  out.Set("dbeta", optionalOutput(env, rkcuda::ruleCorrects(a.rule), c.dev, a.dt, c.gb, &g.dbeta, Init::Overwritten));
  out.Set("dh0", optionalOutput(env, flagField(r.config, "needDh0"), c.dev, DType::F32, c.stateElems, &g.dh0));
  auto k = std::make_shared<AttentionCall>(std::move(c));
  return launch(
      env, op, k->dev, out, [&] { return rkcuda::linearAttentionBackward(k->a, g); },
      [k, g] { attention::linearAttentionBackwardCpu(k->a, g); });
}

// linearAttentionStep({ device, dtype, tensors: { state, q, k, v, g, beta }, config: { rule, batch, tokens,
//   Hq, Hk, Hv, K, V, perKeyDecay, scale, l2norm, updateState, returnIntermediate } })
//   -> { o, intermediate | null }; state fp32 [batch, Hv, K, V] updated in place (updateState),
//   intermediate fp32 [batch, tokens, Hv, K, V] (the state after every token).
Napi::Value LinearAttentionStep(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "linearAttentionStep";
  const Request r = parseRequest(env, info, op, "q");
  AttentionCall c = parseAttention(env, r, op, "tokens", false);
  LinearAttentionArgs& a = c.a;
  float* state = static_cast<float*>(
      tensorArg(env, r.tensors.Get("state"), op, "state", c.dev, DType::F32, c.stateElems, false, Access::Update).data);
  a.h0 = state;
  const bool update = flagField(r.config, "updateState");
  const bool wantIntermediate = flagField(r.config, "returnIntermediate");
  void* o = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("o", allocOutput(env, c.dev, a.dt, c.o, &o, Init::Overwritten));
  out.Set("intermediate", optionalOutput(env, wantIntermediate, c.dev, DType::F32,
                                         product(env, {a.T, c.stateElems}, op), &a.windowStates, Init::Overwritten));
  a.window = wantIntermediate ? a.T : 0;
  a.windowSlotStride = a.Hv * a.K * a.V;
  a.windowSeqStride = a.T * a.windowSlotStride;
  float* fin = update ? state : nullptr;
  auto k = std::make_shared<AttentionCall>(std::move(c));
  return launch(
      env, op, k->dev, out, [&] { return rkcuda::linearAttentionForward(k->a, o, nullptr, fin); },
      [k, o, fin] { attention::linearAttentionForwardCpu(k->a, o, nullptr, fin); });
}

// The gate activations. config { rows, Hv, K, perKey, qwen, sigmoid, betaHeads, dtBiasPerKey };
// tensors { decay, beta, aLog, dtBias } (each nullable); the request's dtype is beta's.
rkcuda::LinearGateArgs parseGates(Napi::Env env, const Request& r, const char* op, int64_t* gElems, int64_t* bElems,
                                  int64_t* bInElems) {
  const Napi::Object t = r.tensors, cfg = r.config;
  rkcuda::LinearGateArgs a;
  a.dt = r.dtype;
  a.rows = intField(env, cfg, "rows", op, 1);
  a.Hv = intField(env, cfg, "Hv", op, 1);
  a.K = intField(env, cfg, "K", op, 1);
  a.betaHeads = intField(env, cfg, "betaHeads", op, 1);
  if (a.betaHeads != 1 && a.betaHeads != a.Hv)
    throwError(env, code::kShape, std::string(op) + ": beta must have Hv heads or 1");
  a.perKey = flagField(cfg, "perKey");
  a.qwen = flagField(cfg, "qwen");
  a.sigmoid = flagField(cfg, "sigmoid");
  a.dtBiasPerKey = flagField(cfg, "dtBiasPerKey") && a.perKey;
  *gElems = product(env, {a.rows, a.Hv, a.perKey ? a.K : 1}, op);
  *bElems = product(env, {a.rows, a.Hv}, op);
  *bInElems = product(env, {a.rows, a.betaHeads}, op);
  a.decay =
      static_cast<const float*>(tensorArg(env, t.Get("decay"), op, "decay", r.device, DType::F32, *gElems, true).data);
  a.beta = tensorArg(env, t.Get("beta"), op, "beta", r.device, a.dt, *bInElems, true).data;
  if (a.qwen && a.decay) {
    a.aLog = static_cast<const float*>(tensorArg(env, t.Get("aLog"), op, "aLog", r.device, DType::F32, a.Hv).data);
    a.dtBias = static_cast<const float*>(
        tensorArg(env, t.Get("dtBias"), op, "dtBias", r.device, DType::F32, a.dtBiasPerKey ? a.Hv * a.K : a.Hv, true)
            .data);
  }
  return a;
}

// linearAttentionGates({ device, dtype, tensors, config }) -> { g | null, beta | null }
Napi::Value LinearAttentionGates(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "linearAttention (gates)";
  const Request r = parseRequest(env, info, op, "beta");
  int64_t gElems = 0, bElems = 0, bInElems = 0;
  const rkcuda::LinearGateArgs a = parseGates(env, r, op, &gElems, &bElems, &bInElems);
  float* g = nullptr;
  void* beta = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("g", optionalOutput(env, a.decay != nullptr, r.device, DType::F32, gElems, &g, Init::Overwritten));
  out.Set("beta", a.beta ? allocOutput(env, r.device, a.dt, bElems, &beta, Init::Overwritten) : env.Null());
  return launch(
      env, op, r.device, out, [&] { return rkcuda::linearAttentionGates(a, g, beta); },
      [a, g, beta] { attention::linearGatesForwardCpu(a, g, beta); });
}

// linearAttentionGatesBackward({ ..., grads: { dg, dbeta } }) -> { ddecay, dbeta, daLog, ddtBias } (each
// null where its input is absent)
Napi::Value LinearAttentionGatesBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "linearAttention (gates).backward";
  const Request r = parseRequest(env, info, op, "beta", true);
  int64_t gElems = 0, bElems = 0, bInElems = 0;
  const rkcuda::LinearGateArgs a = parseGates(env, r, op, &gElems, &bElems, &bInElems);
  const float* dg = a.decay ? static_cast<const float*>(
                                  tensorArg(env, r.grads.Get("dg"), op, "grad of g", r.device, DType::F32, gElems).data)
                            : nullptr;
  const void* dbeta =
      a.beta ? tensorArg(env, r.grads.Get("dbeta"), op, "grad of beta", r.device, a.dt, bElems).data : nullptr;
  float *dDecay = nullptr, *daLog = nullptr, *dDtBias = nullptr;
  void* dBeta = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("ddecay", optionalOutput(env, a.decay != nullptr, r.device, DType::F32, gElems, &dDecay, Init::Overwritten));
  out.Set("dbeta", a.beta ? allocOutput(env, r.device, a.dt, bInElems, &dBeta, Init::Overwritten) : env.Null());
  out.Set("daLog", optionalOutput(env, a.aLog != nullptr, r.device, DType::F32, a.Hv, &daLog));
  out.Set("ddtBias",
          optionalOutput(env, a.dtBias != nullptr, r.device, DType::F32, a.dtBiasPerKey ? a.Hv * a.K : a.Hv, &dDtBias));
  return launch(
      env, op, r.device, out,
      [&] { return rkcuda::linearAttentionGatesBackward(a, dg, dbeta, dDecay, dBeta, daLog, dDtBias); },
      [a, dg, dbeta, dDecay, dBeta, daLog, dDtBias] {
        attention::linearGatesBackwardCpu(a, dg, dbeta, dDecay, dBeta, daLog, dDtBias);
      });
}

}  // namespace

void registerLinearAttention(Napi::Env env, Napi::Object exports) {
  exportFunction(env, exports, "linearAttentionForward", LinearAttentionForward);
  exportFunction(env, exports, "linearAttentionBackward", LinearAttentionBackward);
  exportFunction(env, exports, "linearAttentionStep", LinearAttentionStep);
  exportFunction(env, exports, "linearAttentionGates", LinearAttentionGates);
  exportFunction(env, exports, "linearAttentionGatesBackward", LinearAttentionGatesBackward);
}

}  // namespace rk
