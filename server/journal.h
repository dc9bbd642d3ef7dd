// File: server/journal.h
//
// The job/model journal: an embedded SQLite database in WAL mode next to the artifact store.
// Records are the API's own protobuf messages, stored serialized, with the columns needed for
// lookups and paging. Every write is one transaction, so a crash (even kill -9) leaves either the
// old or the new record, never a mix.
//
// The interface is small so that a shared database (PostgreSQL) can replace SQLite when several
// replicas share one store (docs/ARCHITECTURE.md "Scaling out").
//
// Thread-safe (one connection behind a mutex).
#ifndef FPXINT_SERVER_JOURNAL_H_
#define FPXINT_SERVER_JOURNAL_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "fpxint/v1/quantizer.pb.h"
#include "fpxint/v1/server_state.pb.h"

struct sqlite3;

namespace fpxint::server {

// What fpxint-vet decided about an uploaded TorchScript archive (server/vetting.h).
struct TorchScriptVerdict {
  bool passed = false;
  std::string summary;  // what passed, or which operations were refused and where
};

class Journal {
 public:
  static absl::StatusOr<std::unique_ptr<Journal>> Open(const std::string& path);
  ~Journal();
  Journal(const Journal&) = delete;
  Journal& operator=(const Journal&) = delete;

  // Models, keyed by name.
  absl::Status PutModel(const v1::Model& m);
  absl::StatusOr<std::optional<v1::Model>> GetModel(const std::string& name);
  absl::StatusOr<std::vector<v1::Model>> ListModels();
  // The bytes of every model whose owner is `owner` (upload quotas).
  absl::StatusOr<uint64_t> UploadedBytesBy(const std::string& owner);
  absl::Status DeleteModel(const std::string& name);

  // Jobs, keyed by job_id; the artifacts of a job are indexed by artifact_id too.
  absl::Status PutJob(const v1::Job& job);
  absl::StatusOr<std::optional<v1::Job>> GetJob(const std::string& job_id);
  absl::StatusOr<std::optional<v1::Job>> FindJobByIdempotencyKey(const std::string& key);
  // Newest first. `before_seq` = 0 starts at the newest; *next_seq is 0 on the last page.
  absl::StatusOr<std::vector<v1::Job>> ListJobs(v1::JobState state, int64_t before_seq, int limit,
                                                int64_t* next_seq);
  // Oldest first: for recovery after a restart.
  absl::StatusOr<std::vector<v1::Job>> JobsInStates(const std::vector<v1::JobState>& states);
  // Removes the job and its artifact records in one transaction (not its blobs).
  absl::Status DeleteJob(const std::string& job_id);
  // Whether a QUEUED or RUNNING job uses the model.
  absl::StatusOr<bool> ModelInUse(const std::string& model);
  absl::StatusOr<std::optional<v1::Artifact>> GetArtifact(const std::string& artifact_id);
  // Whether any model, artifact or deployment references the blob.
  absl::StatusOr<bool> BlobReferenced(const std::string& sha256);

  // Deployments, keyed by (name, version).
  absl::Status PutDeployment(const v1::Deployment& d);
  absl::StatusOr<std::vector<v1::Deployment>> ListDeployments();
  absl::Status DeleteDeployment(const std::string& name, const std::string& version);

  // TorchScript verdicts, keyed by (blob SHA-256, allow-list digest): a verdict holds for the
  // list it was made against.
  absl::Status PutVerdict(const std::string& sha256, const std::string& allow_list,
                          const TorchScriptVerdict& v);
  absl::StatusOr<std::optional<TorchScriptVerdict>> GetVerdict(const std::string& sha256,
                                                               const std::string& allow_list);

 private:
  explicit Journal(sqlite3* db) : db_(db) {}
  absl::Status Exec(const char* sql) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Mutex mu_;
  sqlite3* db_ ABSL_GUARDED_BY(mu_);
};

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_JOURNAL_H_
