// File: server/jobs.h
//
// The job manager: a bounded queue feeding a fixed pool of workers (docs/ARCHITECTURE.md "Jobs").
//
//   QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED
//
// Every state change is written to the journal before it is visible; progress (layers done,
// current layer, bytes written, ETA) is kept in memory and streamed to watchers. Finished outputs
// move into the content-addressed store (atomic renames) and only then is the job SUCCEEDED, so
// no half-written artifact is ever listed. After a crash, Start() re-queues every job the journal
// has as QUEUED or RUNNING (attempts counts the runs), except one the server has now died during
// Options::max_attempts times, which ends FAILED. Shutdown lets running jobs finish within a
// grace period and otherwise interrupts them back to QUEUED, to run again after the restart.
//
// Thread-safe.
#ifndef FPXINT_SERVER_JOBS_H_
#define FPXINT_SERVER_JOBS_H_

#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/thread_pool.h"
#include "fpxint/v1/quantizer.pb.h"
#include "server/journal.h"
#include "server/metrics.h"
#include "server/repository.h"
#include "server/store.h"
#include "server/vetting.h"

namespace fpxint::server {

class JobManager {
 public:
  struct Options {
    int workers = 1;
    int queue_limit = 64;
    int torch_threads = 2;
    uint64_t job_memory_limit = 0;  // bytes a job may plan to hold (JobContext::memory_limit)
    Metrics* metrics = nullptr;  // null: the manager counts into its own (unexported) Metrics
    // TorchScript sources run only with a passing verdict. Required for TorchScript jobs.
    TorchScriptVetter* vetter = nullptr;
    // A job the server died during this many times (found RUNNING in the journal at start;
    // Job.crashed_attempts) ends FAILED with the reason instead of running again: a job that
    // crashes the server would otherwise crash it at every restart.
    int max_attempts = 3;
  };
  JobManager(Options o, Journal* journal, BlobStore* store, Repository* repo,
             core::ThreadPool* pool);
  ~JobManager();  // Shutdown(0) if still running

  // Recovers the journal's unfinished jobs and starts the workers. Submit() answers UNAVAILABLE
  // until this has run.
  absl::Status Start();

  absl::StatusOr<v1::Job> Submit(v1::SubmitJobRequest req);
  absl::StatusOr<v1::Job> Get(const std::string& job_id);
  absl::StatusOr<v1::ListJobsResponse> List(const v1::ListJobsRequest& req);
  // QUEUED: cancelled at once. RUNNING: the worker stops at its next poll (within one row of
  // one tensor); waits up to `wait` for that. FailedPrecondition for a finished job.
  absl::StatusOr<v1::Job> Cancel(const std::string& job_id,
                                 absl::Duration wait = absl::Seconds(10));

  // Removes a finished job, its artifact records and every artifact blob nothing else refers
  // to. NotFound for an unknown id; FailedPrecondition while it is queued or running.
  absl::StatusOr<v1::DeleteJobResponse> Delete(const std::string& job_id);
  // Deletes every finished job that finished before `cutoff` (retention); returns how many.
  int DeleteFinishedBefore(absl::Time cutoff);

  // Called after every change of any job (state or progress), on the thread that made it and
  // with no lock of the manager held: how WatchJob's streams learn of changes without polling.
  // One listener; nullptr removes it, waiting for a call in progress to return.
  void SetChangeListener(std::function<void()> fn);

  // For WatchJob: returns the job once its version differs from *seen (updating *seen), or after
  // `timeout` with *changed = false. A job that is finished and not live returns once.
  absl::StatusOr<v1::Job> Wait(const std::string& job_id, uint64_t* seen, absl::Duration timeout,
                               bool* changed);

  // Stops taking jobs, lets running ones finish for up to `grace`, then interrupts them (back to
  // QUEUED in the journal) and joins the workers.
  void Shutdown(absl::Duration grace);

  int queued() const;
  int busy() const { return busy_.load(); }

 private:
  struct Live {
    v1::Job job;
    uint64_t version = 1;
    std::atomic<bool> cancel{false};       // the worker's poll flag (CancelJob or shutdown)
    std::atomic<bool> user_cancel{false};  // CancelJob asked: ends CANCELLED, not re-queued
    std::atomic<bool> interrupted{false};
    bool taken = false;  // a worker has it (under mu_; its state says RUNNING a moment later)
    absl::Time started;
  };

  void WorkerLoop();
  void Run(const std::shared_ptr<Live>& live);
  // Makes `next` the job's state: written to the journal first, then visible in the live map and
  // to watchers, so whoever sees a state can read it back (ListJobs, DownloadArtifact, DeleteModel's
  // in-use check read the journal). `finished`: the job leaves the live map in the same step.
  // `left_queue`: the job was taken out of queue_ for this change (see leaving_queue_).
  // Caller holds no lock.
  // Removes a job the journal has in a terminal state (not live), its artifact records and the
  // artifact blobs nothing else refers to.
  absl::StatusOr<v1::DeleteJobResponse> DeleteFinished(const v1::Job& j);
  void Commit(const std::shared_ptr<Live>& live, v1::Job next, bool finished,
              bool left_queue = false);
  // Wakes the watchers after an in-memory change (progress); caller holds no lock.
  void Notify(const std::shared_ptr<Live>& live);
  // Imports the outputs into the store and deploys when asked; the artifacts are returned for
  // the final Commit.
  absl::Status Finish(const std::shared_ptr<Live>& live, struct JobOutput* out,
                      std::vector<v1::Artifact>* artifacts);

  const Options opts_;
  std::unique_ptr<Metrics> own_metrics_;  // when Options::metrics is null
  Metrics* metrics_;
  Journal* journal_;
  BlobStore* store_;
  Repository* repo_;
  core::ThreadPool* pool_;

  // Tells the change listener; caller holds no lock.
  void Announce();

  absl::Mutex listener_mu_;
  std::function<void()> listener_ ABSL_GUARDED_BY(listener_mu_);
  absl::Mutex submit_mu_;  // serialises idempotency checks
  mutable absl::Mutex mu_;
  absl::CondVar changed_;
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);
  // Jobs taken out of queue_ whose journal row still says QUEUED (their next state is being
  // written): they count against --queue-limit until then, so that submissions do not push the
  // journal's QUEUED jobs past the limit (jobs re-queued by a shutdown can still exceed it).
  int leaving_queue_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, std::shared_ptr<Live>> live_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // Start() has recovered the journal's jobs: before that, Submit() is UNAVAILABLE (a job it
  // wrote would be recovered from the journal a second time).
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
  std::atomic<int> busy_{0};
};

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_JOBS_H_
