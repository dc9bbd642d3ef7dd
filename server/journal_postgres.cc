// File: server/journal_postgres.cc
//
// The PostgreSQL journal (libpq): the same tables as the SQLite one, shared by every replica.
// One connection behind a mutex; a broken connection is reset and the statement retried once
// (statements are single transactions, so a retry cannot apply half of one). Records travel as
// binary bytea parameters and results; everything else as text.
#include <libpq-fe.h>

#include <cstring>
#include <functional>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/status_macros.h"
#include "server/journal.h"

namespace fpxint::server {
namespace {

// Created once per database, under an advisory lock so that replicas starting together do not
// race on CREATE TABLE.
constexpr char kSchema[] = R"sql(
CREATE TABLE IF NOT EXISTS models(
  name TEXT PRIMARY KEY,
  sha256 TEXT NOT NULL,
  record BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS model_files(
  model TEXT NOT NULL,
  path TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  PRIMARY KEY(model, path));
CREATE INDEX IF NOT EXISTS model_files_sha ON model_files(sha256);
CREATE TABLE IF NOT EXISTS jobs(
  seq BIGSERIAL PRIMARY KEY,
  job_id TEXT UNIQUE NOT NULL,
  idempotency_key TEXT UNIQUE,
  model TEXT NOT NULL,
  state INTEGER NOT NULL,
  record BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE TABLE IF NOT EXISTS artifacts(
  artifact_id TEXT PRIMARY KEY,
  job_id TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  record BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS artifacts_sha ON artifacts(sha256);
CREATE INDEX IF NOT EXISTS artifacts_job ON artifacts(job_id);
CREATE TABLE IF NOT EXISTS deployments(
  name TEXT NOT NULL,
  version TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  record BYTEA NOT NULL,
  artifact_sha256 TEXT NOT NULL DEFAULT '',
  PRIMARY KEY(name, version));
CREATE TABLE IF NOT EXISTS torchscript_verdicts(
  sha256 TEXT NOT NULL,
  allow_list TEXT NOT NULL,
  passed BOOLEAN NOT NULL,
  summary TEXT NOT NULL,
  PRIMARY KEY(sha256, allow_list));
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS lease_expires_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS attempt BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS cancel_requested BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS parent TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS jobs_parent ON jobs(parent, seq);
CREATE TABLE IF NOT EXISTS replicas(
  replica_id TEXT PRIMARY KEY,
  seen_ms BIGINT NOT NULL);
)sql";
// A new job row ($1..$6: JobRow); PutJob adds its upsert clause.
#define FPX_PG_INSERT_JOB                                                       \
  "INSERT INTO jobs(job_id, idempotency_key, model, state, record, parent) " \
  "VALUES($1, $2, $3, $4, $5, $6)"
// The database server's clock in Unix milliseconds: every replica's leases on one clock.
#define FPX_PG_NOW_MS "(extract(epoch from clock_timestamp()) * 1000)::bigint"
// Fences a runner's write: the row is RUNNING, leased by $3 for attempt $4.
#define FPX_PG_FENCE "job_id = $5 AND lease_owner = $3 AND attempt = $4 AND state = $6"

constexpr int64_t kSchemaLock = 0x66707869;  // "fpxi"
constexpr int64_t kServerLock = 0x6670786a;  // LockExclusive

using Result = std::unique_ptr<PGresult, decltype(&PQclear)>;

// A statement parameter: text, or binary bytes (bytea).
struct Param {
  std::string value;
  bool binary = false;
  bool null = false;
};
Param Text(std::string s) { return {std::move(s), false, false}; }
Param Int(int64_t v) { return {absl::StrCat(v), false, false}; }
Param Bytes(std::string s) { return {std::move(s), true, false}; }
Param Null() { return {"", false, true}; }

// A failed statement as a status a client can act on: a lost or refused connection is
// UNAVAILABLE, a full disk or too many connections RESOURCE_EXHAUSTED, the rest INTERNAL.
absl::Status PgError(const PGresult* r, PGconn* c, absl::string_view what) {
  const char* state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : nullptr;
  std::string msg = r ? PQresultErrorMessage(r) : PQerrorMessage(c);
  while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
  const std::string text = absl::StrCat("journal (postgresql) ", what, ": ", msg);
  const std::string cls = state ? std::string(state, std::min<size_t>(2, std::strlen(state))) : "";
  if (PQstatus(c) != CONNECTION_OK || cls == "08" || cls == "57") {
    return absl::UnavailableError(text);
  }
  if (cls == "53") return absl::ResourceExhaustedError(text);
  if (state && std::strcmp(state, "23505") == 0) return absl::AlreadyExistsError(text);
  return absl::InternalError(text);
}

// Column `col` of row `row` of a binary-format result.
std::string Col(const PGresult* r, int row, int col) {
  return std::string(PQgetvalue(r, row, col), PQgetlength(r, row, col));
}
int64_t ColInt(const PGresult* r, int row, int col) {
  const char* p = PQgetvalue(r, row, col);
  uint64_t v = 0;
  for (int i = 0; i < PQgetlength(r, row, col); ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  // Network order, sign-extended from the column's width (int4 or int8).
  const int bits = 8 * PQgetlength(r, row, col);
  if (bits > 0 && bits < 64 && (v >> (bits - 1)) & 1) v |= ~uint64_t{0} << bits;
  return static_cast<int64_t>(v);
}

// FPX_PG_INSERT_JOB's parameters for `job`.
std::vector<Param> JobRow(const v1::Job& job) {
  return {Text(job.job_id()),
          job.idempotency_key().empty() ? Null() : Text(job.idempotency_key()),
          Text(job.spec().model()), Int(job.state()), Bytes(job.SerializeAsString()),
          Text(job.parent_job_id())};
}

template <typename Msg>
absl::StatusOr<std::vector<Msg>> Records(const PGresult* r, int col = 0) {
  std::vector<Msg> out;
  for (int i = 0; i < PQntuples(r); ++i) {
    Msg m;
    if (!m.ParseFromString(Col(r, i, col))) {
      return absl::DataLossError("journal (postgresql): corrupt record");
    }
    out.push_back(std::move(m));
  }
  return out;
}

template <typename Msg>
absl::StatusOr<std::optional<Msg>> FirstRecord(const PGresult* r) {
  FPX_ASSIGN_OR_RETURN(std::vector<Msg> all, Records<Msg>(r));
  if (all.empty()) return std::optional<Msg>();
  return std::optional<Msg>(std::move(all.front()));
}

class PostgresJournal final : public Journal {
 public:
  explicit PostgresJournal(PGconn* c) : conn_(c) {}
  ~PostgresJournal() override {
    absl::MutexLock l(&mu_);
    // Release the server lock before disconnecting: the database drops a closed session's locks
    // only once its backend has exited, after PQfinish returns, so a server started right after
    // this one stops could otherwise still find the lock taken.
    if (exclusive_) PQclear(PQexec(conn_, "SELECT pg_advisory_unlock_all()"));
    PQfinish(conn_);
  }
  const char* backend() const override { return "postgresql"; }

  absl::StatusOr<bool> LockExclusive() override {
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(Result r,
                         Exec("SELECT pg_try_advisory_lock($1)", {Int(kServerLock)}));
    exclusive_ = PQntuples(r.get()) == 1 && Col(r.get(), 0, 0) == std::string(1, '\1');
    return exclusive_;
  }

  absl::StatusOr<bool> HeldExclusively() override {
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(Result r,
                         Exec("SELECT pg_try_advisory_lock($1)", {Int(kServerLock)}));
    const bool got = PQntuples(r.get()) == 1 && Col(r.get(), 0, 0) == std::string(1, '\1');
    if (got && !exclusive_) {
      FPX_RETURN_IF_ERROR(Exec("SELECT pg_advisory_unlock($1)", {Int(kServerLock)}).status());
    }
    return !got;
  }

  absl::Status Init() {
    absl::MutexLock l(&mu_);
    FPX_RETURN_IF_ERROR(Exec("BEGIN").status());
    absl::Status s = Exec("SELECT pg_advisory_xact_lock($1)", {Int(kSchemaLock)}).status();
    int64_t found = 0;
    if (s.ok()) s = Script("CREATE TABLE IF NOT EXISTS schema_version(version BIGINT NOT NULL)");
    if (s.ok()) {
      auto r = Exec("SELECT coalesce(max(version), 0)::bigint FROM schema_version");
      s = r.status();
      if (s.ok()) found = ColInt(r->get(), 0, 0);
    }
    if (s.ok()) s = CheckJournalSchemaVersion(found, "--database-url");
    if (s.ok()) s = Script(kSchema);
    if (s.ok() && found != kJournalSchemaVersion) {
      const std::string set =
          absl::StrCat("DELETE FROM schema_version; INSERT INTO schema_version VALUES(",
                       kJournalSchemaVersion, ")");
      s = Script(set.c_str());
    }
    if (!s.ok()) {
      Exec("ROLLBACK").status().IgnoreError();
      return s;
    }
    return Exec("COMMIT").status();
  }

  absl::Status PutModel(const v1::Model& m) override {
    absl::MutexLock l(&mu_);
    return Interactive([&]() -> absl::Status {
      FPX_RETURN_IF_ERROR(
          Exec("INSERT INTO models(name, sha256, record) VALUES($1, $2, $3) ON CONFLICT(name) DO "
               "UPDATE SET sha256 = excluded.sha256, record = excluded.record",
               {Text(m.name()), Text(m.sha256()), Bytes(m.SerializeAsString())})
              .status());
      FPX_RETURN_IF_ERROR(
          Exec("DELETE FROM model_files WHERE model = $1", {Text(m.name())}).status());
      for (const v1::ModelFile& f : m.files()) {
        FPX_RETURN_IF_ERROR(Exec("INSERT INTO model_files(model, path, sha256) VALUES($1, $2, $3)",
                                 {Text(m.name()), Text(f.path()), Text(f.sha256())})
                                .status());
      }
      return absl::OkStatus();
    });
  }
  absl::StatusOr<std::optional<v1::Model>> GetModel(const std::string& name) override {
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(Result r, Exec("SELECT record FROM models WHERE name = $1", {Text(name)}));
    return FirstRecord<v1::Model>(r.get());
  }
  absl::StatusOr<std::vector<v1::Model>> ListModels() override {
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(Result r, Exec("SELECT record FROM models ORDER BY name"));
    return Records<v1::Model>(r.get());
  }
  absl::Status DeleteModel(const std::string& name) override {
    absl::MutexLock l(&mu_);
    return Interactive([&]() -> absl::Status {
      FPX_RETURN_IF_ERROR(Exec("DELETE FROM model_files WHERE model = $1", {Text(name)}).status());
      return Exec("DELETE FROM models WHERE name = $1", {Text(name)}).status();
    });
  }

  absl::Status PutJob(const v1::Job& job) override {
    absl::MutexLock l(&mu_);
    return Interactive([&]() -> absl::Status {
      // Upsert that keeps seq (the submission order) stable.
      FPX_RETURN_IF_ERROR(
          Exec(FPX_PG_INSERT_JOB
               " ON CONFLICT(job_id) DO UPDATE SET state = excluded.state, record = excluded.record",
               JobRow(job))
              .status());
      return PutArtifacts(job);
    });
  }
  absl::StatusOr<std::optional<v1::Job>> GetJob(const std::string& job_id) override {
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(Result r,
                         Exec("SELECT record FROM jobs WHERE job_id = $1", {Text(job_id)}));
    return FirstRecord<v1::Job>(r.get());
  }
  absl::StatusOr<std::optional<v1::Job>> FindJobByIdempotencyKey(const std::string& key) override {
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(
        Result r, Exec("SELECT record FROM jobs WHERE idempotency_key = $1", {Text(key)}));
    return FirstRecord<v1::Job>(r.get());
  }
  absl::StatusOr<std::vector<v1::Job>> ListJobs(v1::JobState state, int64_t before_seq, int limit,
                                                int64_t* next_seq) override {
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(
        Result r,
        Exec("SELECT record, seq FROM jobs WHERE ($1 = 0 OR state = $1) AND ($2 = 0 OR seq < $2) "
             "AND parent = '' ORDER BY seq DESC LIMIT $3",
             {Int(state), Int(before_seq), Int(int64_t{limit} + 1)}));
    FPX_ASSIGN_OR_RETURN(std::vector<v1::Job> out, Records<v1::Job>(r.get()));
    *next_seq = 0;
    if (static_cast<int>(out.size()) > limit) {
      out.pop_back();
      *next_seq = ColInt(r.get(), limit - 1, 1);
    }
    return out;
  }
  absl::StatusOr<std::vector<v1::Job>> JobsInStates(
      const std::vector<v1::JobState>& states) override {
    std::string list;
    for (v1::JobState st : states) absl::StrAppend(&list, list.empty() ? "" : ",", int{st});
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(
        Result r, Exec("SELECT record FROM jobs WHERE state = ANY($1::integer[]) ORDER BY seq",
                       {Text(absl::StrCat("{", list, "}"))}));
    return Records<v1::Job>(r.get());
  }
  absl::Status DeleteJob(const std::string& job_id) override {
    absl::MutexLock l(&mu_);
    return Interactive([&]() -> absl::Status {
      FPX_RETURN_IF_ERROR(Exec("DELETE FROM artifacts WHERE job_id = $1", {Text(job_id)}).status());
      return Exec("DELETE FROM jobs WHERE job_id = $1", {Text(job_id)}).status();
    });
  }
  absl::StatusOr<int64_t> CountJobs(v1::JobState state) override {
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(Result r,
                         Exec("SELECT count(*) FROM jobs WHERE state = $1 AND parent = ''",
                              {Int(state)}));
    return ColInt(r.get(), 0, 0);
  }

  absl::Status InsertJob(const v1::Job& job) override {
    return Run(FPX_PG_INSERT_JOB, JobRow(job));
  }

  absl::StatusOr<std::optional<v1::Job>> ClaimJob(
      const std::string& owner, absl::Duration lease,
      const std::function<void(v1::Job*)>& start) override {
    return Claim(nullptr, owner, lease, start);
  }
  absl::StatusOr<std::optional<v1::Job>> ClaimTask(
      const std::string& parent_job_id, const std::string& owner, absl::Duration lease,
      const std::function<void(v1::Job*)>& start) override {
    return Claim(&parent_job_id, owner, lease, start);
  }
  absl::StatusOr<std::vector<v1::Job>> TasksOf(const std::string& parent_job_id) override {
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(Result r, Exec("SELECT record FROM jobs WHERE parent = $1 ORDER BY seq",
                                        {Text(parent_job_id)}));
    return Records<v1::Job>(r.get());
  }
  // ClaimJob (`parent` null) and ClaimTask.
  absl::StatusOr<std::optional<v1::Job>> Claim(const std::string* parent,
                                               const std::string& owner, absl::Duration lease,
                                               const std::function<void(v1::Job*)>& start) {
    absl::MutexLock l(&mu_);
    std::optional<v1::Job> out;
    FPX_RETURN_IF_ERROR(Interactive([&]() -> absl::Status {
      // SKIP LOCKED: a row another replica is claiming right now is passed over, not waited for.
      FPX_ASSIGN_OR_RETURN(
          Result r,
          parent ? Exec("SELECT record FROM jobs WHERE state = $1 AND parent = $2 ORDER BY seq "
                        "LIMIT 1 FOR UPDATE SKIP LOCKED",
                        {Int(v1::QUEUED), Text(*parent)})
                 : Exec("SELECT record FROM jobs WHERE state = $1 ORDER BY seq LIMIT 1 "
                        "FOR UPDATE SKIP LOCKED",
                        {Int(v1::QUEUED)}));
      FPX_ASSIGN_OR_RETURN(out, FirstRecord<v1::Job>(r.get()));
      if (!out) return absl::OkStatus();
      start(&*out);
      return Exec("UPDATE jobs SET state = $1, record = $2, lease_owner = $3, attempt = $4, "
                  "lease_expires_ms = " FPX_PG_NOW_MS " + $6, cancel_requested = false "
                  "WHERE job_id = $5",
                  {Int(out->state()), Bytes(out->SerializeAsString()), Text(owner),
                   Int(out->attempts()), Text(out->job_id()),
                   Int(absl::ToInt64Milliseconds(lease))})
          .status();
    }));
    return out;
  }

  absl::StatusOr<LeaseCheck> RenewLease(const v1::Job& job, const std::string& owner,
                                        absl::Duration lease) override {
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(
        Result r,
        Exec("UPDATE jobs SET state = $1, record = $2, lease_expires_ms = " FPX_PG_NOW_MS
             " + $7 WHERE " FPX_PG_FENCE " RETURNING cancel_requested",
             {Int(job.state()), Bytes(job.SerializeAsString()), Text(owner), Int(job.attempts()),
              Text(job.job_id()), Int(v1::RUNNING), Int(absl::ToInt64Milliseconds(lease))}));
    LeaseCheck out;
    out.held = PQntuples(r.get()) == 1;
    out.cancel_requested = out.held && Col(r.get(), 0, 0) == std::string(1, '\1');
    return out;
  }

  absl::StatusOr<bool> FinishLeased(const v1::Job& job, const std::string& owner) override {
    absl::MutexLock l(&mu_);
    bool held = false;
    absl::Status s = Interactive([&]() -> absl::Status {
      FPX_ASSIGN_OR_RETURN(
          Result r, Exec("UPDATE jobs SET state = $1, record = $2 WHERE " FPX_PG_FENCE
                         " RETURNING job_id",
                         {Int(job.state()), Bytes(job.SerializeAsString()), Text(owner),
                          Int(job.attempts()), Text(job.job_id()), Int(v1::RUNNING)}));
      held = PQntuples(r.get()) == 1;
      if (!held) return absl::AbortedError("lease lost");  // rolls back; nothing written
      return PutArtifacts(job);
    });
    if (!held) return false;
    FPX_RETURN_IF_ERROR(s);
    return true;
  }

  absl::StatusOr<std::vector<v1::Job>> ReapLeases(
      bool all, const std::string& owner, bool take_mine,
      const std::function<void(v1::Job*, bool)>& decide) override {
    absl::MutexLock l(&mu_);
    std::vector<v1::Job> out;
    FPX_RETURN_IF_ERROR(Interactive([&]() -> absl::Status {
      FPX_ASSIGN_OR_RETURN(
          Result r,
          Exec("SELECT record, cancel_requested FROM jobs WHERE state = $1 AND ($2 OR "
               "($4 AND lease_owner = $3) OR (lease_expires_ms < " FPX_PG_NOW_MS
               " AND ($4 OR lease_owner IS DISTINCT FROM $3))) ORDER BY seq "
               "FOR UPDATE SKIP LOCKED",
               {Int(v1::RUNNING), Text(all ? "true" : "false"), Text(owner),
                Text(take_mine ? "true" : "false")}));
      FPX_ASSIGN_OR_RETURN(out, Records<v1::Job>(r.get()));
      for (size_t i = 0; i < out.size(); ++i) {
        v1::Job& j = out[i];
        decide(&j, Col(r.get(), static_cast<int>(i), 1) == std::string(1, '\1'));
        FPX_RETURN_IF_ERROR(Exec("UPDATE jobs SET state = $1, record = $2, lease_owner = NULL "
                                 "WHERE job_id = $3",
                                 {Int(j.state()), Bytes(j.SerializeAsString()), Text(j.job_id())})
                                .status());
      }
      return absl::OkStatus();
    }));
    return out;
  }

  absl::StatusOr<std::optional<v1::Job>> CancelJob(
      const std::string& job_id, const std::function<void(v1::Job*)>& cancel_queued) override {
    absl::MutexLock l(&mu_);
    std::optional<v1::Job> out;
    FPX_RETURN_IF_ERROR(Interactive([&]() -> absl::Status {
      FPX_ASSIGN_OR_RETURN(
          Result r, Exec("SELECT record FROM jobs WHERE job_id = $1 FOR UPDATE", {Text(job_id)}));
      FPX_ASSIGN_OR_RETURN(out, FirstRecord<v1::Job>(r.get()));
      if (!out) return absl::OkStatus();
      if (out->state() == v1::QUEUED) {
        cancel_queued(&*out);
        return Exec("UPDATE jobs SET state = $1, record = $2 WHERE job_id = $3",
                    {Int(out->state()), Bytes(out->SerializeAsString()), Text(job_id)})
            .status();
      }
      if (out->state() != v1::RUNNING) return absl::OkStatus();
      return Exec("UPDATE jobs SET cancel_requested = true WHERE job_id = $1", {Text(job_id)})
          .status();
    }));
    return out;
  }

  absl::Status ReplicaHeartbeat(const std::string& replica) override {
    return Run("INSERT INTO replicas(replica_id, seen_ms) VALUES($1, " FPX_PG_NOW_MS
               ") ON CONFLICT(replica_id) DO UPDATE SET seen_ms = excluded.seen_ms",
               {Text(replica)});
  }
  absl::StatusOr<std::vector<std::string>> LiveReplicas(absl::Duration within) override {
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(
        Result r, Exec("SELECT replica_id FROM replicas WHERE seen_ms >= " FPX_PG_NOW_MS
                       " - $1 ORDER BY replica_id",
                       {Int(absl::ToInt64Milliseconds(within))}));
    std::vector<std::string> out;
    for (int i = 0; i < PQntuples(r.get()); ++i) out.push_back(Col(r.get(), i, 0));
    return out;
  }

  absl::StatusOr<bool> ModelInUse(const std::string& model) override {
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(
        Result r, Exec("SELECT 1 FROM jobs WHERE model = $1 AND state IN ($2, $3) LIMIT 1",
                       {Text(model), Int(v1::QUEUED), Int(v1::RUNNING)}));
    return PQntuples(r.get()) > 0;
  }
  absl::StatusOr<std::optional<v1::Artifact>> GetArtifact(const std::string& id) override {
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(
        Result r, Exec("SELECT record FROM artifacts WHERE artifact_id = $1", {Text(id)}));
    return FirstRecord<v1::Artifact>(r.get());
  }
  absl::StatusOr<bool> BlobReferenced(const std::string& sha256) override {
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(
        Result r,
        Exec("SELECT 1 FROM models WHERE sha256 = $1 UNION ALL SELECT 1 FROM model_files WHERE "
             "sha256 = $1 UNION ALL SELECT 1 FROM artifacts WHERE "
             "sha256 = $1 UNION ALL SELECT 1 FROM deployments WHERE sha256 = $1 OR "
             "artifact_sha256 = $1 LIMIT 1",
             {Text(sha256)}));
    return PQntuples(r.get()) > 0;
  }

  absl::Status PutDeployment(const v1::Deployment& d) override {
    return Run(
        "INSERT INTO deployments(name, version, sha256, record, artifact_sha256) "
        "VALUES($1, $2, $3, $4, $5) ON CONFLICT(name, version) DO UPDATE SET "
        "sha256 = excluded.sha256, record = excluded.record, "
        "artifact_sha256 = excluded.artifact_sha256",
        {Text(d.name()), Text(d.version()), Text(d.source_sha256()),
         Bytes(d.SerializeAsString()), Text(d.artifact_sha256())});
  }
  absl::StatusOr<std::vector<v1::Deployment>> ListDeployments() override {
    absl::MutexLock l(&mu_);
    // Numeric versions in numeric order (as the SQLite journal's CAST): "2" before "10".
    FPX_ASSIGN_OR_RETURN(
        Result r, Exec("SELECT record FROM deployments ORDER BY name, "
                       "CASE WHEN version ~ '^[0-9]{1,18}$' THEN version::bigint ELSE 0 END, "
                       "version"));
    return Records<v1::Deployment>(r.get());
  }
  absl::Status DeleteDeployment(const std::string& name, const std::string& version) override {
    return Run("DELETE FROM deployments WHERE name = $1 AND version = $2",
               {Text(name), Text(version)});
  }

  absl::Status PutVerdict(const std::string& sha256, const std::string& allow_list,
                          const TorchScriptVerdict& v) override {
    return Run(
        "INSERT INTO torchscript_verdicts(sha256, allow_list, passed, summary) "
        "VALUES($1, $2, $3, $4) ON CONFLICT(sha256, allow_list) DO UPDATE SET "
        "passed = excluded.passed, summary = excluded.summary",
        {Text(sha256), Text(allow_list), Text(v.passed ? "true" : "false"), Text(v.summary)});
  }
  absl::StatusOr<std::optional<TorchScriptVerdict>> GetVerdict(
      const std::string& sha256, const std::string& allow_list) override {
    absl::MutexLock l(&mu_);
    FPX_ASSIGN_OR_RETURN(
        Result r, Exec("SELECT passed, summary FROM torchscript_verdicts "
                       "WHERE sha256 = $1 AND allow_list = $2",
                       {Text(sha256), Text(allow_list)}));
    if (PQntuples(r.get()) == 0) return std::optional<TorchScriptVerdict>();
    return std::optional<TorchScriptVerdict>(
        TorchScriptVerdict{Col(r.get(), 0, 0) == std::string(1, '\1'), Col(r.get(), 0, 1)});
  }

 private:
  // One statement; binary results. A lost connection is reset and the statement sent once more.
  absl::StatusOr<Result> Exec(const char* sql, const std::vector<Param>& params = {})
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<const char*> values;
    std::vector<int> lengths, formats;
    for (const Param& p : params) {
      values.push_back(p.null ? nullptr : p.value.data());
      lengths.push_back(static_cast<int>(p.value.size()));
      formats.push_back(p.binary ? 1 : 0);
    }
    for (int attempt = 0;; ++attempt) {
      Result r(PQexecParams(conn_, sql, static_cast<int>(params.size()), nullptr, values.data(),
                            lengths.data(), formats.data(), /*resultFormat=*/1),
               &PQclear);
      const ExecStatusType st = r ? PQresultStatus(r.get()) : PGRES_FATAL_ERROR;
      if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) return r;
      if (attempt == 0 && PQstatus(conn_) == CONNECTION_BAD && !in_transaction_) {
        PQreset(conn_);
        if (PQstatus(conn_) == CONNECTION_OK && Relock()) continue;
      }
      return PgError(r.get(), conn_, "statement");
    }
  }
  // A new connection has lost the session's advisory lock: take it again, or refuse to go on
  // (another server took the store meanwhile).
  bool Relock() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!exclusive_) return true;
    const std::string sql = absl::StrCat("SELECT pg_try_advisory_lock(", kServerLock, ")");
    Result r(PQexec(conn_, sql.c_str()), &PQclear);
    return r && PQresultStatus(r.get()) == PGRES_TUPLES_OK && PQntuples(r.get()) == 1 &&
           PQgetvalue(r.get(), 0, 0)[0] == 't';
  }
  // Several statements without parameters (the schema).
  absl::Status Script(const char* sql) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Result r(PQexec(conn_, sql), &PQclear);
    if (r && PQresultStatus(r.get()) == PGRES_COMMAND_OK) return absl::OkStatus();
    return PgError(r.get(), conn_, "schema");
  }
  absl::Status Run(const char* sql, const std::vector<Param>& params) {
    absl::MutexLock l(&mu_);
    return Exec(sql, params).status();
  }
  // Runs `body` as one transaction: committed when it returns OK, rolled back otherwise.
  absl::Status Interactive(const std::function<absl::Status()>& body)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    FPX_RETURN_IF_ERROR(Exec("BEGIN").status());
    in_transaction_ = true;
    absl::Status s = body();
    if (s.ok()) s = Exec("COMMIT").status();
    if (!s.ok()) Exec("ROLLBACK").status().IgnoreError();
    in_transaction_ = false;
    return s;
  }
  // The job's artifact records (inside a transaction).
  absl::Status PutArtifacts(const v1::Job& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const v1::Artifact& a : job.artifacts()) {
      FPX_RETURN_IF_ERROR(Exec("INSERT INTO artifacts(artifact_id, job_id, sha256, record) "
                               "VALUES($1, $2, $3, $4) ON CONFLICT(artifact_id) DO UPDATE SET "
                               "job_id = excluded.job_id, sha256 = excluded.sha256, "
                               "record = excluded.record",
                               {Text(a.artifact_id()), Text(job.job_id()), Text(a.sha256()),
                                Bytes(a.SerializeAsString())})
                              .status());
    }
    return absl::OkStatus();
  }

  absl::Mutex mu_;
  PGconn* conn_ ABSL_GUARDED_BY(mu_);
  bool in_transaction_ ABSL_GUARDED_BY(mu_) = false;  // no silent reconnect mid-transaction
  bool exclusive_ ABSL_GUARDED_BY(mu_) = false;       // LockExclusive holds the server lock
};

}  // namespace

absl::StatusOr<std::unique_ptr<Journal>> OpenPostgresJournal(const std::string& url) {
  PGconn* c = PQconnectdb(url.c_str());
  if (c == nullptr || PQstatus(c) != CONNECTION_OK) {
    std::string msg = c ? PQerrorMessage(c) : "out of memory";
    while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
    PQfinish(c);
    // The URL may carry a password: name the failure, not the URL.
    return absl::UnavailableError(
        absl::StrCat("--database-url: cannot connect to PostgreSQL: ", msg));
  }
  // Server notices ("relation already exists, skipping") are not errors; drop them.
  PQsetNoticeProcessor(c, [](void*, const char*) {}, nullptr);
  auto j = std::make_unique<PostgresJournal>(c);
  FPX_RETURN_IF_ERROR(j->Init());
  return j;
}

}  // namespace fpxint::server
