// The ops' native entry points, one registration per op binding (cpp/ops/<family>/<op>_binding.cc);
// addon.cc calls each. A new op adds its binding file and one line here and in addon.cc.
#pragma once
#include <napi.h>

namespace rk {
void registerLinearScan(Napi::Env env, Napi::Object exports);  // linearScanForward / Backward
void registerSelectiveScan(Napi::Env env,
                           Napi::Object exports);  // selectiveScanForward / Backward, selectiveStateUpdate
void registerGatedDeltaRule(Napi::Env env,
                            Napi::Object exports);            // gatedDeltaRuleForward / Backward, gatedDeltaRuleStep
void registerFusedRnn(Napi::Env env, Napi::Object exports);   // fusedRnnForward / Backward
void registerNewtonRnn(Napi::Env env, Napi::Object exports);  // newtonRnnForward / Backward
void registerLinearAttention(Napi::Env env, Napi::Object exports);  // linearAttentionForward / Backward / Step / Gates
void registerCausalConv1d(Napi::Env env, Napi::Object exports);     // causalConv1dForward / Backward
void registerMamba2Scan(Napi::Env env, Napi::Object exports);       // mamba2Prepare / Finish / ... / Step (the glue)
}  // namespace rk
