// Replicas on one PostgreSQL journal (docs/BENCHMARKS.md "Replicas"), in one run:
//   - job throughput: 8 TENSOR jobs on a 64 MiB model (16 F32 tensors of 1024 x 1024, b=4, K=2),
//     run by 1 replica and by 2 replicas, each replica one worker on one compute thread, all on
//     one PostgreSQL server and one store (counter jobs_per_s);
//   - one small TENSOR job, submit to SUCCEEDED, on the SQLite journal and on the PostgreSQL one;
//   - the queue's own statements on PostgreSQL over its Unix socket: a claim, and a fenced final
//     write with one artifact record (counters p50_ms, p99_ms);
//   - one TENSOR job over a 4-shard directory model (4 x 16 F32 tensors of 2048 x 2048, 1 GiB,
//     b=4, K=8), split into shard tasks, run by 1 replica and by 2 (counter source_mb_per_s).
// A replica here is what a server process adds: its own journal connection, job manager and
// compute pool, sharing the store (in-process, so the figures leave out gRPC).
// Needs the postgresql-15 binaries (scripts/setup.sh installs them); runs as root or not.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/safetensors.h"
#include "core/thread_pool.h"
#include "server/jobs.h"
#include "server/journal.h"
#include "server/repository.h"
#include "server/store.h"
#include "server/validation.h"
#include "tests/support/postgres.h"

namespace {

using namespace fpxint;
namespace fs = std::filesystem;

testing::TempPostgres* Postgres() {
  static testing::TempPostgres* pg = [] {
    std::string error;
    auto p = testing::TempPostgres::Start(&error);
    if (!p) {
      std::fprintf(stderr, "cannot start PostgreSQL: %s\n", error.c_str());
      std::exit(3);
    }
    return p.release();
  }();
  return pg;
}

std::string NewDatabase() {
  std::string error;
  std::string url = Postgres()->NewDatabase(&error);
  if (url.empty()) {
    std::fprintf(stderr, "%s\n", error.c_str());
    std::exit(3);
  }
  return url;
}

// A model of `tensors` random F32 [rows, cols] tensors, written to `path`.
void WriteModel(const std::string& path, int tensors, int rows, int cols) {
  core::SafetensorsWriter w;
  std::mt19937 rng(7);
  std::normal_distribution<float> g;
  for (int t = 0; t < tensors; ++t) {
    std::vector<float> v(static_cast<size_t>(rows) * cols);
    for (float& x : v) x = g(rng);
    const auto* p = reinterpret_cast<const uint8_t*>(v.data());
    if (!w.AddOwned(absl::StrCat("layer", t, ".weight"), core::DType::kF32, {rows, cols},
                    std::vector<uint8_t>(p, p + v.size() * 4))
             .ok()) {
      std::exit(4);
    }
  }
  if (!w.WriteFile(path).ok()) std::exit(4);
}

// One store with one uploaded model, and N replicas on one journal. `shards` > 0: a directory
// model (HF_DIRECTORY) of that many shards of `tensors` tensors each.
class Cluster {
 public:
  Cluster(const std::string& where, int replicas, int tensors, int rows, int cols,
          int shards = 0) {
    dir_ = (fs::temp_directory_path() / absl::StrCat("fpxint-replicas-bench-", getpid())).string();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    store_ = *server::BlobStore::Open(dir_ + "/data", "bench");
    model_.set_name("m");
    if (shards == 0) {
      WriteModel(dir_ + "/m.safetensors", tensors, rows, cols);
      model_.set_format(v1::SAFETENSORS);
      model_.set_sha256(*store_->ImportFile(dir_ + "/m.safetensors"));
    } else {
      model_.set_format(v1::HF_DIRECTORY);
      model_.set_sha256(std::string(64, '0'));
      for (int i = 0; i < shards; ++i) {
        const std::string path = absl::StrCat(dir_, "/shard", i, ".safetensors");
        WriteModel(path, tensors, rows, cols);
        v1::ModelFile* f = model_.add_files();
        f->set_path(absl::StrCat("model-", i, ".safetensors"));
        f->set_size_bytes(fs::file_size(path));
        f->set_sha256(*store_->ImportFile(path));
        f->set_role("shard");
        f->set_tensor_count(tensors);
      }
      model_.set_tensor_count(static_cast<uint64_t>(shards) * tensors);
    }
    for (int i = 0; i < replicas; ++i) {
      Replica& r = replicas_.emplace_back();
      r.journal = *server::Journal::Open(where);
      if (i == 0 && !r.journal->PutModel(model_).ok()) std::exit(5);
      r.pool = std::make_unique<core::ThreadPool>(1);
      r.repo = std::make_unique<server::Repository>(dir_ + "/repository", r.journal.get(),
                                                    store_.get(), r.pool.get(),
                                                    server::Repository::Options{});
      server::JobManager::Options o;
      o.workers = 1;
      o.torch_threads = 1;
      o.queue_limit = 1000;
      o.replica_id = absl::StrCat("r", i);
      o.journal_exclusive = !server::Journal::IsDatabaseUrl(where);
      o.poll = absl::Milliseconds(20);
      r.jobs = std::make_unique<server::JobManager>(o, r.journal.get(), store_.get(),
                                                    r.repo.get(), r.pool.get());
      if (!r.jobs->Start().ok()) std::exit(5);
    }
  }
  ~Cluster() {
    for (Replica& r : replicas_) r.jobs->Shutdown(absl::Seconds(60));
    replicas_.clear();
    fs::remove_all(dir_);
  }

  // Submits `n` jobs to the replicas in turn and waits until the journal has them SUCCEEDED.
  void RunJobs(int n, benchmark::State& state, int terms = 2) {
    const int64_t before = *replicas_[0].journal->CountJobs(v1::SUCCEEDED);
    for (int i = 0; i < n; ++i) {
      v1::SubmitJobRequest req;
      req.mutable_spec()->set_model("m");
      req.mutable_spec()->set_granularity(v1::TENSOR);
      req.mutable_spec()->set_weight_bits(4);
      req.mutable_spec()->set_weight_terms(terms);
      if (!replicas_[i % replicas_.size()].jobs->Submit(req).ok()) {
        state.SkipWithError("submit failed");
        return;
      }
    }
    while (*replicas_[0].journal->CountJobs(v1::SUCCEEDED) - before < n) {
      if (*replicas_[0].journal->CountJobs(v1::FAILED) > 0) {
        state.SkipWithError("a job failed");
        return;
      }
      absl::SleepFor(absl::Milliseconds(5));
    }
  }

 private:
  struct Replica {
    std::unique_ptr<server::Journal> journal;
    std::unique_ptr<core::ThreadPool> pool;
    std::unique_ptr<server::Repository> repo;
    std::unique_ptr<server::JobManager> jobs;
  };
  std::string dir_;
  std::unique_ptr<server::BlobStore> store_;
  v1::Model model_;
  std::vector<Replica> replicas_;
};

// 8 jobs of 64 MiB; arg: replicas.
void BM_JobThroughput(benchmark::State& state) {
  const int replicas = static_cast<int>(state.range(0));
  Cluster c(NewDatabase(), replicas, 16, 1024, 1024);
  constexpr int kJobs = 8;
  for (auto _ : state) c.RunJobs(kJobs, state);
  state.counters["jobs_per_s"] = benchmark::Counter(
      kJobs * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_JobThroughput)->Arg(1)->Arg(2)->Unit(benchmark::kSecond)->UseRealTime()
    ->Iterations(3);

// One TENSOR job over a 4-shard directory model, split into shard tasks; arg: replicas.
void BM_ShardedJob(benchmark::State& state) {
  const int replicas = static_cast<int>(state.range(0));
  constexpr int kShards = 4, kTensors = 16, kRows = 2048, kCols = 2048;
  Cluster c(NewDatabase(), replicas, kTensors, kRows, kCols, kShards);
  for (auto _ : state) c.RunJobs(1, state, /*terms=*/8);
  state.counters["source_mb_per_s"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * kShards * kTensors * kRows * kCols * 4 / 1e6,
      benchmark::Counter::kIsRate);
}
BENCHMARK(BM_ShardedJob)->Arg(1)->Arg(2)->Unit(benchmark::kSecond)->UseRealTime()
    ->Iterations(3);

// One small job end to end; arg 0: SQLite, 1: PostgreSQL.
void BM_SmallJob(benchmark::State& state) {
  const bool pg = state.range(0) == 1;
  const std::string sqlite =
      (fs::temp_directory_path() / absl::StrCat("fpxint-bench-", getpid(), ".sqlite")).string();
  fs::remove(sqlite);
  {
    Cluster c(pg ? NewDatabase() : sqlite, 1, 2, 64, 64);
    for (auto _ : state) c.RunJobs(1, state);
  }
  fs::remove(sqlite);
  fs::remove(sqlite + "-wal");
  fs::remove(sqlite + "-shm");
  fs::remove(sqlite + ".lock");
  state.SetLabel(pg ? "postgresql" : "sqlite");
}
BENCHMARK(BM_SmallJob)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();

// Claim and fenced final write latency on PostgreSQL.
void BM_ClaimAndCommit(benchmark::State& state) {
  auto journal = *server::Journal::Open(NewDatabase());
  std::vector<double> claim_ms, commit_ms;
  int64_t n = 0;
  for (auto _ : state) {
    state.PauseTiming();
    v1::Job j;
    j.set_job_id(absl::StrCat("job-", ++n));
    j.set_state(v1::QUEUED);
    j.mutable_spec()->set_model("m");
    if (!journal->InsertJob(j).ok()) state.SkipWithError("insert failed");
    state.ResumeTiming();
    absl::Time t0 = absl::Now();
    auto got = journal->ClaimJob("r0", absl::Seconds(30), [](v1::Job* r) {
      r->set_state(v1::RUNNING);
      r->set_attempts(r->attempts() + 1);
    });
    claim_ms.push_back(absl::ToDoubleMilliseconds(absl::Now() - t0));
    if (!got.ok() || !*got) {
      state.SkipWithError("claim failed");
      break;
    }
    v1::Job done = **got;
    done.set_state(v1::SUCCEEDED);
    v1::Artifact* a = done.add_artifacts();
    a->set_artifact_id(absl::StrCat("art-", n));
    a->set_sha256(std::string(64, 'a'));
    t0 = absl::Now();
    auto fin = journal->FinishLeased(done, "r0");
    commit_ms.push_back(absl::ToDoubleMilliseconds(absl::Now() - t0));
    if (!fin.ok() || !*fin) state.SkipWithError("commit refused");
  }
  auto pct = [](std::vector<double> v, double q) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    return v[std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5))];
  };
  state.counters["claim_p50_ms"] = pct(claim_ms, 0.5);
  state.counters["claim_p99_ms"] = pct(claim_ms, 0.99);
  state.counters["commit_p50_ms"] = pct(commit_ms, 0.5);
  state.counters["commit_p99_ms"] = pct(commit_ms, 0.99);
}
BENCHMARK(BM_ClaimAndCommit)->Iterations(500)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
