// Typed errors thrown to JavaScript. Every native failure becomes a JS Error whose `code` is one of
// the stable codes of the package (ERR_SHAPE, ERR_DTYPE, ...); lib/ turns it into the matching class.
#pragma once
#include <napi.h>

#include <string>

namespace rk {

// The codes, as lib/errors.ts's ErrorCode spells them (tests/errors.test.ts checks that the two
// lists agree and that no other code appears in cpp/).
namespace code {
inline constexpr const char* kShape = "ERR_SHAPE";
inline constexpr const char* kDType = "ERR_DTYPE";
inline constexpr const char* kDevice = "ERR_DEVICE";
inline constexpr const char* kArgument = "ERR_ARGUMENT";
inline constexpr const char* kDisposed = "ERR_DISPOSED";
inline constexpr const char* kCuda = "ERR_CUDA";
inline constexpr const char* kOutOfMemory = "ERR_OUT_OF_MEMORY";
inline constexpr const char* kAborted = "ERR_ABORTED";
}  // namespace code

[[noreturn]] inline void throwError(Napi::Env env, const char* code, const std::string& message) {
  Napi::Error err = Napi::Error::New(env, message);
  err.Set("code", Napi::String::New(env, code));
  throw err;
}

}  // namespace rk
