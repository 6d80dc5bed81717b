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
//   du' = -beta dw (u' = e u);  dk += e S du';  dg = e (<dS, S> + u . du');  dS = e (dS + k du'^T)
// (S here is the state before the token). Gradients of the L2-normalised q and k are kept in
// fp32 and taken through the normalisation at the end.
#include "ops/delta/gated_delta_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "tensor/dtype.h"
#include "tensor/isa.h"
#include "tensor/lanes.h"
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

// ---- the state in column slabs ----
// The columns of the state evolve independently: u_j = sum_i k_i S_ij, w_j and the update of column
// j involve column j alone. So a value head's state is kept as ceil(V / 16) slabs of K rows x 16
// columns (Lanes), zero in the padding columns past V, and each token advances one slab at a time:
// per row, one load, one store and four vector multiply-adds, the row products for the next token
// made in the same sweep. Only the backward pass's row sums (dq, dk) cross slabs.

// Scratch of one work item: per chunk the normalised q and k of its tokens and their dot products.
struct ChunkQK {
  std::vector<float> q, k, kq;
  explicit ChunkQK(int64_t K)
      : q(static_cast<size_t>(kChunk * K)), k(static_cast<size_t>(kChunk * K)), kq(static_cast<size_t>(kChunk)) {}
  template <typename S>
  RK_ALWAYS_INLINE void load(const S* qs, const S* ks, const Dims& d, const ScanSegment& sg, int64_t h, int64_t t0,
                             int64_t n, bool l2norm) {
    for (int64_t t = 0; t < n; ++t) {
      const int64_t pos = sg.start + t0 + t;
      float* qt = q.data() + t * d.K;
      float* kt = k.data() + t * d.K;
      loadVector(qs + d.qk(sg.batch, pos, h), d.K, l2norm, qt);
      loadVector(ks + d.qk(sg.batch, pos, h), d.K, l2norm, kt);
      kq[size_t(t)] = dot(qt, kt, d.K);
    }
  }
};

// The 16 columns of slab jb of a length-V row, zero past V.
template <typename S> RK_ALWAYS_INLINE Lanes loadCols(const S* row, int64_t jb, int64_t V) {
  const int64_t j0 = jb * kLanes, n = std::min<int64_t>(kLanes, V - j0);
  float tmp[kLanes] = {};
  for (int64_t l = 0; l < n; ++l) tmp[l] = Storage<S>::load(row[j0 + l]);
  Lanes x;
  std::memcpy(&x, tmp, sizeof x);
  return x;
}
template <typename S> RK_ALWAYS_INLINE void storeCols(S* row, int64_t jb, int64_t V, Lanes x) {
  const int64_t j0 = jb * kLanes, n = std::min<int64_t>(kLanes, V - j0);
  float tmp[kLanes];
  std::memcpy(tmp, &x, sizeof x);
  for (int64_t l = 0; l < n; ++l) row[j0 + l] = Storage<S>::store(tmp[l]);
}
// Slabs <-> a K x V row-major state.
RK_ALWAYS_INLINE void slabsFromState(Lanes* slabs, const float* st, int64_t K, int64_t V) {
  const int64_t nb = (V + kLanes - 1) / kLanes;
  for (int64_t jb = 0; jb < nb; ++jb)
    for (int64_t i = 0; i < K; ++i) slabs[jb * K + i] = st ? loadCols(st + i * V, jb, V) : Lanes{};
}
RK_ALWAYS_INLINE void stateFromSlabs(float* st, const Lanes* slabs, int64_t K, int64_t V) {
  const int64_t nb = (V + kLanes - 1) / kLanes;
  for (int64_t jb = 0; jb < nb; ++jb)
    for (int64_t i = 0; i < K; ++i) storeCols(st + i * V, jb, V, slabs[jb * K + i]);
}

// (S^T k, S^T q) of one slab, in four partial sums each so that the adds pipeline. Without q (the
// backward's recomputation, which needs only u) p is left alone.
template <bool kWithQ>
RK_ALWAYS_INLINE void slabProducts(const Lanes* S, const float* k, const float* q, int64_t K, Lanes& u, Lanes& p) {
  Lanes u4[4] = {}, p4[4] = {};
  int64_t i = 0;
  for (; i + 4 <= K; i += 4)
    for (int l = 0; l < 4; ++l) {
      u4[l] += k[i + l] * S[i + l];
      if (kWithQ) p4[l] += q[i + l] * S[i + l];
    }
  for (; i < K; ++i) {
    u4[0] += k[i] * S[i];
    if (kWithQ) p4[0] += q[i] * S[i];
  }
  u = (u4[0] + u4[1]) + (u4[2] + u4[3]);
  if (kWithQ) p = (p4[0] + p4[1]) + (p4[2] + p4[3]);
}
// dst = e src + k w^T on one slab (dst may be src); with next (kn, and qn when kWithQ) also returns
// that token's products.
template <bool kWithQ>
RK_ALWAYS_INLINE void slabUpdate(Lanes* dst, const Lanes* src, const float* k, Lanes w, float e, int64_t K,
                                 const float* kn, const float* qn, Lanes& u, Lanes& p) {
  if (!kn) {
    for (int64_t i = 0; i < K; ++i) dst[i] = e * src[i] + k[i] * w;
    return;
  }
  Lanes u4[4] = {}, p4[4] = {};
  int64_t i = 0;
  for (; i + 4 <= K; i += 4)
    for (int l = 0; l < 4; ++l) {
      const Lanes r = e * src[i + l] + k[i + l] * w;
      dst[i + l] = r;
      u4[l] += kn[i + l] * r;
      if (kWithQ) p4[l] += qn[i + l] * r;
    }
  for (; i < K; ++i) {
    const Lanes r = e * src[i] + k[i] * w;
    dst[i] = r;
    u4[0] += kn[i] * r;
    if (kWithQ) p4[0] += qn[i] * r;
  }
  u = (u4[0] + u4[1]) + (u4[2] + u4[3]);
  if (kWithQ) p = (p4[0] + p4[1]) + (p4[2] + p4[3]);
}

// The work items [i0, i1) of the forward pass (an item is a (sequence, q/k head)).
template <typename S>
RK_ALWAYS_INLINE void forwardItemsBody(const GatedDeltaArgs& a, S* o, float* states, float* finalState, int64_t i0,
                                       int64_t i1) {
  const Dims d{a.T, a.H, a.HV, a.K, a.V};
  const int64_t K = a.K, V = a.V, KV = K * V, per = a.HV / a.H, nb = (V + kLanes - 1) / kLanes;
  const S* vs = static_cast<const S*>(a.v);
  const S* bs = static_cast<const S*>(a.beta);
  ChunkQK qk(K);
  LaneScratch slabs(size_t(per * nb * K)), vblk(size_t(kChunk * nb));
  std::vector<float> ec(static_cast<size_t>(kChunk)), bc(static_cast<size_t>(kChunk));
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t s = item / a.H, h = item % a.H;
    const ScanSegment& sg = a.segments[s];
    for (int64_t hvi = 0; hvi < per; ++hvi)
      slabsFromState(slabs.at(size_t(hvi * nb * K)), a.h0 ? a.h0 + (s * a.HV + h * per + hvi) * KV : nullptr, K, V);
    for (int64_t c = 0; c < chunksOf(sg); ++c) {
      const int64_t t0 = c * kChunk, n = std::min(kChunk, sg.length - t0);
      qk.load(static_cast<const S*>(a.q), static_cast<const S*>(a.k), d, sg, h, t0, n, a.l2norm);
      for (int64_t hvi = 0; hvi < per; ++hvi) {
        const int64_t hv = h * per + hvi;
        Lanes* hs = slabs.at(size_t(hvi * nb * K));
        stateFromSlabs(states + ((sg.chunkOffset + c) * a.HV + hv) * KV, hs, K, V);
        for (int64_t t = 0; t < n; ++t) {
          const int64_t pos = sg.start + t0 + t;
          ec[size_t(t)] = std::exp(a.g[d.gb(sg.batch, pos, hv)]);
          bc[size_t(t)] = Storage<S>::load(bs[d.gb(sg.batch, pos, hv)]);
          for (int64_t jb = 0; jb < nb; ++jb) *vblk.at(size_t(t * nb + jb)) = loadCols(vs + d.vo(sg.batch, pos, hv), jb, V);
        }
        for (int64_t jb = 0; jb < nb; ++jb) {
          Lanes* Sl = hs + jb * K;
          Lanes u, p;
          slabProducts<true>(Sl, qk.k.data(), qk.q.data(), K, u, p);
          for (int64_t t = 0; t < n; ++t) {
            const float e = ec[size_t(t)];
            const Lanes w = bc[size_t(t)] * (*vblk.at(size_t(t * nb + jb)) - e * u);
            storeCols(o + d.vo(sg.batch, sg.start + t0 + t, hv), jb, V, a.scale * (e * p + qk.kq[size_t(t)] * w));
            const bool more = t + 1 < n;
            slabUpdate<true>(Sl, Sl, qk.k.data() + t * K, w, e, K, more ? qk.k.data() + (t + 1) * K : nullptr,
                       more ? qk.q.data() + (t + 1) * K : nullptr, u, p);
          }
        }
      }
    }
    if (finalState)
      for (int64_t hvi = 0; hvi < per; ++hvi)
        stateFromSlabs(finalState + (s * a.HV + h * per + hvi) * KV, slabs.at(size_t(hvi * nb * K)), K, V);
  }
}

// The backward pass on up to four slabs at once (G of them), so that the per-row contributions to
// dq and dk are summed over the slabs in registers. Per token t, from the last, with the adjoint dS
// entering the token:
//   A(t):  dS += scale q_t dO_t^T;  dw_t = dS^T k_t;  (dS w_t)_i to dk_t
//   then:  dv = beta dw_t;  dbeta = dw_t . (v - e u);  du' = -beta dw_t;  u . du' to dg
//   BC(t): (Sp dO_t)_i to dq_t, e (Sp du')_i to dk_t, <dS, Sp> to dg;  dS = e (dS + k_t du'^T)
// A(t-1) needs nothing of BC(t) but the new dS rows, so it runs in BC(t)'s sweep (one load and one
// store of dS per row and token); only the chunk's last token has a sweep of A alone, since the
// previous chunk's w is not recomputed yet. Row sums go to lanes per row (accQ, accK) written by
// the first group of slabs and added to by the others, and are summed across lanes once per token.
struct BackSweep {
  float scale;
  int64_t K;
  // A(t) alone: dS += scale q dO^T; dw = dS^T k; accK = dS w.
  template <int G>
  RK_ALWAYS_INLINE void passA(Lanes* const* dS, const float* q, const float* k, const Lanes* dO, const Lanes* w,
                              Lanes* dw, Lanes* accK, bool first) const {
    for (int g = 0; g < G; ++g) dw[g] = Lanes{};
    for (int64_t i = 0; i < K; ++i) {
      const float sq = scale * q[i], ki = k[i];
      Lanes ak{};
      for (int g = 0; g < G; ++g) {
        const Lanes row = dS[g][i] + sq * dO[g];
        dS[g][i] = row;
        dw[g] += ki * row;
        ak += row * w[g];
      }
      accK[i] = first ? ak : accK[i] + ak;
    }
  }
  // BC(t), then (kPrev) A(t-1) on the new rows: q, k, dO, w, dw, accK of token t-1 in prev*.
  // Returns the lanes of <dS, Sp>.
  template <int G, bool kPrev>
  RK_ALWAYS_INLINE Lanes passBCA(Lanes* const* dS, const Lanes* const* Sp, const float* k, float e, const Lanes* dO,
                                 const Lanes* dup, Lanes* accQ, Lanes* accK, const float* prevQ, const float* prevK,
                                 const Lanes* prevDO, const Lanes* prevW, Lanes* prevDw, Lanes* prevAccK,
                                 bool first) const {
    Lanes dg2[2] = {};
    if (kPrev)
      for (int g = 0; g < G; ++g) prevDw[g] = Lanes{};
    for (int64_t i = 0; i < K; ++i) {
      const float ki = k[i];
      const float sqp = kPrev ? scale * prevQ[i] : 0.0f, kp = kPrev ? prevK[i] : 0.0f;
      Lanes aq{}, ak{}, dg{}, akp{};
      for (int g = 0; g < G; ++g) {
        const Lanes sp = Sp[g][i], ds = dS[g][i];
        aq += sp * dO[g];
        ak += sp * dup[g];
        dg += sp * ds;
        Lanes row = e * (ds + ki * dup[g]);
        if (kPrev) {
          row += sqp * prevDO[g];
          prevDw[g] += kp * row;
          akp += row * prevW[g];
        }
        dS[g][i] = row;
      }
      accQ[i] = first ? aq : accQ[i] + aq;
      accK[i] += e * ak;
      if (kPrev) prevAccK[i] = first ? akp : prevAccK[i] + akp;
      dg2[i & 1] += dg;
    }
    return dg2[0] + dg2[1];
  }
};

// The work items [i0, i1) of the backward pass, up to the fp32 gradients dqn, dkn of the
// (normalised) q and k, [batch, T, H, K], each (sequence, head) slice owned by one item.
// Per chunk from the last: the states before each token are recomputed from the checkpoint and
// kept (slabs, with u and w of every token), then the tokens are undone in reverse (BackSweep).
template <typename S>
RK_ALWAYS_INLINE void backwardItemsBody(const GatedDeltaArgs& a, const GatedDeltaGrads& gr, float* dqn, float* dkn,
                                        int64_t i0, int64_t i1) {
  const Dims d{a.T, a.H, a.HV, a.K, a.V};
  const int64_t K = a.K, V = a.V, KV = K * V, per = a.HV / a.H, nb = (V + kLanes - 1) / kLanes;
  const int64_t K16 = (K + kLanes - 1) / kLanes * kLanes;
  const S* vs = static_cast<const S*>(a.v);
  const S* bs = static_cast<const S*>(a.beta);
  const S* dOs = static_cast<const S*>(gr.dO);
  S* dv = static_cast<S*>(gr.dv);
  S* dbeta = static_cast<S*>(gr.dbeta);
  ChunkQK qk(K);
  // Per value head: dS slabs. Per chunk token: the slabs before it, v, dO, u, w blocks. Per slab: the
  // dw of the token about to be undone. Two row-sum buffers for dk: the token's and the next one's.
  LaneScratch dSl(size_t(per * nb * K)), Sprev(size_t(kChunk * nb * K)),
      vblk(size_t(kChunk * nb)), dOblk(size_t(kChunk * nb)), ublk(size_t(kChunk * nb)), wblk(size_t(kChunk * nb)),
      dwS{size_t(nb)}, accQ{size_t(K16)}, accKs{size_t(2 * K16)};
  std::vector<float> ec(static_cast<size_t>(kChunk)), bc(static_cast<size_t>(kChunk));
  const BackSweep sweep{a.scale, K};
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t s = item / a.H, h = item % a.H;
    const ScanSegment& sg = a.segments[s];
    for (int64_t hvi = 0; hvi < per; ++hvi)
      slabsFromState(dSl.at(size_t(hvi * nb * K)), gr.dFinal ? gr.dFinal + (s * a.HV + h * per + hvi) * KV : nullptr,
                     K, V);
    for (int64_t c = chunksOf(sg) - 1; c >= 0; --c) {
      const int64_t t0 = c * kChunk, n = std::min(kChunk, sg.length - t0);
      qk.load(static_cast<const S*>(a.q), static_cast<const S*>(a.k), d, sg, h, t0, n, a.l2norm);
      for (int64_t hvi = 0; hvi < per; ++hvi) {
        const int64_t hv = h * per + hvi;
        for (int64_t t = 0; t < n; ++t) {
          const int64_t pos = sg.start + t0 + t;
          ec[size_t(t)] = std::exp(a.g[d.gb(sg.batch, pos, hv)]);
          bc[size_t(t)] = Storage<S>::load(bs[d.gb(sg.batch, pos, hv)]);
          for (int64_t jb = 0; jb < nb; ++jb) {
            *vblk.at(size_t(t * nb + jb)) = loadCols(vs + d.vo(sg.batch, pos, hv), jb, V);
            *dOblk.at(size_t(t * nb + jb)) = dOs ? loadCols(dOs + d.vo(sg.batch, pos, hv), jb, V) : Lanes{};
          }
        }
        // Recompute: the slabs before every token (slab jb of token t at Sprev[(jb * kChunk + t) * K]), u, w.
        const float* cp = gr.states + ((sg.chunkOffset + c) * a.HV + hv) * KV;
        for (int64_t jb = 0; jb < nb; ++jb) {
          Lanes* St = Sprev.at(size_t(jb * kChunk * K));
          for (int64_t i = 0; i < K; ++i) St[i] = loadCols(cp + i * V, jb, V);
          Lanes u, p;
          slabProducts<false>(St, qk.k.data(), nullptr, K, u, p);
          for (int64_t t = 0; t < n; ++t, St += K) {
            const float e = ec[size_t(t)];
            const Lanes w = bc[size_t(t)] * (*vblk.at(size_t(t * nb + jb)) - e * u);
            *ublk.at(size_t(t * nb + jb)) = u;
            *wblk.at(size_t(t * nb + jb)) = w;
            if (t + 1 < n)
              slabUpdate<false>(St + K, St, qk.k.data() + t * K, w, e, K, qk.k.data() + (t + 1) * K, nullptr, u, p);
          }
        }
        Lanes* dSh = dSl.at(size_t(hvi * nb * K));
        int cur = 0;  // accKs half of the token being undone
        {  // A of the chunk's last token, alone.
          const int64_t t = n - 1;
          const float* q = qk.q.data() + t * K;
          const float* k = qk.k.data() + t * K;
          for (int64_t jb0 = 0; jb0 < nb; jb0 += 4) {
            const int G = int(std::min<int64_t>(4, nb - jb0));
            Lanes* dS[4];
            Lanes dO[4], w[4];
            for (int g = 0; g < G; ++g) {
              dS[g] = dSh + (jb0 + g) * K;
              dO[g] = *dOblk.at(size_t(t * nb + jb0 + g));
              w[g] = *wblk.at(size_t(t * nb + jb0 + g));
            }
            Lanes* dw = dwS.at(size_t(jb0));
            Lanes* acc = accKs.at(size_t(cur * K16));
            switch (G) {
              case 1: sweep.passA<1>(dS, q, k, dO, w, dw, acc, jb0 == 0); break;
              case 2: sweep.passA<2>(dS, q, k, dO, w, dw, acc, jb0 == 0); break;
              case 3: sweep.passA<3>(dS, q, k, dO, w, dw, acc, jb0 == 0); break;
              default: sweep.passA<4>(dS, q, k, dO, w, dw, acc, jb0 == 0); break;
            }
          }
        }
        for (int64_t t = n - 1; t >= 0; --t, cur ^= 1) {
          const int64_t pos = sg.start + t0 + t;
          const float* q = qk.q.data() + t * K;
          const float* k = qk.k.data() + t * K;
          const float e = ec[size_t(t)], beta = bc[size_t(t)];
          const bool prev = t > 0;
          Lanes* accK = accKs.at(size_t(cur * K16));
          Lanes* prevAccK = accKs.at(size_t((cur ^ 1) * K16));
          Lanes wdO{}, dgv{}, dbv{};
          for (int64_t jb0 = 0; jb0 < nb; jb0 += 4) {
            const int G = int(std::min<int64_t>(4, nb - jb0));
            Lanes* dS[4];
            const Lanes* Sp[4];
            Lanes dO[4], dup[4], pdO[4], pw[4];
            Lanes* dw = dwS.at(size_t(jb0));
            for (int g = 0; g < G; ++g) {
              const int64_t jb = jb0 + g;
              dS[g] = dSh + jb * K;
              Sp[g] = Sprev.at(size_t((jb * kChunk + t) * K));
              dO[g] = *dOblk.at(size_t(t * nb + jb));
              wdO += *wblk.at(size_t(t * nb + jb)) * dO[g];
              storeCols(dv + d.vo(sg.batch, pos, hv), jb, V, beta * dw[g]);
              dbv += dw[g] * (*vblk.at(size_t(t * nb + jb)) - e * *ublk.at(size_t(t * nb + jb)));
              dup[g] = -beta * dw[g];
              dgv += dup[g] * *ublk.at(size_t(t * nb + jb));
              if (prev) {
                pdO[g] = *dOblk.at(size_t((t - 1) * nb + jb));
                pw[g] = *wblk.at(size_t((t - 1) * nb + jb));
              }
            }
            const bool first = jb0 == 0;
            const float* pq = prev ? q - K : nullptr;
            const float* pk = prev ? k - K : nullptr;
#define RK_DELTA_BCA(GG, PREV) \
  dgv += sweep.passBCA<GG, PREV>(dS, Sp, k, e, dO, dup, accQ.at(0), accK, pq, pk, pdO, pw, dw, prevAccK, first)
            if (prev) {
              switch (G) {
                case 1: RK_DELTA_BCA(1, true); break;
                case 2: RK_DELTA_BCA(2, true); break;
                case 3: RK_DELTA_BCA(3, true); break;
                default: RK_DELTA_BCA(4, true); break;
              }
            } else {
              switch (G) {
                case 1: RK_DELTA_BCA(1, false); break;
                case 2: RK_DELTA_BCA(2, false); break;
                case 3: RK_DELTA_BCA(3, false); break;
                default: RK_DELTA_BCA(4, false); break;
              }
            }
#undef RK_DELTA_BCA
          }
          const float wdOs = laneSum(wdO);
          float* dq = dqn + d.qk(sg.batch, pos, h);
          float* dk = dkn + d.qk(sg.batch, pos, h);
          for (int64_t r0 = 0; r0 < K; r0 += kLanes) {
            float sq[kLanes], sk[kLanes];
            const Lanes vq = laneSums16(accQ.at(size_t(r0))), vk = laneSums16(accK + r0);
            std::memcpy(sq, &vq, sizeof sq);
            std::memcpy(sk, &vk, sizeof sk);
            for (int64_t l = 0; l < std::min<int64_t>(kLanes, K - r0); ++l) {
              dq[r0 + l] += a.scale * (e * sq[l] + k[r0 + l] * wdOs);
              dk[r0 + l] += sk[l];
            }
          }
          gr.dg[d.gb(sg.batch, pos, hv)] = e * laneSum(dgv);
          dbeta[d.gb(sg.batch, pos, hv)] = Storage<S>::store(laneSum(dbv));
        }
      }
    }
    if (gr.dh0)
      for (int64_t hvi = 0; hvi < per; ++hvi)
        stateFromSlabs(gr.dh0 + (s * a.HV + h * per + hvi) * KV, dSl.at(size_t(hvi * nb * K)), K, V);
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
