// CPU kernels of the three backend entry points, compiled once per instruction set with
// CPU_CAPABILITY naming the namespace (see kernels.h): at::vec::Vectorized<float> is 16
// lanes under AVX512, 8 under AVX2 and a plain array the compiler vectorises by default.
//
// Each row takes two passes, both reading the logits as float32:
//   1. statistics: an online max / sum-exp / entropy accumulator (token_loss.h), by blocks
//      small enough to stay in L1 so that each block's max is found before its exps;
//   2. gradient: logits_gradient's formula (kernels/reference.py, derived there), with
//      c = d(w l)/d logp and e = d(w l)/dH, written in the logits' dtype (possibly over
//      the logits themselves). A row of V float32 logits is 4V bytes, 128 KB at V = 32000:
//      it is still in L2 when pass 2 re-reads it.
// The exps use Vectorized::exp_u20 (a degree-5 polynomial, 20 ulp): a few times cheaper
// than the 1-ulp Sleef exp, and its ~1e-6 relative error is below float32 reduction noise
// over a row.
//
// u = x * (1 / tau) is always rounded before anything is subtracted from it (setup.py builds
// this file with -ffp-contract=off, and no fmadd forms it): the row's max m and lse come from
// rounded products, so u_j - m and u_j - lse are <= 0 exactly. An FMA computing x * inv_t - m
// in one rounding would see the unrounded product and give the argmax a positive log-prob
// (of the order of ulp(m), which grows as 1 / tau).

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../common/token_loss.h"
#include "kernels.h"

namespace siri::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;

// One step of the vector loops: two float vectors, which is one Vectorized<BFloat16/Half>.
constexpr int64_t kStep = 2 * Vec::size();
// Entries per block of the statistics pass: 2048 float32 are 8 KB, a quarter of L1d, so
// the block's second read (its exps, after its max) hits L1. A multiple of kStep, so only
// the last block of a row has a scalar tail.
constexpr int64_t kBlock = 2048;
static_assert(kBlock % kStep == 0, "blocks must hold whole vector steps");

// Loads and stores of kStep entries as two float vectors.
template <typename T>
struct Io;

template <>
struct Io<float> {
  static void load(const float* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  }
  static void store(float* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + Vec::size());
  }
};

template <>
struct Io<c10::BFloat16> {
  static void load(const c10::BFloat16* p, Vec& a, Vec& b) { at::vec::load_fp32_from_bf16(p, a, b); }
  static void store(c10::BFloat16* p, const Vec& a, const Vec& b) { at::vec::convert_float_bfloat16(a, b).store(p); }
};

template <>
struct Io<c10::Half> {
  static void load(const c10::Half* p, Vec& a, Vec& b) { at::vec::load_fp32_from_fp16(p, a, b); }
  static void store(c10::Half* p, const Vec& a, const Vec& b) { at::vec::convert_float_half(a, b).store(p); }
};

template <typename Op>
float horizontal(const Vec& v, Op op) {
  float lanes[Vec::size()];
  v.store(lanes);
  float r = lanes[0];
  for (int i = 1; i < Vec::size(); ++i) r = op(r, lanes[i]);
  return r;
}

// Pass 1 over a row: SoftmaxStats of u = x * inv_t, with a (the entropy accumulator) only
// when kEntropy. Clamping u - m at the lowest float keeps exp(u - m) (u - m) at 0, not
// 0 * -inf = NaN, for -inf logits: 0 log 0 = 0.
template <typename T, bool kEntropy>
SoftmaxStats row_stats(const T* row, int64_t vocab, float inv_t) {
  // Vectors are built inside the functions: a namespace-scope Vec would be a static
  // initializer compiled for this instruction set, run at load time on any CPU.
  const Vec lowest(kLowest);
  float m = kLowest;
  Vec s(0.0f), a(0.0f);
  float s_tail = 0.0f, a_tail = 0.0f;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t end = std::min(start + kBlock, vocab);
    const int64_t vec_end = start + (end - start) / kStep * kStep;
    Vec x0, x1, block_max(-std::numeric_limits<float>::infinity());
    for (int64_t j = start; j < vec_end; j += kStep) {
      Io<T>::load(row + j, x0, x1);
      block_max = at::vec::maximum(block_max, at::vec::maximum(x0, x1));
    }
    float new_max = horizontal(block_max, [](float p, float q) { return std::max(p, q); });
    for (int64_t j = vec_end; j < end; ++j) new_max = std::max(new_max, static_cast<float>(row[j]));
    new_max *= inv_t;  // max(x) * inv_t = max(x * inv_t): rounding is monotone and inv_t > 0
    if (new_max > m) {
      const float shift = rescale_shift(m, new_max), r_scalar = std::exp(shift);
      const Vec r(r_scalar);
      if (kEntropy) a = at::vec::fmadd(Vec(r_scalar * shift), s, r * a);  // a' = r a + (r (m - m')) s
      s = s * r;
      m = new_max;
    }
    // The block's sums start from 0 and join the row's once: each lane adds kBlock / kStep
    // terms in turn, then one per block. A single running sum per lane over the whole row
    // (9,500 terms at V = 151,936 with AVX2's 8 lanes) put float32 rounding of
    // sqrt(9500) ulp into a, 30x PyTorch's pairwise sum in the entropy.
    const Vec scale(inv_t), neg_m(-m);
    Vec block_s(0.0f), block_a(0.0f);
    for (int64_t j = start; j < vec_end; j += kStep) {
      Io<T>::load(row + j, x0, x1);
      const Vec d0 = at::vec::maximum(x0 * scale + neg_m, lowest);
      const Vec d1 = at::vec::maximum(x1 * scale + neg_m, lowest);
      const Vec e0 = d0.exp_u20(), e1 = d1.exp_u20();
      block_s = block_s + (e0 + e1);
      if (kEntropy) block_a = at::vec::fmadd(e1, d1, at::vec::fmadd(e0, d0, block_a));
    }
    s = s + block_s;
    if (kEntropy) a = a + block_a;
    for (int64_t j = vec_end; j < end; ++j) {
      const float d = std::max(static_cast<float>(row[j]) * inv_t - m, kLowest);
      const float e = std::exp(d);
      s_tail += e;
      a_tail += e * d;
    }
  }
  const auto add = [](float p, float q) { return p + q; };
  return {m, horizontal(s, add) + s_tail, kEntropy ? horizontal(a, add) + a_tail : 0.0f};
}

// Pass 2 over a row: grad_j = p_j (k1 + k2 [p_j > 0] (log p_j + H)) with k1 = -c / tau,
// k2 = -e / tau, plus c / tau at the target: an entry of probability 0 takes no entropy term
// (0 log 0 = 0) and otherwise IEEE arithmetic holds (an infinite or NaN c gives NaN), as in
// reference.logits_gradient. The target's entry is written last, from its logit x_target
// read before this pass (which may be overwriting the logits in place); a negative target
// (none in these columns) takes no one-hot term. The row's log-sum-exp comes in two parts,
// lse_hi + lse_lo (its maximum and log s where the pass has them): log p = (u - lse_hi) - lse_lo
// keeps the digits of log s that lse_hi + lse_lo, one float, rounds away at large |u| (all of
// log 2 for two tied maxima at |u| ~ 1e31).
template <typename T, bool kEntropyTerm>
void write_row_gradient(const T* row, T* grad_row, int64_t vocab, int64_t target, float x_target, float inv_t,
                        float lse_hi, float lse_lo, float entropy, float c, float e) {
  const float k1 = -c * inv_t, k2 = kEntropyTerm ? -e * inv_t : 0.0f;
  const Vec scale(inv_t), neg_hi(-lse_hi), neg_lo(-lse_lo), vk1(k1), vk2(k2), vh(entropy), zero(0.0f);
  const auto grad_of = [&](const Vec& x) {
    const Vec log_p = (x * scale + neg_hi) + neg_lo;
    const Vec p = log_p.exp_u20();
    if (!kEntropyTerm) return p * vk1;
    return p * at::vec::fmadd(vk2, Vec::blendv(zero, log_p + vh, p > zero), vk1);
  };
  const int64_t vec_end = vocab / kStep * kStep;
  Vec x0, x1;
  for (int64_t j = 0; j < vec_end; j += kStep) {
    Io<T>::load(row + j, x0, x1);
    Io<T>::store(grad_row + j, grad_of(x0), grad_of(x1));
  }
  const auto scalar_grad = [&](float x) {
    const float log_p = (x * inv_t - lse_hi) - lse_lo;
    const float p = std::exp(log_p);
    return p * (k1 + k2 * (p > 0.0f ? log_p + entropy : 0.0f));
  };
  for (int64_t j = vec_end; j < vocab; ++j) grad_row[j] = static_cast<T>(scalar_grad(static_cast<float>(row[j])));
  if (target >= 0) grad_row[target] = static_cast<T>(scalar_grad(x_target) + c * inv_t);
}

template <typename T>
void write_row_gradient(const T* row, T* grad_row, int64_t vocab, int64_t target, float x_target, float inv_t,
                        float lse_hi, float lse_lo, float entropy, float c, float e, bool entropy_term) {
  if (!(lse_hi + lse_lo > -std::numeric_limits<float>::infinity())) {
    // A row of only -inf logits (lse = -inf) has no distribution: log p_j = -inf - lse is
    // NaN for every j, and so is its gradient. Written here because exp_u20 does not carry
    // a NaN through.
    std::fill(grad_row, grad_row + vocab, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
    return;
  }
  if (entropy_term) {
    write_row_gradient<T, true>(row, grad_row, vocab, target, x_target, inv_t, lse_hi, lse_lo, entropy, c, e);
  } else {
    write_row_gradient<T, false>(row, grad_row, vocab, target, x_target, inv_t, lse_hi, lse_lo, entropy, c, e);
  }
}

template <typename T>
const T* logits_row(const RowsView& rows, int64_t t) {
  return static_cast<const T*>(rows.logits) + t * rows.logits_stride;
}

template <typename T>
T* grad_row(const RowsView& rows, int64_t t) {
  return static_cast<T*>(rows.grad) + t * rows.grad_stride;
}

template <typename T>
void policy_loss_rows_typed(const PolicyLossArgs& args, int64_t begin, int64_t end) {
  const RowsView& rows = args.rows;
  const PolicyOutputs& out = args.out;
  const float inv_t = args.settings.inv_temperature;
  for (int64_t t = begin; t < end; ++t) {
    if (args.in.weights[t] == 0.0f) {
      // Contributes nothing: zeros out, a zero gradient row (all-zero bits are +0 in every
      // float format), and the target is never read.
      out.logprobs[t] = out.entropy[t] = out.loss[t] = out.kl[t] = out.clipped[t] = 0.0f;
      if (rows.grad) std::memset(grad_row<T>(rows, t), 0, rows.vocab * sizeof(T));
      continue;
    }
    const T* row = logits_row<T>(rows, t);
    const int64_t target = load_target(rows, t);
    const float x_target = static_cast<float>(row[target]);
    const SoftmaxStats stats = row_stats<T, true>(row, rows.vocab, inv_t);
    const float log_s = std::log(stats.s), entropy = stats_entropy(stats);
    const float logp = stats_logprob(stats, x_target * inv_t);
    const TokenLoss token = token_loss(logp, entropy, t, args.in, args.settings);
    out.logprobs[t] = logp;
    out.entropy[t] = entropy;
    out.loss[t] = token.loss;
    out.kl[t] = token.kl;
    out.clipped[t] = token.clip_code;
    if (rows.grad) {
      write_row_gradient(row, grad_row<T>(rows, t), rows.vocab, target, x_target, inv_t, stats.m, log_s, entropy,
                         token.grad_logp, token.grad_entropy, token.grad_entropy != 0.0f);
    }
  }
}

template <typename T>
void logprob_rows_typed(const LogprobArgs& args, int64_t begin, int64_t end) {
  const RowsView& rows = args.rows;
  for (int64_t t = begin; t < end; ++t) {
    const T* row = logits_row<T>(rows, t);
    const SoftmaxStats stats = args.entropy ? row_stats<T, true>(row, rows.vocab, args.inv_temperature)
                                            : row_stats<T, false>(row, rows.vocab, args.inv_temperature);
    args.lse[2 * t] = stats.m;  // the log-sum-exp in two parts (see write_row_gradient)
    args.lse[2 * t + 1] = std::log(stats.s);
    args.logprobs[t] = stats_logprob(stats, static_cast<float>(row[load_target(rows, t)]) * args.inv_temperature);
    if (args.entropy) args.entropy[t] = stats_entropy(stats);
  }
}

template <typename T>
void logprob_backward_typed(const LogprobBackwardArgs& args, int64_t begin, int64_t end) {
  const RowsView& rows = args.rows;
  const bool entropy_term = args.grad_entropy != nullptr;
  for (int64_t t = begin; t < end; ++t) {
    const T* row = logits_row<T>(rows, t);
    const int64_t target = load_target_or_absent(rows, t);
    const float x_target = target >= 0 ? static_cast<float>(row[target]) : 0.0f;
    write_row_gradient(row, grad_row<T>(rows, t), rows.vocab, target, x_target, args.inv_temperature,
                       args.lse[2 * t], args.lse[2 * t + 1], entropy_term ? args.entropy[t] : 0.0f,
                       args.grad_logprobs[t], entropy_term ? args.grad_entropy[t] : 0.0f, entropy_term);
  }
}

// Calls fn(T{}) with T the C++ type of a logits dtype.
template <typename Fn>
void with_logits_type(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32:
      return fn(float{});
    case Dtype::kBFloat16:
      return fn(c10::BFloat16{});
    case Dtype::kFloat16:
      return fn(c10::Half{});
  }
}

void policy_loss_rows(const PolicyLossArgs& args, int64_t begin, int64_t end) {
  with_logits_type(args.rows.dtype, [&](auto tag) { policy_loss_rows_typed<decltype(tag)>(args, begin, end); });
}

void logprob_rows(const LogprobArgs& args, int64_t begin, int64_t end) {
  with_logits_type(args.rows.dtype, [&](auto tag) { logprob_rows_typed<decltype(tag)>(args, begin, end); });
}

void logprob_backward(const LogprobBackwardArgs& args, int64_t begin, int64_t end) {
  with_logits_type(args.rows.dtype, [&](auto tag) { logprob_backward_typed<decltype(tag)>(args, begin, end); });
}

}  // namespace

KernelTable kernel_table() { return {policy_loss_rows, logprob_rows, logprob_backward}; }

}  // namespace siri::cpu::CPU_CAPABILITY
