// Error plumbing for cuda/: turns cudaError_t into rkcuda::Status, plus early-return macros and a
// post-launch check. Nothing here aborts or prints; every failure travels back as a Status.
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "common/api.h"

namespace rkcuda {

// Status for a CUDA error code: code = the cudaError_t value, message = "<name>: <description>",
// outOfMemory for allocation failures. cudaSuccess gives an ok Status.
inline Status statusFromCuda(cudaError_t err) {
  Status st;
  if (err == cudaSuccess) return st;
  st.code = static_cast<int>(err);
  st.outOfMemory = (err == cudaErrorMemoryAllocation);
  const char* name = cudaGetErrorName(err);
  const char* text = cudaGetErrorString(err);
  st.message = std::string(name ? name : "cudaError") + ": " + (text ? text : "unknown error");
  return st;
}

// A failed Status that did not come from the CUDA runtime (bad arguments and the like).
inline Status statusError(const std::string& message) {
  Status st;
  st.code = -1;
  st.message = message;
  return st;
}

// After a kernel launch: reports (and clears) a launch error such as an invalid configuration or a
// missing kernel image. Asynchronous faults surface later, at the next synchronising call.
inline Status checkLaunch() { return statusFromCuda(cudaGetLastError()); }

}  // namespace rkcuda

// Evaluate a CUDA runtime call; on failure return its Status from the enclosing function.
#define RK_CUDA_TRY(expr)                                  \
  do {                                                     \
    const cudaError_t rk_err_ = (expr);                    \
    if (rk_err_ != cudaSuccess) {                          \
      cudaGetLastError(); /* a later launch check must not \
                             report this error again */    \
      return ::rkcuda::statusFromCuda(rk_err_);            \
    }                                                      \
  } while (0)

// Evaluate an expression yielding rkcuda::Status; on failure return it from the enclosing function.
#define RK_TRY(expr)                  \
  do {                                \
    ::rkcuda::Status rk_st_ = (expr); \
    if (!rk_st_.ok()) return rk_st_;  \
  } while (0)

// Check the launch that just happened; on failure return its Status.
#define RK_CHECK_LAUNCH() RK_TRY(::rkcuda::checkLaunch())
