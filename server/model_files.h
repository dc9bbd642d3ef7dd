// File: server/model_files.h
//
// Directory models (HF_DIRECTORY): a Hugging Face checkpoint uploaded file by file and recorded
// as one model by CommitModelFiles. This checks a manifest against the store and builds the
// model's record: every file uploaded by the caller and stored with the declared size, an index
// (model.safetensors.index.json) whose every shard is among the files, or one model.safetensors,
// each shard a valid safetensors file, every tensor name in one shard only and in the shard the
// index names. No gRPC calls: the service and the tests run this same code.
#ifndef FPXINT_SERVER_MODEL_FILES_H_
#define FPXINT_SERVER_MODEL_FILES_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "fpxint/v1/quantizer.pb.h"
#include "server/store.h"

namespace fpxint::server {

inline constexpr int kMaxModelFiles = 4096;

// Checks the request's shape (name, count, each path and SHA-256, no path twice) and returns the
// paths whose bytes `owner` has not staged or the store no longer holds. InvalidArgument names
// the field at fault.
absl::StatusOr<std::vector<std::string>> MissingModelFiles(const v1::CommitModelFilesRequest& req,
                                                           const std::string& owner,
                                                           const BlobStore& store);

// The record of a directory model whose files are all stored (MissingModelFiles returned none):
// files with their roles (shards first, in the index's order), tensor and parameter counts and
// dtypes over every shard, sha256 of the manifest, size_bytes the total. InvalidArgument names
// the file or tensor at fault.
absl::StatusOr<v1::Model> BuildDirectoryModel(const v1::CommitModelFilesRequest& req,
                                              const BlobStore& store);

// The SHA-256 that names a directory model: of its manifest, one "path\tsha256\tsize\n" line per
// file sorted by path.
std::string ManifestSha256(const google::protobuf::RepeatedPtrField<v1::ModelFile>& files);

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_MODEL_FILES_H_
