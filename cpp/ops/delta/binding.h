// Delta family (gated delta rule): registration of its native entry points.
#pragma once
#include <napi.h>

namespace rk {
void registerDelta(Napi::Env env, Napi::Object exports);
}
