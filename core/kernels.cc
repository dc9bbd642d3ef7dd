#include "core/kernels.h"

#include "core/internal/kernels_inl.h"
#include "core/runtime.h"

namespace fpxint::core {
namespace {

bool Supported(const KernelTable* t) {
  if (t == &internal::kRefKernels) return true;
  if (t == &internal::kAvx2Kernels) return IsaSupported(Isa::kAvx2);
  if (t == &internal::kAvx512Kernels) return IsaSupported(Isa::kAvx512);
  return false;
}

const KernelTable* const kAll[] = {&internal::kRefKernels, &internal::kAvx2Kernels,
                                   &internal::kAvx512Kernels};

}  // namespace

const KernelTable* KernelsByName(absl::string_view name) {
  for (const KernelTable* t : kAll) {
    if (name == t->name) return Supported(t) ? t : nullptr;
  }
  return nullptr;
}

const KernelTable& ActiveKernels() {
  static const KernelTable& table = *KernelsByName(IsaName(Runtime().isa));
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
