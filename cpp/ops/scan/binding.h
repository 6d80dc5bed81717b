// Scan family (linear scan, selective scan): registration of its native entry points.
#pragma once
#include <napi.h>

namespace rk {
void registerScan(Napi::Env env, Napi::Object exports);
void registerSelectiveScan(Napi::Env env, Napi::Object exports);  // selective_binding.cc
}
