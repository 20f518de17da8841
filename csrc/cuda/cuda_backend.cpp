#include "cuda_backend.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels.cuh"

namespace siri::cuda {
namespace {

void check(cudaError_t status) { TORCH_CHECK(status == cudaSuccess, "siri CUDA launch failed: ", cudaGetErrorString(status)); }

RowSplit split_for(const RowsView& rows, int device) {
  int sm_count = 0;
  check(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  return plan_row_split(rows.num_rows, rows.vocab, sm_count);
}

cudaStream_t current_stream(int device) { return c10::cuda::getCurrentCUDAStream(device).stream(); }

// A float32 scratch buffer on the device, kept alive by the caller until the launches are
// queued (the caching allocator orders its reuse on the same stream).
at::Tensor workspace(int64_t floats, int device) {
  return at::empty({floats}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device));
}

}  // namespace

void policy_loss_rows(const PolicyLossArgs& args, int device) {
  const c10::cuda::CUDAGuard guard(device);
  const RowSplit split = split_for(args.rows, device);
  const at::Tensor scratch = workspace(policy_loss_workspace(args.rows.num_rows, split, args.rows.grad != nullptr), device);
  check(launch_policy_loss_rows(args, split, scratch.data_ptr<float>(), current_stream(device)));
}

void logprob_rows(const LogprobArgs& args, int device) {
  const c10::cuda::CUDAGuard guard(device);
  const RowSplit split = split_for(args.rows, device);
  const at::Tensor scratch = workspace(logprob_workspace(args.rows.num_rows, split), device);
  check(launch_logprob_rows(args, split, scratch.data_ptr<float>(), current_stream(device)));
}

void logprob_backward(const LogprobBackwardArgs& args, int device) {
  const c10::cuda::CUDAGuard guard(device);
  check(launch_logprob_backward(args, split_for(args.rows, device), current_stream(device)));
}

}  // namespace siri::cuda
