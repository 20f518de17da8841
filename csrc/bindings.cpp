// siri._C: the native backends' entry points (kernels/backends.py documents them). Checks
// the tensors the op layer hands over, turns them into raw views (common/kernel_args.h)
// and runs the CPU or CUDA implementation for the logits' device.

#include <optional>

#include <torch/extension.h>

#include "common/kernel_args.h"
#include "cpu/cpu_backend.h"
#ifdef SIRI_WITH_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace siri {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

Dtype logits_dtype(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    case at::kHalf:
      return Dtype::kFloat16;
    default:
      TORCH_CHECK(false, "logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  }
}

// A float32 [T] contiguous tensor on the logits' device.
float* row_values(const at::Tensor& values, const char* name, const at::Tensor& logits) {
  TORCH_CHECK(values.device() == logits.device(), name, " must be on ", logits.device(), ", got ", values.device());
  TORCH_CHECK(values.scalar_type() == at::kFloat, name, " must be float32, got ", values.scalar_type());
  TORCH_CHECK(values.dim() == 1 && values.size(0) == logits.size(0), name, " must have shape [", logits.size(0),
              "], got ", values.sizes());
  TORCH_CHECK(values.is_contiguous(), name, " must be contiguous");
  return values.data_ptr<float>();
}

// The log-sum-exp of every row in two parts, (max, log-sum): float32 [T, 2] (backends.py).
float* lse_parts(const at::Tensor& lse, const at::Tensor& logits) {
  TORCH_CHECK(lse.device() == logits.device(), "lse must be on ", logits.device(), ", got ", lse.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == logits.size(0) && lse.size(1) == 2, "lse must have shape [",
              logits.size(0), ", 2], got ", lse.sizes());
  TORCH_CHECK(lse.is_contiguous(), "lse must be contiguous");
  return lse.data_ptr<float>();
}

float* optional_row_values(const OptionalTensor& values, const char* name, const at::Tensor& logits) {
  return values ? row_values(*values, name, logits) : nullptr;
}

RowsView rows_view(const at::Tensor& logits, const at::Tensor& targets, const OptionalTensor& grad) {
  TORCH_CHECK(logits.dim() == 2, "logits must be [T, V], got ", logits.sizes());
  const int64_t num_rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0 || num_rows == 0, "logits must have V >= 1");
  TORCH_CHECK(vocab == 1 || logits.stride(1) == 1, "logits must have unit stride along V");
  TORCH_CHECK(targets.device() == logits.device(), "targets must be on ", logits.device());
  TORCH_CHECK(targets.scalar_type() == at::kInt || targets.scalar_type() == at::kLong,
              "targets must be int32 or int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == num_rows && targets.is_contiguous(),
              "targets must be contiguous with shape [", num_rows, "]");
  if (grad) {
    TORCH_CHECK(grad->device() == logits.device() && grad->scalar_type() == logits.scalar_type() &&
                    grad->sizes() == logits.sizes(),
                "grad_logits must match logits in device, dtype and shape");
    TORCH_CHECK(vocab == 1 || grad->stride(1) == 1, "grad_logits must have unit stride along V");
  }
  return {logits.data_ptr(),     logits.stride(0),  grad ? grad->data_ptr() : nullptr,
          grad ? grad->stride(0) : 0, num_rows,   vocab,
          logits_dtype(logits),  targets.data_ptr(), targets.scalar_type() == at::kLong};
}

// Runs the implementation for the logits' device.
template <typename Args>
void run(const at::Tensor& logits, const Args& args, void (*on_cpu)(const Args&), void (*on_cuda)(const Args&, int)) {
  if (logits.is_cpu()) return on_cpu(args);
  TORCH_CHECK(logits.is_cuda() && on_cuda != nullptr, "siri._C has no kernels for ", logits.device(),
              " tensors in this build");
  on_cuda(args, logits.get_device());
}

template <typename Args>
using CudaEntry = void (*)(const Args&, int);

#ifdef SIRI_WITH_CUDA
constexpr bool kHasCuda = true;
const CudaEntry<PolicyLossArgs> kCudaPolicyLossRows = cuda::policy_loss_rows;
const CudaEntry<LogprobArgs> kCudaLogprobRows = cuda::logprob_rows;
const CudaEntry<LogprobBackwardArgs> kCudaLogprobBackward = cuda::logprob_backward;
#else
constexpr bool kHasCuda = false;
const CudaEntry<PolicyLossArgs> kCudaPolicyLossRows = nullptr;
const CudaEntry<LogprobArgs> kCudaLogprobRows = nullptr;
const CudaEntry<LogprobBackwardArgs> kCudaLogprobBackward = nullptr;
#endif

void policy_loss_rows(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& advantages,
                      const at::Tensor& weights, const OptionalTensor& old_logprobs,
                      const OptionalTensor& ref_logprobs, const OptionalTensor& rollout_logprobs, double temperature,
                      double clip_low, double clip_high, std::optional<double> dual_clip, double kl_coef,
                      int64_t kl_estimator, double entropy_coef, std::optional<double> tis_cap,
                      double ratio_log_clamp, const at::Tensor& logprobs, const at::Tensor& entropy,
                      const at::Tensor& loss, const at::Tensor& kl, const at::Tensor& clipped,
                      const OptionalTensor& grad_logits) {
  TORCH_CHECK(kl_estimator >= 1 && kl_estimator <= 5,
              "kl_estimator must be 1 to 5 (k1, k2, k3, low_var_kl, k3_ratio)");
  PolicyLossArgs args;
  args.rows = rows_view(logits, targets, grad_logits);
  args.in = {row_values(advantages, "advantages", logits), row_values(weights, "weights", logits),
             optional_row_values(old_logprobs, "old_logprobs", logits),
             optional_row_values(ref_logprobs, "ref_logprobs", logits),
             // TIS needs both the rollout log-probs and a cap; either alone leaves it off.
             tis_cap ? optional_row_values(rollout_logprobs, "rollout_logprobs", logits) : nullptr};
  args.settings = {static_cast<float>(1.0 / temperature),
                   static_cast<float>(clip_low),
                   static_cast<float>(clip_high),
                   static_cast<float>(dual_clip.value_or(0.0)),
                   static_cast<float>(kl_coef),
                   static_cast<float>(entropy_coef),
                   static_cast<float>(tis_cap.value_or(0.0)),
                   static_cast<float>(ratio_log_clamp),
                   static_cast<int>(kl_estimator),
                   dual_clip.has_value()};
  args.out = {row_values(logprobs, "logprobs", logits), row_values(entropy, "entropy", logits),
              row_values(loss, "loss", logits), row_values(kl, "kl", logits), row_values(clipped, "clipped", logits)};
  run(logits, args, cpu::policy_loss_rows, kCudaPolicyLossRows);
}

void logprob_rows(const at::Tensor& logits, const at::Tensor& targets, double temperature, const at::Tensor& logprobs,
                  const OptionalTensor& entropy, const at::Tensor& lse) {
  const LogprobArgs args{rows_view(logits, targets, std::nullopt), static_cast<float>(1.0 / temperature),
                         row_values(logprobs, "logprobs", logits), optional_row_values(entropy, "entropy", logits),
                         lse_parts(lse, logits)};
  run(logits, args, cpu::logprob_rows, kCudaLogprobRows);
}

void logprob_backward(const at::Tensor& logits, const at::Tensor& targets, double temperature, const at::Tensor& lse,
                      const OptionalTensor& entropy, const at::Tensor& grad_logprobs,
                      const OptionalTensor& grad_entropy, const at::Tensor& grad_logits) {
  TORCH_CHECK(!grad_entropy || entropy, "grad_entropy needs the forward's entropy");
  const LogprobBackwardArgs args{rows_view(logits, targets, grad_logits), static_cast<float>(1.0 / temperature),
                                 lse_parts(lse, logits), optional_row_values(entropy, "entropy", logits),
                                 row_values(grad_logprobs, "grad_logprobs", logits),
                                 optional_row_values(grad_entropy, "grad_entropy", logits)};
  run(logits, args, cpu::logprob_backward, kCudaLogprobBackward);
}

}  // namespace
}  // namespace siri

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  using py::arg;
  // The kernels never touch Python objects: other Python threads run meanwhile.
  const auto release_gil = py::call_guard<py::gil_scoped_release>();
  m.doc() = "siri native backends: fused log-prob, entropy and clipped policy-gradient loss over rows of logits";
  m.attr("has_cpu") = true;
  m.attr("has_cuda") = siri::kHasCuda;
  m.def("cpu_capability", &siri::cpu::capability, "Instruction set of the CPU kernels in use: avx512, avx2 or default");
  m.def("policy_loss_rows", &siri::policy_loss_rows, release_gil, arg("logits"), arg("targets"), arg("advantages"),
        arg("weights"), arg("old_logprobs"), arg("ref_logprobs"), arg("rollout_logprobs"), arg("temperature"),
        arg("clip_low"), arg("clip_high"), arg("dual_clip"), arg("kl_coef"), arg("kl_estimator"),
        arg("entropy_coef"), arg("tis_cap"), arg("ratio_log_clamp"), arg("logprobs"), arg("entropy"), arg("loss"),
        arg("kl"), arg("clipped"), arg("grad_logits"));
  m.def("logprob_rows", &siri::logprob_rows, release_gil, arg("logits"), arg("targets"), arg("temperature"),
        arg("logprobs"), arg("entropy"), arg("lse"));
  m.def("logprob_backward", &siri::logprob_backward, release_gil, arg("logits"), arg("targets"), arg("temperature"),
        arg("lse"), arg("entropy"), arg("grad_logprobs"), arg("grad_entropy"), arg("grad_logits"));
}
