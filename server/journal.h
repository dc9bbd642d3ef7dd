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
//     every replica of a scaled-out deployment (docs/SCALING.md).
//
// Thread-safe.
#ifndef FPXINT_SERVER_JOURNAL_H_
#define FPXINT_SERVER_JOURNAL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "fpxint/v1/quantizer.pb.h"
#include "fpxint/v1/server_state.pb.h"

namespace fpxint::server {

// What fpxint-vet decided about an uploaded TorchScript archive (server/vetting.h).
struct TorchScriptVerdict {
  bool passed = false;
  std::string summary;  // what passed, or which operations were refused and where
};

// The journal's schema version, kept in its schema_version table. Each server migrates older
// journals to it at start (under a lock, so replicas starting together migrate once) and refuses
// a journal whose version is newer: 1 the first tables, 2 job leases and replica heartbeats, 3
// the files of directory models (model_files, which BlobReferenced counts), 4 shard tasks (the
// jobs column `parent`).
inline constexpr int64_t kJournalSchemaVersion = 4;
// FailedPrecondition for a journal written by a newer server.
absl::Status CheckJournalSchemaVersion(int64_t found, const std::string& where);

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
  // already holds it. The SQLite journal is for one server: it takes every RUNNING job it finds
  // at start as its own run that died. SQLite: an exclusive lock on <file>.lock; PostgreSQL (for
  // tests and single-server tools; replicas do not call it): a session advisory lock, released
  // with the connection (a crashed server's is released by the database).
  virtual absl::StatusOr<bool> LockExclusive() = 0;
  // Whether a server holds the journal through LockExclusive now (PostgreSQL: a server of a
  // version before replicas, which runs jobs unfenced); replicas refuse to start beside it.
  virtual absl::StatusOr<bool> HeldExclusively() = 0;

  // Models, keyed by name. A directory model's files (Model.files) are kept with it, one
  // transaction, and their blobs count as referenced while the model exists.
  virtual absl::Status PutModel(const v1::Model& m) = 0;
  virtual absl::StatusOr<std::optional<v1::Model>> GetModel(const std::string& name) = 0;
  virtual absl::StatusOr<std::vector<v1::Model>> ListModels() = 0;
  // The bytes of every model whose owner is `owner` (upload quotas).
  absl::StatusOr<uint64_t> UploadedBytesBy(const std::string& owner);
  virtual absl::Status DeleteModel(const std::string& name) = 0;

  // Jobs, keyed by job_id; the artifacts of a job are indexed by artifact_id too. A shard task
  // (a job whose Job.parent_job_id names the job it is part of) is a job like any other, except
  // that ListJobs and CountJobs leave it out: they see the jobs users submitted.
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
  virtual absl::StatusOr<int64_t> CountJobs(v1::JobState state) = 0;

  // ---- The job queue, shared by every replica on the journal ----
  //
  // QUEUED jobs are claimed oldest first. A RUNNING job is leased: its runner (lease owner)
  // runs attempt Job.attempts until the lease expires, and renews it while it works. Every write
  // the runner makes is fenced on (owner, attempt, RUNNING): once the lease is lost (it expired
  // and was reaped, or the job was taken over) the runner's writes are refused, so a replica
  // that wakes from a long pause cannot overwrite the job. Lease times come from the journal's
  // clock (the database server's for PostgreSQL), never from a replica's.
  //
  // The callbacks below edit a record inside the journal's transaction; they must not call the
  // journal.

  // Inserts a new job. AlreadyExists when its job_id or idempotency key is taken (by any
  // replica): the caller looks the key up again.
  virtual absl::Status InsertJob(const v1::Job& job) = 0;
  // Takes the oldest QUEUED job (a submitted job or a shard task) for `owner`. `start` turns its
  // record into the RUNNING one (state, attempts + 1, replica); the lease lasts `lease`.
  // Concurrent claims, from any replica, never take the same job. nullopt when nothing is queued.
  virtual absl::StatusOr<std::optional<v1::Job>> ClaimJob(
      const std::string& owner, absl::Duration lease,
      const std::function<void(v1::Job*)>& start) = 0;
  // Like ClaimJob, among the QUEUED shard tasks of `parent_job_id` only.
  virtual absl::StatusOr<std::optional<v1::Job>> ClaimTask(
      const std::string& parent_job_id, const std::string& owner, absl::Duration lease,
      const std::function<void(v1::Job*)>& start) = 0;
  // The shard tasks of a job, in the order they were inserted.
  virtual absl::StatusOr<std::vector<v1::Job>> TasksOf(const std::string& parent_job_id) = 0;
  struct LeaseCheck {
    bool held = false;              // false: the lease is lost; stop and write nothing more
    bool cancel_requested = false;  // CancelJob asked for it (possibly on another replica)
  };
  // Writes the running job's record (its progress) and extends the lease by `lease`, if `owner`
  // still holds attempt job.attempts().
  virtual absl::StatusOr<LeaseCheck> RenewLease(const v1::Job& job, const std::string& owner,
                                                absl::Duration lease) = 0;
  // The runner's last write, fenced like RenewLease: the job's new state with its artifact
  // records, in one transaction. false: refused (the lease was lost; nothing was written).
  virtual absl::StatusOr<bool> FinishLeased(const v1::Job& job, const std::string& owner) = 0;
  // Takes back RUNNING jobs whose runner is gone. With `take_mine` (at start): those whose lease
  // expired and every one leased by `owner` (this replica in an earlier life, same
  // --replica-id). Without (while running): those whose lease expired, except `owner`'s own,
  // which it renews when it can. With `all`: every RUNNING job (a journal held by one server
  // alone: whatever RUNNING it finds is from a run that died). `decide` makes each record
  // QUEUED, FAILED or (when a cancel was asked for it) CANCELLED; they are written and returned.
  virtual absl::StatusOr<std::vector<v1::Job>> ReapLeases(
      bool all, const std::string& owner, bool take_mine,
      const std::function<void(v1::Job*, bool cancel_requested)>& decide) = 0;
  // Cancels a job from any replica. QUEUED: `cancel_queued` makes the record CANCELLED and it is
  // written (a claim cannot take it meanwhile). RUNNING: the runner is asked to stop (its next
  // RenewLease says cancel_requested). Returns the record as it is now; nullopt: no such job.
  virtual absl::StatusOr<std::optional<v1::Job>> CancelJob(
      const std::string& job_id, const std::function<void(v1::Job*)>& cancel_queued) = 0;

  // ---- Replicas ----
  // Records that `replica` is alive now (every replica calls it while it runs).
  virtual absl::Status ReplicaHeartbeat(const std::string& replica) = 0;
  // Replicas heard from within `within` (by the journal's clock).
  virtual absl::StatusOr<std::vector<std::string>> LiveReplicas(absl::Duration within) = 0;
  // Whether a QUEUED or RUNNING job uses the model.
  virtual absl::StatusOr<bool> ModelInUse(const std::string& model) = 0;
  virtual absl::StatusOr<std::optional<v1::Artifact>> GetArtifact(
      const std::string& artifact_id) = 0;
  // Whether any model (or a directory model's file), artifact or deployment references the blob.
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
