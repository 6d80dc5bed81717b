// A minimal fork-join parallel loop for the CPU kernels. Work is split into contiguous ranges over
// at most `threads` OS threads; small jobs run inline. No state is kept between calls.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <thread>
#include <vector>

namespace rk {

inline int defaultThreads() {
  if (const char* env = std::getenv("RK_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : int(hc);
}

// Runs fn(begin, end) over [0, n) in chunks. `grain` is the least number of items worth a thread.
template <typename Fn> void parallelFor(int64_t n, int64_t grain, Fn&& fn) {
  if (n <= 0) return;
  int64_t threads = std::min<int64_t>(defaultThreads(), std::max<int64_t>(1, n / std::max<int64_t>(grain, 1)));
  if (threads <= 1) { fn(int64_t(0), n); return; }
  std::vector<std::thread> pool;
  std::exception_ptr failure;
  int64_t per = (n + threads - 1) / threads;
  pool.reserve(size_t(threads - 1));
  for (int64_t t = 1; t < threads; ++t) {
    int64_t b = t * per, e = std::min(n, b + per);
    if (b >= e) break;
    pool.emplace_back([&fn, b, e] { fn(b, e); });
  }
  try { fn(int64_t(0), std::min(n, per)); } catch (...) { failure = std::current_exception(); }
  for (auto& th : pool) th.join();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace rk
