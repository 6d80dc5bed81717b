// Argument helpers shared by the op bindings: the request every op entry point takes, integer
// fields and flags of its config, checked products of dimensions, and the sequence table of a
// (possibly packed) batch.
#pragma once
#include <napi.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "cuda/common/api.h"
#include "napi/tensor.h"

namespace rk {

// The one argument of every op's native entry point, read by name:
//   { device, dtype, tensors: { <input>: storage | null, ... }, config: { <size, flag or table>, ... },
//     grads: { <saved tensor or output gradient>: storage | null, ... } (backward only) }
struct Request {
  Device device = Device::CPU;
  DType dtype = DType::F32;
  Napi::Object tensors, config, grads;
};
// Reads info[0] as the request of op; dtypeOf names the input that has the request's dtype (for
// messages); withGrads: a backward (grads is required).
Request parseRequest(Napi::Env env, const Napi::CallbackInfo& info, const char* op, const char* dtypeOf,
                     bool withGrads = false);

// info[i] as an object (ERR_ARGUMENT naming the argument otherwise).
Napi::Object objectArg(Napi::Env env, const Napi::CallbackInfo& info, size_t i, const char* op, const char* name);
// o[name] as an integer of at least `least` (ERR_SHAPE otherwise, ERR_ARGUMENT if not an integer).
int64_t intField(Napi::Env env, const Napi::Object& o, const char* name, const char* op, int64_t least);
inline bool flagField(const Napi::Object& o, const char* name) { return o.Get(name).ToBoolean().Value(); }
// o.scale as a float32 that is finite (ERR_ARGUMENT otherwise: 1e39 is a finite double, not float).
float scaleField(Napi::Env env, const Napi::Object& o, const char* op);
// o[name] as a float32 bound (infinities allowed, NaN and non-numbers ERR_ARGUMENT).
float boundField(Napi::Env env, const Napi::Object& o, const char* name, const char* op);
// The product of xs, throwing ERR_SHAPE instead of overflowing.
int64_t product(Napi::Env env, std::initializer_list<int64_t> xs, const char* op);

// Sequences of a batch: without cuSeqlens (null/undefined) one per batch row over [0, length);
// with it (an Int32Array of nseq + 1 offsets from 0, non-decreasing, at most length; batch must be
// 1) one per offset pair. chunkOffset counts chunks of `chunk` positions before each sequence;
// *totalChunks receives the sum and *packed whether cuSeqlens was given.
std::vector<rkcuda::ScanSegment> parseSegments(Napi::Env env, Napi::Value cuSeqlens, int64_t batch, int64_t length,
                                               int64_t chunk, const char* op, int64_t* totalChunks, bool* packed);

}  // namespace rk
