// Newton family (Newton-iteration parallel nonlinear RNN): registration of its native entry points.
#pragma once
#include <napi.h>

namespace rk {
void registerNewton(Napi::Env env, Napi::Object exports);
}
