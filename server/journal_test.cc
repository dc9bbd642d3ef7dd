// The journal conformance suite (server/journal.h): the same cases against both backends, a
// real SQLite file and a real PostgreSQL 15 server started for this binary on a Unix socket
// (tests/support/postgres.h): records round-trip, queries answer from the records, blob
// references cover every table, deployments list in numeric version order, and two journals on
// one database (two replicas) see each other's writes, and the job queue: concurrent claims take
// each job once, a lost lease fences the old runner's writes, reaping, cancel from any replica,
// idempotency keys unique across replicas, replica heartbeats. SQLite only: a journal written before
// deployments recorded their artifact opens and gains the column.
#include "server/journal.h"

#include <libpq-fe.h>
#include <sqlite3.h>

#include <functional>
#include <map>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"

#include "gtest/gtest.h"
#include "tests/support/postgres.h"
#include "tests/support/test_support.h"

namespace fpxint::server {
namespace {

using ::fpxint::testing::ScratchDir;
using ::fpxint::testing::TempPostgres;

const std::string kShaA(64, 'a'), kShaB(64, 'b'), kShaC(64, 'c'), kShaD(64, 'd');

// One PostgreSQL server for the whole binary; each test gets a fresh database on it.
TempPostgres* g_pg = nullptr;
class PostgresEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    std::string error;
    g_pg = TempPostgres::Start(&error).release();
    ASSERT_NE(g_pg, nullptr) << "cannot start PostgreSQL for the conformance suite: " << error;
  }
  void TearDown() override { delete g_pg; }
};
const auto* const kPostgres = ::testing::AddGlobalTestEnvironment(new PostgresEnvironment);

std::unique_ptr<Journal> MustOpen(const std::string& where) {
  auto j = Journal::Open(where);
  EXPECT_TRUE(j.ok()) << j.status();
  return j.ok() ? *std::move(j) : nullptr;
}

// Parameter: the backend ("sqlite" or "postgresql").
class JournalConformance : public ::testing::TestWithParam<std::string> {
 protected:
  // Where a fresh, empty journal of the backend lives: a new SQLite file or a new database.
  std::string NewLocation() {
    if (GetParam() == "sqlite") return dir_.File("journal" + std::to_string(++n_) + ".sqlite");
    if (g_pg == nullptr) {
      ADD_FAILURE() << "no PostgreSQL server";
      return "";
    }
    std::string error;
    const std::string url = g_pg->NewDatabase(&error);
    if (url.empty()) ADD_FAILURE() << error;
    return url;
  }
  std::unique_ptr<Journal> OpenNew() { return MustOpen(NewLocation()); }
  // Two journals on one fresh location: two replicas (SQLite: two connections to the file).
  std::pair<std::unique_ptr<Journal>, std::unique_ptr<Journal>> OpenTwo() {
    const std::string where = NewLocation();
    auto a = MustOpen(where);
    return {std::move(a), MustOpen(where)};
  }

  ScratchDir dir_;
  int n_ = 0;
};

INSTANTIATE_TEST_SUITE_P(Backends, JournalConformance,
                         ::testing::Values("sqlite", "postgresql"),
                         [](const auto& info) { return info.param; });

TEST_P(JournalConformance, OpensTheBackendItIsGiven) {
  auto j = OpenNew();
  ASSERT_NE(j, nullptr);
  EXPECT_EQ(std::string(j->backend()), GetParam());
}

TEST_P(JournalConformance, RecordsRoundTripAndSurviveReopening) {
  const std::string path = NewLocation();
  {
    auto j = MustOpen(path);
    v1::Model m;
    m.set_name("ocr");
    m.set_sha256(kShaA);
    m.set_size_bytes(100);
    m.set_owner("alice");
    ASSERT_TRUE(j->PutModel(m).ok());
    v1::Model m2 = m;
    m2.set_name("ocr2");
    m2.set_sha256(kShaB);
    m2.set_size_bytes(50);
    ASSERT_TRUE(j->PutModel(m2).ok());
    v1::Job job;
    job.set_job_id("job-1");
    job.set_state(v1::SUCCEEDED);
    job.mutable_spec()->set_model("ocr");
    v1::Artifact* a = job.add_artifacts();
    a->set_artifact_id("art-1");
    a->set_sha256(kShaC);
    ASSERT_TRUE(j->PutJob(job).ok());
  }
  auto j = MustOpen(path);
  auto m = j->GetModel("ocr");
  ASSERT_TRUE(m.ok() && m->has_value());
  EXPECT_EQ((*m)->sha256(), kShaA);
  EXPECT_FALSE(j->GetModel("nope")->has_value());
  EXPECT_EQ(*j->UploadedBytesBy("alice"), 150u);
  EXPECT_EQ(*j->UploadedBytesBy("bob"), 0u);
  auto job = j->GetJob("job-1");
  ASSERT_TRUE(job.ok() && job->has_value());
  EXPECT_EQ((*job)->state(), v1::SUCCEEDED);
  auto art = j->GetArtifact("art-1");
  ASSERT_TRUE(art.ok() && art->has_value());
  EXPECT_EQ((*art)->sha256(), kShaC);
  EXPECT_TRUE(*j->ModelInUse("ocr") == false);  // a finished job does not hold its model
}

TEST_P(JournalConformance, EveryRecordKindKeepsItsBlobsReferenced) {
  auto j = OpenNew();
  ASSERT_NE(j, nullptr);
  for (const std::string& sha : {kShaA, kShaB, kShaC, kShaD}) EXPECT_FALSE(*j->BlobReferenced(sha));
  v1::Model m;
  m.set_name("m");
  m.set_sha256(kShaA);
  ASSERT_TRUE(j->PutModel(m).ok());
  v1::Job job;
  job.set_job_id("j");
  job.set_state(v1::SUCCEEDED);
  job.add_artifacts()->set_sha256(kShaB);
  job.mutable_artifacts(0)->set_artifact_id("a");
  ASSERT_TRUE(j->PutJob(job).ok());
  v1::Deployment d;
  d.set_name("q");
  d.set_version("1");
  d.set_source_sha256(kShaA);
  d.set_artifact_sha256(kShaC);  // the served artifact keeps its blob after its job is gone
  ASSERT_TRUE(j->PutDeployment(d).ok());
  EXPECT_TRUE(*j->BlobReferenced(kShaA));
  EXPECT_TRUE(*j->BlobReferenced(kShaB));
  EXPECT_TRUE(*j->BlobReferenced(kShaC));
  EXPECT_FALSE(*j->BlobReferenced(kShaD));
  ASSERT_TRUE(j->DeleteJob("j").ok());
  EXPECT_FALSE(*j->BlobReferenced(kShaB));
  EXPECT_TRUE(*j->BlobReferenced(kShaC));
  ASSERT_TRUE(j->DeleteDeployment("q", "1").ok());
  EXPECT_FALSE(*j->BlobReferenced(kShaC));
}

// A directory model's files keep their blobs referenced while the model exists; putting the
// model again with other files replaces the set.
TEST_P(JournalConformance, ADirectoryModelsFilesAreReferencedWithIt) {
  auto j = OpenNew();
  ASSERT_NE(j, nullptr);
  v1::Model m;
  m.set_name("dir");
  m.set_format(v1::HF_DIRECTORY);
  m.set_sha256(kShaA);  // the manifest's hash: not a stored blob, but harmless to count
  for (const auto& [path, sha] : {std::pair{"model.safetensors", kShaB}, {"config.json", kShaC}}) {
    v1::ModelFile* f = m.add_files();
    f->set_path(path);
    f->set_sha256(sha);
  }
  ASSERT_TRUE(j->PutModel(m).ok());
  EXPECT_TRUE(*j->BlobReferenced(kShaB));
  EXPECT_TRUE(*j->BlobReferenced(kShaC));
  m.mutable_files(1)->set_sha256(kShaD);
  ASSERT_TRUE(j->PutModel(m).ok());
  EXPECT_FALSE(*j->BlobReferenced(kShaC));
  EXPECT_TRUE(*j->BlobReferenced(kShaD));
  auto back = j->GetModel("dir");
  ASSERT_TRUE(back.ok() && back->has_value());
  EXPECT_EQ((*back)->files_size(), 2);
  ASSERT_TRUE(j->DeleteModel("dir").ok());
  for (const std::string& sha : {kShaA, kShaB, kShaD}) EXPECT_FALSE(*j->BlobReferenced(sha));
}

TEST_P(JournalConformance, DeploymentsListInVersionOrder) {
  auto j = OpenNew();
  ASSERT_NE(j, nullptr);
  for (const char* v : {"10", "2", "1"}) {
    v1::Deployment d;
    d.set_name("q");
    d.set_version(v);
    d.set_source_sha256(kShaA);
    ASSERT_TRUE(j->PutDeployment(d).ok());
  }
  auto all = j->ListDeployments();
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 3u);
  EXPECT_EQ((*all)[0].version(), "1");
  EXPECT_EQ((*all)[1].version(), "2");
  EXPECT_EQ((*all)[2].version(), "10");
}

TEST_P(JournalConformance, JobsPageNewestFirstAndFilterByState) {
  auto j = OpenNew();
  ASSERT_NE(j, nullptr);
  for (int i = 1; i <= 5; ++i) {
    v1::Job job;
    job.set_job_id("job-" + std::to_string(i));
    job.set_state(i % 2 ? v1::SUCCEEDED : v1::QUEUED);
    job.mutable_spec()->set_model(i == 4 ? "busy" : "idle");
    if (i == 3) job.set_idempotency_key("key-3");
    ASSERT_TRUE(j->PutJob(job).ok());
  }
  // Updating a job keeps its place in the submission order.
  v1::Job again;
  again.set_job_id("job-1");
  again.set_state(v1::FAILED);
  ASSERT_TRUE(j->PutJob(again).ok());
  int64_t next = -1;
  auto page = j->ListJobs(v1::JOB_STATE_UNSPECIFIED, 0, 2, &next);
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_EQ(page->size(), 2u);
  EXPECT_EQ((*page)[0].job_id(), "job-5");
  EXPECT_EQ((*page)[1].job_id(), "job-4");
  ASSERT_NE(next, 0);
  page = j->ListJobs(v1::JOB_STATE_UNSPECIFIED, next, 10, &next);
  ASSERT_TRUE(page.ok());
  ASSERT_EQ(page->size(), 3u);
  EXPECT_EQ((*page)[2].job_id(), "job-1");
  EXPECT_EQ((*page)[2].state(), v1::FAILED);
  EXPECT_EQ(next, 0);
  page = j->ListJobs(v1::QUEUED, 0, 10, &next);
  ASSERT_TRUE(page.ok());
  EXPECT_EQ(page->size(), 2u);
  auto recover = j->JobsInStates({v1::QUEUED, v1::FAILED});
  ASSERT_TRUE(recover.ok()) << recover.status();
  ASSERT_EQ(recover->size(), 3u);
  EXPECT_EQ((*recover)[0].job_id(), "job-1");  // oldest first
  auto by_key = j->FindJobByIdempotencyKey("key-3");
  ASSERT_TRUE(by_key.ok() && by_key->has_value());
  EXPECT_EQ((*by_key)->job_id(), "job-3");
  EXPECT_FALSE(j->FindJobByIdempotencyKey("key-9")->has_value());
  EXPECT_TRUE(*j->ModelInUse("busy"));
  EXPECT_FALSE(*j->ModelInUse("unused"));
}

TEST_P(JournalConformance, VerdictsAreKeyedByBlobAndAllowList) {
  auto j = OpenNew();
  ASSERT_NE(j, nullptr);
  ASSERT_TRUE(j->PutVerdict(kShaA, "list-1", {true, "passed: 3 functions"}).ok());
  ASSERT_TRUE(j->PutVerdict(kShaA, "list-2", {false, "aten::from_file refused"}).ok());
  auto v = j->GetVerdict(kShaA, "list-1");
  ASSERT_TRUE(v.ok() && v->has_value()) << v.status();
  EXPECT_TRUE((*v)->passed);
  EXPECT_EQ((*v)->summary, "passed: 3 functions");
  v = j->GetVerdict(kShaA, "list-2");
  ASSERT_TRUE(v.ok() && v->has_value());
  EXPECT_FALSE((*v)->passed);
  EXPECT_FALSE(j->GetVerdict(kShaB, "list-1")->has_value());
  ASSERT_TRUE(j->PutVerdict(kShaA, "list-2", {true, "re-vetted"}).ok());
  EXPECT_TRUE((*j->GetVerdict(kShaA, "list-2"))->passed);
}

TEST_P(JournalConformance, TwoJournalsOnOneStoreSeeEachOthersWrites) {
  auto [a, b] = OpenTwo();
  ASSERT_TRUE(a && b);
  v1::Model m;
  m.set_name("shared");
  m.set_sha256(kShaA);
  ASSERT_TRUE(a->PutModel(m).ok());
  auto got = b->GetModel("shared");
  ASSERT_TRUE(got.ok() && got->has_value()) << got.status();
  v1::Deployment d;
  d.set_name("shared");
  d.set_version("1");
  d.set_source_sha256(kShaA);
  ASSERT_TRUE(b->PutDeployment(d).ok());
  EXPECT_EQ(a->ListDeployments()->size(), 1u);
  ASSERT_TRUE(a->DeleteModel("shared").ok());
  EXPECT_FALSE(b->GetModel("shared")->has_value());
}

TEST_P(JournalConformance, OneServerPerStore) {
  auto [a, b] = OpenTwo();
  ASSERT_TRUE(a && b);
  auto got = a->LockExclusive();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(*got);
  got = b->LockExclusive();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE(*got);  // a second server on the same store
  // What a replica asks before starting beside an older single server (PostgreSQL only).
  auto held = b->HeldExclusively();
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_EQ(*held, GetParam() == "postgresql");
  a.reset();  // the first one stops (or dies): the lock goes with it
  held = b->HeldExclusively();
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_FALSE(*held);  // and asking did not take it
  got = b->LockExclusive();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(*got);
}

// ---- The job queue ----

v1::Job QueuedJob(const std::string& id, const std::string& key = "") {
  v1::Job j;
  j.set_job_id(id);
  j.set_state(v1::QUEUED);
  j.set_idempotency_key(key);
  j.mutable_spec()->set_model("m");
  return j;
}

// What a worker's claim does to the record (server/jobs.cc).
std::function<void(v1::Job*)> Starts(const std::string& owner) {
  return [owner](v1::Job* j) {
    j->set_state(v1::RUNNING);
    j->set_attempts(j->attempts() + 1);
    j->set_replica(owner);
  };
}

// Two replicas' journals, two claiming threads each: every job is claimed exactly once, oldest
// first within each claimer, and the claimed record is RUNNING under its claimer.
TEST_P(JournalConformance, ConcurrentClaimsTakeEachJobOnce) {
  auto [a, b] = OpenTwo();
  ASSERT_TRUE(a && b);
  constexpr int kJobs = 40;
  for (int i = 0; i < kJobs; ++i) {
    ASSERT_TRUE(a->InsertJob(QueuedJob(absl::StrCat("job-", 1000 + i))).ok());
  }
  EXPECT_EQ(*b->CountJobs(v1::QUEUED), kJobs);
  absl::Mutex mu;
  std::map<std::string, int> claimed;
  std::vector<std::string> errors;
  auto claimer = [&](Journal* j, const std::string& owner) {
    std::string last;
    for (;;) {
      auto got = j->ClaimJob(owner, absl::Minutes(5), Starts(owner));
      absl::MutexLock l(&mu);
      if (!got.ok()) {
        errors.push_back(std::string(got.status().message()));
        return;
      }
      if (!*got) return;
      if ((*got)->state() != v1::RUNNING || (*got)->replica() != owner ||
          (*got)->job_id() <= last) {
        errors.push_back("bad claim " + (*got)->ShortDebugString());
      }
      last = (*got)->job_id();
      ++claimed[last];
    }
  };
  {
    std::vector<std::thread> threads;
    threads.emplace_back(claimer, a.get(), "a1");
    threads.emplace_back(claimer, a.get(), "a2");
    threads.emplace_back(claimer, b.get(), "b1");
    threads.emplace_back(claimer, b.get(), "b2");
    for (std::thread& t : threads) t.join();
  }
  EXPECT_TRUE(errors.empty()) << errors.front();
  EXPECT_EQ(claimed.size(), static_cast<size_t>(kJobs));
  for (const auto& [id, n] : claimed) EXPECT_EQ(n, 1) << id << " claimed " << n << " times";
  EXPECT_EQ(*a->CountJobs(v1::QUEUED), 0);
  EXPECT_EQ(*a->CountJobs(v1::RUNNING), kJobs);
}

// A runner's writes are fenced on its lease: once the lease expired and another replica took
// the job, the first runner's renewal and its final write (with an artifact) are refused and
// leave nothing behind; the new runner's go through.
// Shard tasks are jobs with a parent: claimable by any claimer (ClaimJob) or only among their
// job's (ClaimTask), listed with their job (TasksOf), and left out of ListJobs and CountJobs.
TEST_P(JournalConformance, ShardTasksAreClaimedWithTheirJobAndNotListed) {
  auto j = OpenNew();
  ASSERT_NE(j, nullptr);
  ASSERT_TRUE(j->InsertJob(QueuedJob("job-p")).ok());
  ASSERT_TRUE(j->InsertJob(QueuedJob("job-q")).ok());
  for (const char* parent : {"job-p", "job-q"}) {
    for (int i = 0; i < 2; ++i) {
      v1::Job t = QueuedJob(absl::StrCat(parent, ".shard-", i));
      t.set_parent_job_id(parent);
      t.set_shard(absl::StrCat("model-", i, ".safetensors"));
      ASSERT_TRUE(j->InsertJob(t).ok());
    }
  }
  EXPECT_EQ(*j->CountJobs(v1::QUEUED), 2);
  int64_t next = 0;
  auto listed = j->ListJobs(v1::JOB_STATE_UNSPECIFIED, 0, 10, &next);
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->size(), 2u);
  EXPECT_EQ((*listed)[0].job_id(), "job-q");
  auto tasks = j->TasksOf("job-q");
  ASSERT_TRUE(tasks.ok()) << tasks.status();
  ASSERT_EQ(tasks->size(), 2u);
  EXPECT_EQ((*tasks)[0].job_id(), "job-q.shard-0");
  EXPECT_EQ((*tasks)[1].shard(), "model-1.safetensors");
  // ClaimTask takes only the named job's tasks, oldest first, and nothing once they are taken.
  for (int i = 0; i < 2; ++i) {
    auto got = j->ClaimTask("job-q", "a", absl::Minutes(1), Starts("a"));
    ASSERT_TRUE(got.ok() && got->has_value()) << got.status();
    EXPECT_EQ((*got)->job_id(), absl::StrCat("job-q.shard-", i));
    EXPECT_EQ((*got)->parent_job_id(), "job-q");
  }
  auto none = j->ClaimTask("job-q", "a", absl::Minutes(1), Starts("a"));
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  // A task is leased and fenced like a job.
  v1::Job t = *(*j->GetJob("job-q.shard-0"));
  EXPECT_EQ(t.state(), v1::RUNNING);
  t.set_state(v1::SUCCEEDED);
  EXPECT_FALSE(*j->FinishLeased(t, "b"));
  EXPECT_TRUE(*j->FinishLeased(t, "a"));
  // ClaimJob takes any queued job, a task included, oldest first.
  std::vector<std::string> order;
  for (;;) {
    auto got = j->ClaimJob("b", absl::Minutes(1), Starts("b"));
    ASSERT_TRUE(got.ok()) << got.status();
    if (!got->has_value()) break;
    order.push_back((*got)->job_id());
  }
  EXPECT_EQ(order, (std::vector<std::string>{"job-p", "job-q", "job-p.shard-0", "job-p.shard-1"}));
  EXPECT_EQ(*j->CountJobs(v1::RUNNING), 2);
  ASSERT_TRUE(j->DeleteJob("job-q.shard-0").ok());
  EXPECT_EQ(j->TasksOf("job-q")->size(), 1u);
}

TEST_P(JournalConformance, ALostLeaseFencesTheOldRunnersWrites) {
  auto [a, b] = OpenTwo();
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(a->InsertJob(QueuedJob("job-1")).ok());
  auto mine = a->ClaimJob("a", absl::ZeroDuration(), Starts("a"));  // expires at once
  ASSERT_TRUE(mine.ok() && mine->has_value()) << mine.status();
  absl::SleepFor(absl::Milliseconds(20));
  // A lease of another owner that has not expired is not reaped.
  ASSERT_TRUE(b->InsertJob(QueuedJob("job-2")).ok());
  ASSERT_TRUE(b->ClaimJob("c", absl::Hours(1), Starts("c")).ok());
  auto back = b->ReapLeases(/*all=*/false, "b", /*take_mine=*/false, [](v1::Job* j, bool) {
    j->set_state(v1::QUEUED);
    j->set_crashed_attempts(j->crashed_attempts() + 1);
  });
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->size(), 1u);
  EXPECT_EQ((*back)[0].job_id(), "job-1");
  auto theirs = b->ClaimJob("b", absl::Hours(1), Starts("b"));
  ASSERT_TRUE(theirs.ok() && theirs->has_value());
  EXPECT_EQ((*theirs)->job_id(), "job-1");
  EXPECT_EQ((*theirs)->attempts(), 2u);
  EXPECT_EQ((*theirs)->crashed_attempts(), 1u);

  // The old runner wakes up: its progress and its result are refused.
  v1::Job late = **mine;
  late.mutable_progress()->set_fraction(0.5);
  auto renew = a->RenewLease(late, "a", absl::Hours(1));
  ASSERT_TRUE(renew.ok()) << renew.status();
  EXPECT_FALSE(renew->held);
  late.set_state(v1::SUCCEEDED);
  v1::Artifact* art = late.add_artifacts();
  art->set_artifact_id("art-late");
  art->set_sha256(kShaD);
  auto fin = a->FinishLeased(late, "a");
  ASSERT_TRUE(fin.ok()) << fin.status();
  EXPECT_FALSE(*fin);
  EXPECT_FALSE(b->GetArtifact("art-late")->has_value());
  EXPECT_FALSE(*b->BlobReferenced(kShaD));
  auto now = b->GetJob("job-1");
  ASSERT_TRUE(now.ok() && now->has_value());
  EXPECT_EQ((*now)->state(), v1::RUNNING);
  EXPECT_EQ((*now)->replica(), "b");

  // The new runner's renewal and result go through.
  v1::Job done = **theirs;
  renew = b->RenewLease(done, "b", absl::Hours(1));
  ASSERT_TRUE(renew.ok() && renew->held);
  EXPECT_FALSE(renew->cancel_requested);
  done.set_state(v1::SUCCEEDED);
  *done.add_artifacts() = *art;
  done.mutable_artifacts(0)->set_artifact_id("art-ok");
  fin = b->FinishLeased(done, "b");
  ASSERT_TRUE(fin.ok() && *fin) << fin.status();
  EXPECT_TRUE(a->GetArtifact("art-ok")->has_value());
  EXPECT_EQ((*a->GetJob("job-1"))->state(), v1::SUCCEEDED);
  // Finished: even its own runner cannot write it again.
  EXPECT_FALSE(*b->FinishLeased(done, "b"));
}

// Reaping by owner (a restarted replica with the same id, at start), sparing an owner's own
// expired leases while it runs, `all` (a journal held alone), and a cancel asked of a job whose
// runner is gone.
TEST_P(JournalConformance, ReapTakesBackAnOwnersJobsOrAll) {
  auto j = OpenNew();
  ASSERT_NE(j, nullptr);
  for (const char* id : {"job-1", "job-2", "job-3"}) ASSERT_TRUE(j->InsertJob(QueuedJob(id)).ok());
  ASSERT_TRUE(j->ClaimJob("pod-0:1", absl::Hours(1), Starts("pod-0:1")).ok());
  ASSERT_TRUE(j->ClaimJob("pod-1:1", absl::Hours(1), Starts("pod-1:1")).ok());
  ASSERT_TRUE(j->ClaimJob("pod-2:1", absl::ZeroDuration(), Starts("pod-2:1")).ok());
  absl::SleepFor(absl::Milliseconds(20));  // pod-2's lease has expired
  std::vector<bool> cancels;
  auto requeue = [&cancels](v1::Job* r, bool cancel) {
    cancels.push_back(cancel);
    r->set_state(cancel ? v1::CANCELLED : v1::QUEUED);
  };
  // pod-2 itself, running: its own expired lease is left to it.
  auto spared = j->ReapLeases(false, "pod-2:1", /*take_mine=*/false, requeue);
  ASSERT_TRUE(spared.ok()) << spared.status();
  EXPECT_TRUE(spared->empty());
  // pod-0 restarting with its id: its own job, and pod-2's expired one.
  ASSERT_TRUE(j->CancelJob("job-3", [](v1::Job*) {}).ok());  // asked while pod-2 was away
  auto own = j->ReapLeases(false, "pod-0:1", /*take_mine=*/true, requeue);
  ASSERT_TRUE(own.ok()) << own.status();
  ASSERT_EQ(own->size(), 2u);
  EXPECT_EQ((*own)[0].job_id(), "job-1");
  EXPECT_EQ((*own)[1].job_id(), "job-3");
  EXPECT_EQ(cancels, (std::vector<bool>{false, true}));
  // A journal held alone: everything RUNNING.
  auto all = j->ReapLeases(true, "x", /*take_mine=*/true, requeue);
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ((*all)[0].job_id(), "job-2");
  EXPECT_EQ(*j->CountJobs(v1::QUEUED), 2);
  EXPECT_EQ(*j->CountJobs(v1::CANCELLED), 1);
}

// CancelJob from any replica: a queued job is cancelled at once (no claim takes it after), a
// running one's runner is told at its next renewal, a finished one is left as it is.
TEST_P(JournalConformance, CancelReachesQueuedAndRunningJobs) {
  auto [a, b] = OpenTwo();
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(a->InsertJob(QueuedJob("job-1")).ok());
  ASSERT_TRUE(a->InsertJob(QueuedJob("job-2")).ok());
  auto cancel = [](v1::Job* j) { j->set_state(v1::CANCELLED); };
  auto q = b->CancelJob("job-1", cancel);
  ASSERT_TRUE(q.ok() && q->has_value()) << q.status();
  EXPECT_EQ((*q)->state(), v1::CANCELLED);
  auto running = a->ClaimJob("a", absl::Hours(1), Starts("a"));
  ASSERT_TRUE(running.ok() && running->has_value());
  EXPECT_EQ((*running)->job_id(), "job-2");  // the cancelled one is not claimable
  auto renew = a->RenewLease(**running, "a", absl::Hours(1));
  ASSERT_TRUE(renew.ok() && renew->held);
  EXPECT_FALSE(renew->cancel_requested);
  auto r = b->CancelJob("job-2", cancel);
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ((*r)->state(), v1::RUNNING);  // its runner decides how it ends
  renew = a->RenewLease(**running, "a", absl::Hours(1));
  ASSERT_TRUE(renew.ok() && renew->held);
  EXPECT_TRUE(renew->cancel_requested);
  auto missing = b->CancelJob("job-404", cancel);
  ASSERT_TRUE(missing.ok());
  EXPECT_FALSE(missing->has_value());
  auto again = b->CancelJob("job-1", cancel);
  ASSERT_TRUE(again.ok() && again->has_value());
  EXPECT_EQ((*again)->state(), v1::CANCELLED);
}

// An idempotency key names one job across replicas: the second insert is AlreadyExists.
TEST_P(JournalConformance, IdempotencyKeysAreUniqueAcrossReplicas) {
  auto [a, b] = OpenTwo();
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(a->InsertJob(QueuedJob("job-1", "key-1")).ok());
  absl::Status dup = b->InsertJob(QueuedJob("job-2", "key-1"));
  EXPECT_EQ(dup.code(), absl::StatusCode::kAlreadyExists) << dup;
  EXPECT_EQ((*b->FindJobByIdempotencyKey("key-1"))->job_id(), "job-1");
  EXPECT_FALSE(b->GetJob("job-2")->has_value());
}

TEST_P(JournalConformance, ReplicasAreLiveWhileTheyBeat) {
  auto [a, b] = OpenTwo();
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(a->ReplicaHeartbeat("a:1").ok());
  ASSERT_TRUE(b->ReplicaHeartbeat("b:2").ok());
  auto live = a->LiveReplicas(absl::Minutes(1));
  ASSERT_TRUE(live.ok()) << live.status();
  EXPECT_EQ(*live, (std::vector<std::string>{"a:1", "b:2"}));
  absl::SleepFor(absl::Milliseconds(1500));
  ASSERT_TRUE(b->ReplicaHeartbeat("b:2").ok());
  live = a->LiveReplicas(absl::Seconds(1));
  ASSERT_TRUE(live.ok());
  EXPECT_EQ(*live, (std::vector<std::string>{"b:2"}));
}

// Runs one SQL statement on the backend's database directly (not through the journal); returns
// the first column of the first row, or "" with a test failure.
std::string RawSql(const std::string& backend, const std::string& where, const std::string& sql) {
  std::string out;
  if (backend == "sqlite") {
    sqlite3* db = nullptr;
    EXPECT_EQ(sqlite3_open(where.c_str(), &db), SQLITE_OK);
    sqlite3_stmt* st = nullptr;
    EXPECT_EQ(sqlite3_prepare_v2(db, sql.c_str(), -1, &st, nullptr), SQLITE_OK) << sql;
    if (sqlite3_step(st) == SQLITE_ROW) {
      const unsigned char* t = sqlite3_column_text(st, 0);
      out = t ? reinterpret_cast<const char*>(t) : "";
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    return out;
  }
  PGconn* c = PQconnectdb(where.c_str());
  EXPECT_EQ(PQstatus(c), CONNECTION_OK) << PQerrorMessage(c);
  PGresult* r = PQexec(c, sql.c_str());
  const ExecStatusType st = PQresultStatus(r);
  EXPECT_TRUE(st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK) << sql << ": "
                                                               << PQresultErrorMessage(r);
  if (st == PGRES_TUPLES_OK && PQntuples(r) > 0) out = PQgetvalue(r, 0, 0);
  PQclear(r);
  PQfinish(c);
  return out;
}

// The schema version is recorded; a journal written by a newer server is refused with both
// versions named, and nothing in it is changed.
TEST_P(JournalConformance, AJournalOfANewerSchemaIsRefused) {
  const std::string where = NewLocation();
  ASSERT_NE(MustOpen(where), nullptr);
  EXPECT_EQ(RawSql(GetParam(), where, "SELECT max(version) FROM schema_version"),
            std::to_string(kJournalSchemaVersion));
  ASSERT_NE(MustOpen(where), nullptr);  // reopening the current version
  RawSql(GetParam(), where, "UPDATE schema_version SET version = 99");
  auto newer = Journal::Open(where);
  ASSERT_FALSE(newer.ok());
  EXPECT_EQ(newer.status().code(), absl::StatusCode::kFailedPrecondition) << newer.status();
  EXPECT_TRUE(absl::StrContains(newer.status().message(), "version 99")) << newer.status();
  EXPECT_TRUE(absl::StrContains(newer.status().message(),
                                absl::StrCat("(", kJournalSchemaVersion, ")")))
      << newer.status();
  EXPECT_EQ(RawSql(GetParam(), where, "SELECT max(version) FROM schema_version"), "99");
}

// A journal whose deployments table predates artifact_sha256 opens, gains the column, and its
// deployments keep their records.
TEST(SqliteJournal, OldDeploymentsTableGainsTheArtifactColumn) {
  ScratchDir dir;
  const std::string path = dir.File("journal.sqlite");
  v1::Deployment d;
  d.set_name("old");
  d.set_version("1");
  d.set_source_sha256(kShaA);
  d.set_job_id("job-7");
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(db,
                           "CREATE TABLE deployments(name TEXT NOT NULL, version TEXT NOT NULL, "
                           "sha256 TEXT NOT NULL, record BLOB NOT NULL, PRIMARY KEY(name, version))",
                           nullptr, nullptr, nullptr),
              SQLITE_OK);
    sqlite3_stmt* st = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db, "INSERT INTO deployments VALUES(?, ?, ?, ?)", -1, &st, nullptr),
              SQLITE_OK);
    const std::string rec = d.SerializeAsString();
    sqlite3_bind_text(st, 1, "old", -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, "1", -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, kShaA.c_str(), -1, SQLITE_STATIC);
    sqlite3_bind_blob(st, 4, rec.data(), static_cast<int>(rec.size()), SQLITE_STATIC);
    ASSERT_EQ(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);
    sqlite3_close(db);
  }
  auto j = MustOpen(path);
  auto all = j->ListDeployments();
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ((*all)[0].job_id(), "job-7");
  d.set_artifact_sha256(kShaB);
  ASSERT_TRUE(j->PutDeployment(d).ok());
  EXPECT_TRUE(*j->BlobReferenced(kShaB));
}

// A journal written before jobs were leased (no lease columns) opens, gains them, and its queued
// job is claimable.
TEST(SqliteJournal, OldJobsTableGainsTheLeaseColumns) {
  ScratchDir dir;
  const std::string path = dir.File("journal.sqlite");
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(db,
                           "CREATE TABLE jobs(seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT "
                           "UNIQUE NOT NULL, idempotency_key TEXT UNIQUE, model TEXT NOT NULL, "
                           "state INTEGER NOT NULL, record BLOB NOT NULL)",
                           nullptr, nullptr, nullptr),
              SQLITE_OK);
    sqlite3_close(db);
  }
  auto j = MustOpen(path);
  ASSERT_NE(j, nullptr);
  ASSERT_TRUE(j->InsertJob(QueuedJob("job-old")).ok());
  auto got = j->ClaimJob("a", absl::Minutes(1), Starts("a"));
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->job_id(), "job-old");
}

}  // namespace
}  // namespace fpxint::server
