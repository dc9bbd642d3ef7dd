// File: server/upload.h
//
// Assembles an UploadModel stream into a stored blob: the header is validated first, data is
// streamed to a temp file under the size limit with a running SHA-256, and on Finish the hash is
// checked, the blob committed (atomic rename, deduplicated), and the content checked against the
// declared format (a safetensors header is parsed with every bound checked). Nothing half-written
// is ever visible. No gRPC calls and no LibTorch: the service and the fuzzer run this same code.
#ifndef FPXINT_SERVER_UPLOAD_H_
#define FPXINT_SERVER_UPLOAD_H_

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "fpxint/v1/quantizer.pb.h"
#include "server/store.h"
#include "server/validation.h"

namespace fpxint::server {

// What a weights upload holds (Model.tensor_count, parameter_count, dtypes); empty for
// TorchScript.
struct UploadContent {
  uint64_t tensors = 0;
  uint64_t parameters = 0;
  std::map<std::string, uint64_t> dtypes;  // tensors per dtype name
};

class UploadAssembler {
 public:
  UploadAssembler(BlobStore* store, UploadPolicy policy, bool is_admin);
  ~UploadAssembler();

  // Feeds the next message of the stream (the first must carry the header, later ones data).
  absl::Status Add(const v1::UploadChunk& chunk);
  // After the last message. `drop_unreferenced(sha)` removes a freshly stored blob that turned
  // out invalid (the caller knows whether anything else references it).
  absl::StatusOr<BlobWriter::Result> Finish(
      const std::function<void(const std::string&)>& drop_unreferenced);

  const v1::UploadHeader& header() const { return header_; }
  // After a successful Finish: what the file holds.
  const UploadContent& content() const { return content_; }
  // ResourceExhausted with both figures when writing `still_to_write` more bytes would leave
  // less than policy.min_free_bytes free.
  absl::Status CheckFreeSpace(uint64_t still_to_write) const;
  // ResourceExhausted with the figures when an upload of `upload_bytes` would take the caller
  // past policy.quota_bytes.
  absl::Status CheckQuota(uint64_t upload_bytes) const;
  uint64_t bytes() const;

 private:
  BlobStore* store_;
  UploadPolicy policy_;
  bool is_admin_;
  int index_ = 0;
  v1::UploadHeader header_;
  std::unique_ptr<BlobWriter> writer_;
  UploadContent content_;
};

// The stored bytes must be what the header says they are (safetensors parses; TorchScript is a
// zip archive; an HF_DIRECTORY file by its `file_path`: a .safetensors shard parses, the index
// parses as one). Returns what a weights file holds.
absl::StatusOr<UploadContent> CheckUploadContent(const std::string& path,
                                                 v1::ModelFormat format,
                                                 const std::string& file_path = "");
// A file of at most `max_bytes` bytes, read whole. ResourceExhausted above it.
absl::StatusOr<std::string> ReadSmallFile(const std::string& path, uint64_t max_bytes);

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_UPLOAD_H_
