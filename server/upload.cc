#include "server/upload.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "core/hf_checkpoint.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "core/torch_state_dict.h"
#include "core/unique_fd.h"

namespace fpxint::server {

UploadAssembler::UploadAssembler(BlobStore* store, UploadPolicy policy, bool is_admin)
    : store_(store), policy_(policy), is_admin_(is_admin) {}

UploadAssembler::~UploadAssembler() = default;

uint64_t UploadAssembler::bytes() const { return writer_ ? writer_->bytes_written() : 0; }

absl::Status UploadAssembler::Add(const v1::UploadChunk& chunk) {
  const int index = index_++;
  if (index == 0) {
    if (!chunk.has_header()) {
      return absl::InvalidArgumentError("the first message must carry `header`");
    }
    header_ = chunk.header();
    if (absl::Status s = CheckUploadHeader(header_, policy_, is_admin_); !s.ok()) return s;
    if (absl::Status s = CheckQuota(header_.size_bytes()); !s.ok()) return s;
    // Bytes the store already holds (a repeated or resumed upload) are only verified.
    auto w = store_->NewWriter(policy_.max_upload_bytes, header_.sha256());
    if (!w.ok()) return w.status();
    writer_ = std::move(*w);
    if (writer_->writes_to_disk()) {
      if (absl::Status s = CheckFreeSpace(header_.size_bytes()); !s.ok()) {
        writer_.reset();
        return s;
      }
    }
    return absl::OkStatus();
  }
  if (chunk.has_header()) {
    return absl::InvalidArgumentError(
        absl::StrCat("message ", index, ": `header` is allowed in the first message only"));
  }
  const uint64_t before = writer_->bytes_written();
  if (absl::Status s = CheckQuota(before + chunk.data().size()); !s.ok()) return s;
  if (absl::Status s = writer_->Append(chunk.data()); !s.ok()) return s;
  constexpr uint64_t kCheckEvery = 16 << 20;
  if (policy_.min_free_bytes > 0 && writer_->writes_to_disk() &&
      before / kCheckEvery != writer_->bytes_written() / kCheckEvery) {
    return CheckFreeSpace(0);
  }
  return absl::OkStatus();
}

absl::Status UploadAssembler::CheckQuota(uint64_t upload_bytes) const {
  if (policy_.quota_bytes == 0 || policy_.quota_used + upload_bytes <= policy_.quota_bytes) {
    return absl::OkStatus();
  }
  return absl::ResourceExhaustedError(absl::StrCat(
      "this caller's uploads hold ", policy_.quota_used, " bytes and this one ",
      upload_bytes, " more; the quota per caller is ", policy_.quota_bytes,
      " bytes (--upload-quota-bytes): delete models (DeleteModel) or ask the operator"));
}

absl::Status UploadAssembler::CheckFreeSpace(uint64_t still_to_write) const {
  if (policy_.min_free_bytes == 0) return absl::OkStatus();
  absl::StatusOr<uint64_t> free = store_->FreeBytes();
  if (!free.ok()) return free.status();
  if (*free < policy_.min_free_bytes + still_to_write) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the server's data directory has ", *free, " bytes free",
        still_to_write ? absl::StrCat(" and this upload declares ", still_to_write) : "",
        "; it keeps at least ", policy_.min_free_bytes,
        " free (--min-free-bytes): delete models or ask the operator for space"));
  }
  return absl::OkStatus();
}

absl::StatusOr<BlobWriter::Result> UploadAssembler::Finish(
    const std::function<void(const std::string&)>& drop_unreferenced) {
  if (!writer_) {
    return absl::InvalidArgumentError(
        "the upload stream was empty; the first message must carry `header`");
  }
  const uint64_t got = writer_->bytes_written();
  if (header_.size_bytes() != 0 && got != header_.size_bytes()) {
    return absl::InvalidArgumentError(
        absl::StrCat("data: received ", got, " bytes, header.size_bytes says ", header_.size_bytes(),
                     " (truncated upload?); nothing was stored"));
  }
  auto blob = writer_->Commit(header_.sha256());
  if (!blob.ok()) return blob.status();
  absl::StatusOr<UploadContent> content =
      CheckUploadContent(store_->PathOf(blob->sha256), header_.format(), header_.file_path());
  if (!content.ok()) {
    if (!blob->deduplicated) drop_unreferenced(blob->sha256);
    return content.status();
  }
  content_ = *std::move(content);
  return blob;
}

// The uploaded bytes must be what the header says they are.
absl::StatusOr<UploadContent> CheckUploadContent(const std::string& path,
                                                 v1::ModelFormat format,
                                                 const std::string& file_path) {
  // The readers name the file; the client must not learn the server's paths.
  auto hide_path = [&](const absl::Status& s) {
    return absl::StrReplaceAll(s.message(), {{path + ": ", ""}, {path, "the upload"}});
  };
  if (format == v1::HF_DIRECTORY) {
    // A directory's shards are checked as safetensors files, its index as an index; sidecars
    // (config, tokenizer) are kept as bytes.
    if (absl::EndsWith(file_path, ".safetensors")) {
      return CheckUploadContent(path, v1::SAFETENSORS, "");
    }
    if (file_path == core::kHfIndexFile) {
      absl::StatusOr<std::string> text = ReadSmallFile(path, core::HfIndexLimits{}.max_bytes);
      if (!text.ok()) return absl::InvalidArgumentError(absl::StrCat("data: ", hide_path(text.status())));
      if (absl::StatusOr<core::HfIndex> idx = core::ParseHfIndex(*text); !idx.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("data: ", idx.status().message()));
      }
    }
    return UploadContent{};
  }
  if (format == v1::SAFETENSORS) {
    auto r = core::SafetensorsReader::Open(path);
    if (!r.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("data: not a valid safetensors file: ", hide_path(r.status())));
    }
    UploadContent c;
    for (const core::TensorInfo& t : (*r)->tensors()) {
      ++c.tensors;
      c.parameters += static_cast<uint64_t>(t.numel());
      ++c.dtypes[t.dtype == core::DType::kOther ? t.dtype_name
                                                : std::string(core::DTypeName(t.dtype))];
    }
    return c;
  }
  if (format == v1::TORCH_STATE_DICT) {
    auto r = core::TorchStateDict::Open(path);
    if (!r.ok()) return absl::InvalidArgumentError(absl::StrCat("data: ", hide_path(r.status())));
    UploadContent c;
    for (const core::StateDictTensor& t : (*r)->tensors()) {
      ++c.tensors;
      c.parameters += static_cast<uint64_t>(t.numel());
      ++c.dtypes[std::string(core::DTypeName(t.dtype))];
    }
    return c;
  }
  char magic[4] = {0};
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  const bool ok = fd >= 0 && ::read(fd, magic, 4) == 4 && magic[0] == 'P' && magic[1] == 'K' &&
                  magic[2] == 3 && magic[3] == 4;
  if (fd >= 0) ::close(fd);
  if (!ok) {
    return absl::InvalidArgumentError(
        "data: not a TorchScript archive (a zip file written by torch.jit.save)");
  }
  return UploadContent{};
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path, uint64_t max_bytes) {
  core::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  struct stat st {};
  if (fd.get() < 0 || ::fstat(fd.get(), &st) != 0) {
    return core::ErrnoToStatus(errno, "cannot read", path);
  }
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat(path, ": ", st.st_size, " bytes; at most ", max_bytes, " are read"));
  }
  std::string out(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < out.size()) {
    const ssize_t n = ::pread(fd.get(), out.data() + got, out.size() - got, static_cast<off_t>(got));
    if (n <= 0) return core::ErrnoToStatus(n < 0 ? errno : EIO, "cannot read", path);
    got += static_cast<size_t>(n);
  }
  return out;
}

}  // namespace fpxint::server
