// Cells family (fused LSTM / GRU / sLSTM / Elman): registration of its native entry points.
#pragma once
#include <napi.h>

namespace rk {
void registerCells(Napi::Env env, Napi::Object exports);
}
