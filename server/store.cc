// File: server/store.cc
#include "server/store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/statvfs.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/atomic_file.h"
#include "core/sha256.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "server/validation.h"

namespace fpxint::server {
namespace {

namespace fs = std::filesystem;

using core::WriteAll;

}  // namespace

bool IsSha256Hex(absl::string_view s) {
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}


absl::StatusOr<uint64_t> FileSize(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return core::ErrnoToStatus(errno, "cannot stat", path);
  return static_cast<uint64_t>(st.st_size);
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path, absl::string_view flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(flag, ": cannot read '", path, "'"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// ---- BlobStore ----

absl::StatusOr<std::unique_ptr<BlobStore>> BlobStore::Open(const std::string& root,
                                                          const std::string& replica_id) {
  FPX_RETURN_IF_ERROR(CheckReplicaId(replica_id, "--replica-id"));
  const fs::path tmp_root = fs::path(root) / "tmp";
  const fs::path tmp = tmp_root / replica_id;
  std::error_code ec;
  fs::create_directories(fs::path(root) / "blobs", ec);
  if (!ec) fs::create_directories(tmp, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("--data-dir '", root, "': cannot create directories: ", ec.message()));
  }
  // Anything in our own temp directory belongs to a run of ours that died: it never became
  // visible.
  for (const auto& e : fs::directory_iterator(tmp, ec)) fs::remove_all(e.path(), ec);
  return std::unique_ptr<BlobStore>(new BlobStore(root, tmp.string()));
}

int BlobStore::RemoveTempOfGoneReplicas(const std::function<bool(const std::string&)>& alive) {
  int removed = 0;
  std::error_code ec;
  const fs::path own(tmp_);
  for (const auto& e : fs::directory_iterator(own.parent_path(), ec)) {
    if (e.path() == own) continue;
    // A loose file is from the layout before per-replica directories: its server is gone.
    if (e.is_directory(ec) && alive(e.path().filename().string())) continue;
    fs::remove_all(e.path(), ec);
    ++removed;
  }
  return removed;
}

absl::StatusOr<uint64_t> BlobStore::FreeBytes() const {
  struct statvfs v;
  if (::statvfs(root_.c_str(), &v) != 0) return core::ErrnoToStatus(errno, "statvfs", root_);
  return static_cast<uint64_t>(v.f_bavail) * v.f_frsize;
}

std::optional<uint64_t> BlobStore::RemoveIfUnreferenced(const std::string& sha256,
                                                        const ReferencedFn& referenced) {
  absl::StatusOr<bool> used = referenced(sha256);
  if (!used.ok() || *used) return std::nullopt;
  const absl::StatusOr<uint64_t> size = SizeOf(sha256);
  if (!Remove(sha256).ok()) return std::nullopt;
  return size.ok() ? *size : 0;
}

std::string BlobStore::StagedPath(absl::string_view owner, absl::string_view sha256) const {
  const std::string who = core::Sha256Hex(
      absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(owner.data()), owner.size()));
  return (fs::path(root_) / "staged" / who.substr(0, 32) / std::string(sha256)).string();
}

absl::Status BlobStore::MarkStaged(absl::string_view owner, absl::string_view sha256) {
  if (!IsSha256Hex(sha256)) return absl::InvalidArgumentError("not a SHA-256");
  const std::string path = StagedPath(owner, sha256);
  std::error_code ec;
  fs::create_directories(fs::path(path).parent_path(), ec);
  core::UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
  if (fd.get() < 0 || ::futimens(fd.get(), nullptr) != 0) {
    return core::ErrnoToStatus(errno, "cannot mark staged", path);
  }
  return absl::OkStatus();
}

bool BlobStore::IsStaged(absl::string_view owner, absl::string_view sha256) const {
  if (!IsSha256Hex(sha256)) return false;
  struct stat st {};
  return ::stat(StagedPath(owner, sha256).c_str(), &st) == 0;
}

BlobStore::Swept BlobStore::SweepOrphans(const ReferencedFn& referenced, absl::Duration min_age) {
  Swept out;
  std::error_code ec;
  const auto now = fs::file_time_type::clock::now();
  absl::flat_hash_set<std::string> staged;  // marked within min_age: kept
  for (const auto& who : fs::directory_iterator(fs::path(root_) / "staged", ec)) {
    for (const auto& f : fs::directory_iterator(who.path(), ec)) {
      const auto mtime = f.last_write_time(ec);
      if (!ec && now - mtime < absl::ToChronoNanoseconds(min_age)) {
        staged.insert(f.path().filename().string());
      } else {
        fs::remove(f.path(), ec);
      }
    }
    fs::remove(who.path(), ec);  // only when empty
  }
  ec.clear();
  for (const auto& dir : fs::directory_iterator(fs::path(root_) / "blobs", ec)) {
    if (!dir.is_directory(ec)) continue;
    for (const auto& f : fs::directory_iterator(dir.path(), ec)) {
      const std::string sha = f.path().filename().string();
      if (!IsSha256Hex(sha) || !f.is_regular_file(ec)) continue;
      const auto mtime = f.last_write_time(ec);
      if (ec || now - mtime < absl::ToChronoNanoseconds(min_age) || staged.contains(sha)) continue;
      if (std::optional<uint64_t> freed = RemoveIfUnreferenced(sha, referenced)) {
        ++out.blobs;
        out.bytes += *freed;
      }
    }
  }
  return out;
}

std::string BlobStore::NewTempName(absl::string_view prefix) {
  return (fs::path(tmp_) / absl::StrCat(prefix, "-", core::UniqueSuffix())).string();
}

absl::StatusOr<std::unique_ptr<BlobWriter>> BlobStore::NewWriter(uint64_t max_bytes,
                                                                  absl::string_view expected_sha256) {
  if (!expected_sha256.empty() && Has(expected_sha256)) {
    return std::unique_ptr<BlobWriter>(new BlobWriter(this, "", -1, max_bytes));
  }
  std::string tmp = NewTempName("upload");
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0 && errno == ENOENT) {
    // Another replica took this one for gone (a pause longer than twice the lease) and removed
    // its temp directory: make it again.
    std::error_code ec;
    fs::create_directories(tmp_, ec);
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  }
  if (fd < 0) return core::ErrnoToStatus(errno, "cannot create", tmp);
  return std::unique_ptr<BlobWriter>(new BlobWriter(this, tmp, fd, max_bytes));
}

std::string BlobStore::PathOf(absl::string_view sha256) const {
  return (fs::path(root_) / "blobs" / std::string(sha256.substr(0, 2)) / std::string(sha256))
      .string();
}

bool BlobStore::Has(absl::string_view sha256) const {
  if (!IsSha256Hex(sha256)) return false;
  struct stat st;
  return ::stat(PathOf(sha256).c_str(), &st) == 0;
}

absl::StatusOr<uint64_t> BlobStore::SizeOf(absl::string_view sha256) const {
  if (!IsSha256Hex(sha256)) return absl::InvalidArgumentError("not a SHA-256 hex digest");
  struct stat st;
  if (::stat(PathOf(sha256).c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat("blob ", sha256, " is not in the store"));
  }
  return static_cast<uint64_t>(st.st_size);
}

absl::StatusOr<core::UniqueFd> BlobStore::OpenRead(absl::string_view sha256) const {
  if (!IsSha256Hex(sha256)) return absl::InvalidArgumentError("not a SHA-256 hex digest");
  core::UniqueFd fd(::open(PathOf(sha256).c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    if (errno == ENOENT) {
      return absl::NotFoundError(absl::StrCat("blob ", sha256, " is not in the store"));
    }
    return core::ErrnoToStatus(errno, "cannot open blob", std::string(sha256));
  }
  return fd;
}

absl::Status BlobStore::Remove(absl::string_view sha256) {
  if (!IsSha256Hex(sha256)) return absl::InvalidArgumentError("not a SHA-256 hex digest");
  const std::string p = PathOf(sha256);
  if (::unlink(p.c_str()) != 0 && errno != ENOENT)
    return core::ErrnoToStatus(errno, "cannot remove", p);
  return absl::OkStatus();
}

bool BlobStore::Refresh(const std::string& sha256) {
  return ::utimensat(AT_FDCWD, PathOf(sha256).c_str(), nullptr, 0) == 0;
}

absl::Status BlobStore::Commit(const std::string& tmp, const std::string& sha256, bool* existed) {
  const std::string dst = PathOf(sha256);
  *existed = Has(sha256);
  if (*existed) {
    ::unlink(tmp.c_str());
    Refresh(sha256);
    return absl::OkStatus();
  }
  const std::string dir = fs::path(dst).parent_path().string();
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create '", dir, "': ", ec.message()));
  if (::rename(tmp.c_str(), dst.c_str()) != 0)
    return core::ErrnoToStatus(errno, "cannot rename to", dst);
  return core::SyncDir(dir);
}

absl::StatusOr<std::string> BlobStore::ImportFile(const std::string& path,
                                                  absl::string_view known_sha256) {
  FPX_RETURN_IF_ERROR(core::SyncFile(path));
  absl::StatusOr<std::string> sha = std::string(known_sha256);
  if (known_sha256.empty()) {
    sha = core::Sha256File(path);
    if (!sha.ok()) return sha.status();
  } else if (!IsSha256Hex(*sha)) {
    return absl::InternalError(absl::StrCat("importing '", path, "': '", known_sha256,
                                            "' is not a SHA-256 hex digest"));
  }
  bool existed = false;
  absl::Status s = Commit(path, *sha, &existed);
  if (!s.ok()) return s;
  return *sha;
}

absl::StatusOr<std::string> BlobStore::NewTempDir(absl::string_view prefix) {
  std::string dir = NewTempName(prefix);
  std::error_code ec;
  if (!fs::create_directories(dir, ec)) {
    return absl::InternalError(absl::StrCat("cannot create '", dir, "': ", ec.message()));
  }
  return dir;
}

// ---- BlobWriter ----

struct BlobWriter::Hash : core::Sha256 {};

BlobWriter::BlobWriter(BlobStore* store, std::string tmp, int fd, uint64_t max_bytes)
    : store_(store),
      tmp_(std::move(tmp)),
      fd_(fd),
      max_bytes_(max_bytes),
      hash_(std::make_unique<Hash>()) {}

BlobWriter::~BlobWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!done_ && !verify_only()) ::unlink(tmp_.c_str());
}

absl::Status BlobWriter::Append(absl::string_view bytes) {
  if (done_ || (fd_ < 0 && !verify_only())) {
    return absl::FailedPreconditionError("blob writer already finished");
  }
  if (written_ + bytes.size() > max_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat("upload exceeds the server's limit of ",
                                                     max_bytes_, " bytes (--max-upload-bytes)"));
  }
  hash_->Update(bytes);
  absl::Status s =
      verify_only() ? absl::OkStatus() : WriteAll(fd_, bytes.data(), bytes.size(), tmp_);
  if (s.ok()) written_ += bytes.size();
  return s;
}

absl::StatusOr<BlobWriter::Result> BlobWriter::Commit(absl::string_view expected_sha256) {
  if (done_ || (fd_ < 0 && !verify_only())) {
    return absl::FailedPreconditionError("blob writer already finished");
  }
  Result r;
  r.sha256 = hash_->HexDigest();
  r.size = written_;
  if (!expected_sha256.empty() && expected_sha256 != r.sha256) {
    return absl::InvalidArgumentError(absl::StrCat("header.sha256: the uploaded ", written_,
                                                   " bytes hash to ", r.sha256, ", not ",
                                                   expected_sha256, "; nothing was stored"));
  }
  if (verify_only()) {  // the bytes are a blob the store holds (checked again: it may have gone)
    done_ = true;
    if (!store_->Refresh(r.sha256)) {
      return absl::UnavailableError(
          "the stored copy of these bytes was removed while they streamed; upload them again");
    }
    r.deduplicated = true;
    return r;
  }
  if (::fsync(fd_) != 0) return core::ErrnoToStatus(errno, "cannot fsync", tmp_);
  ::close(fd_);
  fd_ = -1;
  absl::Status s = store_->Commit(tmp_, r.sha256, &r.deduplicated);
  if (!s.ok()) return s;
  done_ = true;
  return r;
}

}  // namespace fpxint::server
