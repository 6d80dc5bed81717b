#include "napi/cpu.h"
#include "napi/tensor.h"

#include <string>

#include "common/isa.h"
#include "common/parallel.h"
#include "napi/errors.h"

namespace rk {
namespace {

// cpuInfo() -> { isa, isasSupported, threads, runs: { avx512, avx2, base }, soloTeams, peakBusyThreads }
Napi::Value CpuInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object r = Napi::Object::New(env);
  r.Set("isa", isaName(activeIsa()));
  const auto supported = supportedIsas();
  Napi::Array list = Napi::Array::New(env, supported.size());
  for (size_t i = 0; i < supported.size(); ++i) list.Set(uint32_t(i), isaName(supported[i]));
  r.Set("isasSupported", list);
  r.Set("threads", numThreads());
  Napi::Object runs = Napi::Object::New(env);
  for (Isa i : {Isa::Avx512, Isa::Avx2, Isa::Base}) runs.Set(isaName(i), double(isaRuns(i)));
  r.Set("runs", runs);
  r.Set("soloTeams", double(soloTeams()));
  r.Set("peakBusyThreads", peakBusyThreads());
  return r;
}

// cpuSetStepStallForTesting(microseconds): see common/parallel.h.
Napi::Value CpuSetStepStallForTesting(const Napi::CallbackInfo& info) {
  setStepStallForTesting(info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 0);
  return info.Env().Undefined();
}

// cpuResetPeakForTesting(): restarts cpuInfo().peakBusyThreads.
Napi::Value CpuResetPeakForTesting(const Napi::CallbackInfo& info) {
  resetPeakBusyThreads();
  return info.Env().Undefined();
}

// cpuSetIsa(name)
Napi::Value CpuSetIsa(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throwError(env, code::kArgument, "cpu.setIsa: isa must be a string");
  const std::string name = info[0].As<Napi::String>().Utf8Value();
  Isa isa;
  if (!parseIsa(name, &isa))
    throwError(env, code::kArgument, "cpu.setIsa: isa is '" + name + "', expected 'avx512', 'avx2' or 'base'");
  if (!isaSupported(isa))
    throwError(
        env, code::kArgument,
        "cpu.setIsa: isa '" + name + "' is not supported by this CPU (best: " + isaName(supportedIsas().front()) + ")");
  setActiveIsa(isa);
  return env.Undefined();
}

// cpuSetThreads(n)
Napi::Value CpuSetThreads(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const double n = info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : -1;
  if (!(n >= 1 && n <= 1024 && n == double(int(n))))
    throwError(env, code::kArgument, "cpu.setThreads: threads must be an integer from 1 to 1024");
  setNumThreads(int(n));
  return env.Undefined();
}

}  // namespace

void registerCpu(Napi::Env env, Napi::Object exports) {
  exportFunction(env, exports, "cpuInfo", CpuInfo);
  exportFunction(env, exports, "cpuSetIsa", CpuSetIsa);
  exportFunction(env, exports, "cpuSetThreads", CpuSetThreads);
  exportFunction(env, exports, "cpuSetStepStallForTesting", CpuSetStepStallForTesting);
  exportFunction(env, exports, "cpuResetPeakForTesting", CpuResetPeakForTesting);
}

}  // namespace rk
