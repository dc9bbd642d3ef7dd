// The content-addressed store (server/store.h) on a real directory: streamed blobs are hashed
// and bounded, identical content is stored once, and removal asks who refers to a blob.
#include "server/store.h"

#include <sys/time.h>
#include <unistd.h>

#include <ctime>
#include <filesystem>
#include <set>
#include <string>

#include "core/sha256.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace fpxint::server {
namespace {

using ::fpxint::testing::ReadFileOrDie;
using ::fpxint::testing::ScratchDir;
using ::fpxint::testing::WriteFileOrDie;

std::string Sha(const std::string& s) {
  return core::Sha256Hex(absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(s.data()), s.size()));
}

std::unique_ptr<BlobStore> MustOpen(const std::string& root) {
  auto s = BlobStore::Open(root);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *std::move(s) : nullptr;
}

absl::StatusOr<BlobWriter::Result> Put(BlobStore* store, const std::string& bytes,
                                       const std::string& expected, uint64_t max = 1 << 20) {
  auto w = store->NewWriter(max);
  if (!w.ok()) return w.status();
  for (size_t off = 0; off < bytes.size(); off += 7) {
    if (absl::Status s = (*w)->Append(bytes.substr(off, 7)); !s.ok()) return s;
  }
  return (*w)->Commit(expected);
}

TEST(BlobStore, StreamsHashesAndDeduplicates) {
  ScratchDir dir;
  auto store = MustOpen(dir.File("data"));
  const std::string bytes = "the quick brown fox jumps over the lazy dog";
  auto r = Put(store.get(), bytes, Sha(bytes));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->sha256, Sha(bytes));
  EXPECT_EQ(r->size, bytes.size());
  EXPECT_FALSE(r->deduplicated);
  EXPECT_EQ(ReadFileOrDie(store->PathOf(r->sha256)), bytes);
  auto again = Put(store.get(), bytes, "");
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->deduplicated);
  EXPECT_EQ(*store->SizeOf(r->sha256), bytes.size());
  // Handlers read blobs through the store: an open descriptor, or NotFound.
  auto fd = store->OpenRead(r->sha256);
  ASSERT_TRUE(fd.ok()) << fd.status();
  std::string back(bytes.size(), '\0');
  ASSERT_EQ(::pread(fd->get(), back.data(), back.size(), 0),
            static_cast<ssize_t>(bytes.size()));
  EXPECT_EQ(back, bytes);
  EXPECT_EQ(store->OpenRead(std::string(64, 'e')).status().code(), absl::StatusCode::kNotFound);
}

TEST(BlobStore, RefusesOversizeAndWrongHashStoringNothing) {
  ScratchDir dir;
  auto store = MustOpen(dir.File("data"));
  const std::string bytes(100, 'x');
  auto big = Put(store.get(), bytes, "", /*max=*/99);
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted) << big.status();
  auto wrong = Put(store.get(), bytes, std::string(64, '0'));
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument) << wrong.status();
  EXPECT_FALSE(store->Has(Sha(bytes)));
  // Nothing half-written is left under tmp/ either.
  std::set<std::string> left;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir.File("data") + "/tmp")) {
    if (e.is_regular_file()) left.insert(e.path().string());
  }
  EXPECT_TRUE(left.empty()) << *left.begin();
}

// Bytes the store already holds are only verified when the writer is told their hash: nothing
// reaches the temp directory, wrong bytes are refused, and a blob removed meanwhile is noticed.
TEST(BlobStore, KnownBytesAreVerifiedWithoutWritingThem) {
  ScratchDir dir;
  auto store = MustOpen(dir.File("data"));
  const std::string bytes = "stored once, verified after that";
  ASSERT_TRUE(Put(store.get(), bytes, Sha(bytes)).ok());
  auto w = store->NewWriter(1 << 20, Sha(bytes));
  ASSERT_TRUE(w.ok());
  EXPECT_FALSE((*w)->writes_to_disk());
  ASSERT_TRUE((*w)->Append(bytes).ok());
  EXPECT_TRUE(std::filesystem::is_empty(store->temp_dir()));
  auto r = (*w)->Commit(Sha(bytes));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->deduplicated);
  EXPECT_EQ(r->size, bytes.size());
  // Other bytes under the stored blob's name: refused.
  auto liar = store->NewWriter(1 << 20, Sha(bytes));
  ASSERT_TRUE(liar.ok());
  ASSERT_TRUE((*liar)->Append("something else").ok());
  EXPECT_EQ((*liar)->Commit(Sha(bytes)).status().code(), absl::StatusCode::kInvalidArgument);
  // The size limit holds as for a written blob.
  auto big = store->NewWriter(4, Sha(bytes));
  ASSERT_TRUE(big.ok());
  EXPECT_EQ((*big)->Append(bytes).code(), absl::StatusCode::kResourceExhausted);
  // The blob goes while the bytes stream: the commit says so instead of claiming it is stored.
  auto late = store->NewWriter(1 << 20, Sha(bytes));
  ASSERT_TRUE(late.ok());
  ASSERT_TRUE((*late)->Append(bytes).ok());
  ASSERT_TRUE(store->Remove(Sha(bytes)).ok());
  EXPECT_EQ((*late)->Commit(Sha(bytes)).status().code(), absl::StatusCode::kUnavailable);
  // Unknown bytes are written as usual.
  auto fresh = store->NewWriter(1 << 20, Sha(bytes));
  ASSERT_TRUE(fresh.ok());
  EXPECT_TRUE((*fresh)->writes_to_disk());
}

// A replica paused past twice its lease has its temp directory removed by the others; once it
// resumes, its next upload makes the directory again instead of failing until a restart.
TEST(BlobStore, ATempDirectoryRemovedByAnotherReplicaIsMadeAgain) {
  ScratchDir dir;
  auto store = MustOpen(dir.File("data"));
  std::filesystem::remove_all(store->temp_dir());
  const std::string bytes = "after the pause";
  auto r = Put(store.get(), bytes, Sha(bytes));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(store->Has(Sha(bytes)));
  std::filesystem::remove_all(store->temp_dir());
  auto scratch = store->NewTempDir("job");
  ASSERT_TRUE(scratch.ok()) << scratch.status();
}

TEST(BlobStore, RemovesOnlyWhatNothingRefersTo) {
  ScratchDir dir;
  auto store = MustOpen(dir.File("data"));
  WriteFileOrDie(dir.File("a"), "blob a");
  WriteFileOrDie(dir.File("b"), "blob b");
  auto a = store->ImportFile(dir.File("a"));
  auto b = store->ImportFile(dir.File("b"));
  ASSERT_TRUE(a.ok() && b.ok());
  auto referenced = [&](const std::string& sha) -> absl::StatusOr<bool> { return sha == *a; };
  EXPECT_FALSE(store->RemoveIfUnreferenced(*a, referenced).has_value());
  EXPECT_TRUE(store->Has(*a));
  EXPECT_EQ(store->RemoveIfUnreferenced(*b, referenced), std::optional<uint64_t>(6));
  EXPECT_FALSE(store->Has(*b));
  // A journal that cannot answer keeps the blob.
  auto broken = [](const std::string&) -> absl::StatusOr<bool> {
    return absl::InternalError("journal unavailable");
  };
  EXPECT_FALSE(store->RemoveIfUnreferenced(*a, broken).has_value());
  EXPECT_TRUE(store->Has(*a));
}

TEST(BlobStore, SweepTakesOldOrphansOnly) {
  ScratchDir dir;
  auto store = MustOpen(dir.File("data"));
  WriteFileOrDie(dir.File("a"), "orphan");
  auto a = store->ImportFile(dir.File("a"));
  ASSERT_TRUE(a.ok());
  auto none = [](const std::string&) -> absl::StatusOr<bool> { return false; };
  // Younger than the bound: a blob committed a moment before its record is never taken.
  EXPECT_EQ(store->SweepOrphans(none, absl::Hours(1)).blobs, 0u);
  EXPECT_TRUE(store->Has(*a));
  const BlobStore::Swept swept = store->SweepOrphans(none, absl::ZeroDuration());
  EXPECT_EQ(swept.blobs, 1u);
  EXPECT_EQ(swept.bytes, 6u);
  EXPECT_FALSE(store->Has(*a));
}

// An old unreferenced blob stored again is young again: the sweep that runs while the server
// works (every hour) leaves it to the record about to reference it.
TEST(BlobStore, AnOldBlobStoredAgainIsSpared) {
  ScratchDir dir;
  auto store = MustOpen(dir.File("data"));
  WriteFileOrDie(dir.File("a"), "again");
  auto a = store->ImportFile(dir.File("a"));
  ASSERT_TRUE(a.ok());
  const struct timeval old[2] = {{std::time(nullptr) - 7200, 0}, {std::time(nullptr) - 7200, 0}};
  ASSERT_EQ(::utimes(store->PathOf(*a).c_str(), old), 0);
  WriteFileOrDie(dir.File("b"), "again");
  ASSERT_TRUE(store->ImportFile(dir.File("b")).ok());
  auto none = [](const std::string&) -> absl::StatusOr<bool> { return false; };
  EXPECT_EQ(store->SweepOrphans(none, absl::Hours(1)).blobs, 0u);
  EXPECT_TRUE(store->Has(*a));
}

// Replicas sharing one store: each empties only its own temp directory at start; another's
// goes only when that replica is gone.
TEST(BlobStore, ReplicasKeepTheirTempFilesApart) {
  ScratchDir dir;
  const std::string root = dir.File("data");
  auto a = BlobStore::Open(root, "host-a:1");
  ASSERT_TRUE(a.ok()) << a.status();
  auto a_job = (*a)->NewTempDir("job");
  ASSERT_TRUE(a_job.ok());
  EXPECT_NE(a_job->find("/tmp/host-a:1/"), std::string::npos) << *a_job;
  WriteFileOrDie(*a_job + "/partial", "in flight");
  // Replica b left a file behind when it crashed; replica c is gone for good.
  std::filesystem::create_directories(root + "/tmp/host-b:2");
  WriteFileOrDie(root + "/tmp/host-b:2/upload-x", "b's leftover");
  std::filesystem::create_directories(root + "/tmp/host-c:3");
  WriteFileOrDie(root + "/tmp/host-c:3/upload-y", "c's leftover");
  auto b = BlobStore::Open(root, "host-b:2");  // b restarts on the shared store
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_TRUE(std::filesystem::exists(*a_job + "/partial"));  // a's work in flight is untouched
  EXPECT_FALSE(std::filesystem::exists(root + "/tmp/host-b:2/upload-x"));
  EXPECT_TRUE(std::filesystem::exists(root + "/tmp/host-c:3/upload-y"));
  EXPECT_EQ((*b)->RemoveTempOfGoneReplicas(
                [](const std::string& id) { return id == "host-a:1"; }),
            1);
  EXPECT_FALSE(std::filesystem::exists(root + "/tmp/host-c:3"));
  EXPECT_TRUE(std::filesystem::exists(*a_job + "/partial"));
  for (const char* bad : {"", "..", "a/b", "x y"}) {
    auto s = BlobStore::Open(root, bad);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(s.status().message().find("--replica-id"), std::string::npos);
  }
}

}  // namespace
// Staging marks: per owner, and a blob with a young mark outlives an orphan sweep however old
// the blob is (a directory upload may reuse a stored file); an old mark goes, and its blob too.
TEST(BlobStore, StagingMarksAreOwnedAndKeepTheirBlobs) {
  ScratchDir dir;
  auto store = MustOpen(dir.File("data"));
  WriteFileOrDie(dir.File("a"), "a staged shard");
  auto a = store->ImportFile(dir.File("a"));
  ASSERT_TRUE(a.ok());
  EXPECT_FALSE(store->IsStaged("alice", *a));
  ASSERT_TRUE(store->MarkStaged("alice", *a).ok());
  EXPECT_TRUE(store->IsStaged("alice", *a));
  EXPECT_FALSE(store->IsStaged("bob", *a));
  EXPECT_FALSE(store->MarkStaged("alice", "../../x").ok());
  // The blob is a day old; its mark is new.
  const struct timeval old[2] = {{::time(nullptr) - 86400, 0}, {::time(nullptr) - 86400, 0}};
  ASSERT_EQ(::utimes(store->PathOf(*a).c_str(), old), 0);
  auto none = [](const std::string&) -> absl::StatusOr<bool> { return false; };
  EXPECT_EQ(store->SweepOrphans(none, absl::Hours(1)).blobs, 0u);
  EXPECT_TRUE(store->IsStaged("alice", *a));
  EXPECT_TRUE(store->Has(*a));
  EXPECT_EQ(store->SweepOrphans(none, absl::ZeroDuration()).blobs, 1u);
  EXPECT_FALSE(store->IsStaged("alice", *a));
  EXPECT_FALSE(store->Has(*a));
}

}  // namespace fpxint::server
