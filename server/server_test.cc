// In-process integration tests of fpxint-server: a real gRPC server on 127.0.0.1 (port chosen
// free), real SQLite journal and store in a scratch directory, every RPC through real stubs.
#include "server/server.h"

#include <grpcpp/grpcpp.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "core/artifact.h"
#include "core/dtype.h"
#include "core/hf_checkpoint.h"
#include "core/safetensors.h"
#include "core/sha256.h"
#include "fpxint/v1/quantizer.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "inference/grpc_service.grpc.pb.h"
#include "server/auth.h"
#include "server/jobs.h"
#include "server/journal.h"
#include "server/oip_codec.h"
#include "server/repository.h"
#include "server/store.h"
#include "server/validation.h"
#include "tests/support/postgres.h"
#include "tests/support/test_support.h"

namespace fpxint::server {
namespace {

using ::fpxint::testing::Dist;
using ::fpxint::testing::MaxRelErr;
using ::fpxint::testing::RandomValues;
using ::fpxint::testing::ReadFileOrDie;
using ::fpxint::testing::ToFloat;
using ::fpxint::testing::ScratchDir;
using ::fpxint::testing::SmallWeightsSafetensors;
using ::fpxint::testing::WriteFileOrDie;

constexpr char kAdmin[] = "admin-token-0123456789";
constexpr char kQuantize[] = "quantize-token-0123456789";
constexpr char kInfer[] = "infer-token-0123456789";

std::string TinyDir() {
  const char* d = std::getenv("FPXINT_TINY_MODELS_DIR");
  return d ? d : "";
}

std::string Sha(const std::string& s) {
  return core::Sha256Hex(absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(s.data()), s.size()));
}

class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(TinyDir().empty()) << "FPXINT_TINY_MODELS_DIR is not set";
    WriteFileOrDie(dir_.File("tokens"), absl::StrCat("# test tokens\n", kAdmin, " admin\n",
                                                     kQuantize, " quantize\n", kInfer, " infer\n"));
    StartServer();
  }
  void TearDown() override { server_.reset(); }

  void StartServer() {
    ServerConfig c;
    c.listen = "127.0.0.1:0";
    c.data_dir = dir_.File("data");
    c.token_file = dir_.File("tokens");
    c.max_upload_bytes = max_upload_;
    c.threads = 2;
    c.queue_limit = 8;
    c.shutdown_grace_seconds = shutdown_grace_;
    c.metrics_listen = metrics_listen_;
    c.job_memory_limit = job_memory_limit_;
    c.workers = workers_;
    c.database_url = database_url_;
    auto s = Server::Start(c);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = *std::move(s);
    auto ch = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
    q_ = v1::Quantizer::NewStub(ch);
    oip_ = inference::GRPCInferenceService::NewStub(ch);
    health_ = grpc::health::v1::Health::NewStub(ch);
  }
  void Restart() {
    server_.reset();
    StartServer();
  }

  std::unique_ptr<grpc::ClientContext> Ctx(const char* token = kAdmin) {
    auto c = std::make_unique<grpc::ClientContext>();
    if (token) c->AddMetadata("authorization", absl::StrCat("Bearer ", token));
    c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    return c;
  }

  // Uploads `bytes` in 64 KiB chunks; `sha` empty: the right one.
  grpc::Status Upload(const std::string& name, v1::ModelFormat fmt, const std::string& bytes,
                      v1::Model* out, std::string sha = "", uint64_t size = 0,
                      const char* token = kAdmin) {
    v1::UploadChunk h;
    h.mutable_header()->set_name(name);
    h.mutable_header()->set_format(fmt);
    h.mutable_header()->set_sha256(sha.empty() ? Sha(bytes) : sha);
    h.mutable_header()->set_size_bytes(size);
    if (fmt == v1::TORCHSCRIPT) {
      auto* in = h.mutable_header()->add_inputs();
      in->set_name("input__0");
      in->set_datatype("FP32");
      for (int64_t d : {2, 3, 8, 8}) in->add_shape(d);
    }
    return Send(h, bytes, out, token);
  }
  // Uploads one file of a directory model (HF_DIRECTORY, header.file_path).
  grpc::Status Stage(const std::string& name, const std::string& path, const std::string& bytes,
                     const char* token = kAdmin) {
    v1::UploadChunk h;
    h.mutable_header()->set_name(name);
    h.mutable_header()->set_format(v1::HF_DIRECTORY);
    h.mutable_header()->set_file_path(path);
    h.mutable_header()->set_sha256(Sha(bytes));
    v1::Model staged;
    return Send(h, bytes, &staged, token);
  }
  grpc::Status Send(const v1::UploadChunk& h, const std::string& bytes, v1::Model* out,
                    const char* token) {
    auto ctx = Ctx(token);
    auto w = q_->UploadModel(ctx.get(), out);
    w->Write(h);
    for (size_t off = 0; off < bytes.size(); off += 65536) {
      v1::UploadChunk c;
      c.set_data(bytes.substr(off, 65536));
      if (!w->Write(c)) break;
    }
    w->WritesDone();
    return w->Finish();
  }

  v1::Job Submit(const v1::JobSpec& spec, const std::string& key = "") {
    v1::SubmitJobRequest req;
    *req.mutable_spec() = spec;
    req.set_idempotency_key(key);
    v1::Job job;
    grpc::Status s = q_->SubmitJob(Ctx().get(), req, &job);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return job;
  }

  // Watches a job to its end; returns the events.
  std::vector<v1::Job> Watch(const std::string& id) {
    v1::JobRef ref;
    ref.set_job_id(id);
    auto ctx = Ctx();
    auto r = q_->WatchJob(ctx.get(), ref);
    std::vector<v1::Job> events;
    v1::JobEvent ev;
    while (r->Read(&ev)) events.push_back(ev.job());
    grpc::Status s = r->Finish();
    EXPECT_TRUE(s.ok()) << s.error_message();
    return events;
  }

  // `via`: another server's stub (a second replica); null: this fixture's server.
  std::string Download(const std::string& artifact_id, uint64_t offset = 0,
                       std::string* sha = nullptr, v1::Quantizer::Stub* via = nullptr) {
    v1::ArtifactRef ref;
    ref.set_artifact_id(artifact_id);
    ref.set_offset(offset);
    ref.set_chunk_bytes(4096);
    auto ctx = Ctx();
    auto r = (via ? via : q_.get())->DownloadArtifact(ctx.get(), ref);
    std::string out;
    v1::ArtifactChunk c;
    while (r->Read(&c)) {
      EXPECT_EQ(c.offset(), offset + out.size());
      out += c.data();
      if (sha) *sha = c.sha256();
    }
    grpc::Status s = r->Finish();
    EXPECT_TRUE(s.ok()) << s.error_message();
    return out;
  }

  v1::Job GetJob(const std::string& job_id, v1::Quantizer::Stub* via = nullptr) {
    v1::JobRef ref;
    ref.set_job_id(job_id);
    v1::Job job;
    auto ctx = Ctx();
    grpc::Status s = (via ? via : q_.get())->GetJob(ctx.get(), ref, &job);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return job;
  }

  // A ModelInfer request with one FP32 input "input__0" of `shape`, its bytes raw.
  static inference::ModelInferRequest RawInfer(const std::string& model,
                                               const std::vector<int64_t>& shape,
                                               std::string bytes) {
    inference::ModelInferRequest req;
    req.set_model_name(model);
    auto* in = req.add_inputs();
    in->set_name("input__0");
    in->set_datatype("FP32");
    for (int64_t d : shape) in->add_shape(d);
    req.add_raw_input_contents(std::move(bytes));
    return req;
  }

  v1::JobSpec Spec(const std::string& model, v1::Granularity g, int bits = 4, int terms = 2) {
    v1::JobSpec s;
    s.set_model(model);
    s.set_granularity(g);
    s.set_weight_bits(bits);
    s.set_weight_terms(terms);
    return s;
  }

  ScratchDir dir_;
  uint64_t job_memory_limit_ = 0;
  int workers_ = 1;
  std::string database_url_;  // empty: SQLite in the data directory
  double shutdown_grace_ = 5;
  std::string metrics_listen_;
  int64_t max_upload_ = 4 << 20;
  std::unique_ptr<Server> server_;
  std::unique_ptr<v1::Quantizer::Stub> q_;
  std::unique_ptr<inference::GRPCInferenceService::Stub> oip_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

TEST_F(ServerTest, HealthAndServerMetadataNeedNoToken) {
  for (const char* svc : {"", "inference.GRPCInferenceService", "fpxint.v1.Quantizer"}) {
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(svc);
    grpc::health::v1::HealthCheckResponse resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(health_->Check(&ctx, req, &resp).ok()) << svc;
    EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING) << svc;
  }
  grpc::ClientContext c1, c2, c3;
  inference::ServerLiveResponse live;
  ASSERT_TRUE(oip_->ServerLive(&c1, {}, &live).ok());
  EXPECT_TRUE(live.live());
  inference::ServerReadyResponse ready;
  ASSERT_TRUE(oip_->ServerReady(&c2, {}, &ready).ok());
  EXPECT_TRUE(ready.ready());
  inference::ServerMetadataResponse md;
  ASSERT_TRUE(oip_->ServerMetadata(&c3, {}, &md).ok());
  EXPECT_EQ(md.name(), "fpxint");
  EXPECT_NE(std::find(md.extensions().begin(), md.extensions().end(), "model_repository"),
            md.extensions().end());
}

TEST_F(ServerTest, UploadVerifiesDeduplicatesAndRejectsBadInput) {
  const std::string w = SmallWeightsSafetensors(1);
  v1::Model m;
  ASSERT_TRUE(Upload("w1", v1::SAFETENSORS, w, &m).ok());
  EXPECT_EQ(m.sha256(), Sha(w));
  EXPECT_EQ(m.size_bytes(), w.size());
  EXPECT_FALSE(m.deduplicated());
  // Same name, same bytes: the existing model. Other name, same bytes: deduplicated blob.
  ASSERT_TRUE(Upload("w1", v1::SAFETENSORS, w, &m).ok());
  EXPECT_TRUE(m.deduplicated());
  ASSERT_TRUE(Upload("w1-copy", v1::SAFETENSORS, w, &m).ok());
  EXPECT_TRUE(m.deduplicated());
  // Same name, other bytes.
  grpc::Status s = Upload("w1", v1::SAFETENSORS, SmallWeightsSafetensors(7), &m);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::ALREADY_EXISTS) << s.error_message();

  s = Upload("bad-sha", v1::SAFETENSORS, w, &m, std::string(64, 'a'));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("header.sha256"), std::string::npos) << s.error_message();
  s = Upload("truncated", v1::SAFETENSORS, w.substr(0, w.size() / 2), &m, Sha(w), w.size());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("size_bytes"), std::string::npos) << s.error_message();
  const std::string big(5 << 20, 'x');
  s = Upload("big", v1::SAFETENSORS, big, &m);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  s = Upload("big2", v1::SAFETENSORS, w, &m, "", 1ull << 40);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  s = Upload("../evil", v1::SAFETENSORS, w, &m);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("header.name"), std::string::npos);
  s = Upload("garbage", v1::SAFETENSORS, std::string(1000, '\x7f'), &m);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("safetensors"), std::string::npos) << s.error_message();
  s = Upload("notzip", v1::TORCHSCRIPT, w, &m);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  s = Upload("nofmt", v1::MODEL_FORMAT_UNSPECIFIED, w, &m);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  // Nothing of the refused uploads is visible.
  v1::ListModelsResponse list;
  ASSERT_TRUE(q_->ListModels(Ctx().get(), {}, &list).ok());
  ASSERT_EQ(list.models_size(), 2);
  EXPECT_EQ(list.models(0).name(), "w1");
  EXPECT_EQ(list.models(1).name(), "w1-copy");
  // And the temp directory holds no leftovers.
  EXPECT_TRUE(std::filesystem::is_empty(dir_.File("data") + "/tmp/" + server_->replica_id()));
}

TEST_F(ServerTest, AuthenticationAndRoles) {
  v1::ListModelsResponse list;
  grpc::Status s = q_->ListModels(Ctx(nullptr).get(), {}, &list);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  s = q_->ListModels(Ctx("wrong-token-0123456789").get(), {}, &list);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  s = q_->ListModels(Ctx(kInfer).get(), {}, &list);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_TRUE(q_->ListModels(Ctx(kQuantize).get(), {}, &list).ok());
  inference::RepositoryIndexResponse idx;
  s = oip_->RepositoryIndex(Ctx(kQuantize).get(), {}, &idx);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_TRUE(oip_->RepositoryIndex(Ctx(kInfer).get(), {}, &idx).ok());
}

TEST_F(ServerTest, TensorJobRunsWatchesAndDownloads) {
  const std::string w = SmallWeightsSafetensors(2);
  v1::Model m;
  ASSERT_TRUE(Upload("w", v1::SAFETENSORS, w, &m).ok());
  v1::Job job = Submit(Spec("w", v1::TENSOR, 4, 3));
  EXPECT_EQ(job.state(), v1::QUEUED);
  std::vector<v1::Job> events = Watch(job.job_id());
  ASSERT_FALSE(events.empty());
  const v1::Job& done = events.back();
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.error();
  EXPECT_EQ(done.attempts(), 1u);
  ASSERT_EQ(done.result().layers_size(), 2);  // fc1.weight, fc2.weight; the bias is copied
  EXPECT_EQ(done.result().layers(0).terms_size(), 3);
  EXPECT_LT(done.result().layers(0).terms(2).rel_fro(), done.result().layers(0).terms(0).rel_fro());
  EXPECT_GT(done.result().compression_ratio(), 1.5);
  ASSERT_EQ(done.artifacts_size(), 2);
  const v1::Artifact& art = done.artifacts(0);
  EXPECT_EQ(art.kind(), "packed_safetensors");
  std::string sha;
  const std::string bytes = Download(art.artifact_id(), 0, &sha);
  EXPECT_EQ(bytes.size(), art.size_bytes());
  EXPECT_EQ(Sha(bytes), art.sha256());
  EXPECT_EQ(sha, art.sha256());
  // Resumed download: the tail from an offset.
  EXPECT_EQ(Download(art.artifact_id(), 1000), bytes.substr(1000));
  // The artifact is the documented format.
  auto r = core::SafetensorsReader::FromBuffer(std::vector<uint8_t>(bytes.begin(), bytes.end()));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->Metadata("format").value_or(""), "fpxint");
  EXPECT_EQ((*r)->Metadata("terms").value_or(""), "3");
  EXPECT_NE((*r)->Find("fc1.weight.t3.codes"), nullptr);
  // Progress was streamed and ends complete (a job this small can finish before the watcher
  // attaches, so the RUNNING events themselves are not guaranteed).
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().progress().layers_total(), 2);
  EXPECT_EQ(events.back().progress().layers_done(), 2);
  for (const v1::Job& e : events) {
    if (e.state() == v1::RUNNING && e.progress().layers_total() != 0) {
      EXPECT_EQ(e.progress().layers_total(), 2);
    }
    // Artifacts are listed only with the state that makes them downloadable.
    if (e.artifacts_size() > 0 || e.has_result()) {
      EXPECT_EQ(e.state(), v1::SUCCEEDED);
    }
  }
  // The same spec twice gives byte-identical artifacts.
  v1::Job again = Watch(Submit(Spec("w", v1::TENSOR, 4, 3)).job_id()).back();
  ASSERT_EQ(again.state(), v1::SUCCEEDED);
  EXPECT_EQ(again.artifacts(0).sha256(), art.sha256());

  v1::ArtifactRef bad;
  bad.set_artifact_id("art-nope");
  auto ctx = Ctx();
  auto rd = q_->DownloadArtifact(ctx.get(), bad);
  v1::ArtifactChunk c;
  while (rd->Read(&c)) {
  }
  EXPECT_EQ(rd->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
}

// A second server on the same data directory would recover the first one's running jobs as its
// own and empty its temp directory: it is refused, and the first one goes on untouched.
TEST_F(ServerTest, ASecondServerOnTheSameDataDirectoryIsRefused) {
  const std::string in_flight =
      dir_.File("data") + "/tmp/" + server_->replica_id() + "/upload-in-flight";
  WriteFileOrDie(in_flight, "partial upload");
  ServerConfig c;
  c.listen = "127.0.0.1:0";
  c.data_dir = dir_.File("data");
  c.token_file = dir_.File("tokens");
  c.replica_id = "second";
  auto second = Server::Start(c);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(second.status().message(), "--data-dir")) << second.status();
  EXPECT_TRUE(std::filesystem::exists(in_flight));
  v1::Model m;
  ASSERT_TRUE(Upload("w", v1::SAFETENSORS, SmallWeightsSafetensors(3), &m).ok());  // the first still serves
  // Once the first has stopped, the directory is free again.
  server_.reset();
  auto third = Server::Start(c);
  ASSERT_TRUE(third.ok()) << third.status();
}

// The same job path with the journal in PostgreSQL (a real server on a Unix socket): a TENSOR
// job runs, its artifact downloads, a second replica on the same database and store serves the
// job and its artifact, and a restart on the database finds it.
TEST_F(ServerTest, RunsOnAPostgresJournal) {
  std::string error;
  auto pg = fpxint::testing::TempPostgres::Start(&error);
  ASSERT_NE(pg, nullptr) << error;
  server_.reset();
  database_url_ = pg->NewDatabase(&error);
  ASSERT_FALSE(database_url_.empty()) << error;
  StartServer();
  v1::Model m;
  ASSERT_TRUE(Upload("w", v1::SAFETENSORS, SmallWeightsSafetensors(4), &m).ok());
  v1::Job done = Watch(Submit(Spec("w", v1::TENSOR, 4, 2)).job_id()).back();
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.error();
  const std::string bytes = Download(done.artifacts(0).artifact_id(), 0);
  EXPECT_EQ(Sha(bytes), done.artifacts(0).sha256());
  {
    ServerConfig c;
    c.listen = "127.0.0.1:0";
    c.data_dir = dir_.File("data");
    c.token_file = dir_.File("tokens");
    c.database_url = database_url_;
    c.replica_id = "second";
    auto second = Server::Start(c);
    ASSERT_TRUE(second.ok()) << second.status();
    auto ch = grpc::CreateChannel((*second)->address(), grpc::InsecureChannelCredentials());
    auto q2 = v1::Quantizer::NewStub(ch);
    const v1::Job there = GetJob(done.job_id(), q2.get());
    EXPECT_EQ(there.state(), v1::SUCCEEDED);
    EXPECT_EQ(there.replica(), server_->replica_id());
    const std::string got = Download(done.artifacts(0).artifact_id(), 0, nullptr, q2.get());
    EXPECT_EQ(Sha(got), done.artifacts(0).sha256());
  }
  Restart();
  const v1::Job again = GetJob(done.job_id());
  EXPECT_EQ(again.state(), v1::SUCCEEDED);
  EXPECT_EQ(again.artifacts(0).sha256(), done.artifacts(0).sha256());
  server_.reset();  // before the database goes
}

// --job-memory-limit: a job whose planned memory exceeds it fails with both figures and the
// flag's name, before it expands anything; under the limit the same job runs.
// A Hugging Face model directory: files uploaded one by one with their paths, then committed as
// one model. A dry run lists what this caller has not uploaded (so a resumed upload sends only
// that; another caller's copy of the same bytes does not count), the commit checks the layout
// (an index naming a shard that is not there, a tensor in two shards), and a TENSOR job over it
// writes packed shards with model.fpxint.index.json and the dequantized layout with the sidecars.
TEST_F(ServerTest, DirectoryModelCommitsAndRunsShardByShard) {
  auto shard = [](std::vector<std::pair<std::string, std::vector<int64_t>>> tensors, uint64_t seed) {
    core::SafetensorsWriter w;
    for (const auto& [name, shape] : tensors) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      auto v = fpxint::testing::ToFloat(fpxint::testing::RandomValues(
          fpxint::testing::Dist::kGaussian, static_cast<size_t>(n), seed++));
      std::vector<uint8_t> bytes(v.size() * 4);
      std::memcpy(bytes.data(), v.data(), bytes.size());
      EXPECT_TRUE(w.AddOwned(name, core::DType::kF32, shape, std::move(bytes)).ok());
    }
    auto b = w.Serialize();
    return std::string(b.begin(), b.end());
  };
  const std::string s1 = shard({{"a.weight", {64, 128}}, {"a.bias", {64}}}, 1);
  const std::string s2 = shard({{"b.weight", {32, 64}}}, 9);
  const std::string index = R"({"metadata": {"total_size": 42},
      "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                     "a.bias": "model-00001-of-00002.safetensors",
                     "b.weight": "model-00002-of-00002.safetensors"}})";
  const std::string config = R"({"architectures": ["Toy"]})";
  const std::map<std::string, std::string> files = {
      {"model-00001-of-00002.safetensors", s1}, {"model-00002-of-00002.safetensors", s2},
      {"model.safetensors.index.json", index}, {"config.json", config}};
  v1::CommitModelFilesRequest commit;
  commit.set_name("toy");
  for (const auto& [path, bytes] : files) {
    v1::ModelFile* f = commit.add_files();
    f->set_path(path);
    f->set_sha256(Sha(bytes));
    f->set_size_bytes(bytes.size());
  }
  auto run_commit = [&](bool dry, v1::CommitModelFilesResponse* r, const char* token = kAdmin) {
    v1::CommitModelFilesRequest c = commit;
    c.set_dry_run(dry);
    return q_->CommitModelFiles(Ctx(token).get(), c, r);
  };
  // Nothing uploaded: every file is missing; a commit names them.
  v1::CommitModelFilesResponse r;
  ASSERT_TRUE(run_commit(true, &r).ok());
  EXPECT_EQ(r.missing_size(), 4);
  grpc::Status s = run_commit(false, &r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find("not uploaded"), std::string::npos) << s.error_message();

  // The first shard and the index, as an interrupted upload leaves them; another caller's
  // upload of the second shard does not count for this one.
  ASSERT_TRUE(Stage("toy", "model-00001-of-00002.safetensors", s1).ok());
  ASSERT_TRUE(Stage("toy", "model.safetensors.index.json", index).ok());
  ASSERT_TRUE(Stage("toy", "model-00002-of-00002.safetensors", s2, kQuantize).ok());
  r.Clear();
  ASSERT_TRUE(run_commit(true, &r).ok());
  EXPECT_EQ(std::vector<std::string>(r.missing().begin(), r.missing().end()),
            (std::vector<std::string>{"config.json", "model-00002-of-00002.safetensors"}));
  // Bad files are refused at upload, naming the field.
  s = Stage("toy", "../escape.json", config);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("header.file_path"), std::string::npos) << s.error_message();
  s = Stage("toy", "model-00002-of-00002.safetensors", s2.substr(0, s2.size() - 10));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << "a truncated shard";
  s = Stage("toy", "model.safetensors.index.json", "{\"weight_map\": 3}");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("weight_map"), std::string::npos) << s.error_message();

  // An index naming a shard the manifest lacks.
  {
    v1::CommitModelFilesRequest c;
    c.set_name("toy-partial");
    for (const v1::ModelFile& f : commit.files()) {
      if (f.path() != "model-00002-of-00002.safetensors" && f.path() != "config.json") {
        *c.add_files() = f;
      }
    }
    v1::CommitModelFilesResponse pr;
    s = q_->CommitModelFiles(Ctx().get(), c, &pr);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("model-00002-of-00002.safetensors"), std::string::npos)
        << s.error_message();
  }
  // A manifest naming bytes that were never uploaded (its SHA-256 differs from the file's) is
  // refused, and so is an upload whose bytes differ from its declared SHA-256.
  {
    v1::CommitModelFilesRequest c = commit;
    c.set_name("toy-wrong-sha");
    c.mutable_files(0)->set_sha256(std::string(64, 'e'));
    v1::CommitModelFilesResponse wr;
    s = q_->CommitModelFiles(Ctx().get(), c, &wr);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
    v1::UploadChunk h;
    h.mutable_header()->set_name("toy");
    h.mutable_header()->set_format(v1::HF_DIRECTORY);
    h.mutable_header()->set_file_path("config.json");
    h.mutable_header()->set_sha256(Sha(config + " "));
    v1::Model staged;
    s = Send(h, config, &staged, kAdmin);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  }
  // Resume: the rest, then the commit records one model.
  ASSERT_TRUE(Stage("toy", "model-00002-of-00002.safetensors", s2).ok());
  ASSERT_TRUE(Stage("toy", "config.json", config).ok());
  r.Clear();
  ASSERT_TRUE(run_commit(true, &r).ok());
  EXPECT_EQ(r.missing_size(), 0);
  r.Clear();
  s = run_commit(false, &r);
  ASSERT_TRUE(s.ok()) << s.error_message();
  const v1::Model& m = r.model();
  EXPECT_EQ(m.format(), v1::HF_DIRECTORY);
  EXPECT_EQ(m.tensor_count(), 3u);
  EXPECT_EQ(m.parameter_count(), 64u * 128 + 64 + 32 * 64);
  EXPECT_EQ(m.dtypes().at("F32"), 3u);
  ASSERT_EQ(m.files_size(), 4);
  EXPECT_EQ(m.files(0).path(), "model-00001-of-00002.safetensors");
  EXPECT_EQ(m.files(0).role(), "shard");
  EXPECT_EQ(m.files(0).tensor_count(), 2u);
  EXPECT_EQ(m.files(1).role(), "shard");
  uint64_t total = 0;
  for (const auto& [path, bytes] : files) total += bytes.size();
  EXPECT_EQ(m.size_bytes(), total);
  v1::ModelRef mr;
  mr.set_name("toy");
  v1::Model got;
  ASSERT_TRUE(q_->GetModel(Ctx().get(), mr, &got).ok());
  EXPECT_EQ(got.sha256(), m.sha256());
  // The same commit again returns the model; the same name with other files is refused.
  r.Clear();
  ASSERT_TRUE(run_commit(false, &r).ok());
  EXPECT_TRUE(r.model().deduplicated());

  // A tensor in two shards.
  {
    const std::string dup = shard({{"a.weight", {64, 128}}}, 3);
    ASSERT_TRUE(Stage("dup", "model.safetensors", dup).ok());
    v1::CommitModelFilesRequest c = commit;
    c.set_name("toy-dup");
    c.clear_files();
    for (const auto& [path, bytes] : std::map<std::string, std::string>{
             {"model-00001-of-00002.safetensors", s1}, {"model-00002-of-00002.safetensors", dup},
             {"model.safetensors.index.json", index}}) {
      v1::ModelFile* f = c.add_files();
      f->set_path(path);
      f->set_sha256(Sha(bytes));
      f->set_size_bytes(bytes.size());
    }
    v1::CommitModelFilesResponse dr;
    s = q_->CommitModelFiles(Ctx().get(), c, &dr);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("'a.weight' is in both"), std::string::npos)
        << s.error_message();
  }
  // Nothing of a refused commit was recorded.
  for (const char* refused : {"toy-partial", "toy-dup", "toy-wrong-sha"}) {
    v1::ModelRef ref;
    ref.set_name(refused);
    v1::Model none;
    EXPECT_EQ(q_->GetModel(Ctx().get(), ref, &none).error_code(), grpc::StatusCode::NOT_FOUND)
        << refused;
  }

  // A TENSOR job, group scales, packed and dequantized.
  v1::JobSpec spec = Spec("toy", v1::TENSOR, 4, 2);
  spec.set_scale(v1::PER_GROUP);
  spec.set_group_size(32);
  spec.add_outputs(v1::DEQUANTIZED_SAFETENSORS);
  const std::vector<v1::Job> events = Watch(Submit(spec).job_id());
  ASSERT_FALSE(events.empty());
  const v1::Job job = events.back();
  ASSERT_EQ(job.state(), v1::SUCCEEDED) << job.error();
  ASSERT_EQ(job.result().shards_size(), 2);
  EXPECT_EQ(job.result().shards(0).file(), "model-00001-of-00002.safetensors");
  EXPECT_EQ(job.result().shards(0).tensors(), 1u);  // a.bias is rank 1: copied
  EXPECT_EQ(job.result().shards(0).copied(), 1u);
  EXPECT_GT(job.result().shards(1).max_rel_fro(), 0);
  EXPECT_LT(job.result().shards(1).max_rel_fro(), 0.05);
  EXPECT_EQ(job.result().layers_size(), 2);
  // It ran as one shard task per shard; the tasks are gone once the job has their outputs, and
  // only the job is listed.
  EXPECT_EQ(job.progress().tasks_total(), 2u);
  EXPECT_EQ(job.progress().tasks_done(), 2u);
  for (int i = 0; i < 2; ++i) {
    v1::JobRef tr;
    tr.set_job_id(absl::StrFormat("%s.shard-%05d", job.job_id(), i));
    grpc::Status ts;
    for (int tries = 0; tries < 100; ++tries) {
      v1::Job task;
      ts = q_->GetJob(Ctx().get(), tr, &task);
      if (!ts.ok()) break;
      EXPECT_EQ(task.parent_job_id(), job.job_id());
      absl::SleepFor(absl::Milliseconds(50));
    }
    EXPECT_EQ(ts.error_code(), grpc::StatusCode::NOT_FOUND) << tr.job_id();
  }
  {
    v1::ListJobsRequest lr;
    v1::ListJobsResponse listed;
    ASSERT_TRUE(q_->ListJobs(Ctx().get(), lr, &listed).ok());
    ASSERT_EQ(listed.jobs_size(), 1);
    EXPECT_EQ(listed.jobs(0).job_id(), job.job_id());
  }
  // One artifact per file: 2 packed shards and their index, 2 dequantized shards, their index
  // and the sidecar, and the job's one report.
  EXPECT_EQ(job.artifacts_size(), 8);
  std::map<std::string, v1::Artifact> by_name;
  for (const v1::Artifact& a : job.artifacts()) by_name[a.file_name()] = a;
  for (const char* name :
       {"packed/model-00001-of-00002.safetensors", "packed/model-00002-of-00002.safetensors",
        "packed/model.fpxint.index.json", "dequantized/model-00001-of-00002.safetensors",
        "dequantized/model-00002-of-00002.safetensors", "dequantized/model.safetensors.index.json",
        "dequantized/config.json", "toy.report.json"}) {
    ASSERT_TRUE(by_name.count(name)) << name;
    EXPECT_EQ(Sha(Download(by_name[name].artifact_id())), by_name[name].sha256()) << name;
  }
  EXPECT_EQ(Download(by_name["dequantized/config.json"].artifact_id()), config);
  // The packed index maps every packed tensor to its shard.
  absl::StatusOr<core::HfIndex> pidx =
      core::ParseHfIndex(Download(by_name["packed/model.fpxint.index.json"].artifact_id()));
  ASSERT_TRUE(pidx.ok()) << pidx.status();
  for (const char* shard_name : {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}) {
    const std::string bytes = Download(by_name[absl::StrCat("packed/", shard_name)].artifact_id());
    auto reader = core::SafetensorsReader::FromBuffer(absl::MakeConstSpan(
        reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
    ASSERT_TRUE(reader.ok()) << reader.status();
    for (const core::TensorInfo& t : (*reader)->tensors()) {
      EXPECT_NE(std::find(pidx->weight_map.begin(), pidx->weight_map.end(),
                          std::make_pair(t.name, std::string(shard_name))),
                pidx->weight_map.end())
          << t.name;
    }
  }
  // The dequantized index keeps the weight_map and states the new total size.
  absl::StatusOr<core::HfIndex> didx = core::ParseHfIndex(
      Download(by_name["dequantized/model.safetensors.index.json"].artifact_id()));
  ASSERT_TRUE(didx.ok()) << didx.status();
  absl::StatusOr<core::HfIndex> sidx = core::ParseHfIndex(index);
  EXPECT_EQ(didx->weight_map, sidx->weight_map);
  EXPECT_EQ(*didx->total_size, (64u * 128 + 64 + 32 * 64) * 4);

  // Deleting the job keeps the sidecar the model still uses; deleting both frees every file.
  v1::JobRef jr;
  jr.set_job_id(job.job_id());
  v1::DeleteJobResponse djr;
  ASSERT_TRUE(q_->DeleteJob(Ctx().get(), jr, &djr).ok());
  v1::DeleteModelResponse dmr;
  ASSERT_TRUE(q_->DeleteModel(Ctx().get(), mr, &dmr).ok());
  r.Clear();
  ASSERT_TRUE(run_commit(true, &r).ok());
  EXPECT_EQ(r.missing_size(), 4) << "a deleted model's files leave the store";
}

TEST_F(ServerTest, JobMemoryLimitRefusesJobsThatWouldExceedIt) {
  job_memory_limit_ = 1024;
  Restart();
  v1::Model m;
  ASSERT_TRUE(Upload("w", v1::SAFETENSORS, SmallWeightsSafetensors(5), &m).ok());
  ASSERT_TRUE(Upload("tiny", v1::TORCHSCRIPT, ReadFileOrDie(TinyDir() + "/tiny_cnn.pt"), &m).ok());
  for (v1::Granularity g : {v1::TENSOR, v1::LAYER}) {
    v1::Job job = Submit(Spec(g == v1::TENSOR ? "w" : "tiny", g, 4, 3));
    const std::vector<v1::Job> events = Watch(job.job_id());
    ASSERT_FALSE(events.empty());
    const v1::Job& done = events.back();
    EXPECT_EQ(done.state(), v1::FAILED) << v1::Granularity_Name(g);
    EXPECT_TRUE(absl::StrContains(done.error(), "--job-memory-limit")) << done.error();
    EXPECT_TRUE(absl::StrContains(done.error(), "needs about")) << done.error();
    EXPECT_EQ(done.artifacts_size(), 0);
  }
  job_memory_limit_ = 64 << 20;
  Restart();
  v1::Job ok = Submit(Spec("w", v1::TENSOR, 4, 3));
  const std::vector<v1::Job> events = Watch(ok.job_id());
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().state(), v1::SUCCEEDED) << events.back().error();
}

TEST_F(ServerTest, SpecValidationNamesTheField) {
  v1::Model m;
  ASSERT_TRUE(Upload("w", v1::SAFETENSORS, SmallWeightsSafetensors(3), &m).ok());
  struct Case {
    v1::JobSpec spec;
    grpc::StatusCode code;
    const char* field;
  };
  std::vector<Case> cases;
  cases.push_back({Spec("nope", v1::TENSOR), grpc::StatusCode::NOT_FOUND, "spec.model"});
  cases.push_back({Spec("w", v1::TENSOR, 9), grpc::StatusCode::INVALID_ARGUMENT, "weight_bits"});
  cases.push_back(
      {Spec("w", v1::TENSOR, 4, 40), grpc::StatusCode::INVALID_ARGUMENT, "weight_terms"});
  cases.push_back({Spec("w", v1::LAYER), grpc::StatusCode::INVALID_ARGUMENT, "granularity"});
  cases.push_back(
      {Spec("w", v1::GRANULARITY_UNSPECIFIED), grpc::StatusCode::INVALID_ARGUMENT, "granularity"});
  v1::JobSpec g = Spec("w", v1::TENSOR);
  g.set_scale(v1::PER_GROUP);
  cases.push_back({g, grpc::StatusCode::INVALID_ARGUMENT, "group_size"});
  v1::JobSpec regex = Spec("w", v1::TENSOR);
  regex.set_include("([");
  cases.push_back({regex, grpc::StatusCode::INVALID_ARGUMENT, "spec.include"});
  for (const Case& c : cases) {
    v1::SubmitJobRequest req;
    *req.mutable_spec() = c.spec;
    v1::Job job;
    grpc::Status s = q_->SubmitJob(Ctx().get(), req, &job);
    EXPECT_EQ(s.error_code(), c.code) << c.field << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(c.field), std::string::npos) << s.error_message();
  }
  // A spec that passes validation but selects nothing fails when it runs, with the reason.
  ASSERT_TRUE(Upload("tiny", v1::TORCHSCRIPT, ReadFileOrDie(TinyDir() + "/tiny_cnn.pt"), &m).ok());
  v1::JobSpec none = Spec("tiny", v1::LAYER);
  none.set_include("^no-such-layer$");
  v1::Job failed = Watch(Submit(none).job_id()).back();
  EXPECT_EQ(failed.state(), v1::FAILED);
  EXPECT_NE(failed.error().find("select none"), std::string::npos) << failed.error();
}

// FP16 and BF16 TorchScript models pass the vetting and take LAYER jobs: expanded from their
// weights in fp32, with the probe's error falling with K as for an fp32 model.
TEST_F(ServerTest, HalfPrecisionTorchScriptTakesLayerJobs) {
  for (const char* file : {"tiny_cnn_fp16.pt", "tiny_cnn_bf16.pt"}) {
    v1::Model m;
    const std::string name = absl::StrReplaceAll(file, {{".pt", ""}, {"_", "-"}});
    grpc::Status s = Upload(name, v1::TORCHSCRIPT, ReadFileOrDie(TinyDir() + "/" + file), &m);
    ASSERT_TRUE(s.ok()) << file << ": " << s.error_message();
    v1::JobSpec spec = Spec(name, v1::LAYER, 4, 3);
    spec.add_outputs(v1::DEQUANTIZED_TORCHSCRIPT);
    const v1::Job job = Watch(Submit(spec).job_id()).back();
    ASSERT_EQ(job.state(), v1::SUCCEEDED) << file << ": " << job.error();
    EXPECT_EQ(job.result().layers_size(), 3) << file;
    ASSERT_EQ(job.result().probe_size(), 3) << file;
    EXPECT_LT(job.result().probe(2).rel_fro(), job.result().probe(0).rel_fro()) << file;
  }
}

TEST_F(ServerTest, IdempotencyPagingCancelAndDelete) {
  v1::Model m;
  ASSERT_TRUE(Upload("w", v1::SAFETENSORS, SmallWeightsSafetensors(4), &m).ok());
  v1::Job a = Submit(Spec("w", v1::TENSOR), "key-1");
  v1::Job b = Submit(Spec("w", v1::TENSOR), "key-1");
  EXPECT_EQ(a.job_id(), b.job_id());
  v1::SubmitJobRequest other;
  *other.mutable_spec() = Spec("w", v1::TENSOR, 3);
  other.set_idempotency_key("key-1");
  v1::Job j;
  EXPECT_EQ(q_->SubmitJob(Ctx().get(), other, &j).error_code(), grpc::StatusCode::ALREADY_EXISTS);
  Watch(a.job_id());
  for (int i = 0; i < 3; ++i) Watch(Submit(Spec("w", v1::TENSOR, 2 + i)).job_id());
  // 4 jobs; pages of 3 then 1, newest first, no job twice.
  v1::ListJobsRequest lr;
  lr.set_page_size(3);
  v1::ListJobsResponse p1, p2;
  ASSERT_TRUE(q_->ListJobs(Ctx().get(), lr, &p1).ok());
  ASSERT_EQ(p1.jobs_size(), 3);
  ASSERT_FALSE(p1.next_page_token().empty());
  lr.set_page_token(p1.next_page_token());
  ASSERT_TRUE(q_->ListJobs(Ctx().get(), lr, &p2).ok());
  ASSERT_EQ(p2.jobs_size(), 1);
  EXPECT_TRUE(p2.next_page_token().empty());
  EXPECT_EQ(p2.jobs(0).job_id(), a.job_id());
  lr.Clear();
  lr.set_state(v1::FAILED);
  v1::ListJobsResponse none;
  ASSERT_TRUE(q_->ListJobs(Ctx().get(), lr, &none).ok());
  EXPECT_EQ(none.jobs_size(), 0);
  lr.Clear();
  lr.set_page_token("garbage");
  EXPECT_EQ(q_->ListJobs(Ctx().get(), lr, &none).error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  // Cancel: a finished job cannot be; unknown job is NOT_FOUND.
  v1::JobRef ref;
  ref.set_job_id(a.job_id());
  EXPECT_EQ(q_->CancelJob(Ctx().get(), ref, &j).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  ref.set_job_id("job-nope");
  EXPECT_EQ(q_->CancelJob(Ctx().get(), ref, &j).error_code(), grpc::StatusCode::NOT_FOUND);

  // A large job runs while another waits; cancel both (running promptly, queued at once).
  const std::string big = [] {
    core::SafetensorsWriter w;
    std::vector<uint8_t> data(static_cast<size_t>(1000) * 1000 * 4);
    auto v = fpxint::testing::ToFloat(
        fpxint::testing::RandomValues(fpxint::testing::Dist::kGaussian, 1000 * 1000, 5));
    std::memcpy(data.data(), v.data(), data.size());
    w.AddOwned("big.weight", core::DType::kF32, {1000, 1000}, data).IgnoreError();
    auto b = w.Serialize();
    return std::string(b.begin(), b.end());
  }();
  ASSERT_TRUE(Upload("big", v1::SAFETENSORS, big, &m).ok());
  v1::Job running = Submit(Spec("big", v1::TENSOR, 2, 16));
  v1::Job queued = Submit(Spec("big", v1::TENSOR, 3, 16));
  // Deleting a model that jobs use is refused.
  v1::ModelRef mr;
  mr.set_name("big");
  v1::DeleteModelResponse dr;
  EXPECT_EQ(q_->DeleteModel(Ctx().get(), mr, &dr).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  ref.set_job_id(queued.job_id());
  // Usually still queued; on a fast machine the first job may already be done and this one
  // running (then it is cancelled promptly) or even finished.
  grpc::Status qs = q_->CancelJob(Ctx().get(), ref, &j);
  if (qs.ok()) {  // a running job can still reach its end before it sees the flag
    EXPECT_TRUE(j.state() == v1::CANCELLED || j.state() == v1::SUCCEEDED) << j.state();
  } else {
    EXPECT_EQ(qs.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << qs.error_message();
  }
  ref.set_job_id(running.job_id());
  const auto t0 = std::chrono::steady_clock::now();
  grpc::Status cs = q_->CancelJob(Ctx().get(), ref, &j);
  if (cs.ok()) {
    EXPECT_TRUE(j.state() == v1::CANCELLED || j.state() == v1::SUCCEEDED) << j.state();
  } else {  // it finished first
    EXPECT_EQ(cs.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << cs.error_message();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
  // CancelJob returns as soon as the terminal state is published, while the worker may still
  // be cleaning up; cancelling again right then is refused like any finished job (CI once saw
  // this second cancel succeed).
  EXPECT_EQ(q_->CancelJob(Ctx().get(), ref, &j).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  // Now the model can go.
  EXPECT_TRUE(q_->DeleteModel(Ctx().get(), mr, &dr).ok());
  v1::Model gone;
  EXPECT_EQ(q_->GetModel(Ctx().get(), mr, &gone).error_code(), grpc::StatusCode::NOT_FOUND);
}

// A job that GetJob already reports finished cannot be cancelled, even in the moment after its
// terminal state is published while its worker is still cleaning up (the e2e suite once polled
// into that moment and saw CancelJob succeed on a CANCELLED job).
TEST_F(ServerTest, CancelOfAJobSeenFinishedIsRefused) {
  v1::Model m;
  ASSERT_TRUE(Upload("w", v1::SAFETENSORS, SmallWeightsSafetensors(4), &m).ok());
  for (int i = 0; i < 20; ++i) {
    v1::JobRef ref;
    ref.set_job_id(Submit(Spec("w", v1::TENSOR, 2 + i % 3, 1 + i % 4)).job_id());
    v1::Job now;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    do {
      ASSERT_TRUE(q_->GetJob(Ctx().get(), ref, &now).ok());
    } while (now.state() != v1::SUCCEEDED && now.state() != v1::FAILED &&
             std::chrono::steady_clock::now() < deadline);
    ASSERT_EQ(now.state(), v1::SUCCEEDED) << now.error();
    v1::Job j;
    const grpc::Status s = q_->CancelJob(Ctx().get(), ref, &j);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION)
        << "job " << ref.job_id() << " was " << v1::JobState_Name(now.state())
        << ", CancelJob returned " << v1::JobState_Name(j.state());
  }
}

// Two workers, three clients submitting, watching, cancelling and listing at once (make test-tsan
// runs this under ThreadSanitizer): every job ends in a terminal state that its watcher, GetJob
// and the job list agree on, and the queue is empty afterwards.
TEST_F(ServerTest, ConcurrentJobsWatchersAndCancels) {
  workers_ = 2;
  Restart();
  v1::Model m;
  ASSERT_TRUE(Upload("w", v1::SAFETENSORS, SmallWeightsSafetensors(8), &m).ok());
  constexpr int kClients = 3, kJobsPerClient = 3;
  std::vector<std::vector<v1::Job>> finals(kClients);
  std::vector<std::thread> clients;
  for (int t = 0; t < kClients; ++t) {
    clients.emplace_back([&, t] {
      for (int i = 0; i < kJobsPerClient; ++i) {
        const v1::Job j = Submit(Spec("w", v1::TENSOR, 2 + (t + i) % 4, 2));
        if ((t + i) % 3 == 0) {  // races the worker: the job may finish first
          v1::JobRef ref;
          ref.set_job_id(j.job_id());
          v1::Job c;
          const grpc::Status s = q_->CancelJob(Ctx().get(), ref, &c);
          EXPECT_TRUE(s.ok() || s.error_code() == grpc::StatusCode::FAILED_PRECONDITION)
              << s.error_message();
        }
        const std::vector<v1::Job> events = Watch(j.job_id());
        if (!events.empty()) finals[static_cast<size_t>(t)].push_back(events.back());
        v1::ListJobsRequest lr;
        v1::ListJobsResponse lp;
        EXPECT_TRUE(q_->ListJobs(Ctx().get(), lr, &lp).ok());
      }
    });
  }
  for (std::thread& c : clients) c.join();
  int succeeded = 0;
  for (const std::vector<v1::Job>& jobs : finals) {
    ASSERT_EQ(jobs.size(), static_cast<size_t>(kJobsPerClient));
    for (const v1::Job& j : jobs) {
      ASSERT_TRUE(j.state() == v1::SUCCEEDED || j.state() == v1::CANCELLED)
          << j.job_id() << " " << v1::JobState_Name(j.state()) << " " << j.error();
      v1::JobRef ref;
      ref.set_job_id(j.job_id());
      v1::Job now;
      ASSERT_TRUE(q_->GetJob(Ctx().get(), ref, &now).ok());
      EXPECT_EQ(now.state(), j.state()) << j.job_id();
      if (j.state() == v1::SUCCEEDED) {
        ++succeeded;
        EXPECT_EQ(j.artifacts_size(), 2) << j.job_id();
      }
    }
  }
  EXPECT_GE(succeeded, kClients * kJobsPerClient - 3);  // at most the 3 cancelled ones are not
  v1::ListJobsRequest lr;
  lr.set_page_size(100);
  v1::ListJobsResponse all;
  ASSERT_TRUE(q_->ListJobs(Ctx().get(), lr, &all).ok());
  EXPECT_EQ(all.jobs_size(), kClients * kJobsPerClient);
  for (const v1::Job& j : all.jobs()) {
    EXPECT_TRUE(j.state() == v1::SUCCEEDED || j.state() == v1::CANCELLED) << j.job_id();
  }
}

// An error-budgeted LAYER job: each layer's K comes from its sensitivity, the whole model meets
// the target on the probe, the artifact keeps each layer's own terms and serves them; a pinned
// layer keeps its K; a target out of reach fails with the best error; bad budgets are refused.
// Dynamic batching end to end: refused where the input's first dimension is fixed, shown by
// GetDeployment, concurrent batch-1 requests answered with their own rows (as the same version
// answers each alone), a request above max_batch_size refused up front, and the passes counted.
TEST_F(ServerTest, DynamicBatchingRunsConcurrentRequestsAsOnePass) {
  const std::string ts = ReadFileOrDie(TinyDir() + "/tiny_cnn.pt");
  v1::Model fixed;
  ASSERT_TRUE(Upload("tiny-fixed", v1::TORCHSCRIPT, ts, &fixed).ok());  // input [2, 3, 8, 8]
  v1::JobSpec spec = Spec("tiny-fixed", v1::LAYER, 4, 2);
  spec.mutable_deploy()->set_enabled(true);
  spec.mutable_deploy()->mutable_batching()->set_max_batch_size(8);
  v1::SubmitJobRequest req;
  *req.mutable_spec() = spec;
  v1::Job refused;
  grpc::Status st = q_->SubmitJob(Ctx().get(), req, &refused);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("spec.deploy.batching.max_batch_size"), std::string::npos)
      << st.error_message();
  EXPECT_NE(st.error_message().find("--input input__0:FP32:-1,3,8,8"), std::string::npos)
      << st.error_message();
  spec.mutable_deploy()->mutable_batching()->add_preferred_batch_size(9);
  *req.mutable_spec() = spec;
  st = q_->SubmitJob(Ctx().get(), req, &refused);
  EXPECT_NE(st.error_message().find("preferred_batch_size: 9; accepted 1..max_batch_size"),
            std::string::npos)
      << st.error_message();

  // The same network with a variable first dimension.
  v1::UploadChunk h;
  h.mutable_header()->set_name("tiny-var");
  h.mutable_header()->set_format(v1::TORCHSCRIPT);
  h.mutable_header()->set_sha256(Sha(ts));
  auto* in = h.mutable_header()->add_inputs();
  in->set_name("input__0");
  in->set_datatype("FP32");
  for (int64_t d : {-1, 3, 8, 8}) in->add_shape(d);
  v1::Model var;
  ASSERT_TRUE(Send(h, ts, &var, kAdmin).ok());
  spec.set_model("tiny-var");
  spec.mutable_deploy()->set_name("tiny-batched");
  v1::DynamicBatching* b = spec.mutable_deploy()->mutable_batching();
  b->clear_preferred_batch_size();
  b->add_preferred_batch_size(4);
  b->set_max_queue_delay_microseconds(10'000'000);  // a pass waits for 4 rows (or 10 s)
  v1::Job done = Watch(Submit(spec).job_id()).back();
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.error();
  spec.mutable_deploy()->set_name("tiny-alone");
  spec.mutable_deploy()->clear_batching();
  ASSERT_EQ(Watch(Submit(spec).job_id()).back().state(), v1::SUCCEEDED);

  v1::DeploymentRef dref;
  dref.set_name("tiny-batched");
  v1::DeploymentStatus dep;
  ASSERT_TRUE(q_->GetDeployment(Ctx(kInfer).get(), dref, &dep).ok());
  EXPECT_EQ(dep.batching().max_batch_size(), 8u);
  EXPECT_EQ(dep.batching().max_queue_delay_microseconds(), 10'000'000u);

  // Four concurrent batch-1 requests: one pass of 4 rows, each answered with its own row.
  std::vector<std::string> xs;
  for (int i = 0; i < 4; ++i) {
    const std::vector<float> v =
        ToFloat(RandomValues(Dist::kGaussian, 192, static_cast<uint64_t>(80 + i)));
    xs.emplace_back(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
  }
  std::vector<inference::ModelInferResponse> batched(4);
  std::vector<grpc::Status> status(4);
  std::vector<std::thread> clients;
  for (int i = 0; i < 4; ++i) {
    clients.emplace_back([&, i] {
      status[i] = oip_->ModelInfer(Ctx(kInfer).get(), RawInfer("tiny-batched", {1, 3, 8, 8}, xs[i]),
                                   &batched[i]);
    });
  }
  for (std::thread& t : clients) t.join();
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(status[i].ok()) << i << ": " << status[i].error_message();
    EXPECT_EQ(batched[i].parameters().at("fpxint_batch_rows").int64_param(), 4) << i;
    ASSERT_EQ(batched[i].outputs(0).shape_size(), 2);
    EXPECT_EQ(batched[i].outputs(0).shape(0), 1);
    inference::ModelInferResponse alone;
    ASSERT_TRUE(oip_->ModelInfer(Ctx(kInfer).get(), RawInfer("tiny-alone", {1, 3, 8, 8}, xs[i]),
                                 &alone)
                    .ok());
    EXPECT_FALSE(alone.parameters().contains("fpxint_batch_rows"));
    const std::string& got = batched[i].raw_output_contents(0);
    const std::string& want = alone.raw_output_contents(0);
    ASSERT_EQ(got.size(), want.size());
    std::vector<float> g(got.size() / 4), w(want.size() / 4);
    std::memcpy(g.data(), got.data(), got.size());
    std::memcpy(w.data(), want.data(), want.size());
    EXPECT_LT(MaxRelErr(g, w), 1e-5) << i;
  }

  // Larger than max_batch_size: refused before it waits.
  inference::ModelInferResponse resp;
  st = oip_->ModelInfer(Ctx(kInfer).get(),
                        RawInfer("tiny-batched", {9, 3, 8, 8}, std::string(9 * 192 * 4, '\0')),
                        &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("inputs[0].shape: [9,3,8,8]"), std::string::npos)
      << st.error_message();
  EXPECT_NE(st.error_message().find("max_batch_size"), std::string::npos) << st.error_message();

  // One execution for the pass, four inferences; the pass in the batch histograms.
  inference::ModelStatisticsRequest sreq;
  sreq.set_name("tiny-batched");
  inference::ModelStatisticsResponse stats;
  ASSERT_TRUE(oip_->ModelStatistics(Ctx(kInfer).get(), sreq, &stats).ok());
  ASSERT_EQ(stats.model_stats_size(), 1);
  EXPECT_EQ(stats.model_stats(0).inference_count(), 4u);
  EXPECT_EQ(stats.model_stats(0).execution_count(), 1u);
  const std::string text = server_->MetricsText();
  EXPECT_NE(text.find("fpxint_inference_batch_rows_count{model=\"tiny-batched\",version=\"1\"} 1"),
            std::string::npos);
  EXPECT_NE(text.find("fpxint_inference_batch_requests_sum{model=\"tiny-batched\",version=\"1\"} 4"),
            std::string::npos);
}

// A token model (INT64 input) gets a data-free probe of token ids below its embedding table's
// size: its layers are ranked and an error budget is met.
TEST_F(ServerTest, ErrorBudgetOnATokenModelProbesWithTokenIds) {
  const std::string ts = ReadFileOrDie(TinyDir() + "/tiny_lm.pt");
  v1::UploadChunk h;
  h.mutable_header()->set_name("tiny-lm");
  h.mutable_header()->set_format(v1::TORCHSCRIPT);
  h.mutable_header()->set_sha256(Sha(ts));
  auto* in = h.mutable_header()->add_inputs();
  in->set_name("tokens");
  in->set_datatype("INT64");
  for (int64_t d : {-1, 8}) in->add_shape(d);
  v1::Model m;
  ASSERT_TRUE(Send(h, ts, &m, kAdmin).ok());
  v1::JobSpec spec = Spec("tiny-lm", v1::LAYER, 4, 0);
  spec.set_weight_terms(0);
  spec.set_target_rel_error(0.05);
  v1::Job done = Watch(Submit(spec).job_id()).back();
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.error();
  EXPECT_EQ(done.result().probe_note(), "");
  EXPECT_EQ(done.result().sensitivity_size(), 2);
  EXPECT_LE(done.result().allocation().measured_rel_error(), 0.05);
  EXPECT_GT(done.result().allocation().measured_rel_error(), 0);
}

// W×A budgets: the activations' own error (every weight FP) is a floor the weights share the
// target with; the served version runs each layer's K with expanded activations, and a target
// under the floor fails naming it.
TEST_F(ServerTest, ErrorBudgetOnAWxAJobSharesTheTargetWithTheActivations) {
  const std::string ts = ReadFileOrDie(TinyDir() + "/tiny_cnn.pt");
  v1::Model m;
  ASSERT_TRUE(Upload("tiny", v1::TORCHSCRIPT, ts, &m).ok());
  v1::JobSpec spec = Spec("tiny", v1::LAYER, 4, 0);
  spec.set_weight_terms(0);
  spec.set_act_bits(4);
  spec.set_act_terms(3);
  spec.set_target_rel_error(0.03);
  spec.mutable_deploy()->set_enabled(true);
  spec.mutable_deploy()->set_name("tiny-wa-budget");
  v1::Job done = Watch(Submit(spec).job_id()).back();
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.error();
  const v1::TermAllocation& a = done.result().allocation();
  EXPECT_GT(a.activation_floor(), 0);
  EXPECT_LT(a.activation_floor(), 0.03);
  EXPECT_LE(a.measured_rel_error(), 0.03);
  EXPECT_GE(a.measured_rel_error(), a.activation_floor() * 0.5);
  // The probe at the full K (K_a = 3) is the allocation's network.
  ASSERT_EQ(done.result().probe_size(), 4);
  EXPECT_EQ(done.result().probe(3).act_terms(), 3u);
  EXPECT_NEAR(done.result().probe(3).rel_fro(), a.measured_rel_error(),
              1e-4 * a.measured_rel_error());
  // The layers' sensitivity is their weights' alone: it falls term after term.
  for (const v1::LayerSensitivity& s : done.result().sensitivity()) {
    EXPECT_LT(s.rel_fro(3), s.rel_fro(0)) << s.name();
    EXPECT_LT(s.rel_fro(3), a.activation_floor()) << s.name();
  }
  auto io = core::SafetensorsReader::Open(TinyDir() + "/tiny_io.safetensors");
  ASSERT_TRUE(io.ok());
  auto x = (*io)->Data(*(*io)->Find("input"));
  inference::ModelInferRequest ir = RawInfer(
      "tiny-wa-budget", {2, 3, 8, 8}, std::string(reinterpret_cast<const char*>(x.data()), x.size()));
  inference::ModelInferResponse resp;
  grpc::Status st = oip_->ModelInfer(Ctx(kInfer).get(), ir, &resp);
  EXPECT_TRUE(st.ok()) << st.error_message();

  // Two-bit activations alone are far above 1e-3: FAILED, naming the activations' floor.
  v1::JobSpec low = spec;
  low.clear_deploy();
  low.set_act_bits(2);
  low.set_act_terms(1);
  low.set_target_rel_error(1e-3);
  v1::Job f = Watch(Submit(low).job_id()).back();
  ASSERT_EQ(f.state(), v1::FAILED);
  EXPECT_NE(f.error().find("the activations alone (1 terms of 2 bits"), std::string::npos)
      << f.error();
  EXPECT_EQ(f.artifacts_size(), 0);
}

TEST_F(ServerTest, ErrorBudgetedLayerJobChoosesTermsPerLayer) {
  const std::string ts = ReadFileOrDie(TinyDir() + "/tiny_cnn.pt");
  v1::Model m;
  ASSERT_TRUE(Upload("tiny", v1::TORCHSCRIPT, ts, &m).ok());
  v1::JobSpec spec = Spec("tiny", v1::LAYER, 4, 0);
  spec.set_weight_terms(0);
  spec.set_target_rel_error(0.02);
  spec.mutable_deploy()->set_enabled(true);
  spec.mutable_deploy()->set_name("tiny-budget");
  v1::Job done = Watch(Submit(spec).job_id()).back();
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.error();
  EXPECT_EQ(done.spec().weight_terms(), 4u) << "the expansion has max_terms";
  const v1::TermAllocation& a = done.result().allocation();
  EXPECT_EQ(a.target_rel_error(), 0.02);
  EXPECT_LE(a.measured_rel_error(), 0.02);
  EXPECT_GT(a.measured_rel_error(), 0);
  ASSERT_EQ(a.uniform_size(), 4);
  uint64_t bytes = 0;
  std::map<std::string, uint32_t> k_of;
  for (const v1::LayerResult& l : done.result().layers()) {
    EXPECT_GE(l.weight_terms(), 1u);
    EXPECT_LE(l.weight_terms(), 4u);
    EXPECT_EQ(l.terms_size(), static_cast<int>(l.weight_terms())) << l.name();
    k_of[l.name()] = l.weight_terms();
  }
  for (const v1::LayerSensitivity& s : done.result().sensitivity()) {
    ASSERT_EQ(s.rel_fro_size(), 4);
    bytes += k_of[s.name()] * s.bytes_per_term();
  }
  EXPECT_EQ(a.weight_bytes(), bytes);
  // No uniform K that meets the target is cheaper.
  for (const v1::UniformTerms& u : a.uniform()) {
    if (u.rel_error() <= 0.02) {
      EXPECT_GE(u.weight_bytes(), a.weight_bytes()) << u.weight_terms();
    }
  }
  // The probe at the full K is the allocation's network.
  ASSERT_EQ(done.result().probe_size(), 4);
  EXPECT_NEAR(done.result().probe(3).rel_fro(), a.measured_rel_error(),
              1e-4 * a.measured_rel_error());
  // The artifact records each layer's terms.
  std::string packed;
  for (const v1::Artifact& art : done.artifacts()) {
    if (art.kind() == "packed_safetensors") packed = Download(art.artifact_id());
  }
  auto reader = core::SafetensorsReader::FromBuffer(absl::MakeConstSpan(
      reinterpret_cast<const uint8_t*>(packed.data()), packed.size()));
  ASSERT_TRUE(reader.ok()) << reader.status();
  for (const auto& [name, k] : k_of) {
    EXPECT_EQ((*reader)->Metadata(name + ".terms").value_or("4"), std::to_string(k)) << name;
    EXPECT_EQ((*reader)->Find(absl::StrCat(name, ".t", k + 1, ".codes")), nullptr) << name;
  }
  // Served with any precision: K' above a layer's own K runs that layer's K.
  auto io = core::SafetensorsReader::Open(TinyDir() + "/tiny_io.safetensors");
  ASSERT_TRUE(io.ok());
  auto x = (*io)->Data(*(*io)->Find("input"));
  for (int k : {1, 4}) {
    inference::ModelInferRequest ir = RawInfer(
        "tiny-budget", {2, 3, 8, 8},
        std::string(reinterpret_cast<const char*>(x.data()), x.size()));
    (*ir.mutable_parameters())["fpxint_terms"].set_int64_param(k);
    inference::ModelInferResponse resp;
    grpc::Status st = oip_->ModelInfer(Ctx(kInfer).get(), ir, &resp);
    EXPECT_TRUE(st.ok()) << k << " " << st.error_message();
    EXPECT_EQ(resp.raw_output_contents_size(), 1) << k;
  }
  // The deployment shows every layer's K and the allocation.
  v1::DeploymentRef dref;
  dref.set_name("tiny-budget");
  v1::DeploymentStatus dep;
  ASSERT_TRUE(q_->GetDeployment(Ctx(kInfer).get(), dref, &dep).ok());
  ASSERT_EQ(dep.layer_terms_size(), done.result().layers_size());
  for (const v1::LayerTerms& t : dep.layer_terms()) {
    EXPECT_EQ(t.weight_terms(), k_of[t.name()]) << t.name();
  }
  EXPECT_EQ(dep.allocation().weight_bytes(), a.weight_bytes());

  // A pinned layer keeps its K.
  const std::string first = done.result().layers(0).name();
  v1::JobSpec pinned = spec;
  pinned.clear_deploy();
  pinned.add_weight_terms_for(absl::StrCat(first, "=3"));
  v1::Job p = Watch(Submit(pinned).job_id()).back();
  ASSERT_EQ(p.state(), v1::SUCCEEDED) << p.error();
  EXPECT_EQ(p.result().layers(0).weight_terms(), 3u);

  // Out of reach at max_terms 1: FAILED with the best error reached, nothing stored.
  v1::JobSpec tight = spec;
  tight.clear_deploy();
  tight.set_target_rel_error(1e-9);
  tight.set_max_terms(1);
  v1::Job f = Watch(Submit(tight).job_id()).back();
  ASSERT_EQ(f.state(), v1::FAILED);
  EXPECT_NE(f.error().find("target_rel_error 1.0000e-09 not reached"), std::string::npos)
      << f.error();
  EXPECT_NE(f.error().find("best error reached"), std::string::npos) << f.error();
  EXPECT_EQ(f.artifacts_size(), 0);

  // Bad budgets name the field.
  for (auto [field, edit] :
       std::vector<std::pair<std::string, std::function<void(v1::JobSpec*)>>>{
           {"max_terms", [](v1::JobSpec* x) { x->set_min_terms(3); x->set_max_terms(2); }},
           {"weight_terms_for", [](v1::JobSpec* x) { x->add_weight_terms_for("conv=9"); }},
           {"target_rel_error", [](v1::JobSpec* x) { x->set_granularity(v1::TENSOR); }},
           {"target_rel_error", [](v1::JobSpec* x) {
              x->set_act_bits(4);
              x->set_act_terms(2);
              x->set_truncate(true);
            }},
           {"min_terms", [](v1::JobSpec* x) { x->set_target_rel_error(0); x->set_min_terms(2); }}}) {
    v1::JobSpec bad = spec;
    bad.clear_deploy();
    edit(&bad);
    v1::SubmitJobRequest req;
    *req.mutable_spec() = bad;
    v1::Job out;
    grpc::Status st = q_->SubmitJob(Ctx().get(), req, &out);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << field;
    EXPECT_NE(st.error_message().find(field), std::string::npos) << st.error_message();
  }
}

TEST_F(ServerTest, LayerJobDeploysAndServesAnyPrecision) {
  const std::string ts = ReadFileOrDie(TinyDir() + "/tiny_cnn.pt");
  v1::Model m;
  ASSERT_TRUE(Upload("tiny", v1::TORCHSCRIPT, ts, &m).ok());
  v1::JobSpec spec = Spec("tiny", v1::LAYER, 4, 3);
  spec.add_outputs(v1::DEQUANTIZED_TORCHSCRIPT);
  spec.mutable_deploy()->set_enabled(true);
  spec.mutable_deploy()->set_name("tiny-q");
  v1::Job done = Watch(Submit(spec).job_id()).back();
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.error();
  EXPECT_EQ(done.result().deployed_name(), "tiny-q");
  EXPECT_EQ(done.result().deployed_version(), "1");
  ASSERT_EQ(done.result().probe_size(), 3);
  EXPECT_LT(done.result().probe(2).rel_fro(), done.result().probe(0).rel_fro());
  // Every expanded layer's data-free sensitivity, K = 1..3, ranked by error per MiB.
  ASSERT_EQ(done.result().sensitivity_size(), 3);
  std::set<std::string> sensitive;
  for (int i = 0; i < 3; ++i) {
    const v1::LayerSensitivity& l = done.result().sensitivity(i);
    sensitive.insert(l.name());
    ASSERT_EQ(l.rel_fro_size(), 3) << l.name();
    EXPECT_GT(l.rel_fro(0), l.rel_fro(1)) << l.name();
    EXPECT_GT(l.rel_fro(1), l.rel_fro(2)) << l.name();
    EXPECT_GT(l.bytes_per_term(), 0u);
    EXPECT_NEAR(l.error_per_mib(), l.rel_fro(0) / (l.bytes_per_term() / 1048576.0),
                1e-9 * l.error_per_mib());
    if (i > 0) {
      EXPECT_GE(done.result().sensitivity(i - 1).error_per_mib(), l.error_per_mib());
    }
  }
  std::set<std::string> layers;
  for (const v1::LayerResult& l : done.result().layers()) layers.insert(l.name());
  EXPECT_EQ(sensitive, layers);
  std::set<std::string> kinds;
  for (const auto& a : done.artifacts()) kinds.insert(a.kind());
  EXPECT_EQ(kinds, (std::set<std::string>{"packed_safetensors", "dequantized_torchscript",
                                          "report_json"}));

  // FP model served too, through the repository extension: serving a bare upload needs the
  // quantize role; an infer token may only load deployments.
  inference::RepositoryModelLoadRequest lr;
  lr.set_model_name("tiny");
  inference::RepositoryModelLoadResponse lresp;
  EXPECT_EQ(oip_->RepositoryModelLoad(Ctx(kInfer).get(), lr, &lresp).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  ASSERT_TRUE(oip_->RepositoryModelLoad(Ctx(kQuantize).get(), lr, &lresp).ok());
  inference::ModelMetadataRequest mdr;
  mdr.set_name("tiny-q");
  inference::ModelMetadataResponse md;
  ASSERT_TRUE(oip_->ModelMetadata(Ctx(kInfer).get(), mdr, &md).ok());
  EXPECT_EQ(md.platform(), "fpxint_series");
  ASSERT_EQ(md.inputs_size(), 1);
  EXPECT_EQ(md.inputs(0).shape_size(), 4);

  // The inputs of tests/reference/make_tiny_models.py.
  auto io = core::SafetensorsReader::Open(TinyDir() + "/tiny_io.safetensors");
  ASSERT_TRUE(io.ok());
  auto x = (*io)->Data(*(*io)->Find("input"));
  auto infer = [&](const std::string& model, int terms, bool raw, std::vector<float>* y) {
    inference::ModelInferRequest req;
    req.set_model_name(model);
    req.set_id("req-7");
    auto* in = req.add_inputs();
    in->set_name("input__0");
    in->set_datatype("FP32");
    for (int64_t d : {2, 3, 8, 8}) in->add_shape(d);
    if (raw) {
      req.add_raw_input_contents(std::string(reinterpret_cast<const char*>(x.data()), x.size()));
    } else {
      const float* f = reinterpret_cast<const float*>(x.data());
      for (size_t i = 0; i < x.size() / 4; ++i) in->mutable_contents()->add_fp32_contents(f[i]);
    }
    if (terms) (*req.mutable_parameters())["fpxint_terms"].set_int64_param(terms);
    inference::ModelInferResponse resp;
    grpc::Status s = oip_->ModelInfer(Ctx(kInfer).get(), req, &resp);
    if (!s.ok()) return s;
    EXPECT_EQ(resp.id(), "req-7");
    EXPECT_EQ(resp.outputs_size(), 1);
    if (raw) {
      const std::string& b = resp.raw_output_contents(0);
      y->assign(reinterpret_cast<const float*>(b.data()),
                reinterpret_cast<const float*>(b.data() + b.size()));
    } else {
      y->assign(resp.outputs(0).contents().fp32_contents().begin(),
                resp.outputs(0).contents().fp32_contents().end());
    }
    return s;
  };
  std::vector<float> fp, fp2, q1, q3;
  ASSERT_TRUE(infer("tiny", 0, true, &fp).ok());
  ASSERT_TRUE(infer("tiny", 0, false, &fp2).ok());
  EXPECT_EQ(fp, fp2);
  ASSERT_TRUE(infer("tiny-q", 1, true, &q1).ok());
  ASSERT_TRUE(infer("tiny-q", 0, true, &q3).ok());  // default: all 3 terms
  auto rel = [&](const std::vector<float>& y) {
    double d = 0, n = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      d += (y[i] - fp[i]) * double(y[i] - fp[i]);
      n += fp[i] * double(fp[i]);
    }
    return std::sqrt(d / n);
  };
  ASSERT_EQ(q3.size(), fp.size());
  EXPECT_LT(rel(q3), 0.01);
  EXPECT_GT(rel(q1), rel(q3));

  // Bad requests name the field.
  inference::ModelInferRequest bad =
      RawInfer("tiny-q", {2, 3, 8, 9}, std::string(2 * 3 * 8 * 9 * 4, '\0'));
  auto* in = bad.mutable_inputs(0);
  inference::ModelInferResponse resp;
  grpc::Status s = oip_->ModelInfer(Ctx(kInfer).get(), bad, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("inputs[0].shape"), std::string::npos) << s.error_message();
  in->set_shape(3, 8);
  bad.set_raw_input_contents(0, std::string(x.size() - 4, '\0'));
  s = oip_->ModelInfer(Ctx(kInfer).get(), bad, &resp);
  EXPECT_NE(s.error_message().find("raw_input_contents[0]"), std::string::npos)
      << s.error_message();
  in->set_datatype("FP64");
  s = oip_->ModelInfer(Ctx(kInfer).get(), bad, &resp);
  EXPECT_NE(s.error_message().find("datatype"), std::string::npos) << s.error_message();
  in->set_datatype("FP32");
  bad.set_raw_input_contents(0, std::string(x.size(), '\0'));
  (*bad.mutable_parameters())["fpxint_terms"].set_int64_param(4);
  s = oip_->ModelInfer(Ctx(kInfer).get(), bad, &resp);
  EXPECT_NE(s.error_message().find("fpxint_terms"), std::string::npos) << s.error_message();
  bad.set_model_name("nope");
  EXPECT_EQ(oip_->ModelInfer(Ctx(kInfer).get(), bad, &resp).error_code(),
            grpc::StatusCode::NOT_FOUND);

  inference::ModelStatisticsRequest sr;
  sr.set_name("tiny-q");
  inference::ModelStatisticsResponse st;
  ASSERT_TRUE(oip_->ModelStatistics(Ctx(kInfer).get(), sr, &st).ok());
  ASSERT_EQ(st.model_stats_size(), 1);
  EXPECT_EQ(st.model_stats(0).inference_count(), 4u);  // two requests of batch 2
  EXPECT_EQ(st.model_stats(0).execution_count(), 2u);
  EXPECT_EQ(st.model_stats(0).inference_stats().fail().count(), 4u);

  // Served models survive a restart; unloading is remembered too.
  inference::RepositoryModelUnloadRequest ur;
  ur.set_model_name("tiny");
  inference::RepositoryModelUnloadResponse uresp;
  ASSERT_TRUE(oip_->RepositoryModelUnload(Ctx(kInfer).get(), ur, &uresp).ok());
  Restart();
  inference::ModelReadyRequest rr;
  rr.set_name("tiny-q");
  inference::ModelReadyResponse ready;
  ASSERT_TRUE(oip_->ModelReady(Ctx(kInfer).get(), rr, &ready).ok());
  EXPECT_TRUE(ready.ready());
  rr.set_name("tiny");
  ASSERT_TRUE(oip_->ModelReady(Ctx(kInfer).get(), rr, &ready).ok());
  EXPECT_FALSE(ready.ready());
  std::vector<float> q3b;
  ASSERT_TRUE(infer("tiny-q", 0, true, &q3b).ok());
  EXPECT_EQ(q3b, q3);
  inference::RepositoryIndexResponse idx;
  ASSERT_TRUE(oip_->RepositoryIndex(Ctx(kInfer).get(), {}, &idx).ok());
  ASSERT_EQ(idx.models_size(), 2);
  v1::JobRef ref;
  ref.set_job_id(done.job_id());
  v1::Job after;
  ASSERT_TRUE(q_->GetJob(Ctx().get(), ref, &after).ok());
  EXPECT_EQ(after.state(), v1::SUCCEEDED);
  EXPECT_EQ(Sha(Download(after.artifacts(0).artifact_id())), after.artifacts(0).sha256());
}

// Every RPC that names a model, job or service answers NOT_FOUND for one that does not exist,
// naming the field; and the lookups succeed once it exists.
TEST_F(ServerTest, UnknownNamesAreNotFoundOnEveryRpc) {
  auto not_found = [](const grpc::Status& s, const char* field) {
    EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << field << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(field), std::string::npos) << s.error_message();
  };
  v1::ModelRef mref;
  mref.set_name("absent");
  v1::Model model;
  not_found(q_->GetModel(Ctx().get(), mref, &model), "name");
  v1::JobRef jref;
  jref.set_job_id("no-such-job");
  v1::Job job;
  not_found(q_->GetJob(Ctx().get(), jref, &job), "job");
  not_found(q_->CancelJob(Ctx().get(), jref, &job), "job");
  {
    auto ctx = Ctx();
    auto reader = q_->WatchJob(ctx.get(), jref);
    v1::JobEvent ev;
    EXPECT_FALSE(reader->Read(&ev));
    not_found(reader->Finish(), "job");
  }
  {
    v1::ArtifactRef aref;
    aref.set_artifact_id("no-such-artifact");
    auto ctx = Ctx();
    auto reader = q_->DownloadArtifact(ctx.get(), aref);
    v1::ArtifactChunk chunk;
    EXPECT_FALSE(reader->Read(&chunk));
    not_found(reader->Finish(), "artifact_id");
  }
  inference::ModelReadyRequest rr;
  rr.set_name("absent");
  inference::ModelReadyResponse ready;
  not_found(oip_->ModelReady(Ctx(kInfer).get(), rr, &ready), "absent");
  inference::ModelMetadataRequest mdr;
  mdr.set_name("absent");
  inference::ModelMetadataResponse md;
  not_found(oip_->ModelMetadata(Ctx(kInfer).get(), mdr, &md), "absent");
  inference::RepositoryModelLoadRequest lr;
  lr.set_model_name("absent");
  inference::RepositoryModelLoadResponse lresp;
  not_found(oip_->RepositoryModelLoad(Ctx(kInfer).get(), lr, &lresp), "absent");
  inference::RepositoryModelUnloadRequest ur;
  ur.set_model_name("absent");
  inference::RepositoryModelUnloadResponse uresp;
  not_found(oip_->RepositoryModelUnload(Ctx(kInfer).get(), ur, &uresp), "absent");
  inference::ModelStatisticsRequest sr;
  sr.set_name("absent");
  inference::ModelStatisticsResponse st;
  not_found(oip_->ModelStatistics(Ctx(kInfer).get(), sr, &st), "absent");
  grpc::health::v1::HealthCheckRequest hr;
  hr.set_service("no.such.Service");
  grpc::health::v1::HealthCheckResponse hresp;
  grpc::ClientContext hctx;
  EXPECT_EQ(health_->Check(&hctx, hr, &hresp).error_code(), grpc::StatusCode::NOT_FOUND);

  // Once the model exists: GetModel returns what UploadModel did, the FP model loads and is ready.
  const std::string ts = ReadFileOrDie(TinyDir() + "/tiny_cnn.pt");
  v1::Model up;
  ASSERT_TRUE(Upload("present", v1::TORCHSCRIPT, ts, &up).ok());
  mref.set_name("present");
  ASSERT_TRUE(q_->GetModel(Ctx().get(), mref, &model).ok());
  EXPECT_EQ(model.sha256(), up.sha256());
  EXPECT_EQ(model.size_bytes(), static_cast<int64_t>(ts.size()));
  lr.set_model_name("present");
  ASSERT_TRUE(oip_->RepositoryModelLoad(Ctx(kQuantize).get(), lr, &lresp).ok());
  rr.set_name("present");
  ASSERT_TRUE(oip_->ModelReady(Ctx(kInfer).get(), rr, &ready).ok());
  EXPECT_TRUE(ready.ready());
}

// FP16 and UINT8 inputs of a float model are converted on the way in: UINT8 values give exactly
// the FP32 result of the same values, FP16 that of the rounded halves.
TEST_F(ServerTest, Fp16AndUint8InputsMatchTheirFp32Values) {
  const std::string ts = ReadFileOrDie(TinyDir() + "/tiny_cnn.pt");
  v1::Model m;
  ASSERT_TRUE(Upload("tiny", v1::TORCHSCRIPT, ts, &m).ok());
  inference::RepositoryModelLoadRequest lr;
  lr.set_model_name("tiny");
  inference::RepositoryModelLoadResponse lresp;
  ASSERT_TRUE(oip_->RepositoryModelLoad(Ctx(kQuantize).get(), lr, &lresp).ok());
  const int64_t n = 2 * 3 * 8 * 8;
  auto infer = [&](const char* datatype, const std::string& raw, std::vector<float>* y) {
    inference::ModelInferRequest req;
    req.set_model_name("tiny");
    auto* in = req.add_inputs();
    in->set_name("input__0");
    in->set_datatype(datatype);
    for (int64_t d : {2, 3, 8, 8}) in->add_shape(d);
    req.add_raw_input_contents(raw);
    inference::ModelInferResponse resp;
    grpc::Status s = oip_->ModelInfer(Ctx(kInfer).get(), req, &resp);
    if (s.ok()) {
      const std::string& b = resp.raw_output_contents(0);
      y->assign(reinterpret_cast<const float*>(b.data()),
                reinterpret_cast<const float*>(b.data() + b.size()));
    }
    return s;
  };
  std::string u8(static_cast<size_t>(n), '\0'), f32_of_u8(static_cast<size_t>(4 * n), '\0');
  std::string f16(static_cast<size_t>(2 * n), '\0'), f32_of_f16(static_cast<size_t>(4 * n), '\0');
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t v = static_cast<uint8_t>((i * 37) % 256);
    u8[static_cast<size_t>(i)] = static_cast<char>(v);
    const float fv = static_cast<float>(v);
    std::memcpy(&f32_of_u8[static_cast<size_t>(4 * i)], &fv, 4);
    const uint16_t h = core::FloatToHalf(std::sin(0.37f * static_cast<float>(i)) * 3.1f);
    std::memcpy(&f16[static_cast<size_t>(2 * i)], &h, 2);
    const float hf = core::HalfToFloat(h);
    std::memcpy(&f32_of_f16[static_cast<size_t>(4 * i)], &hf, 4);
  }
  std::vector<float> a, b;
  ASSERT_TRUE(infer("UINT8", u8, &a).ok());
  ASSERT_TRUE(infer("FP32", f32_of_u8, &b).ok());
  ASSERT_FALSE(a.empty());
  EXPECT_EQ(a, b);
  ASSERT_TRUE(infer("FP16", f16, &a).ok());
  ASSERT_TRUE(infer("FP32", f32_of_f16, &b).ok());
  EXPECT_EQ(a, b);
  // The wrong byte count for the datatype names the field.
  grpc::Status s = infer("FP16", f32_of_f16, &a);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("raw_input_contents[0]"), std::string::npos)
      << s.error_message();
}

// Graceful shutdown with a job running (what SIGTERM does): within the grace period the job
// finishes and is SUCCEEDED after the restart; with no grace it is interrupted, and the restarted
// server runs it again to SUCCEEDED (attempts 2). Either way nothing is lost or left half-written.
TEST_F(ServerTest, ShutdownFinishesOrRequeuesARunningJob) {
  max_upload_ = 64 << 20;
  Restart();
  core::SafetensorsWriter wr;
  for (int t = 0; t < 12; ++t) {  // 48 MB: a job of a few hundred ms at b=2, K=8
    auto v = fpxint::testing::ToFloat(fpxint::testing::RandomValues(
        fpxint::testing::Dist::kGaussian, 1024 * 1024, static_cast<uint64_t>(40 + t)));
    std::vector<uint8_t> bytes(v.size() * 4);
    std::memcpy(bytes.data(), v.data(), bytes.size());
    ASSERT_TRUE(wr.AddOwned(absl::StrCat("w", t), core::DType::kF32, {1024, 1024}, std::move(bytes)).ok());
  }
  const std::string path = dir_.File("big.safetensors");
  ASSERT_TRUE(wr.WriteFile(path).ok());
  v1::Model m;
  ASSERT_TRUE(Upload("big", v1::SAFETENSORS, ReadFileOrDie(path), &m).ok());

  auto wait_running = [&](const std::string& id) {
    v1::JobRef ref;
    ref.set_job_id(id);
    v1::Job j;
    for (int i = 0; i < 6000; ++i) {
      EXPECT_TRUE(q_->GetJob(Ctx().get(), ref, &j).ok());
      if (j.state() != v1::QUEUED) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return j;
  };
  auto get = [&](const std::string& id) {
    v1::JobRef ref;
    ref.set_job_id(id);
    v1::Job j;
    EXPECT_TRUE(q_->GetJob(Ctx().get(), ref, &j).ok());
    return j;
  };

  // Grace long enough: the running job completes before the server goes.
  shutdown_grace_ = 60;
  Restart();
  const std::string a = Submit(Spec("big", v1::TENSOR, 2, 8)).job_id();
  ASSERT_EQ(wait_running(a).state(), v1::RUNNING) << "the job finished before the shutdown";
  server_.reset();  // Shutdown(), as SIGTERM does
  StartServer();
  v1::Job ja = get(a);
  EXPECT_EQ(ja.state(), v1::SUCCEEDED) << v1::JobState_Name(ja.state()) << " " << ja.error();
  EXPECT_EQ(ja.attempts(), 1u);
  ASSERT_GT(ja.artifacts_size(), 0);
  for (const v1::Artifact& art : ja.artifacts()) {
    EXPECT_EQ(Sha(Download(art.artifact_id())), art.sha256()) << art.kind();
  }

  // No grace: the running job is interrupted, re-queued, and runs again after the restart.
  shutdown_grace_ = 0;
  Restart();
  const std::string b = Submit(Spec("big", v1::TENSOR, 3, 8)).job_id();
  ASSERT_EQ(wait_running(b).state(), v1::RUNNING) << "the job finished before the shutdown";
  server_.reset();
  shutdown_grace_ = 60;
  StartServer();
  const std::vector<v1::Job> events = Watch(b);
  ASSERT_FALSE(events.empty());
  const v1::Job jb = events.back();
  EXPECT_EQ(jb.state(), v1::SUCCEEDED) << v1::JobState_Name(jb.state()) << " " << jb.error();
  EXPECT_EQ(jb.attempts(), 2u);
  ASSERT_GT(jb.artifacts_size(), 0);
  for (const v1::Artifact& art : jb.artifacts()) {
    EXPECT_EQ(Sha(Download(art.artifact_id())), art.sha256()) << art.kind();
  }
}

// docs/ARCHITECTURE.md, toolchain trap 2: with LibTorch and OpenBLAS in the process, a thread on
// prometheus-cpp's ~100 KiB stack cannot hold the static TLS and the exposer fails to start.
// server/stack_size_fix.cc raises such requests to 1 MiB; this process links it, as fpxint-server
// does.
TEST(StackSizeFix, SmallThreadStacksAreRaisedToOneMiB) {
  pthread_attr_t attr;
  ASSERT_EQ(pthread_attr_init(&attr), 0);
  ASSERT_EQ(pthread_attr_setstacksize(&attr, 100 * 1024), 0);
  size_t got = 0;
  ASSERT_EQ(pthread_attr_getstacksize(&attr, &got), 0);
  EXPECT_GE(got, size_t{1} << 20);
  pthread_attr_destroy(&attr);
}

// The metrics exposer starts and serves in a process that has LibTorch and OpenBLAS loaded (the
// crash of trap 2), and counts the RPCs made.
TEST_F(ServerTest, MetricsEndpointServesWithLibTorchLoaded) {
  std::ifstream maps("/proc/self/maps");
  const std::string m((std::istreambuf_iterator<char>(maps)), std::istreambuf_iterator<char>());
  EXPECT_NE(m.find("libtorch_cpu"), std::string::npos) << "LibTorch is not mapped in this process";
  metrics_listen_ = "127.0.0.1:0";
  Restart();
  ASSERT_GT(server_->metrics_port(), 0);
  auto scrape = [&]() {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    EXPECT_GE(fd, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(server_->metrics_port()));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    const std::string req = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    EXPECT_EQ(write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
    std::string body;
    char buf[4096];
    for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) body.append(buf, static_cast<size_t>(n));
    close(fd);
    return body;
  };
  inference::ServerLiveResponse live;
  for (int i = 0; i < 3; ++i) {
    grpc::ClientContext c;
    ASSERT_TRUE(oip_->ServerLive(&c, {}, &live).ok());
  }
  // The interceptor counts a call when its status has been sent, which may be just after the
  // client has it: scrape until the count shows (or 5 s).
  const std::string series =
      "fpxint_grpc_requests_total{code=\"OK\",method=\"/inference.GRPCInferenceService/ServerLive\"} 3";
  std::string text;
  for (int i = 0; i < 100; ++i) {
    text = scrape();
    if (text.find(series) != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_NE(text.find("200 OK"), std::string::npos) << text.substr(0, 200);
  EXPECT_NE(text.find(series), std::string::npos) << text.substr(0, 4000);
}

TEST_F(ServerTest, ModelJobWritesBasisModels) {
  v1::Model m;
  ASSERT_TRUE(Upload("tiny", v1::TORCHSCRIPT, ReadFileOrDie(TinyDir() + "/tiny_cnn.pt"), &m).ok());
  v1::JobSpec spec = Spec("tiny", v1::MODEL, 4, 2);
  spec.set_act_bits(8);
  spec.set_act_terms(2);
  v1::Job done = Watch(Submit(spec).job_id()).back();
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.error();
  int basis = 0;
  for (const auto& a : done.artifacts()) {
    if (a.kind() == "basis_torchscript") {
      ++basis;
      EXPECT_EQ(Sha(Download(a.artifact_id())), a.sha256());
    }
  }
  EXPECT_EQ(basis, 2);
  ASSERT_EQ(done.result().probe_size(), 2);
  EXPECT_EQ(done.result().probe(1).act_terms(), 2u);
}

// The packed-terms digest of docs/FORMAT.md computed straight from an artifact's tensors: for k,
// for each expanded tensor in data order, codes as stored, then per (row, group) a float32 scale
// and a float32 offset (0 sym, 0.5 mid, -zero asym).
std::string ArtifactTermsSha256(const std::string& bytes) {
  auto r = core::SafetensorsReader::FromBuffer(
      absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  EXPECT_TRUE(r.ok()) << r.status();
  if (!r.ok()) return "";
  auto view = core::ArtifactView::Parse(**r);
  EXPECT_TRUE(view.ok()) << view.status();
  if (!view.ok()) return "";
  const core::ExpansionSpec& spec = view->spec();
  core::Sha256 h;
  for (int k = 1; k <= spec.terms; ++k) {
    for (const core::ArtifactView::Entry& e : view->tensors()) {
      if (k > e.terms) continue;
      const std::string prefix = absl::StrCat(e.name, ".t", k);
      h.Update((*r)->Data(*(*r)->Find(prefix + ".codes")));
      auto floats = [&](const std::string& name) {
        auto d = (*r)->Data(*(*r)->Find(name));
        std::vector<float> v(d.size() / 4);
        std::memcpy(v.data(), d.data(), d.size());
        return v;
      };
      const std::vector<float> scale = floats(prefix + ".scale");
      const std::vector<float> zero =
          spec.grid == core::Grid::kAsym ? floats(prefix + ".zero") : std::vector<float>();
      const int64_t n = e.layout.rows * (spec.scale == core::ScaleGranularity::kGroup
                                             ? e.layout.groups_per_row : 1);
      std::vector<float> s(n), off(n);
      for (int64_t i = 0; i < n; ++i) {
        const size_t j = spec.scale == core::ScaleGranularity::kTensor ? 0 : i;
        s[i] = scale[j];
        off[i] = spec.grid == core::Grid::kSym ? 0.0f : spec.grid == core::Grid::kMid ? 0.5f : -zero[j];
      }
      h.Update(absl::string_view(reinterpret_cast<const char*>(s.data()), s.size() * 4));
      h.Update(absl::string_view(reinterpret_cast<const char*>(off.data()), off.size() * 4));
    }
  }
  return h.HexDigest();
}

// A quantized deployment is built from its job's packed artifact: the artifact a user downloads
// is the one the version serves, term for term, and a changed artifact is refused at load.
TEST_F(ServerTest, DeploymentServesTheDownloadedArtifact) {
  v1::Model m;
  ASSERT_TRUE(Upload("tiny", v1::TORCHSCRIPT, ReadFileOrDie(TinyDir() + "/tiny_cnn.pt"), &m).ok());
  v1::JobSpec spec = Spec("tiny", v1::MODEL, 4, 2);
  spec.set_grid(v1::ASYM);
  spec.mutable_deploy()->set_enabled(true);
  spec.mutable_deploy()->set_name("tiny-m");
  v1::Job done = Watch(Submit(spec).job_id()).back();
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.error();
  std::string artifact;
  for (const auto& a : done.artifacts()) {
    if (a.kind() == "packed_safetensors") artifact = Download(a.artifact_id());
  }
  ASSERT_FALSE(artifact.empty());

  v1::DeploymentRef ref;
  ref.set_name("tiny-m");
  v1::DeploymentStatus st;
  ASSERT_TRUE(q_->GetDeployment(Ctx(kInfer).get(), ref, &st).ok());
  EXPECT_EQ(st.state(), "READY");
  EXPECT_EQ(st.version(), "1");
  EXPECT_EQ(st.job_id(), done.job_id());
  EXPECT_EQ(st.artifact_sha256(), Sha(artifact));
  EXPECT_EQ(st.served_terms_sha256(), ArtifactTermsSha256(artifact));
  EXPECT_EQ(st.packed_layers(), 3);
  EXPECT_LT(st.resident_weight_bytes(), st.fp32_weight_bytes());
  EXPECT_TRUE(absl::StrContains(st.composition(), "Abelian sum of 2 basis models"))
      << st.composition();
  ref.set_version("9");
  grpc::Status missing = q_->GetDeployment(Ctx(kQuantize).get(), ref, &st);
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(absl::StrContains(missing.error_message(), "version")) << missing.error_message();

  // The version directory holds its own copy of the artifact. Change one byte of it: the next
  // load refuses the version rather than serve terms no job wrote.
  const std::string served = dir_.File("data") + "/repository/tiny-m/1/model.fpxint.safetensors";
  std::string bytes = ReadFileOrDie(served);
  ASSERT_EQ(Sha(bytes), Sha(artifact));
  bytes[bytes.size() - 1] ^= 1;
  std::filesystem::remove(served);  // a hard link: the store's blob keeps its bytes
  WriteFileOrDie(served, bytes);
  inference::RepositoryModelUnloadRequest ur;
  ur.set_model_name("tiny-m");
  inference::RepositoryModelUnloadResponse uresp;
  ASSERT_TRUE(oip_->RepositoryModelUnload(Ctx(kInfer).get(), ur, &uresp).ok());
  inference::RepositoryModelLoadRequest lr;
  lr.set_model_name("tiny-m");
  inference::RepositoryModelLoadResponse lresp;
  grpc::Status load = oip_->RepositoryModelLoad(Ctx(kInfer).get(), lr, &lresp);
  EXPECT_EQ(load.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_TRUE(absl::StrContains(load.error_message(), "changed after the job wrote it"))
      << load.error_message();
}

// ---- the trust boundary: defaults, start-up, request bounds ----

TEST(ServerConfigDefaults, DatabaseUrlAndJobAttemptsAreChecked) {
  ServerConfig c;
  c.database_url = "mysql://db/fpxint";
  absl::Status s = c.Validate();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "--database-url")) << s;
  c.database_url = "postgresql://fpxint@db:5432/fpxint";
  EXPECT_TRUE(c.Validate().ok());
  c.max_job_attempts = 0;
  s = c.Validate();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "--max-job-attempts")) << s;
  c.max_job_attempts = 3;
  c.replica_id = "../other";
  s = c.Validate();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "--replica-id")) << s;
  c.replica_id = "pod-7:1234";
  EXPECT_TRUE(c.Validate().ok());
}

TEST(ServerConfigDefaults, OpenServerStaysOnLoopback) {
  ServerConfig c;
  EXPECT_EQ(c.ListenAddress(), "127.0.0.1:8001");
  c.token_file = "tokens";
  EXPECT_EQ(c.ListenAddress(), "0.0.0.0:8001");
}

TEST(ServerConfigDefaults, PublicListenWithoutTokensNeedsInsecureNoAuth) {
  ServerConfig c;
  c.listen = "0.0.0.0:8001";
  absl::Status s = c.Validate();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "--insecure-no-auth")) << s;
  c.listen = "[::]:8001";
  EXPECT_FALSE(c.Validate().ok());
  for (const char* loopback : {"127.0.0.1:0", "localhost:8001", "[::1]:8001", "unix:/tmp/s"}) {
    c.listen = loopback;
    EXPECT_TRUE(c.Validate().ok()) << loopback;
  }
  c.listen = "0.0.0.0:8001";
  c.insecure_no_auth = true;
  EXPECT_TRUE(c.Validate().ok());
  c.insecure_no_auth = false;
  c.token_file = "tokens";
  EXPECT_TRUE(c.Validate().ok());
}

}  // namespace
}  // namespace fpxint::server
