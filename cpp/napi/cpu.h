// rk.cpu: which instruction-set variant and how many threads the CPU kernels use.
#pragma once
#include <napi.h>

namespace rk {
void registerCpu(Napi::Env env, Napi::Object exports);
}
