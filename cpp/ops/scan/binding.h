// Scan family (linear scan; selective scan to come): registration of its native entry points.
#pragma once
#include <napi.h>

namespace rk {
void registerScan(Napi::Env env, Napi::Object exports);
}
