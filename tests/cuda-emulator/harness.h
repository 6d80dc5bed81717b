// What the emulator test drivers in this folder share, included by each after emu.h and the code
// under test:
//   * rkcuda::convert, a host stand-in for runtime.cu's dtype conversion (runtime.cu is not part of
//     the emulator build, and some launchers convert);
//   * Elem<T>, the element types (fp32, fp16, bf16): dtype, name, from(double) rounding to T and
//     value(T) back. Tolerances differ between drivers and stay in each driver;
//   * the reporting: the checks / failures counters, up to kMaxReported failures printed, each with
//     the current context; check(), and compare(), a norm-wise relative comparison
//     (||got - want|| <= tol * ||want||, or a small absolute error where want is all but zero;
//     NaN never passes);
//   * Buf<T>, a device array stand-in with sentinels on each side, poison() (NaN in every dtype,
//     for outputs) and poisonGuards() (NaN guards, for inputs); checkOutput(), which compares an
//     output and checks its guards; roundTo<T>();
//   * centralDifferences() and probeGradient(), the float64 references' gradients by finite
//     differences;
//   * launched / noteLaunches(), the kernels that ran, from the emulator's launch log.
// Each driver keeps its own tolerances, cases and summary line.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <vector>

namespace rkcuda {
Status convert(DType from, const void* src, DType to, void* dst, int64_t n) {
  auto get = [&](int64_t i) -> float {
    switch (from) {
      case DType::F32:
        return static_cast<const float*>(src)[i];
      case DType::F16:
        return __half2float(static_cast<const __half*>(src)[i]);
      default:
        return __bfloat162float(static_cast<const __nv_bfloat16*>(src)[i]);
    }
  };
  for (int64_t i = 0; i < n; ++i) {
    const float v = get(i);
    switch (to) {
      case DType::F32:
        static_cast<float*>(dst)[i] = v;
        break;
      case DType::F16:
        static_cast<__half*>(dst)[i] = __float2half_rn(v);
        break;
      default:
        static_cast<__nv_bfloat16*>(dst)[i] = __float2bfloat16_rn(v);
        break;
    }
  }
  return Status{};
}
}  // namespace rkcuda

namespace {

// ---- element types ----

template <class T> struct Elem;
template <> struct Elem<float> {
  static constexpr rkcuda::DType dtype = rkcuda::DType::F32;
  static constexpr const char* name = "f32";
  static float from(double x) { return static_cast<float>(x); }
  static double value(float x) { return x; }
};
template <> struct Elem<__half> {
  static constexpr rkcuda::DType dtype = rkcuda::DType::F16;
  static constexpr const char* name = "f16";
  static __half from(double x) { return __float2half_rn(static_cast<float>(x)); }
  static double value(__half x) { return __half2float(x); }
};
template <> struct Elem<__nv_bfloat16> {
  static constexpr rkcuda::DType dtype = rkcuda::DType::BF16;
  static constexpr const char* name = "bf16";
  static __nv_bfloat16 from(double x) { return __float2bfloat16_rn(static_cast<float>(x)); }
  static double value(__nv_bfloat16 x) { return __bfloat162float(x); }
};

// Values rounded to T (as stored).
template <class T> double roundTo(double x) { return Elem<T>::value(Elem<T>::from(x)); }

// ---- reporting ----

constexpr long kMaxReported = 40;
long checks = 0, failures = 0;
std::string context;  // the case being run

inline void check(bool ok, const std::string& what, double got = 0, double want = 0) {
  ++checks;
  if (ok) return;
  if (++failures <= kMaxReported)
    std::printf("FAIL %s: got %.9g, want %.9g  (%s)\n", what.c_str(), got, want, context.c_str());
}

// ||got - want|| <= tol * ||want|| (or an absolute 1e-6 per sqrt(element) when want is all but
// zero); NaN never passes.
inline void compare(const std::string& what, const std::vector<double>& got, const std::vector<double>& want,
                    double tol) {
  double num = 0, den = 0, worstDiff = -1;
  bool finite = got.size() == want.size();
  size_t worst = 0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    if (!std::isfinite(got[i])) finite = false;
    const double diff = got[i] - want[i];
    num += diff * diff;
    den += want[i] * want[i];
    if (!(std::fabs(diff) <= worstDiff)) {
      worstDiff = std::fabs(diff);
      worst = i;
    }
  }
  const double err = std::sqrt(num), ref = std::sqrt(den);
  const bool ok = finite && (err <= tol * ref || err <= 1e-6 * std::sqrt(static_cast<double>(got.size()) + 1));
  ++checks;
  if (ok) return;
  if (++failures <= kMaxReported) {
    std::printf("FAIL %s: relative error %.3g (tolerance %.3g), worst at [%zu]: got %.9g, want %.9g  (%s)\n",
                what.c_str(), ref > 0 ? err / ref : err, tol, worst, worst < got.size() ? got[worst] : 0.0,
                worst < want.size() ? want[worst] : 0.0, context.c_str());
  }
}

// ---- arrays ----

// Stand-in for a device array: n elements starting `offset` elements past a 16-byte boundary, with
// kGuard sentinel elements on each side (and 16 spare bytes past the end of those).
template <class T> struct Buf {
  static constexpr int kGuard = 16;  // elements; a multiple of 8 keeps offset 0 16-byte aligned
  uint4* storage = nullptr;          // uint4: 16-byte aligned; device memory of the emulator
  size_t storageCount = 0;
  T* data = nullptr;
  size_t n = 0;

  Buf() = default;
  explicit Buf(size_t count, int offset = 0)
      : storageCount(((count + 2 * kGuard + offset) * sizeof(T) + 15) / 16 + 1), n(count) {
    storage = static_cast<uint4*>(emu::checks::deviceAllocate(storageCount * sizeof(uint4)));
    T* base = reinterpret_cast<T*>(storage);
    std::fill(base, base + storageCount * 16 / sizeof(T), sentinel());
    data = base + kGuard + offset;
    emu::checks::deviceArray(data, n * sizeof(T), kGuard * sizeof(T), true);  // the guards are out of bounds
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  Buf(Buf&& o) noexcept { *this = std::move(o); }
  Buf& operator=(Buf&& o) noexcept {
    if (this != &o) {
      release();
      storage = o.storage;
      storageCount = o.storageCount;
      data = o.data;
      n = o.n;
      o.storage = nullptr;
      o.data = nullptr;
    }
    return *this;
  }
  ~Buf() { release(); }
  void release() {
    if (storage == nullptr) return;
    emu::checks::deviceArrayGone(data);
    emu::checks::deviceFree(storage, storageCount * sizeof(uint4));
    storage = nullptr;
    data = nullptr;
  }
  static T sentinel() { return Elem<T>::from(12345.0); }
  void set(const std::vector<double>& v) {
    for (size_t i = 0; i < n; ++i) data[i] = Elem<T>::from(v[i]);
  }
  void poison() { std::memset(static_cast<void*>(data), 0xff, n * sizeof(T)); }  // NaN in every dtype
  // For inputs: NaN guards, so that a read outside the array poisons the results.
  void poisonGuards() {
    std::memset(static_cast<void*>(data - kGuard), 0xff, kGuard * sizeof(T));
    std::memset(static_cast<void*>(data + n), 0xff, kGuard * sizeof(T));
  }
  std::vector<double> get() const {
    std::vector<double> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = Elem<T>::value(data[i]);
    return v;
  }
  bool guardsIntact() const {
    const double s = Elem<T>::value(sentinel());
    for (int i = 0; i < kGuard; ++i) {
      if (Elem<T>::value(data[-1 - i]) != s || Elem<T>::value(data[n + i]) != s) return false;
    }
    return true;
  }
};

template <class T>
void checkOutput(const std::string& what, const Buf<T>& buf, const std::vector<double>& want, double tol) {
  compare(what, buf.get(), want, tol);
  check(buf.guardsIntact(), what + ": write outside the array");
}

// ---- finite differences ----

// d loss / d v[i] for every i by central differences with step h (v is restored): to check a
// float64 reference's hand-written backward.
template <class Loss> std::vector<double> centralDifferences(std::vector<double>& v, Loss&& loss, double h = 1e-6) {
  std::vector<double> num(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const double v0 = v[i];
    v[i] = v0 + h;
    const double lp = loss();
    v[i] = v0 - h;
    const double lm = loss();
    v[i] = v0;
    num[i] = (lp - lm) / (2 * h);
  }
  return num;
}

// Checks grad, a reference's gradient of loss(problem) with respect to the vector problem.*field,
// against central differences (step 1e-6, agreement within 1e-6 * (1 + |difference|)) at the
// elements 0, stride, 2 * stride, ...; the checks are named d<name>[i].
template <class Problem, class Loss>
void probeGradient(const Problem& problem, std::vector<double> Problem::*field, const std::vector<double>& grad,
                   const char* name, Loss&& loss, size_t stride = 1) {
  for (size_t i = 0; i < (problem.*field).size(); i += stride) {
    Problem a = problem, b = problem;
    const double e = 1e-6;
    (a.*field)[i] += e;
    (b.*field)[i] -= e;
    const double fd = (loss(a) - loss(b)) / (2 * e);
    check(std::fabs(fd - grad[i]) <= 1e-6 * (1 + std::fabs(fd)),
          std::string("d") + name + "[" + std::to_string(i) + "]", grad[i], fd);
  }
}

// ---- launches ----

std::set<const void*> launched;  // every kernel that ran

inline void noteLaunches() {
  for (const emu::LaunchRecord& r : emu::launchLog) launched.insert(r.kernel);
  emu::launchLog.clear();
}

}  // namespace
