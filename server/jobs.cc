// File: server/jobs.cc
#include "server/jobs.h"

#include <google/protobuf/util/message_differencer.h>

#include <filesystem>
#include <random>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/status_macros.h"
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
  return absl::OkStatus();
}

int JobManager::queued() const {
  absl::MutexLock l(&mu_);
  return static_cast<int>(queue_.size());
}

absl::StatusOr<v1::Job> JobManager::Submit(v1::SubmitJobRequest req) {
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
    if (static_cast<int>(queue_.size()) >= opts_.queue_limit) {
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
    auto it = live_.find(j.job_id());
    *resp.add_jobs() = it != live_.end() ? it->second->job : j;  // with live progress
  }
  if (next > 0) resp.set_next_page_token(std::to_string(next));
  return resp;
}

absl::StatusOr<v1::Job> JobManager::Cancel(const std::string& job_id, absl::Duration wait) {
  std::shared_ptr<Live> live;
  {
    absl::MutexLock l(&mu_);
    auto it = live_.find(job_id);
    // A job that has published its terminal state stays in live_ until its worker finishes
    // the clean-up; it is as finished as one that has left, so a second cancel is refused alike.
    if (it != live_.end() && !Terminal(it->second->job.state())) live = it->second;
  }
  if (!live) {
    FPX_ASSIGN_OR_RETURN(v1::Job j, Get(job_id));
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", job_id, " is already ", v1::JobState_Name(j.state()), "; nothing to cancel"));
  }
  live->cancel.store(true);
  bool was_queued = false;
  {
    absl::MutexLock l(&mu_);
    if (live->job.state() == v1::QUEUED) {
      was_queued = true;
      queue_.erase(std::remove(queue_.begin(), queue_.end(), job_id), queue_.end());
      metrics_->SetJobsQueued(static_cast<int>(queue_.size()));
      metrics_->JobFinished(live->job.spec().granularity(), v1::CANCELLED, -1, 0, 0);
      live->job.set_state(v1::CANCELLED);
      live->job.set_error("cancelled before it started");
      live->job.set_finished_unix_ms(NowUnixMs());
    }
  }
  if (was_queued) {
    Publish(live, /*persist=*/true);
    absl::MutexLock l(&mu_);
    live_.erase(job_id);
    return live->job;
  }
  absl::MutexLock l(&mu_);
  const absl::Time deadline = absl::Now() + wait;
  while (!Terminal(live->job.state())) {
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
  }
  return j;
}

void JobManager::Publish(const std::shared_ptr<Live>& live, bool persist) {
  // Journal first, then the watchers: whoever sees a state can also read it back (GetJob,
  // DownloadArtifact) from the journal.
  if (persist) {
    v1::Job snapshot;
    {
      absl::MutexLock l(&mu_);
      snapshot = live->job;
    }
    absl::Status s = journal_->PutJob(snapshot);
    if (!s.ok()) LogError(absl::StrCat("job ", snapshot.job_id(), ": ", s.message()));
  }
  absl::MutexLock l(&mu_);
  ++live->version;
  changed_.SignalAll();
}

void JobManager::WorkerLoop() {
  for (;;) {
    std::shared_ptr<Live> live;
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
      live->job.set_state(v1::RUNNING);
      live->job.set_started_unix_ms(NowUnixMs());
      live->job.set_attempts(live->job.attempts() + 1);
      live->started = absl::Now();
    }
    busy_.fetch_add(1);
    metrics_->WorkersBusyAdd(1);
    Publish(live, /*persist=*/true);
    Run(live);
    metrics_->WorkersBusyAdd(-1);
    busy_.fetch_sub(1);
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
      Publish(live, /*persist=*/false);
    };
    out = RunJob(spec, ctx);
  }
  absl::Status final_status = out.ok() ? Finish(live, &*out) : out.status();
  {
    absl::MutexLock l(&mu_);
    v1::Job& j = live->job;
    if (final_status.ok()) {
      j.set_state(v1::SUCCEEDED);
    } else if (live->interrupted.load()) {
      j.set_state(v1::QUEUED);  // runs again after the restart
      j.clear_progress();
    } else if (live->cancel.load()) {
      j.set_state(v1::CANCELLED);
      j.set_error("cancelled while running");
    } else {
      j.set_state(v1::FAILED);
      j.set_error(std::string(final_status.message()));
    }
    if (j.state() != v1::QUEUED) j.set_finished_unix_ms(NowUnixMs());
  }
  Publish(live, /*persist=*/true);
  if (live->job.state() != v1::QUEUED) {  // QUEUED: interrupted by shutdown, runs again
    uint64_t written = 0;
    for (const v1::Artifact& a : live->job.artifacts()) written += a.size_bytes();
    metrics_->JobFinished(spec.granularity(), live->job.state(),
                          absl::ToDoubleSeconds(absl::Now() - live->started),
                          live->job.result().layers_size(), written);
  }
  LogInfo(absl::StrCat("job ", id, " ", v1::JobState_Name(live->job.state()),
                       final_status.ok() ? "" : absl::StrCat(": ", final_status.message())));
  if (!scratch.empty()) {
    std::error_code ec;
    fs::remove_all(scratch, ec);
  }
  absl::MutexLock l(&mu_);
  live_.erase(id);
  changed_.SignalAll();
}

absl::Status JobManager::Finish(const std::shared_ptr<Live>& live, JobOutput* out) {
  std::vector<v1::Artifact> artifacts;
  for (const ProducedFile& f : out->files) {
    FPX_ASSIGN_OR_RETURN(uint64_t size, FileSize(f.path));
    FPX_ASSIGN_OR_RETURN(std::string sha, store_->ImportFile(f.path, f.sha256));
    v1::Artifact a;
    a.set_artifact_id(NewId("art"));
    a.set_kind(f.kind);
    a.set_file_name(f.file_name);
    a.set_sha256(sha);
    a.set_size_bytes(size);
    artifacts.push_back(a);
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
    {
      absl::MutexLock l(&mu_);
      live->job.mutable_progress()->set_phase("deploying");
    }
    Publish(live, /*persist=*/false);
    FPX_ASSIGN_OR_RETURN(v1::Deployment done, repo_->Deploy(d, /*load=*/true));
    out->result.set_deployed_name(done.name());
    out->result.set_deployed_version(done.version());
  }
  absl::MutexLock l(&mu_);
  live->job.mutable_progress()->set_phase("done");
  *live->job.mutable_result() = out->result;
  for (v1::Artifact& a : artifacts) *live->job.add_artifacts() = std::move(a);
  return absl::OkStatus();
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
      if (live->job.state() == v1::RUNNING) {
        live->interrupted.store(true);
        live->cancel.store(true);
      }
    }
  }
  for (std::thread& t : workers_) t.join();
  workers_.clear();
}

}  // namespace fpxint::server
