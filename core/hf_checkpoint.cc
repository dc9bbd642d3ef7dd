// File: core/hf_checkpoint.cc
#include "core/hf_checkpoint.h"

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/json.h"
#include "core/status_macros.h"

namespace fpxint::core {

bool IsSafeRelativePath(absl::string_view path) {
  if (path.empty() || path.size() > 255) return false;
  int segments = 0;
  for (absl::string_view seg : absl::StrSplit(path, '/')) {
    if (++segments > 4 || seg.empty() || seg.size() > 128) return false;
    const char c0 = seg[0];
    if (!(absl::ascii_isalnum(static_cast<unsigned char>(c0)) || c0 == '_')) return false;
    for (char c : seg) {
      if (!(absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' ||
            c == '-')) {
        return false;
      }
    }
  }
  return true;
}

absl::StatusOr<HfIndex> ParseHfIndex(absl::string_view text, const HfIndexLimits& limits) {
  if (text.size() > limits.max_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        kHfIndexFile, ": ", text.size(), " bytes; at most ", limits.max_bytes, " are read"));
  }
  JsonLimits jl;
  jl.max_depth = 8;
  jl.max_members = limits.max_tensors;
  absl::StatusOr<JsonValue> doc = ParseJson(text, jl);
  if (!doc.ok()) {
    return absl::Status(doc.status().code(), absl::StrCat(kHfIndexFile, ": ", doc.status().message()));
  }
  if (!doc->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(kHfIndexFile, ": expected a JSON object"));
  }
  HfIndex out;
  if (const JsonValue* meta = doc->Find("metadata"); meta != nullptr) {
    if (!meta->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(kHfIndexFile, ": metadata must be an object"));
    }
    for (const auto& [k, v] : meta->object()) {
      if (k == "total_size") {
        out.total_size = v.AsUint64();
        if (!out.total_size) {
          // Some writers store it as a float ("total_size": 1.2e10): keep it out, not an error.
          continue;
        }
      } else if (v.is_string()) {
        out.metadata.emplace_back(k, v.str());
      }
    }
  }
  const JsonValue* map = doc->Find("weight_map");
  if (map == nullptr || !map->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(kHfIndexFile, ": weight_map (an object of tensor name -> shard file) is ",
                     map == nullptr ? "missing" : "not an object"));
  }
  absl::flat_hash_set<std::string> seen;
  out.weight_map.reserve(map->object().size());
  for (const auto& [tensor, shard] : map->object()) {
    if (!shard.is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(kHfIndexFile, ": weight_map['", tensor,
                                                     "'] must be a shard file name, not ",
                                                     JsonValue::KindName(shard.kind())));
    }
    if (!IsSafeRelativePath(shard.str())) {
      return absl::InvalidArgumentError(absl::StrCat(
          kHfIndexFile, ": weight_map['", tensor, "'] names '", shard.str(),
          "', which is not a plain relative file name ([A-Za-z0-9_][A-Za-z0-9._-]* segments)"));
    }
    if (seen.insert(shard.str()).second) {
      if (out.shards.size() >= limits.max_shards) {
        return absl::ResourceExhaustedError(absl::StrCat(
            kHfIndexFile, ": more than ", limits.max_shards, " shard files"));
      }
      out.shards.push_back(shard.str());
    }
    out.weight_map.emplace_back(tensor, shard.str());
  }
  if (out.weight_map.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(kHfIndexFile, ": weight_map is empty"));
  }
  return out;
}

std::string HfIndexToJson(const HfIndex& index) {
  JsonWriter w;
  w.BeginObject().Key("metadata").BeginObject();
  if (index.total_size) w.Key("total_size").Int(static_cast<int64_t>(*index.total_size));
  for (const auto& [k, v] : index.metadata) w.Key(k).String(v);
  w.EndObject().Key("weight_map").BeginObject();
  for (const auto& [tensor, shard] : index.weight_map) w.Key(tensor).String(shard);
  w.EndObject().EndObject();
  return w.str();
}

}  // namespace fpxint::core
