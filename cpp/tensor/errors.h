// Typed errors thrown to JavaScript. Every native failure becomes a JS Error whose `code` is one of
// the stable codes of the package (ERR_SHAPE, ERR_DTYPE, ...); lib/ turns it into the matching class.
#pragma once
#include <napi.h>

#include <string>

namespace rk {

[[noreturn]] inline void throwError(Napi::Env env, const char* code, const std::string& message) {
  Napi::Error err = Napi::Error::New(env, message);
  err.Set("code", Napi::String::New(env, code));
  throw err;
}

}  // namespace rk
