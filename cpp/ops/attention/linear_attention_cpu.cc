// Picks the instruction-set variant of linear attention's CPU kernels per call (common/isa.h); the
// gate activations (elementwise, compiled once).
#include "ops/attention/linear_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/parallel.h"
#include "common/dtype.h"
#include "ops/delta/gated_delta_rule_cpu.h"

namespace rk::attention {

// The gated delta rule's layout without its delta term runs on its kernels (blocked, with fewer
// multiply-adds per state element than this family's: cuda/attention/linear_attention.h), which keep
// the same checkpoints.
static_assert(kLinearAttentionChunk == delta::kGatedDeltaRuleChunk, "one checkpoint layout");

void linearAttentionForwardCpu(const rkcuda::LinearAttentionArgs& a, void* o, float* states, float* finalState) {
  if (rkcuda::onGatedDeltaRuleKernels(a, finalState))
    return delta::gatedDeltaRuleForwardCpu(rkcuda::gatedDeltaRuleArgsOf(a), o, states, finalState);
  RK_ISA_DISPATCH(attention, linearAttentionForwardCpu, (a, o, states, finalState));
}

void linearAttentionBackwardCpu(const rkcuda::LinearAttentionArgs& a, const rkcuda::LinearAttentionGrads& g) {
  if (rkcuda::onGatedDeltaRuleKernels(a, nullptr))
    return delta::gatedDeltaRuleBackwardCpu(rkcuda::gatedDeltaRuleArgsOf(a), rkcuda::gatedDeltaRuleGradsOf(a, g));
  RK_ISA_DISPATCH(attention, linearAttentionBackwardCpu, (a, g));
}

namespace {

// softplus(x) = log(1 + e^x), without overflow for large x or loss for very negative x.
inline float softplus(float x) { return std::max(x, 0.0f) + std::log1p(std::exp(-std::fabs(x))); }
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// Element e of the gate tensor: its head, and its index into dtBias.
struct GateIndex {
  int64_t per, Hv, K;
  bool dtBiasPerKey;
  int64_t head(int64_t e) const { return e / per % Hv; }
  int64_t bias(int64_t e) const { return dtBiasPerKey ? e % (Hv * K) : head(e); }
};

constexpr int64_t kGateGrain = 1 << 14;

}  // namespace

void linearGatesForwardCpu(const LinearGateArgs& a, float* g, void* beta) {
  const int64_t per = a.perKey ? a.K : 1;
  const GateIndex ix{per, a.Hv, a.K, a.dtBiasPerKey};
  if (a.decay) {
    parallelFor(a.rows * a.Hv * per, kGateGrain, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        if (!a.qwen) {
          g[e] = a.decay[e];
          continue;
        }
        const float x = a.decay[e] + (a.dtBias ? a.dtBias[ix.bias(e)] : 0.0f);
        g[e] = -std::exp(a.aLog[ix.head(e)]) * softplus(x);
      }
    });
  }
  if (a.beta) {
    dispatchDType(a.dt, [&](auto tag) {
      using S = decltype(tag);
      const S* b = static_cast<const S*>(a.beta);
      S* out = static_cast<S*>(beta);
      parallelFor(a.rows * a.Hv, kGateGrain, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          const float x = Storage<S>::load(b[a.betaHeads == 1 ? e / a.Hv : e]);
          out[e] = Storage<S>::store(a.sigmoid ? sigmoid(x) : x);
        }
      });
    });
  }
}

void linearGatesBackwardCpu(const LinearGateArgs& a, const float* dg, const void* dbetaEff, float* dDecay, void* dBeta,
                            float* daLog, float* dDtBias) {
  const int64_t per = a.perKey ? a.K : 1;
  const GateIndex ix{per, a.Hv, a.K, a.dtBiasPerKey};
  if (a.decay && dDecay) {
    const int64_t n = a.rows * a.Hv * per;
    parallelFor(n, kGateGrain, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        if (!a.qwen) {
          dDecay[e] = dg[e];
          continue;
        }
        const float x = a.decay[e] + (a.dtBias ? a.dtBias[ix.bias(e)] : 0.0f);
        dDecay[e] = dg[e] * -std::exp(a.aLog[ix.head(e)]) * sigmoid(x);
      }
    });
    if (a.qwen) {
      // Sums over the rows (in double, one pass): d aLog[h] = sum dg * g, d dtBias = sum dDecay.
      std::vector<double> sa(size_t(a.Hv), 0.0), sb(size_t(a.dtBiasPerKey ? a.Hv * a.K : a.Hv), 0.0);
      for (int64_t e = 0; e < n; ++e) {
        const float x = a.decay[e] + (a.dtBias ? a.dtBias[ix.bias(e)] : 0.0f);
        const int64_t h = ix.head(e);
        sa[size_t(h)] += double(dg[e]) * -std::exp(double(a.aLog[h])) * double(softplus(x));
        sb[size_t(ix.bias(e))] += double(dDecay[e]);
      }
      if (daLog)
        for (int64_t h = 0; h < a.Hv; ++h) daLog[h] = float(sa[size_t(h)]);
      if (dDtBias)
        for (size_t i = 0; i < sb.size(); ++i) dDtBias[i] = float(sb[i]);
    }
  }
  if (a.beta && dBeta) {
    dispatchDType(a.dt, [&](auto tag) {
      using S = decltype(tag);
      const S* b = static_cast<const S*>(a.beta);
      const S* db = static_cast<const S*>(dbetaEff);
      S* out = static_cast<S*>(dBeta);
      const int64_t hb = a.betaHeads;
      parallelFor(a.rows * hb, kGateGrain, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t row = e / hb;
          double sum = 0.0;
          for (int64_t h = hb == 1 ? 0 : e % hb; h < (hb == 1 ? a.Hv : e % hb + 1); ++h) {
            const float d = Storage<S>::load(db[row * a.Hv + h]);
            if (!a.sigmoid) {
              sum += d;
              continue;
            }
            const float s = sigmoid(Storage<S>::load(b[e]));
            sum += double(d) * s * (1.0f - s);
          }
          out[e] = Storage<S>::store(float(sum));
        }
      });
    });
  }
}

}  // namespace rk::attention
