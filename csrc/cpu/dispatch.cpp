#include <algorithm>
#include <string>

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include "cpu_backend.h"
#include "kernels.h"

namespace siri::cpu {
namespace {

struct Selected {
  KernelTable table;
  const char* name;
};

// at::get_cpu_capability() is what ATen's own kernels run with: the CPU's widest set,
// lowered by ATEN_CPU_CAPABILITY when the user asks, so both follow the same switch.
Selected select_kernels() {
  const std::string capability = at::get_cpu_capability();
#ifdef SIRI_CPU_AVX512
  if (capability == "AVX512") return {AVX512::kernel_table(), "avx512"};
#endif
#ifdef SIRI_CPU_AVX2
  if (capability == "AVX512" || capability == "AVX2") return {AVX2::kernel_table(), "avx2"};
#endif
  return {DEFAULT::kernel_table(), "default"};
}

const Selected& selected() {
  static const Selected kernels = select_kernels();
  return kernels;
}

// Rows per task: enough for ~32K logits, so a task outweighs its scheduling when V is tiny;
// a single row (tens of microseconds at V = 32000) otherwise.
int64_t grain_size(int64_t vocab) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(vocab, 1)); }

template <typename Args>
void parallel_rows(void (*kernel)(const Args&, int64_t, int64_t), const Args& args) {
  at::parallel_for(0, args.rows.num_rows, grain_size(args.rows.vocab),
                   [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
}

}  // namespace

void policy_loss_rows(const PolicyLossArgs& args) { parallel_rows(selected().table.policy_loss_rows, args); }

void logprob_rows(const LogprobArgs& args) { parallel_rows(selected().table.logprob_rows, args); }

void logprob_backward(const LogprobBackwardArgs& args) { parallel_rows(selected().table.logprob_backward, args); }

const char* capability() { return selected().name; }

}  // namespace siri::cpu
