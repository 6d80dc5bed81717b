// N-API glue of the causal convolution: re-checks every size against the configuration that
// lib/ops/causalConv1d.ts sends, builds the sequence table, allocates the outputs and runs the CPU
// kernels or the CUDA launchers.
#include <string>
#include <vector>

#include "ops/conv/causal_conv1d_cpu.h"
#include "ops/registry.h"
#include "napi/args.h"
#include "napi/tensor.h"

namespace rk {
namespace {

struct ConvCall {
  rkcuda::CausalConv1dArgs a;
  std::vector<rkcuda::ScanSegment> segments;
  int64_t x = 0, state = 0;
};

// config { batch, C, T, W, dilation, channelsLast, silu, cuSeqlens }; tensors { x, weight, bias, h0 }.
ConvCall parseConv(Napi::Env env, const Request& r, const char* op) {
#ifndef RK_WITH_CUDA
  if (r.device == Device::CUDA) throwNoCuda(env, op);
#endif
  ConvCall c;
  rkcuda::CausalConv1dArgs& a = c.a;
  const Napi::Object t = r.tensors, cfg = r.config;
  a.dt = r.dtype;
  a.batch = intField(env, cfg, "batch", op, 1);
  a.C = intField(env, cfg, "C", op, 1);
  a.T = intField(env, cfg, "T", op, 1);
  a.W = intField(env, cfg, "W", op, 2);
  if (a.W > 64) throwError(env, code::kShape, std::string(op) + ": the kernel width must be at most 64");
  a.dilation = intField(env, cfg, "dilation", op, 1);
  a.channelsLast = flagField(cfg, "channelsLast");
  a.silu = flagField(cfg, "silu");
  product(env, {a.W - 1, a.dilation}, op);
  c.x = product(env, {a.batch, a.C, a.T}, op);
  a.x = tensorArg(env, t.Get("x"), op, "x", r.device, a.dt, c.x).data;
  int64_t chunks = 0;
  c.segments = parseSegments(env, cfg.Get("cuSeqlens"), a.batch, a.T, 1, op, &chunks, &a.packed);
  a.nseq = int64_t(c.segments.size());
  a.segments = c.segments.data();
  c.state = product(env, {a.nseq, a.C, a.stateLen()}, op);
  a.weight = tensorArg(env, t.Get("weight"), op, "weight", r.device, a.dt, product(env, {a.C, a.W}, op)).data;
  a.bias = tensorArg(env, t.Get("bias"), op, "bias", r.device, a.dt, a.C, true).data;
  a.h0 = tensorArg(env, t.Get("h0"), op, "initialState", r.device, a.dt, c.state, true).data;
  return c;
}

// causalConv1dForward({ device, dtype, tensors, config: { ..., returnFinal, window } })
//   -> { y, finalState | null, windowStates | null }
Napi::Value CausalConv1dForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "causalConv1d";
  const Request r = parseRequest(env, info, op, "x");
  ConvCall c = parseConv(env, r, op);
  c.a.window = intField(env, r.config, "window", op, 0);
  if (c.a.window > 8) throwError(env, code::kArgument, std::string(op) + ": stateWindow must be 0-8");
  void *y = nullptr, *fin = nullptr;
  Napi::Object out = Napi::Object::New(env);
  out.Set("y", allocOutput(env, r.device, c.a.dt, c.x, &y, Init::Overwritten));  // zeros at positions in no sequence
  out.Set("finalState", optionalOutput(env, flagField(r.config, "returnFinal"), r.device, c.a.dt, c.state, &fin));
  out.Set("windowStates", optionalOutput(env, c.a.window > 0, r.device, c.a.dt, product(env, {c.a.window, c.state}, op),
                                         &c.a.windowStates));
  auto k = std::make_shared<ConvCall>(std::move(c));
  return launch(
      env, op, r.device, out, [&] { return rkcuda::causalConv1dForward(k->a, y, fin); },
      [k, y, fin] { conv::causalConv1dForwardCpu(k->a, y, fin); });
}

// causalConv1dBackward({ device, dtype, tensors, grads: { dY, dFinal }, config: { ..., needDh0 } })
//   -> { dx, dweight, dbias | null, dh0 | null }
Napi::Value CausalConv1dBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "causalConv1d.backward";
  const Request r = parseRequest(env, info, op, "x", true);
  ConvCall c = parseConv(env, r, op);
  rkcuda::CausalConv1dGrads g;
  g.dY = tensorArg(env, r.grads.Get("dY"), op, "grad of y", r.device, c.a.dt, c.x, true).data;
  g.dFinal = tensorArg(env, r.grads.Get("dFinal"), op, "grad of finalState", r.device, c.a.dt, c.state, true).data;
  Napi::Object out = Napi::Object::New(env);
  out.Set("dx", allocOutput(env, r.device, c.a.dt, c.x, &g.dx, Init::Overwritten));  // as y
  out.Set("dweight", allocOutput(env, r.device, c.a.dt, c.a.C * c.a.W, &g.dweight, Init::Overwritten));
  out.Set("dbias", optionalOutput(env, c.a.bias != nullptr, r.device, c.a.dt, c.a.C, &g.dbias));
  out.Set("dh0", optionalOutput(env, flagField(r.config, "needDh0"), r.device, c.a.dt, c.state, &g.dh0));
  auto k = std::make_shared<ConvCall>(std::move(c));
  return launch(
      env, op, r.device, out, [&] { return rkcuda::causalConv1dBackward(k->a, g); },
      [k, g] { conv::causalConv1dBackwardCpu(k->a, g); });
}

}  // namespace

void registerCausalConv1d(Napi::Env env, Napi::Object exports) {
  exportFunction(env, exports, "causalConv1dForward", CausalConv1dForward);
  exportFunction(env, exports, "causalConv1dBackward", CausalConv1dBackward);
}

}  // namespace rk
