// File: server/journal_sqlite.cc
//
// The SQLite journal: one file in WAL mode (synchronous=FULL), one connection behind a mutex.
#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <functional>
#include <utility>

#include "absl/synchronization/mutex.h"
#include "core/safetensors.h"
#include "core/unique_fd.h"
#include "server/journal.h"

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace fpxint::server {
namespace {

constexpr char kSchema[] = R"sql(
CREATE TABLE IF NOT EXISTS models(
  name TEXT PRIMARY KEY,
  sha256 TEXT NOT NULL,
  record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS model_files(
  model TEXT NOT NULL,
  path TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  PRIMARY KEY(model, path));
CREATE INDEX IF NOT EXISTS model_files_sha ON model_files(sha256);
CREATE TABLE IF NOT EXISTS jobs(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  job_id TEXT UNIQUE NOT NULL,
  idempotency_key TEXT UNIQUE,
  model TEXT NOT NULL,
  state INTEGER NOT NULL,
  record BLOB NOT NULL,
  lease_owner TEXT,
  lease_expires_ms INTEGER NOT NULL DEFAULT 0,
  attempt INTEGER NOT NULL DEFAULT 0,
  cancel_requested INTEGER NOT NULL DEFAULT 0,
  parent TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE TABLE IF NOT EXISTS artifacts(
  artifact_id TEXT PRIMARY KEY,
  job_id TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  record BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS artifacts_sha ON artifacts(sha256);
CREATE TABLE IF NOT EXISTS deployments(
  name TEXT NOT NULL,
  version TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  record BLOB NOT NULL,
  artifact_sha256 TEXT NOT NULL DEFAULT '',
  PRIMARY KEY(name, version));
CREATE TABLE IF NOT EXISTS torchscript_verdicts(
  sha256 TEXT NOT NULL,
  allow_list TEXT NOT NULL,
  passed INTEGER NOT NULL,
  summary TEXT NOT NULL,
  PRIMARY KEY(sha256, allow_list));
CREATE TABLE IF NOT EXISTS replicas(
  replica_id TEXT PRIMARY KEY,
  seen_ms INTEGER NOT NULL);
)sql";

// The lease columns of the jobs table, added to journals written before jobs were leased.
constexpr char kLeaseColumns[] = R"sql(
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
)sql";

int64_t NowMs() { return absl::ToUnixMillis(absl::Now()); }

// A new job row; PutJob adds its upsert clause.
constexpr char kInsertJob[] =
    "INSERT INTO jobs(job_id, idempotency_key, model, state, record, parent) "
    "VALUES(?, ?, ?, ?, ?, ?)";

// One prepared statement; finalized on destruction.
// SQLite failures as statuses a client can act on: a full disk is RESOURCE_EXHAUSTED naming the
// journal file, I/O errors UNAVAILABLE, everything else INTERNAL.
absl::Status SqliteError(sqlite3* db, absl::string_view what) {
  const int rc = sqlite3_errcode(db);
  const char* file = sqlite3_db_filename(db, "main");
  const std::string msg =
      absl::StrCat("journal ", file ? file : "", " ", what, ": ", sqlite3_errmsg(db));
  switch (rc) {
    case SQLITE_FULL: return absl::ResourceExhaustedError(absl::StrCat(msg, " (free disk space)"));
    case SQLITE_CONSTRAINT: return absl::AlreadyExistsError(msg);
    case SQLITE_IOERR:
    case SQLITE_CANTOPEN:
    case SQLITE_BUSY:
    case SQLITE_LOCKED: return absl::UnavailableError(msg);
    default: return absl::InternalError(msg);
  }
}

class Stmt {
 public:
  Stmt(sqlite3* db, const char* sql) : db_(db) {
    rc_ = sqlite3_prepare_v2(db, sql, -1, &st_, nullptr);
  }
  ~Stmt() { sqlite3_finalize(st_); }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;

  absl::Status status() const { return rc_ == SQLITE_OK ? absl::OkStatus() : Error("prepare"); }
  Stmt& Bind(int i, const std::string& s) {
    sqlite3_bind_text(st_, i, s.data(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& BindBlob(int i, const std::string& s) {
    sqlite3_bind_blob(st_, i, s.data(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& Bind(int i, int64_t v) {
    sqlite3_bind_int64(st_, i, v);
    return *this;
  }
  Stmt& BindNull(int i) {
    sqlite3_bind_null(st_, i);
    return *this;
  }
  // SQLITE_ROW: true; SQLITE_DONE: false; errors in *s.
  bool Step(absl::Status* s) {
    rc_ = sqlite3_step(st_);
    if (rc_ == SQLITE_ROW) return true;
    if (rc_ != SQLITE_DONE) *s = Error("step");
    return false;
  }
  absl::Status Run() {
    absl::Status s = status();
    if (s.ok()) Step(&s);
    return s;
  }
  std::string Blob(int col) const {
    const void* p = sqlite3_column_blob(st_, col);
    return std::string(static_cast<const char*>(p), sqlite3_column_bytes(st_, col));
  }
  int64_t Int(int col) const { return sqlite3_column_int64(st_, col); }

 private:
  absl::Status Error(const char* what) const { return SqliteError(db_, what); }
  sqlite3* db_;
  sqlite3_stmt* st_ = nullptr;
  int rc_ = SQLITE_OK;
};

// Whether the query returns a row.
absl::StatusOr<bool> HasRow(Stmt& st) {
  absl::Status s = st.status();
  const bool found = s.ok() && st.Step(&s);
  if (!s.ok()) return s;
  return found;
}

// Binds a job's row (kInsertJob's parameters).
void BindJobRow(Stmt& st, const v1::Job& job) {
  st.Bind(1, job.job_id());
  if (job.idempotency_key().empty()) {
    st.BindNull(2);
  } else {
    st.Bind(2, job.idempotency_key());
  }
  st.Bind(3, job.spec().model()).Bind(4, static_cast<int64_t>(job.state()));
  st.BindBlob(5, job.SerializeAsString());
  st.Bind(6, job.parent_job_id());
}

// The job record in column 0 of the current row.
absl::StatusOr<v1::Job> JobRecord(const Stmt& st) {
  v1::Job j;
  if (!j.ParseFromString(st.Blob(0))) return absl::DataLossError("journal: corrupt job record");
  return j;
}

template <typename Msg>
absl::StatusOr<std::vector<Msg>> Collect(Stmt& st) {
  std::vector<Msg> out;
  absl::Status s = st.status();
  while (s.ok() && st.Step(&s)) {
    Msg m;
    if (!m.ParseFromString(st.Blob(0))) return absl::DataLossError("journal: corrupt record");
    out.push_back(std::move(m));
  }
  if (!s.ok()) return s;
  return out;
}

template <typename Msg>
absl::StatusOr<std::optional<Msg>> CollectOne(Stmt& st) {
  auto all = Collect<Msg>(st);
  if (!all.ok()) return all.status();
  if (all->empty()) return std::optional<Msg>();
  return std::optional<Msg>(std::move(all->front()));
}

class SqliteJournal final : public Journal {
 public:
  SqliteJournal(sqlite3* db, std::string path) : path_(std::move(path)), db_(db) {}
  ~SqliteJournal() override;
  const char* backend() const override { return "sqlite"; }
  absl::Status Init();
  absl::StatusOr<bool> LockExclusive() override;
  absl::StatusOr<bool> HeldExclusively() override { return false; }  // SQLite has no replicas

  absl::Status PutModel(const v1::Model& m) override;
  absl::StatusOr<std::optional<v1::Model>> GetModel(const std::string& name) override;
  absl::StatusOr<std::vector<v1::Model>> ListModels() override;
  absl::Status DeleteModel(const std::string& name) override;
  absl::Status PutJob(const v1::Job& job) override;
  absl::StatusOr<std::optional<v1::Job>> GetJob(const std::string& job_id) override;
  absl::StatusOr<std::optional<v1::Job>> FindJobByIdempotencyKey(const std::string& key) override;
  absl::StatusOr<std::vector<v1::Job>> ListJobs(v1::JobState state, int64_t before_seq, int limit,
                                                int64_t* next_seq) override;
  absl::StatusOr<std::vector<v1::Job>> JobsInStates(
      const std::vector<v1::JobState>& states) override;
  absl::Status DeleteJob(const std::string& job_id) override;
  absl::StatusOr<int64_t> CountJobs(v1::JobState state) override;
  absl::Status InsertJob(const v1::Job& job) override;
  absl::StatusOr<std::optional<v1::Job>> ClaimJob(
      const std::string& owner, absl::Duration lease,
      const std::function<void(v1::Job*)>& start) override;
  absl::StatusOr<std::optional<v1::Job>> ClaimTask(
      const std::string& parent_job_id, const std::string& owner, absl::Duration lease,
      const std::function<void(v1::Job*)>& start) override;
  absl::StatusOr<std::vector<v1::Job>> TasksOf(const std::string& parent_job_id) override;
  absl::StatusOr<LeaseCheck> RenewLease(const v1::Job& job, const std::string& owner,
                                        absl::Duration lease) override;
  absl::StatusOr<bool> FinishLeased(const v1::Job& job, const std::string& owner) override;
  absl::StatusOr<std::vector<v1::Job>> ReapLeases(
      bool all, const std::string& owner, bool take_mine,
      const std::function<void(v1::Job*, bool)>& decide) override;
  absl::StatusOr<std::optional<v1::Job>> CancelJob(
      const std::string& job_id, const std::function<void(v1::Job*)>& cancel_queued) override;
  absl::Status ReplicaHeartbeat(const std::string& replica) override;
  absl::StatusOr<std::vector<std::string>> LiveReplicas(absl::Duration within) override;
  absl::StatusOr<bool> ModelInUse(const std::string& model) override;
  absl::StatusOr<std::optional<v1::Artifact>> GetArtifact(const std::string& artifact_id) override;
  absl::StatusOr<bool> BlobReferenced(const std::string& sha256) override;
  absl::Status PutDeployment(const v1::Deployment& d) override;
  absl::StatusOr<std::vector<v1::Deployment>> ListDeployments() override;
  absl::Status DeleteDeployment(const std::string& name, const std::string& version) override;
  absl::Status PutVerdict(const std::string& sha256, const std::string& allow_list,
                          const TorchScriptVerdict& v) override;
  absl::StatusOr<std::optional<TorchScriptVerdict>> GetVerdict(
      const std::string& sha256, const std::string& allow_list) override;

 private:
  absl::Status Exec(const char* sql) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs `body` in one write transaction: committed when it returns OK, rolled back otherwise.
  absl::Status Transaction(const std::function<absl::Status()>& body)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Writes the job row's state (?1) and record (?2); `set_and_fence` adds assignments and the
  // WHERE clause, over ?3 = owner, ?4 = the job's attempts and ?5 = its id. False: no row
  // matched.
  absl::StatusOr<bool> UpdateJob(const v1::Job& job, const char* set_and_fence,
                                 const std::string& owner) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status PutArtifacts(const v1::Job& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // ClaimJob (`parent` null) and ClaimTask.
  absl::StatusOr<std::optional<v1::Job>> Claim(const std::string* parent, const std::string& owner,
                                               absl::Duration lease,
                                               const std::function<void(v1::Job*)>& start);

  const std::string path_;
  core::UniqueFd lock_fd_;  // flock'ed <path>.lock while LockExclusive holds it
  absl::Mutex mu_;
  sqlite3* db_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<Journal>> OpenSqliteJournal(const std::string& path) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                      nullptr) != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return absl::InternalError(absl::StrCat("cannot open the journal '", path, "': ", msg));
  }
  sqlite3_busy_timeout(db, 5000);
  auto j = std::make_unique<SqliteJournal>(db, path);
  FPX_RETURN_IF_ERROR(j->Init());
  return j;
}

absl::Status SqliteJournal::Init() {
  absl::MutexLock l(&mu_);
  // WAL: readers never block the writer; synchronous=FULL: a committed transaction survives a
  // power cut, not only a process crash.
  FPX_RETURN_IF_ERROR(Exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"));
  // One write transaction: a second server opening the file at the same time waits for it.
  return Transaction([&]() -> absl::Status {
    FPX_RETURN_IF_ERROR(Exec("CREATE TABLE IF NOT EXISTS schema_version(version INTEGER NOT NULL)"));
    Stmt st(db_, "SELECT coalesce(max(version), 0) FROM schema_version");
    absl::Status s = st.status();
    const int64_t found = s.ok() && st.Step(&s) ? st.Int(0) : 0;
    FPX_RETURN_IF_ERROR(s);
    FPX_RETURN_IF_ERROR(CheckJournalSchemaVersion(found, path_));
    FPX_RETURN_IF_ERROR(Exec(kSchema));
    // Journals written before deployments were built from their job's artifact lack the column.
    if (sqlite3_exec(db_, "SELECT artifact_sha256 FROM deployments LIMIT 0", nullptr, nullptr,
                     nullptr) != SQLITE_OK) {
      FPX_RETURN_IF_ERROR(
          Exec("ALTER TABLE deployments ADD COLUMN artifact_sha256 TEXT NOT NULL DEFAULT ''"));
    }
    // Version 2: job leases.
    if (sqlite3_exec(db_, "SELECT lease_owner FROM jobs LIMIT 0", nullptr, nullptr, nullptr) !=
        SQLITE_OK) {
      FPX_RETURN_IF_ERROR(Exec(kLeaseColumns));
    }
    // Version 4: shard tasks.
    if (sqlite3_exec(db_, "SELECT parent FROM jobs LIMIT 0", nullptr, nullptr, nullptr) !=
        SQLITE_OK) {
      FPX_RETURN_IF_ERROR(Exec("ALTER TABLE jobs ADD COLUMN parent TEXT NOT NULL DEFAULT ''"));
    }
    FPX_RETURN_IF_ERROR(Exec("CREATE INDEX IF NOT EXISTS jobs_parent ON jobs(parent, seq)"));
    if (found == kJournalSchemaVersion) return absl::OkStatus();
    const std::string set = absl::StrCat("DELETE FROM schema_version; INSERT INTO schema_version "
                                         "VALUES(", kJournalSchemaVersion, ");");
    return Exec(set.c_str());
  });
}

absl::StatusOr<bool> SqliteJournal::LockExclusive() {
  const std::string lock = path_ + ".lock";
  core::UniqueFd fd(::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (fd.get() < 0) return core::ErrnoToStatus(errno, "cannot open", lock);
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) return false;
    return core::ErrnoToStatus(errno, "cannot lock", lock);
  }
  lock_fd_ = std::move(fd);
  return true;
}

SqliteJournal::~SqliteJournal() {
  absl::MutexLock l(&mu_);
  sqlite3_close(db_);
}

absl::Status SqliteJournal::Exec(const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    sqlite3_free(err);
    return SqliteError(db_, "exec");
  }
  return absl::OkStatus();
}

absl::Status SqliteJournal::PutModel(const v1::Model& m) {
  absl::MutexLock l(&mu_);
  return Transaction([&]() -> absl::Status {
    Stmt st(db_, "INSERT OR REPLACE INTO models(name, sha256, record) VALUES(?, ?, ?)");
    st.Bind(1, m.name()).Bind(2, m.sha256()).BindBlob(3, m.SerializeAsString());
    FPX_RETURN_IF_ERROR(st.Run());
    Stmt del(db_, "DELETE FROM model_files WHERE model = ?");
    del.Bind(1, m.name());
    FPX_RETURN_IF_ERROR(del.Run());
    for (const v1::ModelFile& f : m.files()) {
      Stmt ins(db_, "INSERT INTO model_files(model, path, sha256) VALUES(?, ?, ?)");
      ins.Bind(1, m.name()).Bind(2, f.path()).Bind(3, f.sha256());
      FPX_RETURN_IF_ERROR(ins.Run());
    }
    return absl::OkStatus();
  });
}

absl::StatusOr<std::optional<v1::Model>> SqliteJournal::GetModel(const std::string& name) {
  absl::MutexLock l(&mu_);
  Stmt st(db_, "SELECT record FROM models WHERE name = ?");
  st.Bind(1, name);
  return CollectOne<v1::Model>(st);
}

absl::StatusOr<std::vector<v1::Model>> SqliteJournal::ListModels() {
  absl::MutexLock l(&mu_);
  Stmt st(db_, "SELECT record FROM models ORDER BY name");
  return Collect<v1::Model>(st);
}

absl::Status SqliteJournal::DeleteModel(const std::string& name) {
  absl::MutexLock l(&mu_);
  return Transaction([&]() -> absl::Status {
    Stmt files(db_, "DELETE FROM model_files WHERE model = ?");
    files.Bind(1, name);
    FPX_RETURN_IF_ERROR(files.Run());
    Stmt st(db_, "DELETE FROM models WHERE name = ?");
    st.Bind(1, name);
    return st.Run();
  });
}

absl::Status SqliteJournal::PutJob(const v1::Job& job) {
  absl::MutexLock l(&mu_);
  return Transaction([&]() -> absl::Status {
    // Upsert that keeps seq (the submission order) stable.
    static const std::string kUpsert = absl::StrCat(
        kInsertJob,
        " ON CONFLICT(job_id) DO UPDATE SET state = excluded.state, record = excluded.record");
    Stmt st(db_, kUpsert.c_str());
    BindJobRow(st, job);
    FPX_RETURN_IF_ERROR(st.Run());
    return PutArtifacts(job);
  });
}

absl::Status SqliteJournal::PutArtifacts(const v1::Job& job) {
  for (const v1::Artifact& a : job.artifacts()) {
    Stmt st(db_,
            "INSERT OR REPLACE INTO artifacts(artifact_id, job_id, sha256, record) "
            "VALUES(?, ?, ?, ?)");
    st.Bind(1, a.artifact_id()).Bind(2, job.job_id()).Bind(3, a.sha256());
    st.BindBlob(4, a.SerializeAsString());
    FPX_RETURN_IF_ERROR(st.Run());
  }
  return absl::OkStatus();
}

absl::Status SqliteJournal::Transaction(const std::function<absl::Status()>& body) {
  FPX_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
  absl::Status s = body();
  if (!s.ok()) {
    Exec("ROLLBACK").IgnoreError();
    return s;
  }
  return Exec("COMMIT");
}

absl::StatusOr<bool> SqliteJournal::UpdateJob(const v1::Job& job, const char* set_and_fence,
                                              const std::string& owner) {
  const std::string sql =
      absl::StrCat("UPDATE jobs SET state = ?1, record = ?2", set_and_fence);
  Stmt st(db_, sql.c_str());
  st.Bind(1, static_cast<int64_t>(job.state())).BindBlob(2, job.SerializeAsString());
  st.Bind(3, owner).Bind(4, static_cast<int64_t>(job.attempts())).Bind(5, job.job_id());
  FPX_RETURN_IF_ERROR(st.Run());
  return sqlite3_changes(db_) > 0;
}

absl::StatusOr<int64_t> SqliteJournal::CountJobs(v1::JobState state) {
  absl::MutexLock l(&mu_);
  Stmt st(db_, "SELECT count(*) FROM jobs WHERE state = ? AND parent = ''");
  st.Bind(1, static_cast<int64_t>(state));
  absl::Status s = st.status();
  const int64_t n = s.ok() && st.Step(&s) ? st.Int(0) : 0;
  if (!s.ok()) return s;
  return n;
}

absl::Status SqliteJournal::InsertJob(const v1::Job& job) {
  absl::MutexLock l(&mu_);
  Stmt st(db_, kInsertJob);
  BindJobRow(st, job);
  return st.Run();
}

absl::StatusOr<std::optional<v1::Job>> SqliteJournal::ClaimJob(
    const std::string& owner, absl::Duration lease,
    const std::function<void(v1::Job*)>& start) {
  return Claim(nullptr, owner, lease, start);
}

absl::StatusOr<std::optional<v1::Job>> SqliteJournal::ClaimTask(
    const std::string& parent_job_id, const std::string& owner, absl::Duration lease,
    const std::function<void(v1::Job*)>& start) {
  return Claim(&parent_job_id, owner, lease, start);
}

absl::StatusOr<std::vector<v1::Job>> SqliteJournal::TasksOf(const std::string& parent_job_id) {
  absl::MutexLock l(&mu_);
  Stmt st(db_, "SELECT record FROM jobs WHERE parent = ? ORDER BY seq");
  st.Bind(1, parent_job_id);
  return Collect<v1::Job>(st);
}

absl::StatusOr<std::optional<v1::Job>> SqliteJournal::Claim(
    const std::string* parent, const std::string& owner, absl::Duration lease,
    const std::function<void(v1::Job*)>& start) {
  absl::MutexLock l(&mu_);
  std::optional<v1::Job> out;
  FPX_RETURN_IF_ERROR(Transaction([&]() -> absl::Status {
    Stmt st(db_, parent ? "SELECT record FROM jobs WHERE state = ?1 AND parent = ?2 "
                          "ORDER BY seq LIMIT 1"
                        : "SELECT record FROM jobs WHERE state = ?1 ORDER BY seq LIMIT 1");
    st.Bind(1, int64_t{v1::QUEUED});
    if (parent) st.Bind(2, *parent);
    FPX_ASSIGN_OR_RETURN(out, CollectOne<v1::Job>(st));
    if (!out) return absl::OkStatus();
    start(&*out);
    Stmt up(db_,
            "UPDATE jobs SET state = ?1, record = ?2, lease_owner = ?3, attempt = ?4, "
            "lease_expires_ms = ?6, cancel_requested = 0 WHERE job_id = ?5");
    up.Bind(1, static_cast<int64_t>(out->state())).BindBlob(2, out->SerializeAsString());
    up.Bind(3, owner).Bind(4, static_cast<int64_t>(out->attempts())).Bind(5, out->job_id());
    up.Bind(6, NowMs() + absl::ToInt64Milliseconds(lease));
    return up.Run();
  }));
  return out;
}

absl::StatusOr<Journal::LeaseCheck> SqliteJournal::RenewLease(const v1::Job& job,
                                                              const std::string& owner,
                                                              absl::Duration lease) {
  absl::MutexLock l(&mu_);
  LeaseCheck out;
  FPX_RETURN_IF_ERROR(Transaction([&]() -> absl::Status {
    const std::string set = absl::StrCat(
        ", lease_expires_ms = ", NowMs() + absl::ToInt64Milliseconds(lease),
        " WHERE job_id = ?5 AND lease_owner = ?3 AND attempt = ?4 AND state = ", v1::RUNNING);
    FPX_ASSIGN_OR_RETURN(out.held, UpdateJob(job, set.c_str(), owner));
    if (!out.held) return absl::OkStatus();
    Stmt st(db_, "SELECT cancel_requested FROM jobs WHERE job_id = ?");
    st.Bind(1, job.job_id());
    absl::Status s = st.status();
    out.cancel_requested = s.ok() && st.Step(&s) && st.Int(0) != 0;
    return s;
  }));
  return out;
}

absl::StatusOr<bool> SqliteJournal::FinishLeased(const v1::Job& job, const std::string& owner) {
  absl::MutexLock l(&mu_);
  bool held = false;
  absl::Status s = Transaction([&]() -> absl::Status {
    const std::string fence = absl::StrCat(
        " WHERE job_id = ?5 AND lease_owner = ?3 AND attempt = ?4 AND state = ", v1::RUNNING);
    FPX_ASSIGN_OR_RETURN(held, UpdateJob(job, fence.c_str(), owner));
    if (!held) return absl::AbortedError("lease lost");  // rolls back; nothing written
    return PutArtifacts(job);
  });
  if (!held) return false;
  FPX_RETURN_IF_ERROR(s);
  return true;
}

absl::StatusOr<std::vector<v1::Job>> SqliteJournal::ReapLeases(
    bool all, const std::string& owner, bool take_mine,
    const std::function<void(v1::Job*, bool)>& decide) {
  absl::MutexLock l(&mu_);
  std::vector<v1::Job> out;
  FPX_RETURN_IF_ERROR(Transaction([&]() -> absl::Status {
    Stmt st(db_,
            "SELECT record, cancel_requested FROM jobs WHERE state = ?1 AND (?2 OR "
            "(?5 AND lease_owner = ?4) OR (lease_expires_ms < ?3 AND (?5 OR lease_owner IS NOT ?4))) "
            "ORDER BY seq");
    st.Bind(1, int64_t{v1::RUNNING}).Bind(2, int64_t{all ? 1 : 0}).Bind(3, NowMs());
    st.Bind(4, owner).Bind(5, int64_t{take_mine ? 1 : 0});
    std::vector<bool> cancel;
    absl::Status s = st.status();
    while (s.ok() && st.Step(&s)) {
      FPX_ASSIGN_OR_RETURN(v1::Job j, JobRecord(st));
      out.push_back(std::move(j));
      cancel.push_back(st.Int(1) != 0);
    }
    FPX_RETURN_IF_ERROR(s);
    for (size_t i = 0; i < out.size(); ++i) {
      v1::Job& j = out[i];
      decide(&j, cancel[i]);
      Stmt up(db_, "UPDATE jobs SET state = ?1, record = ?2, lease_owner = NULL WHERE job_id = ?3");
      up.Bind(1, static_cast<int64_t>(j.state())).BindBlob(2, j.SerializeAsString());
      up.Bind(3, j.job_id());
      FPX_RETURN_IF_ERROR(up.Run());
    }
    return absl::OkStatus();
  }));
  return out;
}

absl::StatusOr<std::optional<v1::Job>> SqliteJournal::CancelJob(
    const std::string& job_id, const std::function<void(v1::Job*)>& cancel_queued) {
  absl::MutexLock l(&mu_);
  std::optional<v1::Job> out;
  FPX_RETURN_IF_ERROR(Transaction([&]() -> absl::Status {
    Stmt st(db_, "SELECT record FROM jobs WHERE job_id = ?");
    st.Bind(1, job_id);
    FPX_ASSIGN_OR_RETURN(out, CollectOne<v1::Job>(st));
    if (!out) return absl::OkStatus();
    if (out->state() == v1::QUEUED) {
      cancel_queued(&*out);
      return UpdateJob(*out, " WHERE job_id = ?5", "").status();
    }
    if (out->state() != v1::RUNNING) return absl::OkStatus();
    Stmt up(db_, "UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?");
    up.Bind(1, job_id);
    return up.Run();
  }));
  return out;
}

absl::Status SqliteJournal::ReplicaHeartbeat(const std::string& replica) {
  absl::MutexLock l(&mu_);
  Stmt st(db_, "INSERT OR REPLACE INTO replicas(replica_id, seen_ms) VALUES(?, ?)");
  st.Bind(1, replica).Bind(2, NowMs());
  return st.Run();
}

absl::StatusOr<std::vector<std::string>> SqliteJournal::LiveReplicas(absl::Duration within) {
  absl::MutexLock l(&mu_);
  Stmt st(db_, "SELECT replica_id FROM replicas WHERE seen_ms >= ? ORDER BY replica_id");
  st.Bind(1, NowMs() - absl::ToInt64Milliseconds(within));
  std::vector<std::string> out;
  absl::Status s = st.status();
  while (s.ok() && st.Step(&s)) out.push_back(st.Blob(0));
  if (!s.ok()) return s;
  return out;
}

absl::StatusOr<std::optional<v1::Job>> SqliteJournal::GetJob(const std::string& job_id) {
  absl::MutexLock l(&mu_);
  Stmt st(db_, "SELECT record FROM jobs WHERE job_id = ?");
  st.Bind(1, job_id);
  return CollectOne<v1::Job>(st);
}

absl::StatusOr<std::optional<v1::Job>> SqliteJournal::FindJobByIdempotencyKey(const std::string& key) {
  absl::MutexLock l(&mu_);
  Stmt st(db_, "SELECT record FROM jobs WHERE idempotency_key = ?");
  st.Bind(1, key);
  return CollectOne<v1::Job>(st);
}

absl::StatusOr<std::vector<v1::Job>> SqliteJournal::ListJobs(v1::JobState state, int64_t before_seq,
                                                       int limit, int64_t* next_seq) {
  absl::MutexLock l(&mu_);
  Stmt st(db_,
          "SELECT record, seq FROM jobs WHERE (?1 = 0 OR state = ?1) AND (?2 = 0 OR seq < ?2) "
          "AND parent = '' ORDER BY seq DESC LIMIT ?3");
  st.Bind(1, static_cast<int64_t>(state)).Bind(2, before_seq).Bind(3, int64_t{limit} + 1);
  std::vector<v1::Job> out;
  std::vector<int64_t> seqs;
  absl::Status s = st.status();
  while (s.ok() && st.Step(&s)) {
    FPX_ASSIGN_OR_RETURN(v1::Job j, JobRecord(st));
    out.push_back(std::move(j));
    seqs.push_back(st.Int(1));
  }
  if (!s.ok()) return s;
  *next_seq = 0;
  if (static_cast<int>(out.size()) > limit) {
    out.pop_back();
    *next_seq = seqs[limit - 1];
  }
  return out;
}

absl::StatusOr<std::vector<v1::Job>> SqliteJournal::JobsInStates(
    const std::vector<v1::JobState>& states) {
  std::vector<v1::Job> out;
  absl::MutexLock l(&mu_);
  Stmt st(db_, "SELECT record, state FROM jobs ORDER BY seq ASC");
  absl::Status s = st.status();
  while (s.ok() && st.Step(&s)) {
    const auto state = static_cast<v1::JobState>(st.Int(1));
    if (std::find(states.begin(), states.end(), state) == states.end()) continue;
    FPX_ASSIGN_OR_RETURN(v1::Job j, JobRecord(st));
    out.push_back(std::move(j));
  }
  if (!s.ok()) return s;
  return out;
}

absl::Status SqliteJournal::DeleteJob(const std::string& job_id) {
  absl::MutexLock l(&mu_);
  return Transaction([&]() -> absl::Status {
    for (const char* sql : {"DELETE FROM artifacts WHERE job_id = ?",
                            "DELETE FROM jobs WHERE job_id = ?"}) {
      Stmt st(db_, sql);
      st.Bind(1, job_id);
      FPX_RETURN_IF_ERROR(st.Run());
    }
    return absl::OkStatus();
  });
}

absl::StatusOr<bool> SqliteJournal::ModelInUse(const std::string& model) {
  absl::MutexLock l(&mu_);
  Stmt st(db_, "SELECT 1 FROM jobs WHERE model = ? AND state IN (?, ?) LIMIT 1");
  st.Bind(1, model).Bind(2, int64_t{v1::QUEUED}).Bind(3, int64_t{v1::RUNNING});
  return HasRow(st);
}

absl::StatusOr<std::optional<v1::Artifact>> SqliteJournal::GetArtifact(const std::string& id) {
  absl::MutexLock l(&mu_);
  Stmt st(db_, "SELECT record FROM artifacts WHERE artifact_id = ?");
  st.Bind(1, id);
  return CollectOne<v1::Artifact>(st);
}

absl::StatusOr<bool> SqliteJournal::BlobReferenced(const std::string& sha256) {
  absl::MutexLock l(&mu_);
  Stmt st(db_,
          "SELECT 1 FROM models WHERE sha256 = ?1 UNION ALL SELECT 1 FROM model_files WHERE "
          "sha256 = ?1 UNION ALL SELECT 1 FROM artifacts WHERE "
          "sha256 = ?1 UNION ALL SELECT 1 FROM deployments WHERE sha256 = ?1 OR artifact_sha256 = ?1 "
          "LIMIT 1");
  st.Bind(1, sha256);
  return HasRow(st);
}

absl::Status SqliteJournal::PutDeployment(const v1::Deployment& d) {
  absl::MutexLock l(&mu_);
  Stmt st(db_,
          "INSERT OR REPLACE INTO deployments(name, version, sha256, record, artifact_sha256) "
          "VALUES(?, ?, ?, ?, ?)");
  st.Bind(1, d.name()).Bind(2, d.version()).Bind(3, d.source_sha256());
  st.BindBlob(4, d.SerializeAsString());
  st.Bind(5, d.artifact_sha256());
  return st.Run();
}

absl::StatusOr<std::vector<v1::Deployment>> SqliteJournal::ListDeployments() {
  absl::MutexLock l(&mu_);
  Stmt st(db_, "SELECT record FROM deployments ORDER BY name, CAST(version AS INTEGER), version");
  return Collect<v1::Deployment>(st);
}

absl::Status SqliteJournal::DeleteDeployment(const std::string& name, const std::string& version) {
  absl::MutexLock l(&mu_);
  Stmt st(db_, "DELETE FROM deployments WHERE name = ? AND version = ?");
  st.Bind(1, name).Bind(2, version);
  return st.Run();
}

absl::Status SqliteJournal::PutVerdict(const std::string& sha256, const std::string& allow_list,
                                 const TorchScriptVerdict& v) {
  absl::MutexLock l(&mu_);
  Stmt st(db_,
          "INSERT OR REPLACE INTO torchscript_verdicts(sha256, allow_list, passed, summary) "
          "VALUES(?1, ?2, ?3, ?4)");
  st.Bind(1, sha256).Bind(2, allow_list).Bind(3, int64_t{v.passed ? 1 : 0}).Bind(4, v.summary);
  return st.Run();
}

absl::StatusOr<std::optional<TorchScriptVerdict>> SqliteJournal::GetVerdict(
    const std::string& sha256, const std::string& allow_list) {
  absl::MutexLock l(&mu_);
  Stmt st(db_,
          "SELECT passed, summary FROM torchscript_verdicts WHERE sha256 = ?1 AND allow_list = ?2");
  st.Bind(1, sha256).Bind(2, allow_list);
  absl::Status s = st.status();
  if (s.ok() && st.Step(&s)) {
    return std::optional<TorchScriptVerdict>(TorchScriptVerdict{st.Int(0) != 0, st.Blob(1)});
  }
  if (!s.ok()) return s;
  return std::optional<TorchScriptVerdict>();
}

}  // namespace fpxint::server
