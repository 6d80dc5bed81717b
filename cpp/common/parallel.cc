#include "common/parallel.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace rk {
namespace {

int initialThreads() {
  if (const char* env = std::getenv("RK_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : int(hc);
}

std::atomic<int>& threadSetting() {
  static std::atomic<int> n{initialThreads()};
  return n;
}

// How long a pool worker stays awake after a job, looking for the next one.
constexpr auto kStayAwake = std::chrono::milliseconds(2);

// A team goes solo only after this many steps and this much time (so that one slow start decides
// nothing).
constexpr int kMinStepsForSolo = 8;
constexpr int64_t kMinNsForSolo = 1000000;

int64_t nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The testing hook of StepBarrier, and its count of teams gone solo.
std::atomic<int> testStallUs{0};
std::atomic<uint64_t> soloCount{0};
// Threads inside a range now, and the most at once since the last reset.
std::atomic<int> busyThreads{0}, busyPeak{0};

// Set on pool workers and on any thread while it runs a range: nested calls run inline.
thread_local bool tInsideRange = false;
// The cancel flag of the call this thread works on (see CancelScope), or null.
thread_local const std::atomic<bool>* tCancel = nullptr;

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// One parallelFor / runTeam call: ranges are claimed in order through `next`.
struct Job {
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t ranges = 0, n = 0, per = 0;
  bool team = false;
  const std::atomic<bool>* cancel = nullptr;  // the caller's cancel flag, handed to every range
  int users = 0;                              // pool workers inside work() (guarded by the pool's mutex)
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> left{0};  // ranges not finished yet
  std::mutex failMutex;
  std::exception_ptr failure;
  std::mutex doneMutex;
  std::condition_variable doneCv;

  // Claims and runs ranges until none is left; false if there was none to claim.
  bool work() {
    bool any = false;
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= ranges) return any;
      any = true;
      const int64_t b = team ? i : i * per, e = team ? i + 1 : std::min(n, b + per);
      const bool outer = tInsideRange;
      const std::atomic<bool>* outerCancel = tCancel;
      tInsideRange = true;
      tCancel = cancel;
      try {
        // A range that has not started when the call is cancelled is skipped. A team member never
        // skips: the others would wait for it at their first barrier (the barrier stops them all).
        if (!team) cancelPoint();
        const int busy = busyThreads.fetch_add(1, std::memory_order_relaxed) + 1;
        for (int peak = busyPeak.load(std::memory_order_relaxed);
             busy > peak && !busyPeak.compare_exchange_weak(peak, busy, std::memory_order_relaxed);) {
        }
        struct Leave {
          ~Leave() { busyThreads.fetch_sub(1, std::memory_order_relaxed); }
        } leave;
        if (b < e) (*fn)(b, e);
      } catch (...) {
        std::lock_guard<std::mutex> lock(failMutex);
        if (!failure) failure = std::current_exception();
      }
      tInsideRange = outer;
      tCancel = outerCancel;
      if (left.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(doneMutex);
        doneCv.notify_all();
      }
      // A team member runs exactly one range: the others must run on other threads at the same time.
      if (team) return true;
    }
  }
  bool claimable() const { return next.load(std::memory_order_relaxed) < ranges; }
};

class Pool {
 public:
  static Pool& get() {
    // Never destroyed: workers may still be parked when the process exits.
    static Pool* pool = new Pool();
    return *pool;
  }

  void submit(Job* job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Enough workers that every member of every running team can run at once: a worker held by
      // a team waits only for members of that team, and the workers not held by teams that still
      // miss members always outnumber those missing members, so every team completes.
      if (job->team) teamDemand_ += int(job->ranges - 1);
      const int want = std::max(teamDemand_, int(job->ranges - 1));
      while (workers_ < want) {
        std::thread([this] { loop(); }).detach();
        ++workers_;
      }
      jobs_.push_back(job);
      submittedAtomic_.store(++submitted_, std::memory_order_release);
    }
    cv_.notify_all();
  }

  // Called once every range of the job has finished; returns when no worker touches it any more.
  void retire(Job* job) {
    std::unique_lock<std::mutex> lock(mutex_);
    jobs_.erase(std::find(jobs_.begin(), jobs_.end(), job));
    if (job->team) teamDemand_ -= int(job->ranges - 1);
    retired_.wait(lock, [job] { return job->users == 0; });
  }

 private:
  Job* take() {
    for (Job* j : jobs_)
      if (j->claimable()) return j;
    return nullptr;
  }

  void loop() {
    tInsideRange = true;
    std::unique_lock<std::mutex> lock(mutex_);
    bool justWorked = false;
    for (;;) {
      if (Job* job = take()) {
        ++job->users;
        lock.unlock();
        job->work();
        lock.lock();
        if (--job->users == 0) retired_.notify_all();
        justWorked = true;
        continue;
      }
      if (justWorked) {
        // Right after a job, stay awake for a while before sleeping: back-to-back calls (a loop of
        // kernel calls, a kernel's phases) then find the worker running. Waking a sleeping thread
        // can take a millisecond or more where the idle core has to be woken too (virtual
        // machines); the wait yields often, so that other work on this core runs meanwhile.
        justWorked = false;
        const int seen = submitted_;
        lock.unlock();
        const auto until = std::chrono::steady_clock::now() + kStayAwake;
        bool fresh = false;
        while (!fresh && std::chrono::steady_clock::now() < until) {
          for (int i = 0; i < 64 && !fresh; ++i) {
            relax();
            fresh = submittedAtomic_.load(std::memory_order_acquire) != seen;
          }
          if (!fresh) std::this_thread::yield();
        }
        lock.lock();
        continue;
      }
      cv_.wait(lock, [this] { return take() != nullptr; });
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_, retired_;
  std::deque<Job*> jobs_;
  int submitted_ = 0;                    // jobs ever submitted (guarded by mutex_)
  std::atomic<int> submittedAtomic_{0};  // the same, for spinning workers
  int workers_ = 0, teamDemand_ = 0;
};

}  // namespace

bool cancelRequested() { return tCancel != nullptr && tCancel->load(std::memory_order_relaxed); }

CancelScope::CancelScope(const std::atomic<bool>* flag) : saved_(tCancel) { tCancel = flag; }
CancelScope::~CancelScope() { tCancel = saved_; }

int numThreads() { return threadSetting().load(std::memory_order_relaxed); }

void setNumThreads(int n) { threadSetting().store(std::max(1, n), std::memory_order_relaxed); }

int teamLimit() { return tInsideRange ? 1 : numThreads(); }

namespace detail {

int64_t rangesFor(int64_t n, int64_t grain) {
  if (tInsideRange) return 1;
  return std::min<int64_t>(numThreads(), std::max<int64_t>(1, n / std::max<int64_t>(grain, 1)));
}

void runRanges(int64_t ranges, int64_t n, const std::function<void(int64_t, int64_t)>& fn, bool team) {
  Job job;
  job.fn = &fn;
  job.ranges = ranges;
  job.n = n;
  job.per = (n + ranges - 1) / ranges;
  job.team = team;
  job.cancel = tCancel;
  job.left.store(ranges, std::memory_order_relaxed);
  Pool& pool = Pool::get();
  pool.submit(&job);
  if (team) {
    job.work();  // the caller is one member
  } else {
    while (job.work()) {
    }
  }
  // Every range is claimed now (or being claimed by a team member); wait for the rest to finish.
  if (job.left.load(std::memory_order_acquire) > 0) {
    for (int i = 0; i < 2000 && job.left.load(std::memory_order_acquire) > 0; ++i) relax();
    std::unique_lock<std::mutex> lock(job.doneMutex);
    job.doneCv.wait(lock, [&] { return job.left.load(std::memory_order_acquire) == 0; });
  }
  pool.retire(&job);
  if (job.failure) std::rethrow_exception(job.failure);
}

}  // namespace detail

StepBarrier::StepBarrier(int n, bool allowSolo) : n_(n), allowSolo_(allowSolo), startNs_(nowNs()) {}

void setStepStallForTesting(int microseconds) { testStallUs.store(microseconds, std::memory_order_relaxed); }
uint64_t soloTeams() { return soloCount.load(std::memory_order_relaxed); }
int peakBusyThreads() { return busyPeak.load(std::memory_order_relaxed); }
void resetPeakBusyThreads() { busyPeak.store(busyThreads.load(std::memory_order_relaxed), std::memory_order_relaxed); }

bool StepBarrier::wait(int member) {
  if (n_ <= 1 || solo_.load(std::memory_order_acquire)) {
    cancelPoint();
    return n_ > 1;
  }
  if (const int us = testStallUs.load(std::memory_order_relaxed); us > 0 && member != 0)
    std::this_thread::sleep_for(std::chrono::microseconds(us));
  const int gen = gen_.load(std::memory_order_acquire);
  if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
    // The last to arrive releases the others, and decides for all of them whether to go solo: when,
    // after a few steps, the members have spent more than 40% of the team's time waiting here, one
    // thread alone is about as fast as the team, and it no longer depends on being scheduled.
    count_.store(0, std::memory_order_relaxed);
    const int steps = ++steps_;
    if (allowSolo_ && steps >= kMinStepsForSolo) {
      const int64_t elapsed = nowNs() - startNs_;
      const int64_t waited = waitedNs_.load(std::memory_order_relaxed);
      if (elapsed > kMinNsForSolo && double(waited) > 0.4 * double(elapsed) * double(n_ - 1)) {
        solo_.store(true, std::memory_order_release);
        soloCount.fetch_add(1, std::memory_order_relaxed);
      }
    }
    if (cancelRequested()) stop_.store(true, std::memory_order_relaxed);
    gen_.store(gen + 1, std::memory_order_release);
    if (stop_.load(std::memory_order_relaxed)) throw Cancelled();
    return solo_.load(std::memory_order_acquire);
  }
  const int64_t start = nowNs();
  for (int spins = 0; gen_.load(std::memory_order_acquire) == gen; ++spins) {
    if (spins < 2000)
      relax();
    else
      std::this_thread::yield();
  }
  waitedNs_.fetch_add(nowNs() - start, std::memory_order_relaxed);
  if (stop_.load(std::memory_order_acquire)) throw Cancelled();
  return solo_.load(std::memory_order_acquire);
}

}  // namespace rk
