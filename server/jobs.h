// File: server/jobs.h
//
// The job manager: a fixed pool of workers over the journal's job queue (docs/ARCHITECTURE.md
// "Jobs"), shared by every replica on the journal.
//
//   QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED
//
// Submit writes a QUEUED job; any replica's worker claims it (Journal::ClaimJob) under a lease it
// renews while the job runs, writing the job's progress with each renewal, so GetJob, WatchJob and
// ListJobs on any replica follow it. Every write of the runner is fenced on its lease: a replica
// that lost the lease (stopped, paused, cut off) cannot overwrite the job afterwards. A reaper
// re-queues jobs whose lease expired, except one whose runner has gone away during
// Options::max_attempts runs, which ends FAILED. Finished outputs move into the content-addressed
// store (atomic renames) and only then is the job SUCCEEDED, so no half-written artifact is ever
// listed. Shutdown lets running jobs finish within a grace period and otherwise interrupts them
// back to QUEUED, for any replica to run again.
//
// Thread-safe.
#ifndef FPXINT_SERVER_JOBS_H_
#define FPXINT_SERVER_JOBS_H_

#include <atomic>
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
#include "server/executor.h"
#include "server/journal.h"
#include "server/metrics.h"
#include "server/repository.h"
#include "server/store.h"
#include "server/vetting.h"

namespace fpxint::server {

// Removes the temp directories (uploads in flight, job scratch) of replicas that are gone: not
// heard from (Journal::LiveReplicas) within two leases, or, on a journal held alone, every other
// replica's. Logs and returns how many went.
absl::StatusOr<int> RemoveTempOfGoneReplicas(Journal* journal, BlobStore* store,
                                             absl::Duration lease, bool journal_exclusive);

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
    // A job whose runner went away during this many runs (its lease expired, or it was found
    // RUNNING at start; Job.crashed_attempts) ends FAILED with the reason instead of running
    // again: a job that crashes the server would otherwise crash it at every restart.
    int max_attempts = 3;
    // This replica (Job.replica, the lease owner) and the lease of a running job, renewed every
    // lease/3 and whenever progress changed, at most once a second.
    std::string replica_id = "local";
    absl::Duration lease = absl::Seconds(30);
    // The journal is this server's alone (SQLite): every RUNNING job found at start is from a
    // run that died. Otherwise only expired leases and this replica id's earlier ones are.
    bool journal_exclusive = true;
    // How often an idle worker looks for jobs submitted on other replicas (local submissions
    // wake it at once).
    absl::Duration poll = absl::Seconds(1);
  };
  JobManager(Options o, Journal* journal, BlobStore* store, Repository* repo,
             core::ThreadPool* pool);
  ~JobManager();  // Shutdown(0) if still running

  // Takes back the jobs of runs that died, and starts the workers and the lease keeper. Submit()
  // answers UNAVAILABLE until this has run.
  absl::Status Start();

  absl::StatusOr<v1::Job> Submit(v1::SubmitJobRequest req);
  absl::StatusOr<v1::Job> Get(const std::string& job_id);
  absl::StatusOr<v1::ListJobsResponse> List(const v1::ListJobsRequest& req);
  // QUEUED: cancelled at once. RUNNING here: the worker stops at its next poll (within one row of
  // one tensor); on another replica: its runner is asked through the journal and stops after its
  // next lease renewal. Waits up to `wait` for the job to end. FailedPrecondition for a finished
  // job.
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

  // Called from the lease keeper when the journal becomes unreachable (false) or reachable again
  // (true), checked every second: the server's health follows it. One listener; set before
  // Start().
  void SetJournalHealthListener(std::function<void(bool)> fn) { journal_health_ = std::move(fn); }
  bool journal_reachable() const { return journal_ok_.load(); }

  // For WatchJob: returns the job once it differs from what *seen stands for (updating *seen),
  // or after `timeout` with *changed = false. A job running here is followed in memory; any other
  // (queued, finished, or running on another replica) through the journal.
  absl::StatusOr<v1::Job> Wait(const std::string& job_id, uint64_t* seen, absl::Duration timeout,
                               bool* changed);

  // Stops taking jobs, lets running ones finish for up to `grace`, then interrupts them (back to
  // QUEUED in the journal) and joins the workers.
  void Shutdown(absl::Duration grace);

  // Jobs QUEUED in the journal (every replica's).
  int queued() const;
  int busy() const { return busy_.load(); }
  // Late writes of jobs whose lease this replica had lost, refused by the journal.
  int fenced_writes() const { return fenced_.load(); }

 private:
  // A job running on this replica.
  struct Live {
    v1::Job job;
    uint64_t version = 1;
    uint64_t persisted = 1;                // the version the journal has (lease keeper)
    absl::Time renewed;                    // the last lease renewal
    std::atomic<bool> cancel{false};       // the worker's poll flag (CancelJob or shutdown)
    std::atomic<bool> user_cancel{false};  // CancelJob asked: ends CANCELLED, not re-queued
    std::atomic<bool> interrupted{false};
    std::atomic<bool> lease_lost{false};   // another replica may run it now: write nothing
    std::atomic<bool> finishing{false};    // its final write is under way: no more renewals
    absl::Time started;
  };

  void WorkerLoop();
  // Renews the leases of the jobs running here (writing their progress), passes cancels asked on
  // other replicas to them, reaps expired leases and keeps this replica's heartbeat.
  void KeeperLoop();
  void KeepLeases();
  // Re-queues (or, at max_attempts, fails) a job whose runner went away.
  void TakeBack(v1::Job* j) const;
  // The journal's QUEUED count into queued() and the gauge; returns the read's status (the
  // keeper uses it as the journal's reachability).
  absl::Status RefreshQueued();
  void SetQueued(int64_t n);
  // Expired leases; `at_start` also this replica id's own (and, with a journal held alone,
  // every RUNNING job).
  absl::Status Reap(bool at_start);
  // The runner's write of `next` through the journal's fence; false when refused (logged).
  bool FencedWrite(const std::shared_ptr<Live>& live, const v1::Job& next, bool final_write);
  // Runs a claimed job to its final Commit. `inline_task`: a shard task its job's coordinator
  // runs on its own worker (the worker is counted busy once, for the job).
  void Run(const std::shared_ptr<Live>& live, bool inline_task);
  // A claimed job, made live here.
  std::shared_ptr<Live> Adopt(v1::Job claimed);
  // Whether the job runs as shard tasks: a TENSOR job over a directory model.
  static bool IsSharded(const v1::JobSpec& spec, const v1::Model& model);
  // A sharded job's run: queues the shard tasks it does not have yet, runs queued ones here one
  // at a time (on a thread of its own) until none is left, follows every task (on any replica)
  // into the job's progress, and once every task has succeeded assembles the job's outputs
  // (AssembleDirectoryJob). A failed task fails the job.
  absl::StatusOr<JobOutput> Coordinate(const std::shared_ptr<Live>& live, const JobContext& ctx);
  // After a sharded job's final state: SUCCEEDED removes its tasks' records (its artifacts hold
  // their outputs); FAILED and CANCELLED remove finished tasks with their outputs and cancel the
  // rest; QUEUED (interrupted) keeps them for the next run.
  void EndTasks(const std::string& job_id, v1::JobState state);
  // CancelJob's flags on a job running here, and on its shard tasks running here.
  void FlagCancel(const std::shared_ptr<Live>& live);
  // Cancels the job's shard tasks running here (they end CANCELLED).
  void StopTasksHere(const std::string& job_id);
  // Removes a job the journal has in a terminal state (not live), its artifact records and the
  // artifact blobs nothing else refers to.
  absl::StatusOr<v1::DeleteJobResponse> DeleteFinished(const v1::Job& j);
  // Makes `next` the running job's last state: written to the journal first (fenced), then
  // visible to watchers, and the job leaves the live map. Caller holds no lock.
  void Commit(const std::shared_ptr<Live>& live, v1::Job next);
  // Wakes the watchers after an in-memory change (progress); caller holds no lock.
  void Notify(const std::shared_ptr<Live>& live);
  // Imports the outputs into the store and deploys when asked; the artifacts are returned for
  // the final Commit.
  absl::Status Finish(const std::shared_ptr<Live>& live, JobOutput* out,
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
  // The journal's record of a job not running here, for Wait: one read serves every WatchJob
  // poll of the job for a fifth of a second (the hub polls every watcher at every change). A
  // read that raced with a local state change is not kept (cache_gen_).
  absl::StatusOr<std::optional<v1::Job>> ReadForWatch(const std::string& job_id);
  void ForgetCached(const std::string& job_id);
  struct CachedJob {
    absl::Time read;
    std::optional<v1::Job> job;
  };
  absl::Mutex cache_mu_;
  std::map<std::string, CachedJob> cache_ ABSL_GUARDED_BY(cache_mu_);
  uint64_t cache_gen_ ABSL_GUARDED_BY(cache_mu_) = 0;

  absl::Mutex listener_mu_;
  std::function<void()> listener_ ABSL_GUARDED_BY(listener_mu_);
  absl::Mutex submit_mu_;  // serialises this replica's idempotency checks
  mutable absl::Mutex mu_;
  absl::CondVar changed_;
  // Bumped by every local submission: idle workers claim at once instead of at their next poll.
  uint64_t submitted_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, std::shared_ptr<Live>> live_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool interrupting_ ABSL_GUARDED_BY(mu_) = false;  // Shutdown's grace is over
  // The lease keeper runs until the workers have stopped: running jobs keep their leases (and
  // hear of cancels) through Shutdown's grace period.
  bool keeper_stop_ ABSL_GUARDED_BY(mu_) = false;
  // Start() has taken back the jobs of runs that died: before that, Submit() is UNAVAILABLE.
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
  std::thread keeper_;
  std::atomic<int> busy_{0};  // workers claiming or running a job
  std::atomic<int> queued_{0};  // the journal's QUEUED count, as last read
  std::atomic<int> fenced_{0};
  std::function<void(bool)> journal_health_;  // set before Start(); called by the keeper only
  std::atomic<bool> journal_ok_{true};
};

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_JOBS_H_
