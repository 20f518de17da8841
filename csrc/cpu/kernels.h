// The CPU kernels, compiled once per instruction set (setup.py builds kernels.cpp with
// CPU_CAPABILITY = DEFAULT, AVX2, AVX512, as ATen does) and chosen at run time by
// dispatch.cpp. Each entry point handles the rows [begin, end) on the calling thread.
#pragma once

#include <cstdint>

#include "../common/kernel_args.h"

namespace siri::cpu {

struct KernelTable {
  void (*policy_loss_rows)(const PolicyLossArgs& args, int64_t begin, int64_t end);
  void (*logprob_rows)(const LogprobArgs& args, int64_t begin, int64_t end);
  void (*logprob_backward)(const LogprobBackwardArgs& args, int64_t begin, int64_t end);
};

namespace DEFAULT {
KernelTable kernel_table();
}
#ifdef SIRI_CPU_AVX2
namespace AVX2 {
KernelTable kernel_table();
}
#endif
#ifdef SIRI_CPU_AVX512
namespace AVX512 {
KernelTable kernel_table();
}
#endif

}  // namespace siri::cpu
