// The job manager (server/jobs.h) on a real SQLite journal and store: start-up recovery. Submit
// is refused until the journal's jobs are recovered, and a job the server keeps dying during
// ends FAILED at --max-job-attempts instead of running again. Then as replicas on one real
// PostgreSQL journal: a shared queue, idempotency keys across replicas, a stalled runner's job
// taken over with its late write refused, and a cancel reaching another replica's runner. The
// job path over gRPC is in server_test.cc; separate server processes (SIGSTOP) in
// tests/e2e/test_replicas.py.
#include "server/jobs.h"

#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "core/thread_pool.h"
#include "gtest/gtest.h"
#include "server/journal.h"
#include "server/repository.h"
#include "server/store.h"
#include "server/validation.h"
#include "tests/support/postgres.h"
#include "tests/support/test_support.h"

namespace fpxint::server {
namespace {

using ::fpxint::testing::ScratchDir;
using ::fpxint::testing::TempPostgres;
using ::fpxint::testing::SmallWeightsSafetensors;
using ::fpxint::testing::WriteFileOrDie;

// A store and a journal holding one uploaded safetensors model "w", and a repository on them.
class JobManagerStartup : public ::testing::Test {
 protected:
  // The journal: a SQLite file here; the replica tests' fixture gives a PostgreSQL database.
  virtual std::string JournalLocation() { return dir_.File("journal.sqlite"); }
  void SetUp() override {
    auto store = BlobStore::Open(dir_.File("data"));
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
    const std::string where = JournalLocation();
    ASSERT_FALSE(where.empty());
    auto journal = Journal::Open(where);
    ASSERT_TRUE(journal.ok()) << journal.status();
    journal_ = *std::move(journal);
    WriteFileOrDie(dir_.File("w.safetensors"), SmallWeightsSafetensors(7));
    auto sha = store_->ImportFile(dir_.File("w.safetensors"));
    ASSERT_TRUE(sha.ok()) << sha.status();
    model_.set_name("w");
    model_.set_format(v1::SAFETENSORS);
    model_.set_sha256(*sha);
    ASSERT_TRUE(journal_->PutModel(model_).ok());
    repo_ = std::make_unique<Repository>(dir_.File("repository"), journal_.get(), store_.get(),
                                         &pool_, Repository::Options{});
  }
  ScratchDir dir_;
  core::ThreadPool pool_{1};
  std::unique_ptr<BlobStore> store_;
  std::unique_ptr<Journal> journal_;
  std::unique_ptr<Repository> repo_;
  v1::Model model_;
};

TEST_F(JobManagerStartup, SubmitBeforeStartIsUnavailable) {
  // Jobs written before Start() would be recovered from the journal a second time by it.
  JobManager jobs(JobManager::Options{}, journal_.get(), store_.get(), repo_.get(), &pool_);
  v1::SubmitJobRequest req;
  req.mutable_spec()->set_model("w");
  req.mutable_spec()->set_granularity(v1::TENSOR);
  auto early = jobs.Submit(req);
  EXPECT_EQ(early.status().code(), absl::StatusCode::kUnavailable) << early.status();
  auto pending = journal_->JobsInStates({v1::QUEUED, v1::RUNNING});
  ASSERT_TRUE(pending.ok());
  EXPECT_TRUE(pending->empty());
  ASSERT_TRUE(jobs.Start().ok());
  auto j = jobs.Submit(req);
  ASSERT_TRUE(j.ok()) << j.status();
  jobs.Shutdown(absl::Seconds(30));
}

// A job the server died during --max-job-attempts times is not run again (it would take the
// server down at every restart): it ends FAILED with the reason. One it died during fewer times
// runs again, and a clean shutdown's re-queue is not counted.
TEST_F(JobManagerStartup, AJobTheServerKeepsDyingDuringEndsFailed) {
  // As a server that died during them left them: RUNNING in the journal.
  auto running = [&](const std::string& id, uint32_t attempts, uint32_t crashed) {
    v1::Job j;
    j.set_job_id(id);
    j.set_state(v1::RUNNING);
    j.mutable_spec()->set_model("w");
    j.mutable_spec()->set_granularity(v1::TENSOR);
    j.mutable_spec()->set_weight_bits(4);
    j.mutable_spec()->set_weight_terms(2);
    ASSERT_TRUE(NormalizeJobSpec(model_, j.mutable_spec()).ok());
    j.set_attempts(attempts);
    j.set_crashed_attempts(crashed);
    ASSERT_TRUE(journal_->PutJob(j).ok());
  };
  running("job-crashy", 3, 2);  // the third death now
  running("job-once", 2, 0);    // died once; a clean shutdown had re-queued it before
  JobManager::Options o;
  o.max_attempts = 3;
  JobManager jobs(o, journal_.get(), store_.get(), repo_.get(), &pool_);
  ASSERT_TRUE(jobs.Start().ok());
  auto crashy = jobs.Get("job-crashy");
  ASSERT_TRUE(crashy.ok()) << crashy.status();
  EXPECT_EQ(crashy->state(), v1::FAILED);
  EXPECT_EQ(crashy->crashed_attempts(), 3u);
  EXPECT_TRUE(absl::StrContains(crashy->error(), "--max-job-attempts 3")) << crashy->error();
  uint64_t seen = 0;
  bool changed = false;
  v1::Job once;
  for (int i = 0; i < 600; ++i) {
    auto j = jobs.Wait("job-once", &seen, absl::Seconds(1), &changed);
    ASSERT_TRUE(j.ok()) << j.status();
    once = *j;
    if (once.state() == v1::SUCCEEDED || once.state() == v1::FAILED) break;
  }
  EXPECT_EQ(once.state(), v1::SUCCEEDED) << once.error();
  EXPECT_EQ(once.crashed_attempts(), 1u);
  EXPECT_EQ(once.attempts(), 3u);
  jobs.Shutdown(absl::Seconds(30));
}

// One PostgreSQL server for the replica tests; each test gets a fresh database on it.
class JobManagerReplicas : public JobManagerStartup {
 protected:
  static void SetUpTestSuite() {
    std::string error;
    pg_ = TempPostgres::Start(&error).release();
    if (pg_ == nullptr) ADD_FAILURE() << "cannot start PostgreSQL: " << error;
  }
  static void TearDownTestSuite() {
    delete pg_;
    pg_ = nullptr;
  }
  std::string JournalLocation() override {
    std::string error;
    url_ = pg_ ? pg_->NewDatabase(&error) : "";
    if (pg_ && url_.empty()) ADD_FAILURE() << error;
    return url_;
  }
  // A replica: its own connection to the database, the shared store and repository.
  struct Replica {
    std::unique_ptr<Journal> journal;
    std::unique_ptr<JobManager> jobs;
  };
  Replica StartReplica(const std::string& id, absl::Duration lease = absl::Seconds(30)) {
    Replica r;
    auto j = Journal::Open(url_);
    EXPECT_TRUE(j.ok()) << j.status();
    if (!j.ok()) return r;
    r.journal = *std::move(j);
    JobManager::Options o;
    o.replica_id = id;
    o.lease = lease;
    o.journal_exclusive = false;
    o.poll = absl::Milliseconds(100);
    r.jobs = std::make_unique<JobManager>(o, r.journal.get(), store_.get(), repo_.get(), &pool_);
    absl::Status s = r.jobs->Start();
    EXPECT_TRUE(s.ok()) << s;
    return r;
  }
  v1::SubmitJobRequest Request(uint32_t terms, const std::string& key = "") {
    v1::SubmitJobRequest req;
    req.mutable_spec()->set_model("w");
    req.mutable_spec()->set_granularity(v1::TENSOR);
    req.mutable_spec()->set_weight_bits(4);
    req.mutable_spec()->set_weight_terms(terms);
    req.set_idempotency_key(key);
    return req;
  }
  // Follows the job through `jobs` until it is finished.
  v1::Job Finished(JobManager* jobs, const std::string& id) {
    uint64_t seen = 0;
    bool changed = false;
    v1::Job j;
    for (int i = 0; i < 600; ++i) {
      auto got = jobs->Wait(id, &seen, absl::Seconds(1), &changed);
      EXPECT_TRUE(got.ok()) << got.status();
      if (!got.ok()) break;
      j = *got;
      if (j.state() == v1::SUCCEEDED || j.state() == v1::FAILED ||
          j.state() == v1::CANCELLED) {
        break;
      }
    }
    return j;
  }
  static TempPostgres* pg_;
  std::string url_;
};
TempPostgres* JobManagerReplicas::pg_ = nullptr;

// Jobs submitted on either replica run once each, on one of them, and both replicas see every
// job's final state (GetJob and ListJobs from the journal).
TEST_F(JobManagerReplicas, TwoReplicasShareOneQueue) {
  Replica a = StartReplica("a");
  Replica b = StartReplica("b");
  ASSERT_TRUE(a.jobs && b.jobs);
  std::vector<std::string> ids;
  for (int i = 0; i < 6; ++i) {
    auto j = (i % 2 ? b : a).jobs->Submit(Request(1 + i % 3));
    ASSERT_TRUE(j.ok()) << j.status();
    ids.push_back(j->job_id());
  }
  for (const std::string& id : ids) {
    v1::Job seen_by_a = Finished(a.jobs.get(), id);
    v1::Job seen_by_b = Finished(b.jobs.get(), id);
    EXPECT_EQ(seen_by_a.state(), v1::SUCCEEDED) << seen_by_a.error();
    EXPECT_EQ(seen_by_b.state(), v1::SUCCEEDED);
    EXPECT_EQ(seen_by_a.attempts(), 1u) << id << " ran more than once";
    EXPECT_TRUE(seen_by_a.replica() == "a" || seen_by_a.replica() == "b") << seen_by_a.replica();
    EXPECT_EQ(seen_by_a.replica(), seen_by_b.replica());
    EXPECT_EQ(seen_by_a.artifacts_size(), seen_by_b.artifacts_size());
  }
  auto listed = a.jobs->List(v1::ListJobsRequest());
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->jobs_size(), 6);
  b.jobs->Shutdown(absl::Seconds(30));
  a.jobs->Shutdown(absl::Seconds(30));
}

// Two replicas given the same idempotency key get the same job; another spec under it is
// refused on either.
TEST_F(JobManagerReplicas, AnIdempotencyKeyNamesOneJobOnEveryReplica) {
  Replica a = StartReplica("a");
  Replica b = StartReplica("b");
  ASSERT_TRUE(a.jobs && b.jobs);
  auto first = a.jobs->Submit(Request(2, "nightly-42"));
  ASSERT_TRUE(first.ok()) << first.status();
  auto again = b.jobs->Submit(Request(2, "nightly-42"));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->job_id(), first->job_id());
  auto other = b.jobs->Submit(Request(3, "nightly-42"));
  EXPECT_EQ(other.status().code(), absl::StatusCode::kAlreadyExists) << other.status();
  b.jobs->Shutdown(absl::Seconds(30));
  a.jobs->Shutdown(absl::Seconds(30));
}

// A runner that stalled past its lease (a paused or cut-off replica, here one that claimed the
// job and never renewed): another replica takes the job over and finishes it, and the stalled
// runner's late result is refused and changes nothing.
TEST_F(JobManagerReplicas, AStalledRunnersJobIsTakenOverAndItsLateWriteRefused) {
  ASSERT_TRUE(journal_->InsertJob([&] {
    v1::Job j;
    j.set_job_id("job-stalled");
    j.set_state(v1::QUEUED);
    *j.mutable_spec() = Request(2).spec();
    EXPECT_TRUE(NormalizeJobSpec(model_, j.mutable_spec()).ok());
    return j;
  }()).ok());
  auto stalled = journal_->ClaimJob("ghost", absl::Milliseconds(200), [](v1::Job* j) {
    j->set_state(v1::RUNNING);
    j->set_attempts(j->attempts() + 1);
    j->set_replica("ghost");
  });
  ASSERT_TRUE(stalled.ok() && stalled->has_value()) << stalled.status();
  absl::SleepFor(absl::Milliseconds(400));  // the lease runs out
  Replica b = StartReplica("b", absl::Seconds(3));
  ASSERT_TRUE(b.jobs);
  v1::Job done = Finished(b.jobs.get(), "job-stalled");
  EXPECT_EQ(done.state(), v1::SUCCEEDED) << done.error();
  EXPECT_EQ(done.replica(), "b");
  EXPECT_EQ(done.attempts(), 2u);
  EXPECT_EQ(done.crashed_attempts(), 1u);
  v1::Job late = **stalled;
  late.set_state(v1::FAILED);
  late.set_error("the ghost's late verdict");
  auto written = journal_->FinishLeased(late, "ghost");
  ASSERT_TRUE(written.ok()) << written.status();
  EXPECT_FALSE(*written);
  auto now = b.jobs->Get("job-stalled");
  ASSERT_TRUE(now.ok());
  EXPECT_EQ(now->state(), v1::SUCCEEDED);
  EXPECT_EQ(now->artifacts_size(), done.artifacts_size());
  b.jobs->Shutdown(absl::Seconds(30));
}

// CancelJob on one replica for a job another replica runs: the runner is told through the
// journal (its next renewal says so); a queued job is cancelled at once.
TEST_F(JobManagerReplicas, CancelReachesAJobRunningOnAnotherReplica) {
  Replica b = StartReplica("b");
  ASSERT_TRUE(b.jobs);
  b.jobs->Shutdown(absl::Seconds(30));  // b takes no jobs: it only answers the cancel
  ASSERT_TRUE(journal_->InsertJob([&] {
    v1::Job j;
    j.set_job_id("job-remote");
    j.set_state(v1::QUEUED);
    *j.mutable_spec() = Request(2).spec();
    return j;
  }()).ok());
  auto running = journal_->ClaimJob("elsewhere", absl::Hours(1), [](v1::Job* j) {
    j->set_state(v1::RUNNING);
    j->set_attempts(1);
    j->set_replica("elsewhere");
  });
  ASSERT_TRUE(running.ok() && running->has_value());
  auto c = b.jobs->Cancel("job-remote", absl::ZeroDuration());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->state(), v1::RUNNING);  // its runner ends it
  auto told = journal_->RenewLease(**running, "elsewhere", absl::Hours(1));
  ASSERT_TRUE(told.ok() && told->held);
  EXPECT_TRUE(told->cancel_requested);
}

}  // namespace
}  // namespace fpxint::server
