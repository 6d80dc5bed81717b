// CPU gated delta rule, the per-token recurrence. Work is split over (sequence, q/k head): one
// item walks every value head that reads its q/k head, so the gradients of q and k (summed over
// those value heads) have a single writer.
//
// Per token and value head, with the state S (K x V, row-major) and e = exp(g):
//   u = S^T k, p = S^T q          (one pass over S)
//   w = beta (v - e u)            (the delta-rule correction)
//   o = scale (e p + (k.q) w)     (= scale S_new^T q)
//   S = e S + k w^T               (a second pass)
// Backward, per chunk of kGatedDeltaChunk tokens from the last: the chunk's states are recomputed
// from the checkpoint and kept, then each token is undone in reverse with the adjoint dS:
//   dS += scale q dO^T;  dw = dS^T k;  dk += dS w;  dv = beta dw;  dbeta = dw . (v - e u)
//   du' = -beta dw (u' = e u);  dk += e S du';  dg = e (<dS, S> + k . (S du'));  dS = e (dS + k du'^T)
// (S here is the state before the token). Gradients of the L2-normalised q and k are kept in
// fp32 and taken through the normalisation at the end.
#include "ops/delta/gated_delta_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "tensor/dtype.h"
#include "tensor/isa.h"
#include "tensor/parallel.h"

namespace rk::delta {
namespace {

using rkcuda::GatedDeltaArgs;
using rkcuda::GatedDeltaGrads;
using rkcuda::GatedDeltaStepArgs;
using rkcuda::ScanSegment;

constexpr float kL2Eps = 1e-6f;
constexpr int64_t kChunk = kGatedDeltaChunk;

// Loads n elements as fp32; with l2norm divides by sqrt(sum x^2 + eps) and returns that divisor.
template <typename S> RK_ALWAYS_INLINE float loadVector(const S* src, int64_t n, bool l2norm, float* dst) {
  float ss = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = Storage<S>::load(src[i]);
    ss += dst[i] * dst[i];
  }
  if (!l2norm) return 1.0f;
  const float r = std::sqrt(ss + kL2Eps);
  for (int64_t i = 0; i < n; ++i) dst[i] /= r;
  return r;
}

// sum_j a[j] b[j], in 16 independent partial sums so that it vectorises without reassociation.
RK_ALWAYS_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[j + l] * b[j + l];
  float tail = 0.0f;
  for (; j < n; ++j) tail += a[j] * b[j];
  for (int l = 8; l > 0; l /= 2)
    for (int m = 0; m < l; ++m) acc[m] += acc[m + l];
  return acc[0] + tail;
}

// Index helpers for one (batch row, position) of the [batch, T, heads, dim] tensors.
struct Dims {
  int64_t T, H, HV, K, V;
  int64_t qk(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * K; }
  int64_t vo(int64_t b, int64_t t, int64_t hv) const { return ((b * T + t) * HV + hv) * V; }
  int64_t gb(int64_t b, int64_t t, int64_t hv) const { return (b * T + t) * HV + hv; }
};

// One token of the recurrence for one value head: updates S (K x V) and writes o (V).
RK_ALWAYS_INLINE void stepToken(float* S, const float* q, const float* k, const float* v, float e, float beta, float scale,
                      int64_t K, int64_t V, float* u, float* p, float* w, float* o) {
  std::fill(u, u + V, 0.0f);
  std::fill(p, p + V, 0.0f);
  float kq = 0.0f;
  for (int64_t i = 0; i < K; ++i) {
    const float* row = S + i * V;
    const float ki = k[i], qi = q[i];
    kq += ki * qi;
    for (int64_t j = 0; j < V; ++j) {
      u[j] += ki * row[j];
      p[j] += qi * row[j];
    }
  }
  for (int64_t j = 0; j < V; ++j) {
    w[j] = beta * (v[j] - e * u[j]);
    o[j] = scale * (e * p[j] + kq * w[j]);
  }
  for (int64_t i = 0; i < K; ++i) {
    float* row = S + i * V;
    const float ki = k[i];
    for (int64_t j = 0; j < V; ++j) row[j] = e * row[j] + ki * w[j];
  }
}

inline int64_t chunksOf(const ScanSegment& sg) { return (sg.length + kChunk - 1) / kChunk; }

template <typename S> void zeroUncovered(const GatedDeltaArgs& a, S* out, int64_t perPosition) {
  if (!a.packed || !out) return;
  int64_t end = 0;
  for (int64_t s = 0; s < a.nseq; ++s) end = std::max(end, a.segments[s].start + a.segments[s].length);
  for (int64_t i = end * perPosition; i < a.T * perPosition; ++i) out[i] = Storage<S>::store(0.0f);
}

// The work items [i0, i1) of the forward pass (an item is a (sequence, q/k head)).
template <typename S>
RK_ALWAYS_INLINE void forwardItemsBody(const GatedDeltaArgs& a, S* o, float* states, float* finalState, int64_t i0,
                                       int64_t i1) {
  const Dims d{a.T, a.H, a.HV, a.K, a.V};
  const int64_t K = a.K, V = a.V, KV = K * V, per = a.HV / a.H;
  const S* qs = static_cast<const S*>(a.q);
  const S* ks = static_cast<const S*>(a.k);
  const S* vs = static_cast<const S*>(a.v);
  const S* bs = static_cast<const S*>(a.beta);
  {
    std::vector<float> Sm(static_cast<size_t>(KV)), q(static_cast<size_t>(K)), k(static_cast<size_t>(K)),
        qn(static_cast<size_t>(K)), kn(static_cast<size_t>(K)), v(static_cast<size_t>(V)), u(static_cast<size_t>(V)),
        p(static_cast<size_t>(V)), w(static_cast<size_t>(V));
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t s = item / a.H, h = item % a.H;
      const ScanSegment& sg = a.segments[s];
      for (int64_t hv = h * per; hv < (h + 1) * per; ++hv) {
        if (a.h0) std::copy(a.h0 + (s * a.HV + hv) * KV, a.h0 + (s * a.HV + hv + 1) * KV, Sm.begin());
        else std::fill(Sm.begin(), Sm.end(), 0.0f);
        // One pass over S per token: the update by token t and the products S^T k, S^T q that
        // token t + 1 needs are made in the same sweep over the rows.
        auto load = [&](int64_t t, float* qd, float* kd) {
          const int64_t pos = sg.start + t;
          loadVector(qs + d.qk(sg.batch, pos, h), K, a.l2norm, qd);
          loadVector(ks + d.qk(sg.batch, pos, h), K, a.l2norm, kd);
        };
        if (sg.length > 0) {
          load(0, q.data(), k.data());
          std::fill(u.begin(), u.end(), 0.0f);
          std::fill(p.begin(), p.end(), 0.0f);
          for (int64_t i = 0; i < K; ++i)
            for (int64_t j = 0; j < V; ++j) {
              u[size_t(j)] += k[size_t(i)] * Sm[size_t(i * V + j)];
              p[size_t(j)] += q[size_t(i)] * Sm[size_t(i * V + j)];
            }
        }
        for (int64_t t = 0; t < sg.length; ++t) {
          if (t % kChunk == 0)
            std::copy(Sm.begin(), Sm.end(), states + ((sg.chunkOffset + t / kChunk) * a.HV + hv) * KV);
          const int64_t pos = sg.start + t;
          loadVector(vs + d.vo(sg.batch, pos, hv), V, false, v.data());
          const float e = std::exp(a.g[d.gb(sg.batch, pos, hv)]);
          const float beta = Storage<S>::load(bs[d.gb(sg.batch, pos, hv)]);
          float kq = 0.0f;
          for (int64_t i = 0; i < K; ++i) kq += k[size_t(i)] * q[size_t(i)];
          S* od = o + d.vo(sg.batch, pos, hv);
          for (int64_t j = 0; j < V; ++j) {
            w[size_t(j)] = beta * (v[size_t(j)] - e * u[size_t(j)]);
            od[j] = Storage<S>::store(a.scale * (e * p[size_t(j)] + kq * w[size_t(j)]));
          }
          const bool more = t + 1 < sg.length;
          if (more) load(t + 1, qn.data(), kn.data());
          std::fill(u.begin(), u.end(), 0.0f);
          std::fill(p.begin(), p.end(), 0.0f);
          for (int64_t i = 0; i < K; ++i) {
            float* row = Sm.data() + i * V;
            const float ki = k[size_t(i)];
            for (int64_t j = 0; j < V; ++j) row[j] = e * row[j] + ki * w[size_t(j)];
            if (!more) continue;
            const float kn_i = kn[size_t(i)], qn_i = qn[size_t(i)];
            for (int64_t j = 0; j < V; ++j) {
              u[size_t(j)] += kn_i * row[j];
              p[size_t(j)] += qn_i * row[j];
            }
          }
          std::swap(q, qn);
          std::swap(k, kn);
        }
        if (finalState) std::copy(Sm.begin(), Sm.end(), finalState + (s * a.HV + hv) * KV);
      }
    }
  }
}

// The work items [i0, i1) of the backward pass, up to the fp32 gradients dqn, dkn of the
// (normalised) q and k, [batch, T, H, K], each (sequence, head) slice owned by one item.
template <typename S>
RK_ALWAYS_INLINE void backwardItemsBody(const GatedDeltaArgs& a, const GatedDeltaGrads& gr, float* dqn, float* dkn,
                                        int64_t i0, int64_t i1) {
  const Dims d{a.T, a.H, a.HV, a.K, a.V};
  const int64_t K = a.K, V = a.V, KV = K * V, per = a.HV / a.H;
  const S* qs = static_cast<const S*>(a.q);
  const S* ks = static_cast<const S*>(a.k);
  const S* vs = static_cast<const S*>(a.v);
  const S* bs = static_cast<const S*>(a.beta);
  const S* dOs = static_cast<const S*>(gr.dO);
  S* dv = static_cast<S*>(gr.dv);
  S* dbeta = static_cast<S*>(gr.dbeta);
  {
    // Per chunk: the state before each token, and per token q, k (normalised), u, w, e, beta.
    std::vector<float> Sprev(static_cast<size_t>(kChunk * KV)), Sm(static_cast<size_t>(KV)), dS(static_cast<size_t>(KV));
    std::vector<float> qc(static_cast<size_t>(kChunk * K)), kc(static_cast<size_t>(kChunk * K)), vc(static_cast<size_t>(kChunk * V)),
        uc(static_cast<size_t>(kChunk * V)), wc(static_cast<size_t>(kChunk * V)), ec(static_cast<size_t>(kChunk)), bc(static_cast<size_t>(kChunk));
    std::vector<float> p(static_cast<size_t>(V)), out(static_cast<size_t>(V)), dO(static_cast<size_t>(V)), dw(static_cast<size_t>(V)), dup(static_cast<size_t>(V)), Sd(static_cast<size_t>(K)),
        Su(static_cast<size_t>(K)), dSw(static_cast<size_t>(K));
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t s = item / a.H, h = item % a.H;
      const ScanSegment& sg = a.segments[s];
      for (int64_t hv = h * per; hv < (h + 1) * per; ++hv) {
        if (gr.dFinal) std::copy(gr.dFinal + (s * a.HV + hv) * KV, gr.dFinal + (s * a.HV + hv + 1) * KV, dS.begin());
        else std::fill(dS.begin(), dS.end(), 0.0f);
        for (int64_t c = chunksOf(sg) - 1; c >= 0; --c) {
          const int64_t t0 = c * kChunk, n = std::min(kChunk, sg.length - t0);
          const float* cp = gr.states + ((sg.chunkOffset + c) * a.HV + hv) * KV;
          std::copy(cp, cp + KV, Sm.begin());
          for (int64_t t = 0; t < n; ++t) {
            const int64_t pos = sg.start + t0 + t;
            float* q = qc.data() + t * K;
            float* k = kc.data() + t * K;
            float* v = vc.data() + t * V;
            loadVector(qs + d.qk(sg.batch, pos, h), K, a.l2norm, q);
            loadVector(ks + d.qk(sg.batch, pos, h), K, a.l2norm, k);
            loadVector(vs + d.vo(sg.batch, pos, hv), V, false, v);
            ec[size_t(t)] = std::exp(a.g[d.gb(sg.batch, pos, hv)]);
            bc[size_t(t)] = Storage<S>::load(bs[d.gb(sg.batch, pos, hv)]);
            std::copy(Sm.begin(), Sm.end(), Sprev.begin() + t * KV);
            stepToken(Sm.data(), q, k, v, ec[size_t(t)], bc[size_t(t)], a.scale, K, V, uc.data() + t * V, p.data(),
                      wc.data() + t * V, out.data());
          }
          for (int64_t t = n - 1; t >= 0; --t) {
            const int64_t pos = sg.start + t0 + t;
            const float* q = qc.data() + t * K;
            const float* k = kc.data() + t * K;
            const float* v = vc.data() + t * V;
            const float* u = uc.data() + t * V;
            const float* w = wc.data() + t * V;
            const float* Sp = Sprev.data() + t * KV;
            const float e = ec[size_t(t)], beta = bc[size_t(t)];
            if (dOs) loadVector(dOs + d.vo(sg.batch, pos, hv), V, false, dO.data());
            else std::fill(dO.begin(), dO.end(), 0.0f);
            float* dq = dqn + d.qk(sg.batch, pos, h);
            float* dk = dkn + d.qk(sg.batch, pos, h);
            // dq = scale S_new dO with S_new = e Sp + k w^T: scale (e Sp dO + k (w . dO)).
            float wdO = 0.0f;
            for (int64_t j = 0; j < V; ++j) wdO += w[j] * dO[size_t(j)];
            // Pass A over dS: dS += scale q dO^T, then dw = dS^T k and dSw = dS w.
            std::fill(dw.begin(), dw.end(), 0.0f);
            for (int64_t i = 0; i < K; ++i) {
              float* row = dS.data() + i * V;
              const float sq = a.scale * q[i], ki = k[i];
              for (int64_t j = 0; j < V; ++j) {
                row[j] += sq * dO[size_t(j)];
                dw[size_t(j)] += row[j] * ki;
              }
              dSw[size_t(i)] = dot(row, w, V);
            }
            float db = 0.0f;
            for (int64_t j = 0; j < V; ++j) {
              dv[d.vo(sg.batch, pos, hv) + j] = Storage<S>::store(beta * dw[size_t(j)]);
              db += dw[size_t(j)] * (v[j] - e * u[j]);
              dup[size_t(j)] = -beta * dw[size_t(j)];
            }
            dbeta[d.gb(sg.batch, pos, hv)] = Storage<S>::store(db);
            // Pass B over the previous state: Sp dO, Sp du', <dS, Sp>.
            float dSSp = 0.0f, kSu = 0.0f;
            for (int64_t i = 0; i < K; ++i) {
              const float* srow = Sp + i * V;
              const float a2 = dot(srow, dup.data(), V);
              Sd[size_t(i)] = dot(srow, dO.data(), V);
              Su[size_t(i)] = a2;
              dSSp += dot(srow, dS.data() + i * V, V);
              kSu += k[i] * a2;
            }
            for (int64_t i = 0; i < K; ++i) {
              dq[i] += a.scale * (e * Sd[size_t(i)] + k[i] * wdO);
              dk[i] += dSw[size_t(i)] + e * Su[size_t(i)];
            }
            gr.dg[d.gb(sg.batch, pos, hv)] = e * (dSSp + kSu);
            // Pass C: dS_prev = e (dS + k du'^T).
            for (int64_t i = 0; i < K; ++i) {
              float* row = dS.data() + i * V;
              const float ki = k[i];
              for (int64_t j = 0; j < V; ++j) row[j] = e * (row[j] + ki * dup[size_t(j)]);
            }
          }
        }
        if (gr.dh0) std::copy(dS.begin(), dS.end(), gr.dh0 + (s * a.HV + hv) * KV);
      }
    }
  }
}

// The bodies above compiled per instruction set, and picked at run time.
#define RK_DELTA_VARIANTS(SUFFIX, ATTR)                                                                      \
  template <typename S>                                                                                      \
  ATTR void forwardItems##SUFFIX(const GatedDeltaArgs& a, S* o, float* states, float* finalState, int64_t i0, \
                                 int64_t i1) {                                                               \
    forwardItemsBody<S>(a, o, states, finalState, i0, i1);                                                   \
  }                                                                                                          \
  template <typename S>                                                                                      \
  ATTR void backwardItems##SUFFIX(const GatedDeltaArgs& a, const GatedDeltaGrads& gr, float* dqn, float* dkn, \
                                  int64_t i0, int64_t i1, const S*) {                                        \
    backwardItemsBody<S>(a, gr, dqn, dkn, i0, i1);                                                           \
  }
RK_DELTA_VARIANTS(Base, )
#ifdef RK_X86_MULTIVERSION
RK_DELTA_VARIANTS(Avx2, RK_ISA_TARGET_AVX2)
RK_DELTA_VARIANTS(Avx512, RK_ISA_TARGET_AVX512)
#endif
template <typename S>
RK_DISPATCH(forwardItems, (const GatedDeltaArgs& a, S* o, float* states, float* finalState, int64_t i0, int64_t i1),
            (a, o, states, finalState, i0, i1))
template <typename S>
RK_DISPATCH(backwardItems, (const GatedDeltaArgs& a, const GatedDeltaGrads& gr, float* dqn, float* dkn, int64_t i0,
                            int64_t i1, const S* tag),
            (a, gr, dqn, dkn, i0, i1, tag))

template <typename S> void forwardImpl(const GatedDeltaArgs& a, S* o, float* states, float* finalState) {
  parallelFor(a.nseq * a.H, 1, [&](int64_t i0, int64_t i1) { forwardItems<S>(a, o, states, finalState, i0, i1); });
  zeroUncovered(a, o, a.HV * a.V);
}

template <typename S> void backwardImpl(const GatedDeltaArgs& a, const GatedDeltaGrads& gr) {
  const int64_t K = a.K;
  const S* qs = static_cast<const S*>(a.q);
  const S* ks = static_cast<const S*>(a.k);
  std::vector<float> dqn(size_t(a.batch * a.T * a.H * K), 0.0f), dkn(dqn.size(), 0.0f);
  parallelFor(a.nseq * a.H, 1, [&](int64_t i0, int64_t i1) {
    backwardItems<S>(a, gr, dqn.data(), dkn.data(), i0, i1, static_cast<const S*>(nullptr));
  });
  // Through the L2 normalisation, and to the output dtype.
  S* dq = static_cast<S*>(gr.dq);
  S* dk = static_cast<S*>(gr.dk);
  parallelFor(a.batch * a.T * a.H, 256, [&](int64_t r0, int64_t r1) {
    std::vector<float> x(static_cast<size_t>(K));
    for (int64_t r = r0; r < r1; ++r) {
      for (int which = 0; which < 2; ++which) {
        const S* src = (which == 0 ? qs : ks) + r * K;
        const float* gsrc = (which == 0 ? dqn : dkn).data() + r * K;
        S* dst = (which == 0 ? dq : dk) + r * K;
        if (!a.l2norm) {
          for (int64_t i = 0; i < K; ++i) dst[i] = Storage<S>::store(gsrc[i]);
          continue;
        }
        // With raw x, r^2 = |x|^2 + eps: dx_i = (g_i (r^2 - x_i^2) - x_i (x.g - x_i g_i)) / r^3, written so
        // that a dominant component does not cancel against itself (exact for K = 1).
        loadVector(src, K, false, x.data());
        float ss = 0.0f, dot = 0.0f;
        for (int64_t i = 0; i < K; ++i) {
          ss += x[size_t(i)] * x[size_t(i)];
          dot += x[size_t(i)] * gsrc[i];
        }
        const float r2 = ss + kL2Eps, r3 = r2 * std::sqrt(r2);
        for (int64_t i = 0; i < K; ++i) {
          const float xi = x[size_t(i)], gi = gsrc[i];
          dst[i] = Storage<S>::store((gi * ((ss - xi * xi) + kL2Eps) - xi * (dot - xi * gi)) / r3);
        }
      }
    }
  });
}

}  // namespace

void gatedDeltaForwardCpu(const GatedDeltaArgs& a, void* o, float* states, float* finalState) {
  dispatchDType(DType(int(a.dt)), [&](auto tag) {
    using S = decltype(tag);
    forwardImpl<S>(a, static_cast<S*>(o), states, finalState);
  });
}

void gatedDeltaBackwardCpu(const GatedDeltaArgs& a, const GatedDeltaGrads& g) {
  dispatchDType(DType(int(a.dt)), [&](auto tag) { backwardImpl<decltype(tag)>(a, g); });
}

void gatedDeltaStepCpu(const GatedDeltaStepArgs& a) {
  dispatchDType(DType(int(a.dt)), [&](auto tag) {
    using S = decltype(tag);
    const Dims d{a.tokens, a.H, a.HV, a.K, a.V};
    const int64_t K = a.K, V = a.V, KV = K * V, per = a.HV / a.H;
    parallelFor(a.batch * a.HV, 1, [&](int64_t r0, int64_t r1) {
      std::vector<float> Sm(static_cast<size_t>(KV)), q(static_cast<size_t>(K)), k(static_cast<size_t>(K)), v(static_cast<size_t>(V)), u(static_cast<size_t>(V)), p(static_cast<size_t>(V)),
          w(static_cast<size_t>(V)), out(static_cast<size_t>(V));
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / a.HV, hv = r % a.HV, h = hv / per;
        float* st = a.state + r * KV;
        std::copy(st, st + KV, Sm.begin());
        for (int64_t t = 0; t < a.tokens; ++t) {
          loadVector(static_cast<const S*>(a.q) + d.qk(b, t, h), K, a.l2norm, q.data());
          loadVector(static_cast<const S*>(a.k) + d.qk(b, t, h), K, a.l2norm, k.data());
          loadVector(static_cast<const S*>(a.v) + d.vo(b, t, hv), V, false, v.data());
          const float e = std::exp(a.g[d.gb(b, t, hv)]);
          const float beta = Storage<S>::load(static_cast<const S*>(a.beta)[d.gb(b, t, hv)]);
          stepToken(Sm.data(), q.data(), k.data(), v.data(), e, beta, a.scale, K, V, u.data(), p.data(), w.data(),
                    out.data());
          S* od = static_cast<S*>(a.o) + d.vo(b, t, hv);
          for (int64_t j = 0; j < V; ++j) od[j] = Storage<S>::store(out[size_t(j)]);
          if (a.intermediate) std::copy(Sm.begin(), Sm.end(), a.intermediate + ((b * a.tokens + t) * a.HV + hv) * KV);
        }
        if (a.updateState) std::copy(Sm.begin(), Sm.end(), st);
      }
    });
  });
}

}  // namespace rk::delta
