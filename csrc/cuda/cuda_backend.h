// The CUDA backend on raw arguments, with the torch side of a launch: device guard, the
// current stream, and the chunked path's workspace from torch's caching allocator.
#pragma once

#include "../common/kernel_args.h"

namespace siri::cuda {

void policy_loss_rows(const PolicyLossArgs& args, int device);
void logprob_rows(const LogprobArgs& args, int device);
void logprob_backward(const LogprobBackwardArgs& args, int device);

}  // namespace siri::cuda
