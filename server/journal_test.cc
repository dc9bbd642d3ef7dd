// The journal (server/journal.h) on a real SQLite file: records round-trip, queries answer from
// the records, blob references cover every table, and a journal written before deployments
// recorded their artifact opens and gains the column.
#include "server/journal.h"

#include <sqlite3.h>

#include <string>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace fpxint::server {
namespace {

using ::fpxint::testing::ScratchDir;

const std::string kShaA(64, 'a'), kShaB(64, 'b'), kShaC(64, 'c'), kShaD(64, 'd');

std::unique_ptr<Journal> MustOpen(const std::string& path) {
  auto j = Journal::Open(path);
  EXPECT_TRUE(j.ok()) << j.status();
  return j.ok() ? *std::move(j) : nullptr;
}

TEST(Journal, RecordsRoundTripAndSurviveReopening) {
  ScratchDir dir;
  const std::string path = dir.File("journal.sqlite");
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

TEST(Journal, EveryRecordKindKeepsItsBlobsReferenced) {
  ScratchDir dir;
  auto j = MustOpen(dir.File("journal.sqlite"));
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

TEST(Journal, DeploymentsListInVersionOrder) {
  ScratchDir dir;
  auto j = MustOpen(dir.File("journal.sqlite"));
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

// A journal whose deployments table predates artifact_sha256 opens, gains the column, and its
// deployments keep their records.
TEST(Journal, OldDeploymentsTableGainsTheArtifactColumn) {
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
