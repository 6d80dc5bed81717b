// Module initialisation. The addon is context-aware: every environment (main thread or worker)
// gets its own instance data, and nothing is kept in process-wide globals.
#include <napi.h>

#include "napi/async.h"
#include "napi/cpu.h"
#include "ops/registry.h"
#include "napi/tensor.h"

namespace {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* inst = new rk::Instance();
  env.SetInstanceData<rk::Instance>(inst);
  // Runs before the environment finalizes its remaining objects: from then on, DeviceBuffer
  // finalizers leave CUDA alone.
  std::shared_ptr<rk::EnvState> state = inst->state;
  env.AddCleanupHook([state]() { state->alive = false; });
  rk::registerTensor(env, exports);
  rk::registerCpu(env, exports);
  rk::registerAsync(env, exports);
  rk::registerLinearScan(env, exports);
  rk::registerSelectiveScan(env, exports);
  rk::registerGatedDeltaRule(env, exports);
  rk::registerFusedRnn(env, exports);
  rk::registerNewtonRnn(env, exports);
  rk::registerLinearAttention(env, exports);
  rk::registerCausalConv1d(env, exports);
  rk::registerMamba2Scan(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(recurrent_kernels, Init)
