// libFuzzer target: the Hugging Face checkpoint index parser (core/hf_checkpoint.h) on arbitrary
// bytes, at the limits the server reads uploaded indexes with (HfIndexLimits' defaults). A
// crash, a sanitizer report, a shard path IsSafeRelativePath refuses, more entries than the
// limit, or an index that does not read back as itself from HfIndexToJson is a bug.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/hf_checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fpxint::core::HfIndexLimits limits;  // the production limits
  const absl::string_view text(reinterpret_cast<const char*>(data), size);
  auto idx = fpxint::core::ParseHfIndex(text, limits);
  if (!idx.ok()) return 0;
  if (idx->weight_map.empty() || idx->weight_map.size() > limits.max_tensors ||
      idx->shards.size() > limits.max_shards) {
    std::abort();
  }
  for (const std::string& s : idx->shards) {
    if (!fpxint::core::IsSafeRelativePath(s)) std::abort();
  }
  auto again = fpxint::core::ParseHfIndex(fpxint::core::HfIndexToJson(*idx), limits);
  if (!again.ok() || again->weight_map != idx->weight_map || again->shards != idx->shards ||
      again->metadata != idx->metadata || again->total_size != idx->total_size) {
    std::abort();
  }
  return 0;
}
