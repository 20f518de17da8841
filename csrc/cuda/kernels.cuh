// Launchers of the CUDA kernels on raw arguments (common/kernel_args.h): no torch header,
// so kernels.cu compiles standalone with `nvcc -c`. cuda_backend.cpp adds the torch side
// (device guard, current stream, workspace from the caching allocator).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../common/kernel_args.h"

namespace siri::cuda {

// How each row is cut along V: `chunks` blocks of `chunk_size` logits per row. One chunk
// (a whole row per block) when T alone fills the GPU; more when T is small.
struct RowSplit {
  int chunks;
  int64_t chunk_size;
};

RowSplit plan_row_split(int64_t num_rows, int64_t vocab, int sm_count);

// float32 entries of workspace the launches below need (0: pass a null workspace).
int64_t policy_loss_workspace(int64_t num_rows, RowSplit split, bool with_grad);
int64_t logprob_workspace(int64_t num_rows, RowSplit split);

cudaError_t launch_policy_loss_rows(const PolicyLossArgs& args, RowSplit split, float* workspace, cudaStream_t stream);
cudaError_t launch_logprob_rows(const LogprobArgs& args, RowSplit split, float* workspace, cudaStream_t stream);
cudaError_t launch_logprob_backward(const LogprobBackwardArgs& args, RowSplit split, cudaStream_t stream);

}  // namespace siri::cuda
