// The CPU kernels' threads: one persistent pool per process, shared by every environment (main
// thread and worker_threads alike).
//
// parallelFor(n, grain, fn) cuts [0, n) into at most numThreads() contiguous ranges (never fewer
// than `grain` items each) and runs fn(begin, end) once per range: the calling thread runs ranges
// itself and idle pool workers take the others. The cut depends only on n, grain and numThreads(),
// never on timing, so results do not depend on which thread ran what. Calls made from inside a range
// (nested) run inline. Calls from several environments at once share the workers; each caller
// always works on its own call, so every call makes progress.
//
// runTeam(n, fn) runs fn(0) .. fn(n - 1) on n threads that are all running at the same time (for
// kernels whose threads meet at barriers), n <= teamLimit().
//
// An exception thrown by fn (std::bad_alloc included) is rethrown in the caller once every range
// has finished.
//
// Cancellation: a thread that runs a call for an async request sets a cancel flag (CancelScope);
// parallelFor and runTeam hand it to the ranges they run, on whichever thread runs them. Kernels
// call cancelPoint() at chunk / time-step / iteration boundaries: once the flag is set it throws
// Cancelled, which unwinds the kernel like any other exception. A range not started yet is skipped.
#pragma once
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <mutex>

namespace rk {

// Thrown by cancelPoint() once the running call's cancel flag is set.
struct Cancelled : std::exception {
  const char* what() const noexcept override { return "cancelled"; }
};
// Whether the running call was asked to stop (false for calls that cannot be cancelled).
bool cancelRequested();
// Throws Cancelled when cancelRequested().
inline void cancelPoint() {
  if (cancelRequested()) throw Cancelled();
}
// Sets the calling thread's cancel flag for its lifetime (nullptr: none).
class CancelScope {
 public:
  explicit CancelScope(const std::atomic<bool>* flag);
  ~CancelScope();
  CancelScope(const CancelScope&) = delete;
  CancelScope& operator=(const CancelScope&) = delete;

 private:
  const std::atomic<bool>* saved_;
};

// The number of threads the kernels use: rk.cpu.setThreads(n), else RK_NUM_THREADS, else the
// hardware's.
int numThreads();
// Sets it (n >= 1; the pool grows on demand and never shrinks below what was started).
void setNumThreads(int n);
// The most threads a team can have right now (numThreads(), or 1 inside a pool range).
int teamLimit();

namespace detail {
void runRanges(int64_t ranges, int64_t n, const std::function<void(int64_t, int64_t)>& fn, bool team);
int64_t rangesFor(int64_t n, int64_t grain);
}  // namespace detail

template <typename Fn> void parallelFor(int64_t n, int64_t grain, Fn&& fn) {
  if (n <= 0) return;
  const int64_t ranges = detail::rangesFor(n, grain);
  if (ranges <= 1) {
    fn(int64_t(0), n);
    return;
  }
  detail::runRanges(ranges, n, std::function<void(int64_t, int64_t)>([&fn](int64_t b, int64_t e) { fn(b, e); }), false);
}

// parallelFor whose ranges each return a partial result (fn(begin, end) -> Partial); merge(partial)
// is then called on the calling thread for every range in the order of the ranges, so that sums
// over ranges give the same bits from call to call (for a given thread count).
template <typename Partial, typename Fn, typename Merge>
void parallelReduce(int64_t n, int64_t grain, Fn&& fn, Merge&& merge) {
  std::mutex mutex;
  std::map<int64_t, Partial> partials;  // by the range's first item
  parallelFor(n, grain, [&](int64_t b, int64_t e) {
    Partial part = fn(b, e);
    std::lock_guard<std::mutex> lock(mutex);
    partials.emplace(b, std::move(part));
  });
  for (auto& entry : partials) merge(entry.second);
}

// The grain (items per range) that gives each range at least `minWork` units of work when an item
// costs `perItem` of them: calls too small to repay waking a thread (tens of microseconds) then run on
// the calling thread alone.
inline int64_t grainFor(double perItem, double minWork) {
  const double g = minWork / (perItem > 1.0 ? perItem : 1.0);
  return g < 1.0 ? 1 : g > 1e15 ? int64_t(1e15) : int64_t(g + 0.999);
}

template <typename Fn> void runTeam(int n, Fn&& fn) {
  if (n <= 1) {
    fn(0);
    return;
  }
  detail::runRanges(n, n, std::function<void(int64_t, int64_t)>([&fn](int64_t b, int64_t) { fn(int(b)); }), true);
}

// For tests: members other than 0 sleep this long before each step barrier (0: off), and how many
// teams have gone solo so far.
void setStepStallForTesting(int microseconds);
uint64_t soloTeams();
// For tests: the most threads that ran ranges of parallelFor / runTeam calls at the same time since
// the last reset (calls that run on their caller alone do not count).
int peakBusyThreads();
void resetPeakBusyThreads();

// The members of a runTeam that meet once per step. A member that arrives first spins briefly, then
// yields. When the members spend much of their time waiting (a core is shared with other work, and
// members keep losing their time slices), the team gives up splitting the steps: wait() returns true
// for every member at the same step, and from then on the caller lets member 0 do every member's
// share while the others return (a per-step barrier would otherwise cost a time slice per step).
// Every member's work before that wait() has finished when it returns. When the call is cancelled,
// the member that arrives last decides so for the whole team: every member throws Cancelled from the
// same wait(), so that none is left waiting for the others.
class StepBarrier {
 public:
  // allowSolo: the caller can hand every member's share to member 0 (otherwise wait() only waits).
  StepBarrier(int n, bool allowSolo);
  // True once the team goes solo (then it returns at once, for every later call too). member: the
  // caller's index in the team.
  bool wait(int member);
  bool solo() const { return solo_.load(std::memory_order_acquire); }

 private:
  std::atomic<int> count_{0}, gen_{0};
  std::atomic<int64_t> waitedNs_{0};
  std::atomic<bool> solo_{false}, stop_{false};
  int n_, steps_ = 0;  // steps_: written only by the member that arrives last
  bool allowSolo_;
  int64_t startNs_;
};

}  // namespace rk
