// File: server/model_files.cc
#include "server/model_files.h"

#include <algorithm>
#include <map>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/hf_checkpoint.h"
#include "core/safetensors.h"
#include "core/sha256.h"
#include "core/status_macros.h"
#include "server/upload.h"
#include "server/validation.h"

namespace fpxint::server {

std::string ManifestSha256(const google::protobuf::RepeatedPtrField<v1::ModelFile>& files) {
  std::vector<const v1::ModelFile*> sorted;
  for (const v1::ModelFile& f : files) sorted.push_back(&f);
  std::sort(sorted.begin(), sorted.end(),
            [](const v1::ModelFile* a, const v1::ModelFile* b) { return a->path() < b->path(); });
  core::Sha256 h;
  for (const v1::ModelFile* f : sorted) {
    h.Update(absl::StrCat(f->path(), "\t", f->sha256(), "\t", f->size_bytes(), "\n"));
  }
  return h.HexDigest();
}

absl::StatusOr<std::vector<std::string>> MissingModelFiles(const v1::CommitModelFilesRequest& req,
                                                           const std::string& owner,
                                                           const BlobStore& store) {
  FPX_RETURN_IF_ERROR(CheckName(req.name(), "name"));
  if (req.files_size() == 0 || req.files_size() > kMaxModelFiles) {
    return absl::InvalidArgumentError(absl::StrCat(
        "files: ", req.files_size(), " given; a directory model has 1..", kMaxModelFiles, " files"));
  }
  absl::flat_hash_set<std::string> paths;
  std::vector<std::string> missing;
  for (int i = 0; i < req.files_size(); ++i) {
    const v1::ModelFile& f = req.files(i);
    const std::string field = absl::StrCat("files[", i, "]");
    if (!core::IsSafeRelativePath(f.path())) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".path: '", f.path(), "'; at most 4 '/'-separated segments of "
          "[A-Za-z0-9_][A-Za-z0-9._-]*"));
    }
    if (!paths.insert(f.path()).second) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".path: '", f.path(), "' is listed twice"));
    }
    if (!IsSha256Hex(f.sha256())) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".sha256: 64 lower-case hex digits of '", f.path(), "'"));
    }
    if (!store.IsStaged(owner, f.sha256()) || !store.Has(f.sha256())) {
      missing.push_back(f.path());
      continue;
    }
    absl::StatusOr<uint64_t> size = store.SizeOf(f.sha256());
    if (!size.ok()) {
      missing.push_back(f.path());
    } else if (*size != f.size_bytes()) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".size_bytes: ", f.size_bytes(),
                                                     ", but the uploaded '", f.path(), "' has ",
                                                     *size, " bytes"));
    }
  }
  return missing;
}

absl::StatusOr<v1::Model> BuildDirectoryModel(const v1::CommitModelFilesRequest& req,
                                              const BlobStore& store) {
  std::map<std::string, const v1::ModelFile*> by_path;
  for (const v1::ModelFile& f : req.files()) by_path[f.path()] = &f;
  // Which files are shards, in order: the index's, or the one model.safetensors.
  std::vector<std::string> shards;
  std::optional<core::HfIndex> index;
  if (auto it = by_path.find(core::kHfIndexFile); it != by_path.end()) {
    FPX_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(store.PathOf(it->second->sha256()),
                                                         core::HfIndexLimits{}.max_bytes));
    FPX_ASSIGN_OR_RETURN(index, core::ParseHfIndex(text));
    for (const std::string& s : index->shards) {
      if (!by_path.count(s)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "files: ", core::kHfIndexFile, " maps tensors to '", s,
            "', which is not among the files; upload the whole directory"));
      }
      if (!absl::EndsWith(s, ".safetensors")) {
        return absl::InvalidArgumentError(absl::StrCat(
            core::kHfIndexFile, ": shard '", s, "' is not a .safetensors file"));
      }
    }
    shards = index->shards;
  } else if (by_path.count(core::kHfSingleFile)) {
    shards = {core::kHfSingleFile};
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "files: a Hugging Face model directory holds ", core::kHfIndexFile, " and its shards, or ",
        core::kHfSingleFile, "; neither is among the ", req.files_size(), " files"));
  }

  v1::Model m;
  m.set_name(req.name());
  m.set_format(v1::HF_DIRECTORY);
  absl::flat_hash_map<std::string, std::string> where;  // tensor -> shard
  absl::flat_hash_map<std::string, std::string> mapped;  // the index's weight_map
  if (index) {
    for (const auto& [t, s] : index->weight_map) mapped.emplace(t, s);
  }
  uint64_t total = 0;
  for (const std::string& s : shards) {
    const v1::ModelFile& f = *by_path.at(s);
    auto reader = core::SafetensorsReader::Open(store.PathOf(f.sha256()));
    if (!reader.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("files: '", s, "' is not a valid safetensors file"));
    }
    v1::ModelFile* out = m.add_files();
    *out = f;
    out->set_role("shard");
    out->set_tensor_count((*reader)->tensors().size());
    for (const core::TensorInfo& t : (*reader)->tensors()) {
      if (auto [it, fresh] = where.emplace(t.name, s); !fresh) {
        return absl::InvalidArgumentError(absl::StrCat(
            "files: tensor '", t.name, "' is in both '", it->second, "' and '", s,
            "'; a tensor name must be unique across the shards"));
      }
      if (index) {
        auto it = mapped.find(t.name);
        if (it == mapped.end() || it->second != s) {
          return absl::InvalidArgumentError(absl::StrCat(
              core::kHfIndexFile, ": tensor '", t.name, "' is in '", s, "' but the index ",
              it == mapped.end() ? "does not list it" : absl::StrCat("maps it to '", it->second, "'")));
        }
      }
      m.set_tensor_count(m.tensor_count() + 1);
      m.set_parameter_count(m.parameter_count() + static_cast<uint64_t>(t.numel()));
      ++(*m.mutable_dtypes())[t.dtype == core::DType::kOther ? t.dtype_name
                                                             : std::string(core::DTypeName(t.dtype))];
    }
  }
  for (const auto& [t, s] : mapped) {
    if (!where.count(t)) {
      return absl::InvalidArgumentError(absl::StrCat(core::kHfIndexFile, ": maps tensor '", t,
                                                     "' to '", s, "', which does not hold it"));
    }
  }
  for (const auto& [path, f] : by_path) {
    total += f->size_bytes();
    if (std::find(shards.begin(), shards.end(), path) != shards.end()) continue;
    v1::ModelFile* out = m.add_files();
    *out = *f;
    out->set_role(path == core::kHfIndexFile ? "index" : "sidecar");
    out->clear_tensor_count();
  }
  m.set_size_bytes(total);
  m.set_sha256(ManifestSha256(m.files()));
  return m;
}

}  // namespace fpxint::server
