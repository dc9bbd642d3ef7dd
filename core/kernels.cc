#include "core/kernels.h"

#include <cstdlib>

#include "core/internal/kernels_inl.h"

namespace fpxint::core {
namespace {

bool Supported(const KernelTable* t) {
  if (t == &internal::kRefKernels) return true;
  __builtin_cpu_init();
  if (t == &internal::kAvx2Kernels) return __builtin_cpu_supports("avx2");
  if (t == &internal::kAvx512Kernels) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  }
  return false;
}

const KernelTable* const kAll[] = {&internal::kRefKernels, &internal::kAvx2Kernels,
                                   &internal::kAvx512Kernels};

const KernelTable& Choose() {
  if (const char* forced = std::getenv("FPXINT_KERNEL"); forced != nullptr && *forced != '\0') {
    if (const KernelTable* t = KernelsByName(forced); t != nullptr) return *t;
  }
  for (int i = 2; i >= 0; --i) {
    if (Supported(kAll[i])) return *kAll[i];
  }
  return internal::kRefKernels;
}

}  // namespace

const KernelTable* KernelsByName(absl::string_view name) {
  for (const KernelTable* t : kAll) {
    if (name == t->name) return Supported(t) ? t : nullptr;
  }
  return nullptr;
}

const KernelTable& ActiveKernels() {
  static const KernelTable& table = Choose();
  return table;
}

std::vector<std::string> SupportedKernelNames() {
  std::vector<std::string> names;
  for (const KernelTable* t : kAll) {
    if (Supported(t)) names.emplace_back(t->name);
  }
  return names;
}

}  // namespace fpxint::core
