// Per-row scalar math shared by the CPU and CUDA kernels: the softmax statistics and the
// per-token policy loss with its derivatives. Compiles as host code and, under nvcc, as
// device code, so both backends take their formulas from this one place.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "kernel_args.h"

// Host copies have internal linkage: the CPU kernels are compiled once per instruction set
// (cpu/kernels.h), and an inline function with external linkage would let the linker keep
// an AVX-512 copy for every caller.
#ifdef __CUDACC__
#define SIRI_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SIRI_HOST_DEVICE static inline
#endif

namespace siri {

// The lowest finite float. The running maximum starts here: finite, so that an entry of -inf
// gives -inf - start = -inf (not the NaN of -inf - -inf), yet no finite u lies below it.
constexpr float kLowest = -FLT_MAX;

// The exponent of a rescale from running max m to M >= m. m - M overflows to -inf when both
// are huge and far apart (from the start value: M above about 1e31); clamped at the lowest
// float it stays finite, so exp(shift) * shift is 0 where exp(shift) is, never 0 * -inf.
SIRI_HOST_DEVICE float rescale_shift(float m, float new_max) { return fmaxf(m - new_max, kLowest); }

// Online softmax statistics of u = logits / temperature over some of a row's entries:
// m = max u, s = sum exp(u - m), a = sum exp(u - m) (u - m). Measuring a from the running
// max keeps the entropy free of the cancellation lse - E[u] would suffer for large logits.
struct SoftmaxStats {
  float m, s, a;
};

SIRI_HOST_DEVICE SoftmaxStats empty_stats() { return {kLowest, 0.0f, 0.0f}; }

// Moving a's origin from m to M (M >= m): exp(u - M) (u - M) = r exp(u - m) ((u - m) + (m - M))
// with r = exp(m - M), so s' = r s and a' = r a + (r (m - M)) s.
SIRI_HOST_DEVICE SoftmaxStats merge_stats(SoftmaxStats x, SoftmaxStats y) {
  const float m = fmaxf(x.m, y.m);
  const float dx = rescale_shift(x.m, m), dy = rescale_shift(y.m, m);
  const float rx = expf(dx), ry = expf(dy);
  return {m, rx * x.s + ry * y.s, rx * x.a + (rx * dx) * x.s + ry * y.a + (ry * dy) * y.s};
}

SIRI_HOST_DEVICE float stats_lse(SoftmaxStats st) { return st.m + logf(st.s); }

// log p of an entry u: (u - m) - log s, exact in u - m near the maximum, where u - lse would
// round log p to the spacing of lse (all of log 2 for two tied maxima at |u| ~ 1e31).
SIRI_HOST_DEVICE float stats_logprob(SoftmaxStats st, float u) { return (u - st.m) - logf(st.s); }

// H = lse - sum p u = log s - a / s.
SIRI_HOST_DEVICE float stats_entropy(SoftmaxStats st) { return logf(st.s) - st.a / st.s; }

// What one active row contributes: outputs and the derivatives of weight * l w.r.t. logp
// (grad_logp, "c") and H (grad_entropy, "e"); the gradient pass turns them into
// d(w l)/dz by logits_gradient's formula (kernels/reference.py).
struct TokenLoss {
  float loss;  // weight * l
  float kl;
  float clip_code;
  float grad_logp;
  float grad_entropy;
};

// Clamp that lets NaN through (fminf / fmaxf would return the bound): NaN in, NaN out.
SIRI_HOST_DEVICE float clamp_keep_nan(float x, float low, float high) { return x < low ? low : (x > high ? high : x); }

// reference.per_token_loss for one row, with the derivatives autograd would give it,
// including its choices at ties: torch.maximum / torch.minimum split the gradient evenly
// between equal branches, and torch.clamp passes it at the bounds. Non-finite values follow
// IEEE arithmetic but for the reference's two exceptions: the on-policy log-ratio is 0 even
// where logp = -inf, and a zero kl_coef leaves the KL (possibly infinite) out of the loss.
SIRI_HOST_DEVICE TokenLoss token_loss(float logp, float entropy, int64_t row, const PolicyInputs& in,
                                      const LossSettings& s) {
  const float adv = in.advantages[row];
  const float weight = in.weights[row];
  // On-policy (no old logprobs): old = stop_grad(logp), so the log-ratio is exactly 0.
  const float old = in.old_logprobs ? in.old_logprobs[row] : logp;
  const float log_ratio = in.old_logprobs ? logp - old : 0.0f;
  const float ratio = expf(clamp_keep_nan(log_ratio, -s.ratio_log_clamp, s.ratio_log_clamp));
  // d ratio / d logp = ratio unless the clamp binds (bounds excluded; NaN does not bind).
  const bool clamp_binds = log_ratio < -s.ratio_log_clamp || log_ratio > s.ratio_log_clamp;

  const float unclipped = -adv * ratio;
  const float clipped = -adv * clamp_keep_nan(ratio, 1.0f - s.clip_low, 1.0f + s.clip_high);
  // clipped > unclipped only when the clamp moved the ratio, where it has no gradient; at a
  // tie the ratio is in bounds (or A = 0), both branches have slope -A and their even
  // split is the full -A.
  float pg = fmaxf(unclipped, clipped);
  float dpg_dratio = clipped > unclipped ? 0.0f : -adv;
  float clip_code = clipped > unclipped ? kClipRatio : kClipNone;
  if (s.has_dual_clip && adv < 0.0f) {
    const float dual = -adv * s.dual_clip;  // constant: no gradient
    if (dual < pg) {
      pg = dual;
      dpg_dratio = 0.0f;
      clip_code = kClipDual;
    } else if (dual == pg) {
      dpg_dratio *= 0.5f;  // torch.minimum's even split with the constant branch
    }
  }
  float tis = 1.0f;
  if (in.rollout_logprobs) {
    // Truncated importance weight of the trainer against the rollout engine: a constant
    // factor, no gradient through it.
    const float ratio_to_rollout = expf(old - in.rollout_logprobs[row]);
    tis = ratio_to_rollout > s.tis_cap ? s.tis_cap : ratio_to_rollout;
    pg *= tis;
  }
  // Inside the clamp's mask, as in the reference: 0 where the clamp binds, even for a NaN
  // weight (old = rollout = -inf).
  const float dpg_dlogp = clamp_binds ? 0.0f : dpg_dratio * ratio * tis;

  float kl = 0.0f, dkl_dlogp = 0.0f;
  if (in.ref_logprobs) {
    const float d = in.ref_logprobs[row] - logp;  // dd/dlogp = -1
    if (s.kl_estimator == 1) {
      kl = -d;
      dkl_dlogp = 1.0f;
    } else if (s.kl_estimator == 2) {
      kl = 0.5f * d * d;
      dkl_dlogp = -d;
    } else {
      const float exp_d = expf(d);
      // exp(d) - d - 1 tends to +inf as d -> +inf (a target of probability 0); the formula
      // itself would evaluate inf - inf.
      kl = d == INFINITY ? exp_d : exp_d - d - 1.0f;
      dkl_dlogp = 1.0f - exp_d;
      if (s.kl_estimator == 4 && kl > kLowVarKlClamp) {  // low_var_kl: the bound, no gradient (NaN stays)
        kl = kLowVarKlClamp;
        dkl_dlogp = 0.0f;
      } else if (s.kl_estimator == 5) {  // k3_ratio: (k3 r)' = k3' r + k3 r', r' = r unless the clamp binds
        dkl_dlogp = dkl_dlogp * ratio + (clamp_binds ? 0.0f : kl * ratio);
        kl *= ratio;
      }
    }
  }
  const bool kl_term = s.kl_coef != 0.0f;
  const float l = pg - s.entropy_coef * entropy + (kl_term ? s.kl_coef * kl : 0.0f);
  const float dl_dlogp = dpg_dlogp + (kl_term ? s.kl_coef * dkl_dlogp : 0.0f);
  return {weight * l, kl, clip_code, weight * dl_dlogp, -weight * s.entropy_coef};
}

SIRI_HOST_DEVICE int64_t stored_target(const RowsView& rows, int64_t row) {
  return rows.targets_int64 ? static_cast<const int64_t*>(rows.targets)[row]
                            : static_cast<const int32_t*>(rows.targets)[row];
}

// Target index of a row, clamped into [0, V): validation rejects out-of-range targets
// before any launch; the clamp only keeps a run with SIRI_VALIDATE=0 inside the row.
SIRI_HOST_DEVICE int64_t load_target(const RowsView& rows, int64_t row) {
  const int64_t y = stored_target(rows, row);
  return y < 0 ? 0 : (y >= rows.vocab ? rows.vocab - 1 : y);
}

// Target index of a row for logprob_backward: as load_target, but a negative target stays -1,
// meaning the row's target lies outside these columns (kernels/backends.py): no one-hot term.
SIRI_HOST_DEVICE int64_t load_target_or_absent(const RowsView& rows, int64_t row) {
  const int64_t y = stored_target(rows, row);
  return y < 0 ? -1 : (y >= rows.vocab ? rows.vocab - 1 : y);
}

}  // namespace siri
