// File: core/hf_checkpoint.h
//
// The layout of a Hugging Face safetensors checkpoint directory:
//   model.safetensors.index.json   {"metadata": {"total_size": N, ...},
//                                   "weight_map": {"<tensor>": "<shard file>", ...}}
//   model-00001-of-0000N.safetensors ...   the shards the index names
//   config.json, tokenizer.json, ...       sidecars, copied as they are
// or, unsharded, one model.safetensors and its sidecars.
//
// The index is untrusted: parsed strictly and in linear time (core/json.h), with bounds on its
// size and entries, and every shard name checked to be a safe relative path. fpxint writes the
// same form for its packed output (model.fpxint.index.json, docs/FORMAT.md).
#ifndef FPXINT_CORE_HF_CHECKPOINT_H_
#define FPXINT_CORE_HF_CHECKPOINT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace fpxint::core {

inline constexpr char kHfIndexFile[] = "model.safetensors.index.json";
inline constexpr char kHfSingleFile[] = "model.safetensors";
inline constexpr char kFpxintIndexFile[] = "model.fpxint.index.json";

struct HfIndexLimits {
  uint64_t max_bytes = 64ull << 20;  // of the index file
  size_t max_tensors = 1u << 20;     // weight_map entries
  size_t max_shards = 4096;          // distinct shard files
};

struct HfIndex {
  std::optional<uint64_t> total_size;  // metadata.total_size, when present
  // Every other metadata member whose value is a string (kept in order; others are dropped).
  std::vector<std::pair<std::string, std::string>> metadata;
  // weight_map in document order: tensor name -> shard file.
  std::vector<std::pair<std::string, std::string>> weight_map;
  std::vector<std::string> shards;  // the distinct shard files, in order of first mention
};

// True for a relative path of at most 4 '/'-separated segments (255 bytes in all), each
// [A-Za-z0-9_][A-Za-z0-9._-]{0,127}: no "..", no leading '/', no hidden files.
bool IsSafeRelativePath(absl::string_view path);

// Parses an index. InvalidArgument names the member at fault (a weight_map entry that is not a
// string, a shard path IsSafeRelativePath refuses, a missing weight_map); ResourceExhausted for a
// document past `limits`.
absl::StatusOr<HfIndex> ParseHfIndex(absl::string_view text, const HfIndexLimits& limits = {});

// The index as JSON text (metadata first, then weight_map in the order given), for outputs.
std::string HfIndexToJson(const HfIndex& index);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_HF_CHECKPOINT_H_
