// File: server/jobs.cc
#include "server/jobs.h"

#include <google/protobuf/util/message_differencer.h>

#include <algorithm>
#include <filesystem>
#include <iterator>
#include <optional>
#include <set>
#include <random>

#include "absl/cleanup/cleanup.h"
#include "absl/hash/hash.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/status_macros.h"
#include "proto/job_quality.h"
#include "server/executor.h"
#include "server/log.h"
#include "server/status_util.h"

namespace fpxint::server {
namespace {

namespace fs = std::filesystem;

std::string NewId(absl::string_view prefix) {
  static std::mt19937_64 rng(std::random_device{}());
  static absl::Mutex mu;
  absl::MutexLock l(&mu);
  return absl::StrFormat("%s-%016x", prefix, rng());
}

bool Terminal(v1::JobState s) {
  return s == v1::SUCCEEDED || s == v1::FAILED || s == v1::CANCELLED;
}

// What a claim (ClaimJob, ClaimTask) makes of a QUEUED record: the RUNNING one of `replica`'s
// next attempt.
std::function<void(v1::Job*)> StartOn(const std::string& replica) {
  return [replica](v1::Job* j) {
    j->set_state(v1::RUNNING);
    j->set_started_unix_ms(NowUnixMs());
    j->set_attempts(j->attempts() + 1);
    j->set_replica(replica);
    j->clear_error();
  };
}

}  // namespace

JobManager::JobManager(Options o, Journal* journal, BlobStore* store, Repository* repo,
                       core::ThreadPool* pool)
    : opts_(o),
      own_metrics_(o.metrics ? nullptr : std::make_unique<Metrics>()),
      metrics_(o.metrics ? o.metrics : own_metrics_.get()),
      journal_(journal),
      store_(store),
      repo_(repo),
      pool_(pool) {
  metrics_->SetWorkers(std::max(1, o.workers));
  metrics_->SetQueueLimit(o.queue_limit);
}

JobManager::~JobManager() {
  if (!workers_.empty()) Shutdown(absl::ZeroDuration());
}

void JobManager::TakeBack(v1::Job* j) const {
  j->set_crashed_attempts(j->crashed_attempts() + 1);
  j->clear_progress();
  if (opts_.max_attempts > 0 && static_cast<int>(j->crashed_attempts()) >= opts_.max_attempts) {
    // Running it again would likely take a server down again.
    j->set_state(v1::FAILED);
    j->set_error(absl::StrCat(
        "the replica running it went away during ", j->crashed_attempts(), " of this job's ",
        j->attempts(), " runs (last ", j->replica().empty() ? "unknown" : j->replica(),
        "; a crash, kill, out-of-memory or a stall past its lease; --max-job-attempts ",
        opts_.max_attempts, "); not run again"));
    j->set_finished_unix_ms(NowUnixMs());
  } else {
    j->set_state(v1::QUEUED);
  }
}

absl::Status JobManager::Reap(bool at_start) {
  // At start, this replica id's own leases are from an earlier life (the same --replica-id
  // after a restart); later they are the jobs running here.
  // Later, this replica's own expired leases are left to it (its renewals failed for a while;
  // it renews them when it can), and only other replicas take them over.
  FPX_ASSIGN_OR_RETURN(
      std::vector<v1::Job> back,
      journal_->ReapLeases(at_start && opts_.journal_exclusive, opts_.replica_id,
                           /*take_mine=*/at_start,
                           [this](v1::Job* j, bool cancel_requested) {
                             if (cancel_requested) {
                               // Its runner is gone: the cancel it was asked for ends it.
                               j->set_state(v1::CANCELLED);
                               j->set_error("cancelled while running (its replica went away)");
                               j->clear_progress();
                               j->set_finished_unix_ms(NowUnixMs());
                               return;
                             }
                             TakeBack(j);
                           }));
  for (const v1::Job& j : back) {
    if (j.state() == v1::CANCELLED) {
      metrics_->JobFinished(j.spec().granularity(), v1::CANCELLED, -1, 0, 0);
      LogInfo(absl::StrCat("job ", j.job_id(), " CANCELLED: ", j.error()));
    } else if (j.state() == v1::FAILED) {
      metrics_->JobFinished(j.spec().granularity(), v1::FAILED, -1, 0, 0);
      LogWarning(absl::StrCat("job ", j.job_id(), " FAILED: ", j.error()));
    } else {
      LogInfo(absl::StrCat("job ", j.job_id(), " lost its runner (", j.replica(), ", attempt ",
                           j.attempts(), "); queued to run again"));
    }
  }
  if (!back.empty()) {
    {
      absl::MutexLock l(&mu_);
      ++submitted_;  // re-queued work for the idle workers
    }
    Announce();
  }
  return absl::OkStatus();
}

absl::Status JobManager::Start() {
  // A journal held alone has no other runner: whatever RUNNING it finds is from a run that died.
  // A shared one: expired leases, and this replica id's own from an earlier life.
  FPX_RETURN_IF_ERROR(Reap(/*at_start=*/true));
  FPX_RETURN_IF_ERROR(journal_->ReplicaHeartbeat(opts_.replica_id));
  RefreshQueued().IgnoreError();  // the keeper retries every second
  for (int i = 0; i < std::max(1, opts_.workers); ++i) {
    workers_.emplace_back([this] { WorkerLoop(); });
  }
  keeper_ = std::thread([this] { KeeperLoop(); });
  absl::MutexLock l(&mu_);
  started_ = true;
  return absl::OkStatus();
}

int JobManager::queued() const { return queued_.load(); }

void JobManager::SetQueued(int64_t n) {
  queued_.store(static_cast<int>(n));
  metrics_->SetJobsQueued(static_cast<int>(n));
}

absl::Status JobManager::RefreshQueued() {
  absl::StatusOr<int64_t> n = journal_->CountJobs(v1::QUEUED);
  if (n.ok()) SetQueued(*n);
  return n.status();
}

absl::StatusOr<v1::Job> JobManager::Submit(v1::SubmitJobRequest req) {
  {
    absl::MutexLock l(&mu_);
    if (!started_) {
      return absl::UnavailableError("the server is starting (recovering its jobs); retry");
    }
  }
  v1::JobSpec spec = req.spec();
  if (spec.model().empty()) {
    return absl::InvalidArgumentError("spec.model: required (the name of an uploaded model)");
  }
  FPX_ASSIGN_OR_RETURN(std::optional<v1::Model> model, journal_->GetModel(spec.model()));
  if (!model) {
    return absl::NotFoundError(absl::StrCat("spec.model: no uploaded model is named '",
                                            spec.model(), "' (ListModels shows them)"));
  }
  FPX_RETURN_IF_ERROR(NormalizeJobSpec(*model, &spec));
  if (req.idempotency_key().size() > 128) {
    return absl::InvalidArgumentError("idempotency_key: at most 128 characters");
  }
  // The job an idempotency key already names: the same spec is answered with it, another spec
  // refused.
  auto previous = [&]() -> absl::StatusOr<std::optional<v1::Job>> {
    FPX_ASSIGN_OR_RETURN(std::optional<v1::Job> prev,
                         journal_->FindJobByIdempotencyKey(req.idempotency_key()));
    if (!prev) return prev;
    if (!google::protobuf::util::MessageDifferencer::Equals(prev->spec(), spec)) {
      return absl::AlreadyExistsError(absl::StrCat("idempotency_key: '", req.idempotency_key(),
                                                   "' was used for job ", prev->job_id(),
                                                   " with a different spec"));
    }
    FPX_ASSIGN_OR_RETURN(v1::Job now, Get(prev->job_id()));
    return std::optional<v1::Job>(std::move(now));
  };
  absl::MutexLock submit_lock(&submit_mu_);
  if (!req.idempotency_key().empty()) {
    FPX_ASSIGN_OR_RETURN(std::optional<v1::Job> prev, previous());
    if (prev) return *prev;
  }
  {
    absl::MutexLock l(&mu_);
    if (stopping_) return absl::UnavailableError("the server is shutting down");
  }
  FPX_ASSIGN_OR_RETURN(int64_t queued, journal_->CountJobs(v1::QUEUED));
  if (queued >= opts_.queue_limit) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the job queue is full (", queued, " queued, --queue-limit ",
                     opts_.queue_limit, "); retry when jobs have finished"));
  }
  v1::Job j;
  j.set_job_id(NewId("job"));
  *j.mutable_spec() = spec;
  j.set_state(v1::QUEUED);
  j.set_idempotency_key(req.idempotency_key());
  j.set_created_unix_ms(NowUnixMs());
  j.mutable_progress()->set_eta_seconds(-1);
  if (absl::Status s = journal_->InsertJob(j); !s.ok()) {
    if (s.code() != absl::StatusCode::kAlreadyExists) return s;
    // The insert was sent again after a lost connection and had committed the first time.
    auto mine = journal_->GetJob(j.job_id());
    if (mine.ok() && *mine && (*mine)->created_unix_ms() == j.created_unix_ms()) {
      j = **mine;
    } else if (!req.idempotency_key().empty()) {
      // Another replica took the same idempotency key a moment ago: answer with its job.
      FPX_ASSIGN_OR_RETURN(std::optional<v1::Job> prev, previous());
      if (prev) return *prev;
      return s;
    } else {
      return s;
    }
  }
  SetQueued(queued + 1);
  metrics_->JobSubmitted(spec.granularity());
  {
    absl::MutexLock l(&mu_);
    ++submitted_;
  }
  Announce();
  return j;
}

absl::StatusOr<v1::Job> JobManager::Get(const std::string& job_id) {
  {
    absl::MutexLock l(&mu_);
    auto it = live_.find(job_id);
    // A run that lost its lease (this replica stalled, another took the job) holds a stale copy
    // until it stops: the journal has the job.
    if (it != live_.end() && !it->second->lease_lost.load()) return it->second->job;
  }
  FPX_ASSIGN_OR_RETURN(std::optional<v1::Job> j, journal_->GetJob(job_id));
  if (!j) return absl::NotFoundError(absl::StrCat("job_id: no job '", job_id, "'"));
  return *j;
}

absl::StatusOr<v1::ListJobsResponse> JobManager::List(const v1::ListJobsRequest& req) {
  int size = req.page_size() == 0 ? 50 : static_cast<int>(req.page_size());
  if (size > 1000) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size: ", req.page_size(), "; accepted 0 (default 50) .. 1000"));
  }
  int64_t before = 0;
  if (!req.page_token().empty() && (!absl::SimpleAtoi(req.page_token(), &before) || before <= 0)) {
    return absl::InvalidArgumentError(
        "page_token: not a token this server issued (use next_page_token of the last response)");
  }
  int64_t next = 0;
  FPX_ASSIGN_OR_RETURN(std::vector<v1::Job> jobs,
                       journal_->ListJobs(req.state(), before, size, &next));
  v1::ListJobsResponse resp;
  absl::MutexLock l(&mu_);
  for (v1::Job& j : jobs) {
    // A job running here has fresher progress in memory; the journal's row is the newer one
    // when the two states differ (a new state is written there first).
    auto it = live_.find(j.job_id());
    const bool same = it != live_.end() && it->second->job.state() == j.state();
    *resp.add_jobs() = same ? it->second->job : j;
  }
  if (next > 0) resp.set_next_page_token(std::to_string(next));
  return resp;
}

absl::StatusOr<v1::Job> JobManager::Cancel(const std::string& job_id, absl::Duration wait) {
  auto flag_local = [&] {
    std::shared_ptr<Live> live;
    {
      absl::MutexLock l(&mu_);
      auto it = live_.find(job_id);
      if (it == live_.end()) return false;
      live = it->second;
    }
    FlagCancel(live);
    return true;
  };
  if (!flag_local()) {
    // Queued (cancelled in the journal at once) or running on another replica (asked through
    // the journal: its runner stops after its next lease renewal).
    const int64_t now = NowUnixMs();
    bool cancelled_here = false;
    FPX_ASSIGN_OR_RETURN(std::optional<v1::Job> j,
                         journal_->CancelJob(job_id, [now, &cancelled_here](v1::Job* q) {
                           q->set_state(v1::CANCELLED);
                           q->set_error("cancelled before it started");
                           q->set_finished_unix_ms(now);
                           cancelled_here = true;
                         }));
    if (!j) return absl::NotFoundError(absl::StrCat("job_id: no job '", job_id, "'"));
    if (cancelled_here) {
      ForgetCached(job_id);
      metrics_->JobFinished(j->spec().granularity(), v1::CANCELLED, -1, 0, 0);
      RefreshQueued().IgnoreError();
      Announce();
      return *j;
    }
    if (j->state() != v1::RUNNING) {
      return absl::FailedPreconditionError(absl::StrCat(
          "job ", job_id, " is already ", v1::JobState_Name(j->state()), "; nothing to cancel"));
    }
    flag_local();  // claimed here a moment ago
  }
  const absl::Time deadline = absl::Now() + wait;
  for (;;) {
    FPX_ASSIGN_OR_RETURN(v1::Job j, Get(job_id));
    if (Terminal(j.state()) || absl::Now() >= deadline) return j;
    absl::MutexLock l(&mu_);
    changed_.WaitWithDeadline(&mu_, std::min(deadline, absl::Now() + absl::Milliseconds(100)));
  }
}

absl::StatusOr<v1::Job> JobManager::Wait(const std::string& job_id, uint64_t* seen,
                                         absl::Duration timeout, bool* changed) {
  *changed = false;
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    std::shared_ptr<Live> live;
    {
      absl::MutexLock l(&mu_);
      auto it = live_.find(job_id);
      if (it != live_.end()) live = it->second;
      if (live) {
        while (live->version == *seen) {
          if (changed_.WaitWithDeadline(&mu_, deadline)) break;
        }
        if (live->version != *seen) {
          *seen = live->version;
          *changed = true;
        }
        return live->job;
      }
    }
    // Not running here: the journal's record, told apart by a digest of its bytes (the top bit
    // set keeps it apart from the small versions of a live job).
    FPX_ASSIGN_OR_RETURN(std::optional<v1::Job> j, ReadForWatch(job_id));
    if (!j) return absl::NotFoundError(absl::StrCat("job_id: no job '", job_id, "'"));
    const uint64_t digest =
        absl::HashOf(j->SerializeAsString()) | (uint64_t{1} << 63);
    if (digest != *seen) {
      *seen = digest;
      *changed = true;
      return *j;
    }
    if (absl::Now() >= deadline) return *j;
    absl::MutexLock l(&mu_);
    changed_.WaitWithDeadline(&mu_, std::min(deadline, absl::Now() + absl::Milliseconds(250)));
  }
}

absl::StatusOr<std::optional<v1::Job>> JobManager::ReadForWatch(const std::string& job_id) {
  constexpr absl::Duration kReuse = absl::Milliseconds(200);
  uint64_t gen;
  {
    absl::MutexLock l(&cache_mu_);
    auto it = cache_.find(job_id);
    if (it != cache_.end() && absl::Now() - it->second.read < kReuse) return it->second.job;
    gen = cache_gen_;
  }
  const absl::Time read = absl::Now();
  FPX_ASSIGN_OR_RETURN(std::optional<v1::Job> j, journal_->GetJob(job_id));
  absl::MutexLock l(&cache_mu_);
  if (gen == cache_gen_) {
    if (cache_.size() >= 4096) {
      for (auto it = cache_.begin(); it != cache_.end();) {
        it = read - it->second.read >= kReuse ? cache_.erase(it) : std::next(it);
      }
    }
    cache_[job_id] = CachedJob{read, j};
  }
  return j;
}

void JobManager::ForgetCached(const std::string& job_id) {
  absl::MutexLock l(&cache_mu_);
  ++cache_gen_;
  cache_.erase(job_id);
}

bool JobManager::FencedWrite(const std::shared_ptr<Live>& live, const v1::Job& next,
                             bool final_write) {
  if (live->lease_lost.load()) return false;
  absl::StatusOr<bool> held = true;
  if (final_write) {
    held = journal_->FinishLeased(next, opts_.replica_id);
  } else {
    auto check = journal_->RenewLease(next, opts_.replica_id, opts_.lease);
    if (check.ok()) {
      held = check->held;
      if (check->cancel_requested && !live->user_cancel.load()) {
        LogInfo(absl::StrCat("job ", next.job_id(), ": cancel asked on another replica"));
        FlagCancel(live);
      }
    } else {
      held = check.status();
    }
  }
  if (!held.ok()) {
    // The journal is unreachable: the lease may lapse, and then the fence refuses later writes.
    LogError(absl::StrCat("job ", next.job_id(), ": ", held.status().message()));
    return false;
  }
  if (!*held) {
    // A renewal that lost the race with this runner's own final write is no lost lease.
    if (!final_write && live->finishing.load()) return false;
    live->lease_lost.store(true);
    live->cancel.store(true);
    fenced_.fetch_add(1);
    metrics_->JobWriteFenced();
    LogWarning(absl::StrCat("job ", next.job_id(), " attempt ", next.attempts(),
                            ": this replica's lease was lost (it expired, or the job was taken "
                            "over or deleted); its ",
                            final_write ? v1::JobState_Name(next.state()) : "progress",
                            " write was refused and the job is left to its new runner"));
    return false;
  }
  return true;
}

void JobManager::Commit(const std::shared_ptr<Live>& live, v1::Job next) {
  live->finishing.store(true);
  // A journal error (not a refusal) is retried while the lease can still be valid: giving up
  // leaves the job RUNNING in the journal, to be reaped and run again after its lease.
  bool written = false;
  const absl::Time give_up = absl::Now() + opts_.lease;
  for (;;) {
    written = FencedWrite(live, next, /*final_write=*/true);
    if (written || live->lease_lost.load() || absl::Now() >= give_up) break;
    absl::SleepFor(absl::Milliseconds(500));
  }
  if (!written) {
    // What watchers see next is the journal's record (the new runner's, or RUNNING until the
    // lease is reaped), not a state this replica could not write.
    auto now = journal_->GetJob(next.job_id());
    if (now.ok() && now->has_value()) {
      next = **now;
    } else {
      next = live->job;
    }
  }
  ForgetCached(next.job_id());
  absl::ReleasableMutexLock l(&mu_);
  live->job = std::move(next);
  ++live->version;
  if (auto it = live_.find(live->job.job_id()); it != live_.end() && it->second == live) {
    live_.erase(it);
  }
  changed_.SignalAll();
  l.Release();
  Announce();
}

void JobManager::Notify(const std::shared_ptr<Live>& live) {
  {
    absl::MutexLock l(&mu_);
    ++live->version;
    changed_.SignalAll();
  }
  Announce();
}

void JobManager::SetChangeListener(std::function<void()> fn) {
  absl::MutexLock l(&listener_mu_);
  listener_ = std::move(fn);
}

void JobManager::Announce() {
  absl::MutexLock l(&listener_mu_);
  if (listener_) listener_();
}

void JobManager::WorkerLoop() {
  uint64_t seen = 0;
  bool idle = false;
  for (;;) {
    {
      absl::MutexLock l(&mu_);
      if (idle) {
        // Woken by a local submission at once; other replicas' submissions are found by polling.
        struct Arg {
          JobManager* m;
          uint64_t seen;
        } arg{this, seen};
        mu_.AwaitWithTimeout(
            absl::Condition(
                +[](Arg* a) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                  return a->m->stopping_ || a->m->submitted_ != a->seen;
                },
                &arg),
            opts_.poll);
      }
      if (stopping_) return;
      seen = submitted_;
      // A claim in flight counts as busy, so Shutdown's grace covers a job claimed just as it
      // began (else the job, already RUNNING in the journal, went back to the queue).
      busy_.fetch_add(1);
    }
    auto claimed =
        journal_->ClaimJob(opts_.replica_id, opts_.lease, StartOn(opts_.replica_id));
    if (!claimed.ok()) LogError(absl::StrCat("job queue: ", claimed.status().message()));
    idle = !claimed.ok() || !*claimed;
    if (idle) {
      absl::MutexLock l(&mu_);
      busy_.fetch_sub(1);
      changed_.SignalAll();
      continue;
    }
    auto live = Adopt(**std::move(claimed));
    if (live->job.parent_job_id().empty()) SetQueued(std::max(0, queued_.load() - 1));
    metrics_->WorkersBusyAdd(1);
    Announce();
    Run(live, /*inline_task=*/false);  // ends with the job's final Commit
  }
}

void JobManager::KeeperLoop() {
  const absl::Duration tick = std::min(absl::Seconds(1), opts_.lease / 3);
  absl::Time last_reap = absl::Now();
  for (;;) {
    {
      absl::MutexLock l(&mu_);
      mu_.AwaitWithTimeout(
          absl::Condition(
              +[](JobManager* m) ABSL_NO_THREAD_SAFETY_ANALYSIS { return m->keeper_stop_; },
              this),
          tick);
      if (keeper_stop_) return;
    }
    KeepLeases();
    // The journal's reachability, every tick: a cheap read (which also reconnects to a
    // PostgreSQL server that came back) that keeps the queue gauge current.
    const absl::Status reached = RefreshQueued();
    if (reached.ok() != journal_ok_.load()) {
      journal_ok_.store(reached.ok());
      if (reached.ok()) {
        LogInfo("the journal is reachable again");
      } else {
        LogError(absl::StrCat("the journal is unreachable: ", reached.message()));
      }
      if (journal_health_) journal_health_(reached.ok());
    }
    if (absl::Now() - last_reap >= opts_.lease / 3) {
      last_reap = absl::Now();
      if (absl::Status s = Reap(/*at_start=*/false); !s.ok()) {
        LogError(absl::StrCat("job lease reaper: ", s.message()));
      }
      if (absl::Status s = journal_->ReplicaHeartbeat(opts_.replica_id); !s.ok()) {
        LogError(absl::StrCat("replica heartbeat: ", s.message()));
      }
      if (!opts_.journal_exclusive) {
        RemoveTempOfGoneReplicas(journal_, store_, opts_.lease, /*journal_exclusive=*/false)
            .IgnoreError();  // tried again at the next reap
      }
    }
  }
}

absl::StatusOr<int> RemoveTempOfGoneReplicas(Journal* journal, BlobStore* store,
                                             absl::Duration lease, bool journal_exclusive) {
  std::set<std::string> alive;
  if (!journal_exclusive) {
    FPX_ASSIGN_OR_RETURN(std::vector<std::string> live, journal->LiveReplicas(2 * lease));
    alive.insert(live.begin(), live.end());
  }
  const int n = store->RemoveTempOfGoneReplicas(
      [&alive](const std::string& r) { return alive.count(r) > 0; });
  if (n > 0) {
    LogInfo(absl::StrCat("removed the temp files of ", n, " replica run(s) that are gone from ",
                         store->root(), "/tmp"));
  }
  return n;
}

void JobManager::KeepLeases() {
  struct Due {
    std::shared_ptr<Live> live;
    v1::Job job;
    uint64_t version;
  };
  std::vector<Due> due;
  const absl::Time now = absl::Now();
  {
    absl::MutexLock l(&mu_);
    for (auto& [id, live] : live_) {
      if (live->job.state() != v1::RUNNING || live->lease_lost.load() ||
          live->finishing.load()) {
        continue;
      }
      if (live->version != live->persisted || now - live->renewed >= opts_.lease / 3) {
        due.push_back({live, live->job, live->version});
      }
    }
  }
  for (Due& d : due) {
    // Marked renewed only once the journal has it: a failed renewal is tried again next tick.
    if (!FencedWrite(d.live, d.job, /*final_write=*/false)) continue;
    absl::MutexLock l(&mu_);
    d.live->persisted = d.version;
    d.live->renewed = now;
  }
}

void JobManager::Run(const std::shared_ptr<Live>& live, bool inline_task) {
  const std::string id = live->job.job_id();
  const v1::JobSpec spec = live->job.spec();
  const bool task = !live->job.parent_job_id().empty();
  bool sharded = false;  // runs as shard tasks (this run coordinates them)
  LogInfo(absl::StrCat("job ", id, " running: ", v1::Granularity_Name(spec.granularity()), " of '",
                       spec.model(), "' b=", spec.weight_bits(), " K=", spec.weight_terms(),
                       task ? absl::StrCat(", shard '", live->job.shard(), "' of job ",
                                           live->job.parent_job_id())
                            : ""));
  absl::StatusOr<JobOutput> out = absl::InternalError("not run");
  std::string scratch;
  if (auto model = journal_->GetModel(spec.model()); !model.ok() || !*model) {
    out = absl::FailedPreconditionError(
        absl::StrCat("model '", spec.model(), "' is no longer available"));
  } else if (auto dir = store_->NewTempDir("job"); !dir.ok()) {
    out = dir.status();
  } else {
    scratch = *dir;
    JobContext ctx;
    ctx.model = **model;
    if (ctx.model.format() == v1::HF_DIRECTORY) {
      for (const v1::ModelFile& f : ctx.model.files()) {
        ctx.files.push_back({f.path(), store_->PathOf(f.sha256()), f.sha256(), f.role()});
      }
    } else {
      ctx.source_path = store_->PathOf(ctx.model.sha256());
    }
    ctx.scratch_dir = scratch;
    absl::Status vetted = absl::OkStatus();
    if (ctx.model.format() == v1::TORCHSCRIPT) {
      vetted = opts_.vetter ? opts_.vetter->Require(ctx.model.sha256(), ctx.source_path)
                            : absl::InternalError("job manager: no TorchScript vetter");
    }
    ctx.pool = pool_;
    ctx.torch_threads = opts_.torch_threads;
    ctx.memory_limit = opts_.job_memory_limit;
    ctx.cancel = &live->cancel;
    ctx.shard = live->job.shard();
    sharded = !task && IsSharded(spec, ctx.model);
    ctx.progress = [this, live](const v1::Progress& p) {
      {
        absl::MutexLock l(&mu_);
        v1::Progress& dst = *live->job.mutable_progress();
        dst = p;
        const double elapsed = absl::ToDoubleSeconds(absl::Now() - live->started);
        dst.set_eta_seconds(p.fraction() > 0.02 ? elapsed * (1 - p.fraction()) / p.fraction() : -1);
      }
      Notify(live);
    };
    if (!vetted.ok()) {
      out = vetted;
    } else if (sharded) {
      out = Coordinate(live, ctx);
    } else {
      out = RunJob(spec, ctx);
    }
    // A cancel asked on another replica since the last lease renewal wins as well: one more
    // renewal reads it (FencedWrite flags it) before anything is stored.
    if (out.ok() && !live->user_cancel.load()) {
      v1::Job now;
      {
        absl::MutexLock l(&mu_);
        now = live->job;
      }
      FencedWrite(live, now, /*final_write=*/false);
    }
    // A cancel that arrived after the expansion's last poll (while it wrote its outputs) still
    // wins: nothing has been stored or deployed yet.
    if (out.ok() && live->user_cancel.load()) out = absl::CancelledError("cancelled");
  }
  std::vector<v1::Artifact> artifacts;
  absl::Status final_status = out.ok() ? Finish(live, &*out, &artifacts) : out.status();
  v1::Job next;
  {
    absl::MutexLock l(&mu_);
    next = live->job;
  }
  if (!final_status.ok() && live->interrupted.load() && !live->user_cancel.load()) {
    // Going back to the queue: a cancel asked on another replica since the last renewal ends
    // the job instead (the renewal reads it).
    FencedWrite(live, next, /*final_write=*/false);
  }
  // The result and artifacts appear with the SUCCEEDED state, never before it (DownloadArtifact
  // reads the journal). A user's cancel wins over a shutdown's interruption.
  if (final_status.ok()) {
    next.set_state(v1::SUCCEEDED);
    next.mutable_progress()->set_phase("done");
    *next.mutable_result() = out->result;
    for (v1::Artifact& a : artifacts) *next.add_artifacts() = std::move(a);
  } else if (live->user_cancel.load()) {
    next.set_state(v1::CANCELLED);
    next.set_error("cancelled while running");
  } else if (live->interrupted.load()) {
    next.set_state(v1::QUEUED);  // runs again after the restart
    next.clear_progress();
  } else {
    next.set_state(v1::FAILED);
    next.set_error(std::string(final_status.message()));
    // A job that ran and then failed its quality gate (or its deployment) keeps its report, so
    // the caller sees what was measured.
    if (out.ok()) *next.mutable_result() = out->result;
  }
  // Everything a client could check once it sees the final state (scratch gone, metrics
  // counted, workers gauge) happens before that state becomes visible.
  if (!scratch.empty()) {
    std::error_code ec;
    fs::remove_all(scratch, ec);
  }
  if (next.state() != v1::QUEUED && !live->lease_lost.load() && !task) {
    // QUEUED: interrupted by shutdown, runs again; a lost lease: the job's new runner counts it.
    // A shard task is counted with its job.
    next.set_finished_unix_ms(NowUnixMs());
    uint64_t written = 0;
    for (const v1::Artifact& a : next.artifacts()) written += a.size_bytes();
    metrics_->JobFinished(spec.granularity(), next.state(),
                          absl::ToDoubleSeconds(absl::Now() - live->started),
                          next.result().layers_size(), written);
  }
  if (!inline_task) metrics_->WorkersBusyAdd(-1);
  LogInfo(absl::StrCat("job ", id, " ", v1::JobState_Name(next.state()),
                       final_status.ok() ? "" : absl::StrCat(": ", final_status.message())));
  if (!inline_task) busy_.fetch_sub(1);
  const v1::JobState final_state = next.state();
  Commit(live, std::move(next));
  if (sharded && !live->lease_lost.load()) EndTasks(id, final_state);
}

bool JobManager::IsSharded(const v1::JobSpec& spec, const v1::Model& model) {
  return spec.granularity() == v1::TENSOR && model.format() == v1::HF_DIRECTORY;
}

std::shared_ptr<JobManager::Live> JobManager::Adopt(v1::Job claimed) {
  ForgetCached(claimed.job_id());
  auto live = std::make_shared<Live>();
  live->job = std::move(claimed);
  live->started = absl::Now();
  live->renewed = live->started;
  {
    absl::MutexLock l(&mu_);
    live_[live->job.job_id()] = live;
    if (interrupting_) {  // claimed as Shutdown's grace ran out: back to the queue at once
      live->interrupted.store(true);
      live->cancel.store(true);
    }
    changed_.SignalAll();
  }
  return live;
}

void JobManager::FlagCancel(const std::shared_ptr<Live>& live) {
  live->user_cancel.store(true);
  live->cancel.store(true);
  // The job's shard tasks running here stop with it (their runs poll their own flags).
  StopTasksHere(live->job.job_id());
}

void JobManager::StopTasksHere(const std::string& job_id) {
  absl::MutexLock l(&mu_);
  for (auto& [id, other] : live_) {
    if (other->job.parent_job_id() == job_id) {
      other->user_cancel.store(true);
      other->cancel.store(true);
    }
  }
}

absl::StatusOr<JobOutput> JobManager::Coordinate(const std::shared_ptr<Live>& live,
                                                 const JobContext& ctx) {
  v1::Job job;
  {
    absl::MutexLock l(&mu_);
    job = live->job;
  }
  const std::string& id = job.job_id();
  // One task per shard, in the index's order; a run after a lost runner keeps the tasks it finds
  // (those done stay done, those running keep their runners).
  std::vector<const v1::ModelFile*> shards;
  uint64_t total_bytes = 0;
  for (const v1::ModelFile& f : ctx.model.files()) {
    if (f.role() != "shard") continue;
    shards.push_back(&f);
    total_bytes += f.size_bytes();
  }
  if (shards.empty()) return absl::FailedPreconditionError("the model lists no shard");
  FPX_ASSIGN_OR_RETURN(std::vector<v1::Job> existing, journal_->TasksOf(id));
  std::set<std::string> have;
  for (const v1::Job& t : existing) have.insert(t.shard());
  int created = 0;
  for (size_t i = 0; i < shards.size(); ++i) {
    if (have.count(shards[i]->path())) continue;
    v1::Job t;
    t.set_job_id(absl::StrFormat("%s.shard-%05d", id, i));
    *t.mutable_spec() = job.spec();
    // The job's gate and deployment apply to the whole model, once, when it is assembled.
    t.mutable_spec()->clear_deploy();
    t.mutable_spec()->set_max_rel_error(0);
    t.set_state(v1::QUEUED);
    t.set_parent_job_id(id);
    t.set_shard(shards[i]->path());
    t.set_created_unix_ms(NowUnixMs());
    t.mutable_progress()->set_eta_seconds(-1);
    absl::Status s = journal_->InsertJob(t);
    if (!s.ok() && s.code() != absl::StatusCode::kAlreadyExists) return s;
    ++created;
  }
  if (created > 0) {
    LogInfo(absl::StrCat("job ", id, ": ", created, " of ", shards.size(),
                         " shard task(s) queued for any replica"));
    absl::MutexLock l(&mu_);
    ++submitted_;  // idle local workers take tasks too
  }
  Announce();
  const auto start = StartOn(opts_.replica_id);
  // This replica runs the job's queued tasks itself, one at a time on a thread of its own, while
  // this one follows every task (on any replica) into the job's progress.
  std::thread runner;
  std::atomic<bool> running_here{false};
  auto join_runner = [&] {
    if (runner.joinable()) runner.join();
  };
  absl::Cleanup stop_runner = [&] {
    if (!runner.joinable()) return;
    // The job failed or was cancelled: its task here stops too. Interrupted (shutdown), the task
    // is interrupted with it and queued again; with the job's lease lost, the task (leased on
    // its own) finishes for the job's new runner.
    if (!live->interrupted.load() && !live->lease_lost.load()) StopTasksHere(id);
    runner.join();
  };
  std::vector<v1::Job> tasks;
  for (;;) {
    if (live->cancel.load()) {
      if (live->user_cancel.load()) return absl::CancelledError("cancelled");
      return absl::AbortedError("interrupted; its shard tasks are kept for the next run");
    }
    if (!running_here.load()) {
      FPX_ASSIGN_OR_RETURN(std::optional<v1::Job> claimed,
                           journal_->ClaimTask(id, opts_.replica_id, opts_.lease, start));
      if (claimed) {
        join_runner();
        running_here.store(true);
        runner = std::thread([this, &running_here, t = Adopt(*std::move(claimed))] {
          Run(t, /*inline_task=*/true);
          running_here.store(false);
          absl::MutexLock l(&mu_);
          changed_.SignalAll();
        });
      }
    }
    FPX_ASSIGN_OR_RETURN(tasks, journal_->TasksOf(id));
    std::map<std::string, const v1::Job*> by_shard;
    for (const v1::Job& t : tasks) by_shard[t.shard()] = &t;
    v1::Progress p;
    p.set_phase("expanding");
    p.set_tasks_total(static_cast<uint32_t>(shards.size()));
    p.set_layers_total(static_cast<uint32_t>(ctx.model.tensor_count()));
    p.set_terms(job.spec().weight_terms());
    double fraction = 0;
    for (const v1::ModelFile* f : shards) {
      auto it = by_shard.find(f->path());
      if (it == by_shard.end()) {
        return absl::InternalError(absl::StrCat("shard task for '", f->path(), "' is missing"));
      }
      const v1::Job& t = *it->second;
      const double w = total_bytes > 0 ? static_cast<double>(f->size_bytes()) / total_bytes
                                       : 1.0 / shards.size();
      if (t.state() == v1::FAILED || t.state() == v1::CANCELLED) {
        return absl::FailedPreconditionError(
            absl::StrCat("shard '", t.shard(), "' (task ", t.job_id(), ") ",
                         v1::JobState_Name(t.state()), ": ", t.error()));
      }
      p.set_layers_done(p.layers_done() + t.progress().layers_done());
      p.set_bytes_written(p.bytes_written() + t.progress().bytes_written());
      if (t.state() == v1::SUCCEEDED) {
        p.set_tasks_done(p.tasks_done() + 1);
        fraction += w;
      } else if (t.state() == v1::RUNNING) {
        p.set_tasks_running(p.tasks_running() + 1);
        fraction += w * t.progress().fraction();
        if (p.current_layer().empty()) p.set_current_layer(t.progress().current_layer());
      }
    }
    p.set_fraction(0.98 * fraction);
    ctx.progress(p);
    if (p.tasks_done() == shards.size()) break;
    absl::MutexLock l(&mu_);
    changed_.WaitWithTimeout(&mu_, absl::Milliseconds(100));
  }
  join_runner();
  std::vector<ShardTaskOutput> outputs;
  for (const v1::ModelFile* f : shards) {
    for (const v1::Job& t : tasks) {
      if (t.shard() != f->path()) continue;
      outputs.push_back({t.shard(), t.result(),
                         std::vector<v1::Artifact>(t.artifacts().begin(), t.artifacts().end())});
    }
  }
  {
    absl::MutexLock l(&mu_);
    live->job.mutable_progress()->set_phase("indexing");
  }
  Notify(live);
  BlobStore* store = store_;
  return AssembleDirectoryJob(
      job.spec(), ctx, outputs, [store](const std::string& sha) { return store->PathOf(sha); },
      absl::ToDoubleSeconds(absl::Now() - live->started));
}

void JobManager::EndTasks(const std::string& job_id, v1::JobState state) {
  if (state == v1::QUEUED) return;  // interrupted: the next run goes on with them
  auto tasks = journal_->TasksOf(job_id);
  if (!tasks.ok()) {
    LogWarning(absl::StrCat("job ", job_id, ": its shard tasks stay until retention: ",
                            tasks.status().message()));
    return;
  }
  for (const v1::Job& t : *tasks) {
    if (state == v1::SUCCEEDED) {
      // The job's artifacts now reference the tasks' outputs: only the records go.
      journal_->DeleteJob(t.job_id()).IgnoreError();
    } else if (Terminal(t.state())) {
      DeleteFinished(t).IgnoreError();  // outputs nothing else references go with them
    } else {
      Cancel(t.job_id(), absl::ZeroDuration()).IgnoreError();  // retention removes it later
    }
  }
}

absl::Status JobManager::Finish(const std::shared_ptr<Live>& live, JobOutput* out,
                                std::vector<v1::Artifact>* artifacts) {
  const v1::JobSpec& gate_spec = live->job.spec();
  if (gate_spec.max_rel_error() > 0) {
    // The gate comes first: a job above it stores no artifact and deploys nothing.
    std::string what;
    const double err = JobQualityError(out->result, &what);
    if (err < 0 || err > gate_spec.max_rel_error()) {
      return absl::FailedPreconditionError(
          err < 0 ? absl::StrCat("quality gate: the job measured no error to compare with "
                                 "spec.max_rel_error; nothing was stored or deployed")
                  : absl::StrFormat("quality gate: %s is %.4e, above spec.max_rel_error %.4e; "
                                    "nothing was stored or deployed",
                                    what, err, gate_spec.max_rel_error()));
    }
  }
  for (const ProducedFile& f : out->files) {
    uint64_t size = 0;
    std::string sha = f.sha256;
    if (f.path.empty()) {  // already stored (a directory model's sidecar, copied as it is)
      FPX_ASSIGN_OR_RETURN(size, store_->SizeOf(f.sha256));
    } else {
      FPX_ASSIGN_OR_RETURN(size, FileSize(f.path));
      FPX_ASSIGN_OR_RETURN(sha, store_->ImportFile(f.path, f.sha256));
    }
    v1::Artifact a;
    a.set_artifact_id(NewId("art"));
    a.set_kind(f.kind);
    a.set_file_name(f.file_name);
    a.set_sha256(sha);
    a.set_size_bytes(size);
    artifacts->push_back(a);
  }
  const v1::JobSpec& spec = live->job.spec();
  if (spec.deploy().enabled()) {
    FPX_ASSIGN_OR_RETURN(std::optional<v1::Model> m, journal_->GetModel(spec.model()));
    if (!m) return absl::FailedPreconditionError("the model was deleted before deployment");
    v1::Deployment d;
    d.set_name(spec.deploy().name().empty() ? spec.model() + "-fpxint" : spec.deploy().name());
    d.set_version(spec.deploy().version());
    d.set_platform(kPlatformSeries);
    d.set_source_sha256(m->sha256());
    *d.mutable_spec() = spec;
    *d.mutable_inputs() = m->inputs();
    *d.mutable_batching() = spec.deploy().batching();
    d.set_job_id(live->job.job_id());
    // The version serves this job's packed artifact.
    for (const v1::Artifact& a : *artifacts) {
      if (a.kind() == kPackedArtifactKind) d.set_artifact_sha256(a.sha256());
    }
    {
      absl::MutexLock l(&mu_);
      live->job.mutable_progress()->set_phase("deploying");
    }
    Notify(live);
    // Deploying is visible to every replica: only while this replica still holds the job.
    v1::Job holding;
    {
      absl::MutexLock l(&mu_);
      holding = live->job;
    }
    if (!FencedWrite(live, holding, /*final_write=*/false)) {
      return absl::AbortedError("this replica lost the job's lease; not deployed");
    }
    FPX_ASSIGN_OR_RETURN(v1::Deployment done, repo_->Deploy(d, /*load=*/true));
    out->result.set_deployed_name(done.name());
    out->result.set_deployed_version(done.version());
  }
  {
    absl::MutexLock l(&mu_);
    live->job.mutable_progress()->set_phase("done");  // outputs in the store; state next
  }
  Notify(live);
  return absl::OkStatus();
}

absl::StatusOr<v1::DeleteJobResponse> JobManager::Delete(const std::string& job_id) {
  {
    absl::MutexLock l(&mu_);
    if (live_.count(job_id)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "job ", job_id, " is queued or running; cancel it (CancelJob) before deleting it"));
    }
  }
  FPX_ASSIGN_OR_RETURN(std::optional<v1::Job> j, journal_->GetJob(job_id));
  if (!j) return absl::NotFoundError(absl::StrCat("job_id: no job '", job_id, "'"));
  if (!Terminal(j->state())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", job_id, " is ", v1::JobState_Name(j->state()), "; cancel it before deleting it"));
  }
  return DeleteFinished(*j);
}

absl::StatusOr<v1::DeleteJobResponse> JobManager::DeleteFinished(const v1::Job& j) {
  FPX_RETURN_IF_ERROR(journal_->DeleteJob(j.job_id()));
  Journal* journal = journal_;
  auto referenced = [journal](const std::string& sha) { return journal->BlobReferenced(sha); };
  v1::DeleteJobResponse out;
  for (const v1::Artifact& a : j.artifacts()) {
    out.set_artifacts_deleted(out.artifacts_deleted() + 1);
    if (std::optional<uint64_t> freed = store_->RemoveIfUnreferenced(a.sha256(), referenced)) {
      out.set_bytes_freed(out.bytes_freed() + *freed);
    }
  }
  LogInfo(absl::StrCat("job ", j.job_id(), " deleted: ", out.artifacts_deleted(),
                       " artifact(s), ", out.bytes_freed(), " bytes freed"));
  return out;
}

int JobManager::DeleteFinishedBefore(absl::Time cutoff) {
  auto done = journal_->JobsInStates({v1::SUCCEEDED, v1::FAILED, v1::CANCELLED});
  if (!done.ok()) return 0;
  const int64_t cutoff_ms = absl::ToUnixMillis(cutoff);
  int n = 0;
  for (const v1::Job& j : *done) {
    const int64_t at = j.finished_unix_ms() > 0 ? j.finished_unix_ms() : j.created_unix_ms();
    if (at < cutoff_ms && DeleteFinished(j).ok()) ++n;
  }
  return n;
}

void JobManager::Shutdown(absl::Duration grace) {
  {
    absl::MutexLock l(&mu_);
    if (stopping_ && workers_.empty()) return;
    stopping_ = true;
    changed_.SignalAll();
    const absl::Time deadline = absl::Now() + grace;
    while (busy_.load() > 0) {
      if (changed_.WaitWithDeadline(&mu_, deadline)) break;
    }
    interrupting_ = true;
    for (auto& [id, live] : live_) {
      live->interrupted.store(true);
      live->cancel.store(true);
    }
  }
  for (std::thread& t : workers_) t.join();
  workers_.clear();
  {
    absl::MutexLock l(&mu_);
    keeper_stop_ = true;
  }
  if (keeper_.joinable()) keeper_.join();
}

}  // namespace fpxint::server
