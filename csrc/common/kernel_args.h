// Raw-pointer views of the backend arguments (kernels/backends.py), shared by the CPU and
// CUDA kernels. Plain C++ with no torch header, so the .cu files compile standalone.
#pragma once

#include <cstdint>

namespace siri {

enum class Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Per-row codes written into `clipped` (config.py CLIP_*).
constexpr float kClipNone = 0.0f;
constexpr float kClipRatio = 1.0f;
constexpr float kClipDual = 2.0f;

// kl_estimator "low_var_kl" is k3 clamped above at this bound (config.LOW_VAR_KL_CLAMP).
constexpr float kLowVarKlClamp = 10.0f;

// The logits [T, V] (unit stride along V, rows `logits_stride` elements apart), their
// gradient (same dtype; may be the logits buffer itself, or null when not asked for) and
// the targets [T] (int32 or int64).
struct RowsView {
  const void* logits;
  int64_t logits_stride;
  void* grad;
  int64_t grad_stride;
  int64_t num_rows;
  int64_t vocab;
  Dtype dtype;
  const void* targets;
  bool targets_int64;
};

// The scalar settings of `LossConfig`, as the kernels take them.
struct LossSettings {
  float inv_temperature;
  float clip_low;
  float clip_high;
  float dual_clip;  // read only when has_dual_clip
  float kl_coef;
  float entropy_coef;
  float tis_cap;  // read only when rollout logprobs are given
  float ratio_log_clamp;
  int kl_estimator;  // 1..5: k1, k2, k3, low_var_kl, k3_ratio (config.KL_ESTIMATORS)
  bool has_dual_clip;
};

// float32 [T] per-row inputs; old/ref/rollout are null when absent (rollout is null too
// when TIS is off, so its presence alone switches TIS on).
struct PolicyInputs {
  const float* advantages;
  const float* weights;
  const float* old_logprobs;
  const float* ref_logprobs;
  const float* rollout_logprobs;
};

// float32 [T] per-row outputs of policy_loss_rows.
struct PolicyOutputs {
  float* logprobs;
  float* entropy;
  float* loss;
  float* kl;
  float* clipped;
};

struct PolicyLossArgs {
  RowsView rows;
  PolicyInputs in;
  LossSettings settings;
  PolicyOutputs out;
};

struct LogprobArgs {
  RowsView rows;  // grad unused
  float inv_temperature;
  float* logprobs;
  float* entropy;  // null: entropy not asked for
  float* lse;      // [T, 2]: each row's max and log sum exp(u - max)
};

struct LogprobBackwardArgs {
  RowsView rows;  // grad: where the gradient goes
  float inv_temperature;
  const float* lse;      // [T, 2], as LogprobArgs writes it
  const float* entropy;  // read only when grad_entropy is given
  const float* grad_logprobs;
  const float* grad_entropy;  // null: no entropy term
};

}  // namespace siri
