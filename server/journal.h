// File: server/journal.h
//
// The job/model journal: models, jobs, artifacts, deployments and TorchScript verdicts. Records
// are the API's own protobuf messages, stored serialized, with the columns needed for lookups and
// paging. Every write is one transaction, so a crash (even kill -9) leaves either the old or the
// new record, never a mix.
//
// Two backends behind one interface, checked by one conformance suite (server/journal_test.cc):
//   - SQLite (server/journal_sqlite.cc), the embedded default: one file in WAL mode next to the
//     artifact store, for a single replica;
//   - PostgreSQL (server/journal_postgres.cc, libpq), selected by a postgresql:// URL, shared by
//     every replica of a scaled-out deployment (docs/ARCHITECTURE.md "Scaling out").
//
// Thread-safe.
#ifndef FPXINT_SERVER_JOURNAL_H_
#define FPXINT_SERVER_JOURNAL_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "fpxint/v1/quantizer.pb.h"
#include "fpxint/v1/server_state.pb.h"

namespace fpxint::server {

// What fpxint-vet decided about an uploaded TorchScript archive (server/vetting.h).
struct TorchScriptVerdict {
  bool passed = false;
  std::string summary;  // what passed, or which operations were refused and where
};

class Journal {
 public:
  // `where`: a libpq URI (postgresql://... or postgres://...) selects PostgreSQL; anything else is
  // the path of a SQLite file, created when missing. Creates or migrates the schema.
  static absl::StatusOr<std::unique_ptr<Journal>> Open(const std::string& where);
  static bool IsDatabaseUrl(const std::string& where);

  virtual ~Journal() = default;
  // "sqlite" or "postgresql".
  virtual const char* backend() const = 0;

  // Makes this journal the only server on its store while it lives: false when another process
  // already holds it. The job manager recovers RUNNING jobs at start as its own, so one server
  // per store. SQLite: an exclusive lock on <file>.lock; PostgreSQL: a session advisory lock,
  // released with the connection (a crashed server's is released by the database).
  virtual absl::StatusOr<bool> LockExclusive() = 0;

  // Models, keyed by name.
  virtual absl::Status PutModel(const v1::Model& m) = 0;
  virtual absl::StatusOr<std::optional<v1::Model>> GetModel(const std::string& name) = 0;
  virtual absl::StatusOr<std::vector<v1::Model>> ListModels() = 0;
  // The bytes of every model whose owner is `owner` (upload quotas).
  absl::StatusOr<uint64_t> UploadedBytesBy(const std::string& owner);
  virtual absl::Status DeleteModel(const std::string& name) = 0;

  // Jobs, keyed by job_id; the artifacts of a job are indexed by artifact_id too.
  virtual absl::Status PutJob(const v1::Job& job) = 0;
  virtual absl::StatusOr<std::optional<v1::Job>> GetJob(const std::string& job_id) = 0;
  virtual absl::StatusOr<std::optional<v1::Job>> FindJobByIdempotencyKey(
      const std::string& key) = 0;
  // Newest first. `before_seq` = 0 starts at the newest; *next_seq is 0 on the last page.
  virtual absl::StatusOr<std::vector<v1::Job>> ListJobs(v1::JobState state, int64_t before_seq,
                                                        int limit, int64_t* next_seq) = 0;
  // Oldest first: for recovery after a restart.
  virtual absl::StatusOr<std::vector<v1::Job>> JobsInStates(
      const std::vector<v1::JobState>& states) = 0;
  // Removes the job and its artifact records in one transaction (not its blobs).
  virtual absl::Status DeleteJob(const std::string& job_id) = 0;
  // Whether a QUEUED or RUNNING job uses the model.
  virtual absl::StatusOr<bool> ModelInUse(const std::string& model) = 0;
  virtual absl::StatusOr<std::optional<v1::Artifact>> GetArtifact(
      const std::string& artifact_id) = 0;
  // Whether any model, artifact or deployment references the blob.
  virtual absl::StatusOr<bool> BlobReferenced(const std::string& sha256) = 0;

  // Deployments, keyed by (name, version); listed by name, then numeric version.
  virtual absl::Status PutDeployment(const v1::Deployment& d) = 0;
  virtual absl::StatusOr<std::vector<v1::Deployment>> ListDeployments() = 0;
  virtual absl::Status DeleteDeployment(const std::string& name, const std::string& version) = 0;

  // TorchScript verdicts, keyed by (blob SHA-256, allow-list digest): a verdict holds for the
  // list it was made against.
  virtual absl::Status PutVerdict(const std::string& sha256, const std::string& allow_list,
                                  const TorchScriptVerdict& v) = 0;
  virtual absl::StatusOr<std::optional<TorchScriptVerdict>> GetVerdict(
      const std::string& sha256, const std::string& allow_list) = 0;
};

// The backends (Journal::Open chooses).
absl::StatusOr<std::unique_ptr<Journal>> OpenSqliteJournal(const std::string& path);
absl::StatusOr<std::unique_ptr<Journal>> OpenPostgresJournal(const std::string& url);

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_JOURNAL_H_
