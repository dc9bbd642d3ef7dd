// File: server/store.h
//
// The artifact store: content-addressed blobs under <data>/blobs/<aa>/<sha256>, written
// atomically (temp file under <data>/tmp, fsync, rename, fsync of the directory), so a reader
// never sees a half-written blob. Uploads stream into a BlobWriter that hashes while writing and
// enforces the size limit; an upload whose bytes are already stored is deduplicated.
//
// A store only knows bytes. Which blobs are referenced (by models, artifacts, deployments) is the
// journal's business; garbage collection asks the journal.
//
// Thread-safe.
#ifndef FPXINT_SERVER_STORE_H_
#define FPXINT_SERVER_STORE_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/strings/string_view.h"
#include "core/unique_fd.h"

namespace fpxint::server {

// True for 64 lower-case hex digits.
bool IsSha256Hex(absl::string_view s);

class BlobWriter;

class BlobStore {
 public:
  // Creates <root>/blobs and this replica's temp directory <root>/tmp/<replica_id>, emptied of
  // what a crash left there. Other replicas' temp directories (the store may be shared) are left
  // alone. InvalidArgument naming --replica-id for an id CheckReplicaId refuses (validation.h).
  static absl::StatusOr<std::unique_ptr<BlobStore>> Open(const std::string& root,
                                                         const std::string& replica_id = "local");
  // Removes the temp directories (and loose temp files) of every other replica for which
  // `alive(replica_id)` is false: their uploads and job scratch never became visible. Returns
  // how many it removed.
  int RemoveTempOfGoneReplicas(const std::function<bool(const std::string&)>& alive);

  // A streaming writer for one blob of at most `max_bytes` bytes. When `expected_sha256` names a
  // blob the store already holds, the writer only hashes what it is given (nothing reaches the
  // disk) and its Commit checks the bytes against that blob's name: a repeated or resumed upload
  // costs no disk space or writes.
  absl::StatusOr<std::unique_ptr<BlobWriter>> NewWriter(uint64_t max_bytes,
                                                        absl::string_view expected_sha256 = {});
  // Moves a finished file (written by this process under TempDir()) into the store; returns its
  // SHA-256. The file is fsynced first. `known_sha256` is the hash its writer computed over the
  // bytes it wrote (SafetensorsWriter::WriteFile); empty: the file is read back and hashed.
  absl::StatusOr<std::string> ImportFile(const std::string& path,
                                         absl::string_view known_sha256 = {});

  bool Has(absl::string_view sha256) const;
  // Makes a stored blob young again (its mtime now), so that the orphan sweep, which spares
  // blobs younger than its min age, leaves it to the record about to reference it. False when
  // it is not stored.
  bool Refresh(const std::string& sha256);
  std::string PathOf(absl::string_view sha256) const;  // REQUIRES: IsSha256Hex(sha256)
  absl::StatusOr<uint64_t> SizeOf(absl::string_view sha256) const;
  // The blob opened for reading (what handlers use; no path leaves the store). NotFound when it
  // is not in the store.
  absl::StatusOr<core::UniqueFd> OpenRead(absl::string_view sha256) const;
  absl::Status Remove(absl::string_view sha256);

  // Bytes an unprivileged writer can still use on the store's file system.
  absl::StatusOr<uint64_t> FreeBytes() const;
  // Whether any record refers to a blob (the journal answers; Journal::BlobReferenced).
  using ReferencedFn = std::function<absl::StatusOr<bool>(const std::string&)>;
  // Removes the blob unless `referenced` says something uses it or cannot tell. Returns the
  // bytes freed, or nullopt when the blob was kept.
  std::optional<uint64_t> RemoveIfUnreferenced(const std::string& sha256,
                                               const ReferencedFn& referenced);
  // Removes every blob nothing refers to whose file is older than `min_age` (so a blob
  // committed a moment before its record is never taken), and staging marks older than it;
  // a blob with a younger mark stays. Returns the blobs and bytes removed.
  struct Swept {
    uint64_t blobs = 0, bytes = 0;
  };
  Swept SweepOrphans(const ReferencedFn& referenced, absl::Duration min_age);

  // Staging of directory uploads: a file uploaded for a later CommitModelFiles is marked as
  // uploaded by `owner` (<root>/staged/<hash of owner>/<sha256>), and only a model of its
  // uploader may name it by hash, so knowing a file's SHA-256 never gives access to it. A mark
  // lasts until SweepOrphans finds it older than its min_age; the blob it marks is kept as long.
  absl::Status MarkStaged(absl::string_view owner, absl::string_view sha256);
  bool IsStaged(absl::string_view owner, absl::string_view sha256) const;

  // A fresh, empty directory for one job's scratch files (removed by the caller or at Open).
  absl::StatusOr<std::string> NewTempDir(absl::string_view prefix);
  const std::string& root() const { return root_; }
  const std::string& temp_dir() const { return tmp_; }  // <root>/tmp/<replica_id>

 private:
  friend class BlobWriter;
  BlobStore(std::string root, std::string tmp) : root_(std::move(root)), tmp_(std::move(tmp)) {}
  // Renames `tmp` (fsynced) to the blob path of `sha256`, or drops it when the blob exists.
  // Sets *existed accordingly.
  absl::Status Commit(const std::string& tmp, const std::string& sha256, bool* existed);
  std::string NewTempName(absl::string_view prefix);
  std::string StagedPath(absl::string_view owner, absl::string_view sha256) const;

  std::string root_;
  std::string tmp_;  // this replica's temp directory
};

class BlobWriter {
 public:
  ~BlobWriter();  // aborts (removes the temp file) unless committed
  BlobWriter(const BlobWriter&) = delete;
  BlobWriter& operator=(const BlobWriter&) = delete;

  // ResourceExhausted once more than max_bytes were written (the message gives the limit).
  absl::Status Append(absl::string_view bytes);
  uint64_t bytes_written() const { return written_; }  // (or hashed, verifying a stored blob)
  // False when the writer only verifies bytes the store already holds (NewWriter).
  bool writes_to_disk() const { return !tmp_.empty(); }

  struct Result {
    std::string sha256;
    uint64_t size = 0;
    bool deduplicated = false;
  };
  // Finishes the blob. InvalidArgument (nothing stored) when `expected_sha256` is non-empty and
  // differs from the bytes' hash.
  absl::StatusOr<Result> Commit(absl::string_view expected_sha256);

 private:
  friend class BlobStore;
  BlobWriter(BlobStore* store, std::string tmp, int fd, uint64_t max_bytes);
  bool verify_only() const { return tmp_.empty(); }
  struct Hash;
  BlobStore* store_;
  std::string tmp_;
  int fd_;
  uint64_t max_bytes_;
  uint64_t written_ = 0;
  bool done_ = false;
  std::unique_ptr<Hash> hash_;
};

// The size of a file. NotFound / Internal with the path.
absl::StatusOr<uint64_t> FileSize(const std::string& path);
// A whole (small) file: token files, PEM certificates. InvalidArgument naming `flag` when it
// cannot be read.
absl::StatusOr<std::string> ReadTextFile(const std::string& path, absl::string_view flag);

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_STORE_H_
