// The CPU backend on raw arguments: picks the kernels of the widest instruction set that
// both this build and the CPU have, and spreads the rows over torch's OpenMP threads.
#pragma once

#include "../common/kernel_args.h"

namespace siri::cpu {

void policy_loss_rows(const PolicyLossArgs& args);
void logprob_rows(const LogprobArgs& args);
void logprob_backward(const LogprobBackwardArgs& args);

// "avx512", "avx2" or "default": the kernels in use.
const char* capability();

}  // namespace siri::cpu
