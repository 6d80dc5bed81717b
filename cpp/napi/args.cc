#include "napi/args.h"

#include <cfloat>
#include <cmath>
#include <string>

#include "napi/errors.h"
#include "napi/tensor.h"

namespace rk {

int64_t intField(Napi::Env env, const Napi::Object& o, const char* name, const char* op, int64_t least) {
  int64_t v = parseCount(env, o.Get(name), op, name);
  if (v < least)
    throwError(env, code::kShape, std::string(op) + ": " + name + " must be at least " + std::to_string(least));
  return v;
}

float scaleField(Napi::Env env, const Napi::Object& cfg, const char* op) {
  Napi::Value v = cfg.Get("scale");
  double s = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : NAN;
  // Finite as the float the kernels use, not only as a double (1e39 would become inf).
  if (!std::isfinite(s) || std::fabs(s) > double(FLT_MAX))
    throwError(env, code::kArgument,
               std::string(op) + ": scale must be finite as a float32 (at most 3.4e38 in magnitude), got " +
                   Napi::Number::New(env, s).ToString().Utf8Value());
  return float(s);
}

float boundField(Napi::Env env, const Napi::Object& cfg, const char* name, const char* op) {
  Napi::Value v = cfg.Get(name);
  const double x = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : NAN;
  if (std::isnan(x)) throwError(env, code::kArgument, std::string(op) + ": " + name + " must be a number");
  return float(x);
}

int64_t product(Napi::Env env, std::initializer_list<int64_t> xs, const char* op) {
  int64_t p = 1;
  for (int64_t x : xs) p = checkedProduct(env, p, x, op);
  return p;
}

static Napi::Object objectField(Napi::Env env, const Napi::Object& o, const char* name, const char* op) {
  Napi::Value v = o.Get(name);
  if (!v.IsObject() || v.IsArray() || v.IsTypedArray())
    throwError(env, code::kArgument, std::string(op) + ": request." + name + " must be an object");
  return v.As<Napi::Object>();
}

Request parseRequest(Napi::Env env, const Napi::CallbackInfo& info, const char* op, const char* dtypeOf,
                     bool withGrads) {
  Napi::Object req = objectArg(env, info, 0, op, "request");
  Request r;
  r.device = parseDevice(env, req.Get("device"), op);
  r.dtype = parseDType(env, req.Get("dtype"), op, dtypeOf);
  r.tensors = objectField(env, req, "tensors", op);
  r.config = objectField(env, req, "config", op);
  if (withGrads) r.grads = objectField(env, req, "grads", op);
  return r;
}

Napi::Object objectArg(Napi::Env env, const Napi::CallbackInfo& info, size_t i, const char* op, const char* name) {
  Napi::Value v = info[i];
  if (!v.IsObject() || v.IsArray() || v.IsTypedArray())
    throwError(env, code::kArgument,
               std::string(op) + ": argument " + std::to_string(i + 1) + " (" + name + ") must be an object");
  return v.As<Napi::Object>();
}

std::vector<rkcuda::ScanSegment> parseSegments(Napi::Env env, Napi::Value cu, int64_t batch, int64_t length,
                                               int64_t chunk, const char* op, int64_t* totalChunks, bool* packed) {
  std::vector<rkcuda::ScanSegment> segs;
  *packed = false;
  if (cu.IsNull() || cu.IsUndefined()) {
    for (int64_t b = 0; b < batch; ++b) segs.push_back({b, 0, length, 0});
  } else {
    if (!cu.IsTypedArray() || cu.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
      throwError(env, code::kArgument, std::string(op) + ": cuSeqlens must be an Int32Array");
    Napi::Int32Array arr = cu.As<Napi::Int32Array>();
    const size_t n = arr.ElementLength();
    if (batch != 1) throwError(env, code::kShape, std::string(op) + ": cuSeqlens needs batch 1");
    if (n < 2 || arr[0] != 0)
      throwError(env, code::kArgument, std::string(op) + ": cuSeqlens must start with 0 and have at least 2 entries");
    for (size_t i = 1; i < n; ++i) {
      if (arr[i] < arr[i - 1] || arr[i] > length)
        throwError(env, code::kArgument, std::string(op) + ": cuSeqlens must be non-decreasing and at most the length");
      segs.push_back({0, arr[i - 1], int64_t(arr[i]) - arr[i - 1], 0});
    }
    *packed = true;
  }
  int64_t total = 0;
  for (rkcuda::ScanSegment& s : segs) {
    s.chunkOffset = total;
    total += (s.length + chunk - 1) / chunk;
  }
  *totalChunks = total;
  return segs;
}

}  // namespace rk
