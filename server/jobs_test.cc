// The job manager (server/jobs.h) on a real SQLite journal and store: start-up recovery. Submit
// is refused until the journal's jobs are recovered, and a job the server keeps dying during
// ends FAILED at --max-job-attempts instead of running again. The job path over gRPC is in
// server_test.cc.
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
#include "tests/support/test_support.h"

namespace fpxint::server {
namespace {

using ::fpxint::testing::ScratchDir;
using ::fpxint::testing::SmallWeightsSafetensors;
using ::fpxint::testing::WriteFileOrDie;

// A store and a journal holding one uploaded safetensors model "w", and a repository on them.
class JobManagerStartup : public ::testing::Test {
 protected:
  void SetUp() override {
    auto store = BlobStore::Open(dir_.File("data"));
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
    auto journal = Journal::Open(dir_.File("journal.sqlite"));
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

}  // namespace
}  // namespace fpxint::server
