// The journal conformance suite (server/journal.h): the same cases against both backends, a
// real SQLite file and a real PostgreSQL 15 server started for this binary on a Unix socket
// (tests/support/postgres.h): records round-trip, queries answer from the records, blob
// references cover every table, deployments list in numeric version order, and two journals on
// one database (two replicas) see each other's writes. SQLite only: a journal written before
// deployments recorded their artifact opens and gains the column.
#include "server/journal.h"

#include <sqlite3.h>

#include <string>

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
    return g_pg->NewDatabase();
  }
  std::unique_ptr<Journal> OpenNew() { return MustOpen(NewLocation()); }

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
  const std::string where = NewLocation();
  auto a = MustOpen(where);
  auto b = MustOpen(where);  // a second replica (SQLite: a second connection to the file)
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
  const std::string where = NewLocation();
  auto a = MustOpen(where);
  auto b = MustOpen(where);
  ASSERT_TRUE(a && b);
  auto got = a->LockExclusive();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(*got);
  got = b->LockExclusive();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE(*got);  // a second server on the same store
  a.reset();           // the first one stops (or dies): the lock goes with it
  got = b->LockExclusive();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(*got);
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

}  // namespace
}  // namespace fpxint::server
