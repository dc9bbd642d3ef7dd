// File: server/jobs.cc
#include "server/jobs.h"

#include <google/protobuf/util/message_differencer.h>

#include <algorithm>
#include <filesystem>
#include <optional>
#include <random>

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

absl::Status JobManager::Start() {
  FPX_ASSIGN_OR_RETURN(std::vector<v1::Job> pending,
                       journal_->JobsInStates({v1::QUEUED, v1::RUNNING}));
  for (v1::Job& j : pending) {
    // Found RUNNING: the server died during this run (a clean shutdown re-queues its jobs).
    if (j.state() == v1::RUNNING) j.set_crashed_attempts(j.crashed_attempts() + 1);
    if (opts_.max_attempts > 0 && static_cast<int>(j.crashed_attempts()) >= opts_.max_attempts) {
      // Running it again would likely take the server down again.
      j.set_state(v1::FAILED);
      j.set_error(absl::StrCat(
          "the server died during ", j.crashed_attempts(), " of this job's ", j.attempts(),
          " runs (a crash, kill or out-of-memory during the run; --max-job-attempts ",
          opts_.max_attempts, "); not run again"));
      j.clear_progress();
      j.set_finished_unix_ms(NowUnixMs());
      FPX_RETURN_IF_ERROR(journal_->PutJob(j));
      metrics_->JobFinished(j.spec().granularity(), v1::FAILED, -1, 0, 0);
      LogWarning(absl::StrCat("job ", j.job_id(), " FAILED: ", j.error()));
      continue;
    }
    if (j.state() == v1::RUNNING) {
      LogInfo(absl::StrCat("job ", j.job_id(), " was interrupted (attempt ", j.attempts(),
                           "); queued to run again"));
    }
    j.set_state(v1::QUEUED);
    j.clear_progress();
    FPX_RETURN_IF_ERROR(journal_->PutJob(j));
    auto live = std::make_shared<Live>();
    live->job = j;
    absl::MutexLock l(&mu_);
    live_[j.job_id()] = live;
    queue_.push_back(j.job_id());
    metrics_->SetJobsQueued(static_cast<int>(queue_.size()));
  }
  for (int i = 0; i < std::max(1, opts_.workers); ++i) {
    workers_.emplace_back([this] { WorkerLoop(); });
  }
  absl::MutexLock l(&mu_);
  started_ = true;
  return absl::OkStatus();
}

int JobManager::queued() const {
  absl::MutexLock l(&mu_);
  return static_cast<int>(queue_.size());
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
  absl::MutexLock submit_lock(&submit_mu_);
  if (!req.idempotency_key().empty()) {
    FPX_ASSIGN_OR_RETURN(std::optional<v1::Job> prev,
                         journal_->FindJobByIdempotencyKey(req.idempotency_key()));
    if (prev) {
      if (!google::protobuf::util::MessageDifferencer::Equals(prev->spec(), spec)) {
        return absl::AlreadyExistsError(absl::StrCat("idempotency_key: '", req.idempotency_key(),
                                                     "' was used for job ", prev->job_id(),
                                                     " with a different spec"));
      }
      return Get(prev->job_id());
    }
  }
  auto live = std::make_shared<Live>();
  {
    absl::MutexLock l(&mu_);
    if (stopping_) return absl::UnavailableError("the server is shutting down");
    if (static_cast<int>(queue_.size()) + leaving_queue_ >= opts_.queue_limit) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the job queue is full (", opts_.queue_limit,
                       " queued, --queue-limit); retry when jobs have finished"));
    }
  }
  v1::Job& j = live->job;
  j.set_job_id(NewId("job"));
  *j.mutable_spec() = spec;
  j.set_state(v1::QUEUED);
  j.set_idempotency_key(req.idempotency_key());
  j.set_created_unix_ms(NowUnixMs());
  j.mutable_progress()->set_eta_seconds(-1);
  FPX_RETURN_IF_ERROR(journal_->PutJob(j));
  absl::MutexLock l(&mu_);
  live_[j.job_id()] = live;
  queue_.push_back(j.job_id());
  metrics_->JobSubmitted(spec.granularity());
  metrics_->SetJobsQueued(static_cast<int>(queue_.size()));
  changed_.SignalAll();
  return j;
}

absl::StatusOr<v1::Job> JobManager::Get(const std::string& job_id) {
  {
    absl::MutexLock l(&mu_);
    auto it = live_.find(job_id);
    if (it != live_.end()) return it->second->job;
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
    // The live copy adds progress; it can trail the journal for a moment (a new state is
    // written there first), and then the journal's row is the newer one.
    auto it = live_.find(j.job_id());
    const bool same = it != live_.end() && it->second->job.state() == j.state();
    *resp.add_jobs() = same ? it->second->job : j;
  }
  if (next > 0) resp.set_next_page_token(std::to_string(next));
  return resp;
}

absl::StatusOr<v1::Job> JobManager::Cancel(const std::string& job_id, absl::Duration wait) {
  std::shared_ptr<Live> live;
  {
    absl::MutexLock l(&mu_);
    auto it = live_.find(job_id);
    if (it != live_.end()) live = it->second;  // never terminal: Commit removes finished jobs
  }
  if (!live) {
    FPX_ASSIGN_OR_RETURN(v1::Job j, Get(job_id));
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", job_id, " is already ", v1::JobState_Name(j.state()), "; nothing to cancel"));
  }
  live->user_cancel.store(true);
  live->cancel.store(true);
  // Still in the queue: it never runs, and is CANCELLED at once. Otherwise a worker has taken
  // it (its state may not say RUNNING yet) and stops at its next poll.
  std::optional<v1::Job> cancelled;
  {
    absl::MutexLock l(&mu_);
    auto q = std::find(queue_.begin(), queue_.end(), job_id);
    if (q != queue_.end()) {
      queue_.erase(q);
      ++leaving_queue_;
      metrics_->SetJobsQueued(static_cast<int>(queue_.size()));
      cancelled = live->job;
    }
  }
  if (cancelled) {
    cancelled->set_state(v1::CANCELLED);
    cancelled->set_error("cancelled before it started");
    cancelled->set_finished_unix_ms(NowUnixMs());
    metrics_->JobFinished(cancelled->spec().granularity(), v1::CANCELLED, -1, 0, 0);
    Commit(live, *cancelled, /*finished=*/true, /*left_queue=*/true);
    return *cancelled;
  }
  absl::MutexLock l(&mu_);
  const absl::Time deadline = absl::Now() + wait;
  while (!Terminal(live->job.state()) && live_.count(job_id) > 0) {
    if (changed_.WaitWithDeadline(&mu_, deadline)) break;
  }
  return live->job;
}

absl::StatusOr<v1::Job> JobManager::Wait(const std::string& job_id, uint64_t* seen,
                                         absl::Duration timeout, bool* changed) {
  *changed = false;
  std::shared_ptr<Live> live;
  {
    absl::MutexLock l(&mu_);
    auto it = live_.find(job_id);
    if (it != live_.end()) live = it->second;
    if (live) {
      const absl::Time deadline = absl::Now() + timeout;
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
  FPX_ASSIGN_OR_RETURN(v1::Job j, Get(job_id));
  if (*seen != UINT64_MAX) {
    *seen = UINT64_MAX;  // a finished job is sent once
    *changed = true;
  } else {
    // Not live and already sent: nothing will change it in this process (a job interrupted by
    // shutdown, or one whose last state could not be journaled). Pace the caller's loop.
    absl::SleepFor(timeout);
  }
  return j;
}

void JobManager::Commit(const std::shared_ptr<Live>& live, v1::Job next, bool finished,
                        bool left_queue) {
  absl::Status s = journal_->PutJob(next);
  if (!s.ok()) LogError(absl::StrCat("job ", next.job_id(), ": ", s.message()));
  absl::ReleasableMutexLock l(&mu_);
  if (left_queue) --leaving_queue_;
  live->job = std::move(next);
  ++live->version;
  if (finished) live_.erase(live->job.job_id());
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
  for (;;) {
    std::shared_ptr<Live> live;
    v1::Job running;
    {
      absl::MutexLock l(&mu_);
      mu_.Await(absl::Condition(
          +[](JobManager* m)
               ABSL_NO_THREAD_SAFETY_ANALYSIS { return m->stopping_ || !m->queue_.empty(); },
          this));
      if (stopping_) return;
      live = live_[queue_.front()];
      queue_.pop_front();
      metrics_->SetJobsQueued(static_cast<int>(queue_.size()));
      live->taken = true;
      ++leaving_queue_;
      live->started = absl::Now();
      running = live->job;
      busy_.fetch_add(1);
    }
    running.set_state(v1::RUNNING);
    running.set_started_unix_ms(NowUnixMs());
    running.set_attempts(running.attempts() + 1);
    metrics_->WorkersBusyAdd(1);
    Commit(live, std::move(running), /*finished=*/false, /*left_queue=*/true);
    Run(live);  // ends with the job's final Commit
  }
}

void JobManager::Run(const std::shared_ptr<Live>& live) {
  const std::string id = live->job.job_id();
  const v1::JobSpec spec = live->job.spec();
  LogInfo(absl::StrCat("job ", id, " running: ", v1::Granularity_Name(spec.granularity()), " of '",
                       spec.model(), "' b=", spec.weight_bits(), " K=", spec.weight_terms()));
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
    ctx.source_path = store_->PathOf(ctx.model.sha256());
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
    out = vetted.ok() ? RunJob(spec, ctx) : absl::StatusOr<JobOutput>(vetted);
  }
  std::vector<v1::Artifact> artifacts;
  absl::Status final_status = out.ok() ? Finish(live, &*out, &artifacts) : out.status();
  v1::Job next;
  {
    absl::MutexLock l(&mu_);
    next = live->job;
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
  if (next.state() != v1::QUEUED) {  // QUEUED: interrupted by shutdown, runs again
    next.set_finished_unix_ms(NowUnixMs());
    uint64_t written = 0;
    for (const v1::Artifact& a : next.artifacts()) written += a.size_bytes();
    metrics_->JobFinished(spec.granularity(), next.state(),
                          absl::ToDoubleSeconds(absl::Now() - live->started),
                          next.result().layers_size(), written);
  }
  metrics_->WorkersBusyAdd(-1);
  LogInfo(absl::StrCat("job ", id, " ", v1::JobState_Name(next.state()),
                       final_status.ok() ? "" : absl::StrCat(": ", final_status.message())));
  busy_.fetch_sub(1);
  Commit(live, std::move(next), /*finished=*/true);
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
    FPX_ASSIGN_OR_RETURN(uint64_t size, FileSize(f.path));
    FPX_ASSIGN_OR_RETURN(std::string sha, store_->ImportFile(f.path, f.sha256));
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
    for (auto& [id, live] : live_) {
      if (live->taken) {
        live->interrupted.store(true);
        live->cancel.store(true);
      }
    }
  }
  for (std::thread& t : workers_) t.join();
  workers_.clear();
}

}  // namespace fpxint::server
