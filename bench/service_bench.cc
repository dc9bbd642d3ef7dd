// Service overhead, measured against the same work done in-process, in one run
// (docs/BENCHMARKS.md "Service"):
//   - ModelInfer of the OCR recognizer at batch 1 over gRPC (loopback, raw FP32) vs
//     model::Model::Forward of the same network in-process, both at 2 LibTorch threads, with the
//     p50/p99 latency of every request and the throughput (counters p50_ms, p99_ms, req_per_s);
//     and the same with 1, 8 and 64 concurrent clients;
//   - 32 concurrent clients sending batch-1 requests to the character LM and to the OCR
//     recognizer at W4×2, with and without dynamic batching (InferLmClients/batched,
//     /unbatched; InferRecClients/...);
//   - upload and download throughput of a 100 MB file;
//   - a TENSOR job end to end (submit, run, watch to SUCCEEDED) vs core::ExpandSafetensorsFile on
//     the same file and spec;
//   - a Hugging Face checkpoint directory: its upload, and a TENSOR job over it (source read
//     rate and peak resident set) vs core::ExpandTensor of one of its tensors in memory.
// Needs FPXINT_MODELS_DIR (scripts/fetch_models.sh --print-dir).
#include <benchmark/benchmark.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/artifact.h"
#include "core/dtype.h"
#include "core/expansion.h"
#include "core/safetensors.h"
#include "core/sha256.h"
#include "core/thread_pool.h"
#include "fpxint/v1/quantizer.grpc.pb.h"
#include "inference/grpc_service.grpc.pb.h"
#include "model/model.h"
#include "server/server.h"

namespace {

using namespace fpxint;

struct Env {
  std::string dir;
  std::unique_ptr<server::Server> srv;
  std::unique_ptr<v1::Quantizer::Stub> q;
  std::unique_ptr<inference::GRPCInferenceService::Stub> oip;
  std::string rec_path;
  std::string big_path;  // 100 MB safetensors (the size)
  std::string big_bytes;
  std::string artifact_id;
  uint64_t artifact_size = 0;
};

std::string ReadAll(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// `sha256`: the bytes' hash when the caller already knows it (a client hashes a file once; the
// upload benchmark measures the service, not the client's hashing).
// `input`: a TorchScript model's signature (default: the recognizer's [1, 3, 48, 320] FP32).
absl::Status Upload(Env& e, const std::string& name, v1::ModelFormat f, const std::string& bytes,
                    std::string sha256 = "", const v1::TensorSignature* input = nullptr) {
  grpc::ClientContext ctx;
  v1::Model m;
  auto w = e.q->UploadModel(&ctx, &m);
  v1::UploadChunk h;
  h.mutable_header()->set_name(name);
  h.mutable_header()->set_format(f);
  if (sha256.empty()) {
    sha256 = core::Sha256Hex(
        absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  }
  h.mutable_header()->set_sha256(sha256);
  if (f == v1::TORCHSCRIPT && input != nullptr) {
    *h.mutable_header()->add_inputs() = *input;
  } else if (f == v1::TORCHSCRIPT) {
    auto* in = h.mutable_header()->add_inputs();
    in->set_datatype("FP32");
    for (int64_t d : {1, 3, 48, 320}) in->add_shape(d);
  }
  w->Write(h);
  v1::UploadChunk c;
  for (size_t off = 0; off < bytes.size(); off += 1 << 20) {
    c.set_data(bytes.data() + off, std::min<size_t>(1 << 20, bytes.size() - off));
    w->Write(c);
  }
  w->WritesDone();
  grpc::Status s = w->Finish();
  return s.ok() ? absl::OkStatus() : absl::InternalError(s.error_message());
}

v1::Job RunJob(Env& e, const v1::JobSpec& spec) {
  grpc::ClientContext c1;
  v1::SubmitJobRequest req;
  *req.mutable_spec() = spec;
  v1::Job job;
  e.q->SubmitJob(&c1, req, &job);
  grpc::ClientContext c2;
  v1::JobRef ref;
  ref.set_job_id(job.job_id());
  auto r = e.q->WatchJob(&c2, ref);
  v1::JobEvent ev;
  while (r->Read(&ev)) job = ev.job();
  r->Finish();
  return job;
}

v1::JobSpec TensorSpec() {
  v1::JobSpec s;
  s.set_model("big");
  s.set_granularity(v1::TENSOR);
  s.set_weight_bits(4);
  s.set_weight_terms(2);
  return s;
}

Env* GetEnv() {
  static Env* env = [] {
    auto* e = new Env;
    const char* models = std::getenv("FPXINT_MODELS_DIR");
    if (!models) {
      std::fprintf(stderr, "FPXINT_MODELS_DIR is not set\n");
      std::exit(3);
    }
    e->rec_path = std::string(models) + "/ocr/ocr_rec.pt";
    e->dir =
        (std::filesystem::temp_directory_path() / absl::StrCat("fpxint-bench-", getpid())).string();
    std::filesystem::create_directories(e->dir);
    // The store and the generated checkpoints take up to ~11 GB: gone when the program exits,
    // however it exits short of a signal (the server is left running; the files go from under
    // it).
    static const std::string* dir = &e->dir;
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(*dir, ec);
    });
    server::ServerConfig c;
    c.listen = "127.0.0.1:0";
    c.data_dir = e->dir + "/data";
    c.threads = 2;
    auto s = server::Server::Start(c);
    if (!s.ok()) std::exit(4);
    e->srv = *std::move(s);
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(256 << 20);
    auto ch =
        grpc::CreateCustomChannel(e->srv->address(), grpc::InsecureChannelCredentials(), args);
    e->q = v1::Quantizer::NewStub(ch);
    e->oip = inference::GRPCInferenceService::NewStub(ch);
    if (!Upload(*e, "rec", v1::TORCHSCRIPT, ReadAll(e->rec_path)).ok()) std::exit(4);
    grpc::ClientContext lc;
    inference::RepositoryModelLoadRequest lr;
    lr.set_model_name("rec");
    inference::RepositoryModelLoadResponse lresp;
    if (!e->oip->RepositoryModelLoad(&lc, lr, &lresp).ok()) std::exit(4);
    // 100.7 MB (96 MiB) of N(0,1) weights in 24 tensors [1024, 1024].
    core::SafetensorsWriter w;
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    for (int t = 0; t < 24; ++t) {
      std::vector<uint8_t> data(1024 * 1024 * 4);
      float* f = reinterpret_cast<float*>(data.data());
      for (int i = 0; i < 1024 * 1024; ++i) f[i] = nd(rng);
      w.AddOwned(absl::StrCat("layer", t, ".weight"), core::DType::kF32, {1024, 1024},
                 std::move(data))
          .IgnoreError();
    }
    e->big_path = e->dir + "/big.safetensors";
    w.WriteFile(e->big_path).IgnoreError();
    e->big_bytes = ReadAll(e->big_path);
    if (!Upload(*e, "big", v1::SAFETENSORS, e->big_bytes).ok()) std::exit(4);
    v1::Job j = RunJob(*e, TensorSpec());
    if (j.state() != v1::SUCCEEDED) std::exit(4);
    e->artifact_id = j.artifacts(0).artifact_id();
    e->artifact_size = j.artifacts(0).size_bytes();
    return e;
  }();
  return env;
}

std::vector<float> RecInput() {
  std::vector<float> x(1 * 3 * 48 * 320);
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> u(-1, 1);
  for (float& v : x) v = u(rng);
  return x;
}

// Per-request latency percentiles and throughput over every iteration of the run (Google
// Benchmark's own figures are means per repetition): p50_ms, p99_ms, req_per_s.
class Latencies {
 public:
  void Start() { t0_ = std::chrono::steady_clock::now(); }
  void Stop() {
    ms_.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count());
  }
  // With several client threads (->Threads(n)) each reports its own: the percentiles are
  // averaged over the threads, the request rates summed (the server's throughput).
  void Report(benchmark::State& state) {
    if (ms_.empty()) return;
    double total = 0;
    for (double v : ms_) total += v;
    std::sort(ms_.begin(), ms_.end());
    auto pct = [&](double p) {
      return ms_[std::min(ms_.size() - 1, static_cast<size_t>(p * static_cast<double>(ms_.size())))];
    };
    state.counters["p50_ms"] = benchmark::Counter(pct(0.50), benchmark::Counter::kAvgThreads);
    state.counters["p99_ms"] = benchmark::Counter(pct(0.99), benchmark::Counter::kAvgThreads);
    state.counters["req_per_s"] = 1000.0 * static_cast<double>(ms_.size()) / total;
  }

 private:
  std::chrono::steady_clock::time_point t0_;
  std::vector<double> ms_;
};

void BM_InferInProcess(benchmark::State& state) {
  Env* e = GetEnv();
  auto net = model::Model::Load(e->rec_path, {2});
  if (!net.ok()) return state.SkipWithError("cannot load the recognizer");
  const auto x = model::HostTensor::Float({1, 3, 48, 320}, RecInput());
  Latencies lat;
  for (auto _ : state) {
    lat.Start();
    auto y = (*net)->Forward(x);
    benchmark::DoNotOptimize(y);
    lat.Stop();
  }
  lat.Report(state);
}

void BM_InferGrpc(benchmark::State& state) {
  Env* e = GetEnv();
  const std::vector<float> x = RecInput();
  inference::ModelInferRequest req;
  req.set_model_name("rec");
  auto* in = req.add_inputs();
  in->set_name("input__0");
  in->set_datatype("FP32");
  for (int64_t d : {1, 3, 48, 320}) in->add_shape(d);
  req.add_raw_input_contents(reinterpret_cast<const char*>(x.data()), x.size() * 4);
  Latencies lat;
  for (auto _ : state) {
    lat.Start();
    grpc::ClientContext ctx;
    inference::ModelInferResponse resp;
    if (!e->oip->ModelInfer(&ctx, req, &resp).ok()) return state.SkipWithError("ModelInfer failed");
    lat.Stop();
  }
  lat.Report(state);
}

// state.threads() clients sending requests back to back on one channel, all to the one served
// instance (--infer-instances 1): queueing and the edge's overhead under load.
void BM_InferGrpcClients(benchmark::State& state) {
  BM_InferGrpc(state);
}

// Dynamic batching: state.threads() clients each send batch-1 requests back to back to one
// model at W4×2 (LAYER job), one instance: the character LM ([1, 64] token ids) or the OCR
// recognizer ([1, 3, 48, 320] FP32). `batched` is the same job deployed with max_batch_size 32
// and a 2 ms queue delay, the other without batching. req_per_s is the server's throughput,
// p99_ms each request's latency, mean_pass_rows the rows of the passes that served them.
enum class ClientModel { kLm, kRecognizer };

// Uploads the model with a variable first dimension and deploys "<name>-alone" and
// "<name>-batched" from it.
bool Deploy(ClientModel which) {
  Env* e = GetEnv();
  const char* models = std::getenv("FPXINT_MODELS_DIR");
  const bool lm = which == ClientModel::kLm;
  const std::string name = lm ? "lm" : "rec-any";
  const std::string bytes =
      lm ? ReadAll(std::string(models) + "/charlm/char_lm.pt") : ReadAll(e->rec_path);
  v1::TensorSignature in;
  in.set_name(lm ? "tokens" : "x");
  in.set_datatype(lm ? "INT64" : "FP32");
  for (int64_t d : lm ? std::vector<int64_t>{-1, 64} : std::vector<int64_t>{-1, 3, 48, 320}) {
    in.add_shape(d);
  }
  if (!Upload(*e, name, v1::TORCHSCRIPT, bytes, "", &in).ok()) return false;
  for (const bool batched : {false, true}) {
    v1::JobSpec spec;
    spec.set_model(name);
    spec.set_granularity(v1::LAYER);
    spec.set_weight_bits(4);
    spec.set_weight_terms(2);
    spec.mutable_deploy()->set_enabled(true);
    spec.mutable_deploy()->set_name(name + (batched ? "-batched" : "-alone"));
    if (batched) {
      spec.mutable_deploy()->mutable_batching()->set_max_batch_size(32);
      spec.mutable_deploy()->mutable_batching()->set_max_queue_delay_microseconds(2000);
    }
    if (RunJob(*e, spec).state() != v1::SUCCEEDED) return false;
  }
  return true;
}

// Once per process and model; every client thread asks, the first one deploys.
bool DeployForClients(ClientModel which) {
  if (which == ClientModel::kLm) {
    static const bool lm = Deploy(ClientModel::kLm);
    return lm;
  }
  static const bool rec = Deploy(ClientModel::kRecognizer);
  return rec;
}

void BM_InferClients(benchmark::State& state, ClientModel which, bool batched) {
  Env* e = GetEnv();
  if (!DeployForClients(which)) return state.SkipWithError("cannot upload and deploy the model");
  const bool lm = which == ClientModel::kLm;
  inference::ModelInferRequest req;
  req.set_model_name(std::string(lm ? "lm" : "rec-any") + (batched ? "-batched" : "-alone"));
  auto* in = req.add_inputs();
  in->set_name(lm ? "tokens" : "x");
  in->set_datatype(lm ? "INT64" : "FP32");
  if (lm) {
    for (int64_t d : {1, 64}) in->add_shape(d);
    std::vector<int64_t> tokens(64);
    std::mt19937 rng(static_cast<uint32_t>(3 + state.thread_index()));
    for (int64_t& t : tokens) t = static_cast<int64_t>(rng() % 55);
    req.add_raw_input_contents(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 8);
  } else {
    for (int64_t d : {1, 3, 48, 320}) in->add_shape(d);
    const std::vector<float> x = RecInput();
    req.add_raw_input_contents(reinterpret_cast<const char*>(x.data()), x.size() * 4);
  }
  Latencies lat;
  int64_t rows = 0, calls = 0;
  for (auto _ : state) {
    lat.Start();
    grpc::ClientContext ctx;
    inference::ModelInferResponse resp;
    if (!e->oip->ModelInfer(&ctx, req, &resp).ok()) return state.SkipWithError("ModelInfer failed");
    lat.Stop();
    if (auto it = resp.parameters().find("fpxint_batch_rows"); it != resp.parameters().end()) {
      rows += it->second.int64_param();
      ++calls;
    }
  }
  lat.Report(state);
  if (calls > 0) {
    state.counters["mean_pass_rows"] = benchmark::Counter(
        static_cast<double>(rows) / static_cast<double>(calls), benchmark::Counter::kAvgThreads);
  }
}

void BM_InferLmClients(benchmark::State& state, bool batched) {
  BM_InferClients(state, ClientModel::kLm, batched);
}
void BM_InferRecClients(benchmark::State& state, bool batched) {
  BM_InferClients(state, ClientModel::kRecognizer, batched);
}

void BM_Upload100MB(benchmark::State& state) {
  Env* e = GetEnv();
  const std::string sha = core::Sha256Hex(absl::MakeConstSpan(
      reinterpret_cast<const uint8_t*>(e->big_bytes.data()), e->big_bytes.size()));
  int i = 0;
  for (auto _ : state) {
    // A new name each time: the bytes are streamed, hashed by the server, written and
    // deduplicated.
    if (!Upload(*e, absl::StrCat("copy", i++), v1::SAFETENSORS, e->big_bytes, sha).ok()) {
      return state.SkipWithError("upload failed");
    }
  }
  state.SetBytesProcessed(state.iterations() * e->big_bytes.size());
}

void BM_DownloadArtifact(benchmark::State& state) {
  Env* e = GetEnv();
  for (auto _ : state) {
    grpc::ClientContext ctx;
    v1::ArtifactRef ref;
    ref.set_artifact_id(e->artifact_id);
    ref.set_chunk_bytes(4 << 20);
    auto r = e->q->DownloadArtifact(&ctx, ref);
    v1::ArtifactChunk c;
    uint64_t n = 0;
    while (r->Read(&c)) n += c.data().size();
    if (!r->Finish().ok() || n != e->artifact_size) return state.SkipWithError("download failed");
  }
  state.SetBytesProcessed(state.iterations() * e->artifact_size);
}

void BM_TensorJobEndToEnd(benchmark::State& state) {
  Env* e = GetEnv();
  for (auto _ : state) {
    if (RunJob(*e, TensorSpec()).state() != v1::SUCCEEDED) return state.SkipWithError("job failed");
  }
  state.SetBytesProcessed(state.iterations() * e->big_bytes.size());
}

void BM_TensorExpandDirect(benchmark::State& state) {
  Env* e = GetEnv();
  core::ThreadPool pool(2);
  core::ArtifactOptions o;
  o.spec.bits = 4;
  o.spec.terms = 2;
  o.expand.pool = &pool;
  const std::string out = e->dir + "/direct.safetensors";
  for (auto _ : state) {
    if (!core::ExpandSafetensorsFile(e->big_path, out, o).ok()) {
      return state.SkipWithError("expand failed");
    }
  }
  state.SetBytesProcessed(state.iterations() * e->big_bytes.size());
}

// ---- A Hugging Face checkpoint directory (docs/BENCHMARKS.md "Checkpoint directories") ----
//
// A generated BF16 checkpoint of FPXINT_BENCH_CHECKPOINT_MB (default 1024) in two shards of
// [4096, 4096] tensors (32 MiB each), an index and a config.json, uploaded file by file and
// committed (CommitModelFiles), then expanded by a TENSOR job W4x2 with group-128 scales, packed
// output. The baseline is core::ExpandTensor of one such tensor in memory, same spec and threads.

struct CheckpointDir {
  std::vector<std::string> paths, abs, shas;  // shards first
  std::vector<uint64_t> sizes;
  uint64_t shard_bytes = 0;
  std::vector<uint8_t> tensor;  // one BF16 tensor, for the in-memory baseline
};

constexpr int64_t kDirRows = 4096, kDirCols = 4096;

CheckpointDir* GetCheckpointDir() {
  static CheckpointDir* d = [] {
    Env* e = GetEnv();
    auto* c = new CheckpointDir;
    const char* mb_env = std::getenv("FPXINT_BENCH_CHECKPOINT_MB");
    const int64_t mb = mb_env ? std::max<int64_t>(64, std::atoll(mb_env)) : 1024;
    const int64_t tensor_bytes = kDirRows * kDirCols * 2;
    const int tensors = static_cast<int>(std::max<int64_t>(2, (mb << 20) / tensor_bytes));
    // Four different tensors, cycled: each shard holds its tensors' bytes once in memory.
    std::vector<std::vector<uint8_t>> bufs(4, std::vector<uint8_t>(tensor_bytes));
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.f, 0.02f);
    for (auto& b : bufs) {
      uint16_t* h = reinterpret_cast<uint16_t*>(b.data());
      for (int64_t i = 0; i < kDirRows * kDirCols; ++i) h[i] = core::FloatToBFloat16(nd(rng));
    }
    c->tensor = bufs[0];
    std::string weight_map;
    for (int s = 0; s < 2; ++s) {
      const std::string name = absl::StrCat("model-0000", s + 1, "-of-00002.safetensors");
      core::SafetensorsWriter w;
      for (int t = s; t < tensors; t += 2) {
        const std::string tn = absl::StrCat("model.layers.", t, ".mlp.up_proj.weight");
        w.Add(tn, core::DType::kBF16, {kDirRows, kDirCols}, bufs[static_cast<size_t>(t) % 4])
            .IgnoreError();
        absl::StrAppend(&weight_map, weight_map.empty() ? "" : ",", "\"", tn, "\":\"", name, "\"");
      }
      std::string sha;
      const std::string path = e->dir + "/" + name;
      if (!w.WriteFile(path, &sha).ok()) std::exit(4);
      c->paths.push_back(name);
      c->abs.push_back(path);
      c->shas.push_back(sha);
      c->sizes.push_back(std::filesystem::file_size(path));
      c->shard_bytes += c->sizes.back();
    }
    for (const auto& [name, text] :
         {std::pair<std::string, std::string>{"model.safetensors.index.json",
                                              "{\"metadata\":{},\"weight_map\":{" + weight_map + "}}"},
          {"config.json", "{\"architectures\": [\"LlamaForCausalLM\"]}"}}) {
      const std::string path = e->dir + "/" + name;
      std::ofstream(path, std::ios::binary) << text;
      c->paths.push_back(name);
      c->abs.push_back(path);
      c->shas.push_back(core::Sha256Hex(
          absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(text.data()), text.size())));
      c->sizes.push_back(text.size());
    }
    return c;
  }();
  return d;
}

// Uploads every file of the directory (streamed from disk in 1 MiB chunks, hashes known, as the
// CLI has them) and commits them as `name`.
absl::Status UploadDirectory(Env& e, const CheckpointDir& d, const std::string& name) {
  std::vector<char> buf(1 << 20);
  v1::CommitModelFilesRequest commit;
  commit.set_name(name);
  for (size_t i = 0; i < d.paths.size(); ++i) {
    grpc::ClientContext ctx;
    v1::Model m;
    auto w = e.q->UploadModel(&ctx, &m);
    v1::UploadChunk h;
    h.mutable_header()->set_name(name);
    h.mutable_header()->set_format(v1::HF_DIRECTORY);
    h.mutable_header()->set_file_path(d.paths[i]);
    h.mutable_header()->set_sha256(d.shas[i]);
    h.mutable_header()->set_size_bytes(d.sizes[i]);
    w->Write(h);
    std::ifstream in(d.abs[i], std::ios::binary);
    v1::UploadChunk c;
    while (in.read(buf.data(), static_cast<std::streamsize>(buf.size())) || in.gcount() > 0) {
      c.set_data(buf.data(), static_cast<size_t>(in.gcount()));
      if (!w->Write(c)) break;
    }
    w->WritesDone();
    if (grpc::Status s = w->Finish(); !s.ok()) return absl::InternalError(s.error_message());
    v1::ModelFile* f = commit.add_files();
    f->set_path(d.paths[i]);
    f->set_sha256(d.shas[i]);
    f->set_size_bytes(d.sizes[i]);
  }
  grpc::ClientContext ctx;
  v1::CommitModelFilesResponse r;
  grpc::Status s = e.q->CommitModelFiles(&ctx, commit, &r);
  return s.ok() ? absl::OkStatus() : absl::InternalError(s.error_message());
}

v1::JobSpec DirectorySpec() {
  v1::JobSpec s = TensorSpec();
  s.set_model("ckpt");
  s.set_scale(v1::PER_GROUP);
  s.set_group_size(128);
  return s;
}

// The process's peak resident set since the last reset (VmHWM), in MiB; ResetPeakRss starts a
// new window (Linux: 5 > /proc/self/clear_refs).
void ResetPeakRss() { std::ofstream("/proc/self/clear_refs") << "5"; }
double PeakRssMiB() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::atof(line.c_str() + 6) / 1024.0;
  }
  return 0;
}

// The first upload of the directory: every file streamed, hashed by the server, written and
// fsynced, then the commit validates the shards. The model is deleted (its files with it)
// between iterations, outside the timing.
void BM_DirectoryUpload(benchmark::State& state) {
  Env* e = GetEnv();
  CheckpointDir* d = GetCheckpointDir();
  uint64_t bytes = 0;
  for (uint64_t n : d->sizes) bytes += n;
  for (auto _ : state) {
    if (!UploadDirectory(*e, *d, "ckpt-up").ok()) {
      return state.SkipWithError("directory upload failed");
    }
    state.PauseTiming();
    grpc::ClientContext ctx;
    v1::ModelRef ref;
    ref.set_name("ckpt-up");
    v1::DeleteModelResponse r;
    e->q->DeleteModel(&ctx, ref, &r);
    state.ResumeTiming();
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(bytes));
}

// The same upload again under another name, its files already stored (a repeated or resumed
// upload that sends everything): the server hashes and verifies the bytes, writing nothing.
void BM_DirectoryUploadStored(benchmark::State& state) {
  Env* e = GetEnv();
  CheckpointDir* d = GetCheckpointDir();
  static const bool stored = UploadDirectory(*e, *d, "ckpt-stored").ok();
  if (!stored) return state.SkipWithError("directory upload failed");
  uint64_t bytes = 0;
  for (uint64_t n : d->sizes) bytes += n;
  int i = 0;
  for (auto _ : state) {
    if (!UploadDirectory(*e, *d, absl::StrCat("ckpt-again", i++)).ok()) {
      return state.SkipWithError("directory upload failed");
    }
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(bytes));
}

void BM_DirectoryJob(benchmark::State& state) {
  Env* e = GetEnv();
  CheckpointDir* d = GetCheckpointDir();
  static const bool uploaded = UploadDirectory(*e, *d, "ckpt").ok();
  if (!uploaded) return state.SkipWithError("directory upload failed");
  double peak = 0, before = 0;
  for (auto _ : state) {
    ResetPeakRss();
    before = std::max(before, PeakRssMiB());
    if (RunJob(*e, DirectorySpec()).state() != v1::SUCCEEDED) {
      return state.SkipWithError("job failed");
    }
    peak = std::max(peak, PeakRssMiB());
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(d->shard_bytes));
  state.counters["rss_before_mib"] = before;
  state.counters["peak_rss_mib"] = peak;
}

void BM_ExpandInMemoryBf16(benchmark::State& state) {
  CheckpointDir* d = GetCheckpointDir();
  core::ThreadPool pool(2);
  core::ExpansionSpec spec;
  spec.bits = 4;
  spec.terms = 2;
  spec.scale = core::ScaleGranularity::kGroup;
  spec.group_size = 128;
  core::ExpandOptions o;
  o.pool = &pool;
  const std::vector<int64_t> shape = {kDirRows, kDirCols};
  for (auto _ : state) {
    auto r = core::ExpandTensor(core::DType::kBF16, shape, d->tensor, spec, o);
    if (!r.ok()) return state.SkipWithError("expand failed");
    benchmark::DoNotOptimize(r);
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(d->tensor.size()));
}

BENCHMARK(BM_InferInProcess)->Unit(benchmark::kMillisecond)->MinTime(3)->UseRealTime();
BENCHMARK(BM_InferGrpc)->Unit(benchmark::kMillisecond)->MinTime(3)->UseRealTime();
BENCHMARK(BM_InferGrpcClients)
    ->Threads(1)
    ->Threads(8)
    ->Threads(64)
    ->Unit(benchmark::kMillisecond)
    ->MinTime(3)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_InferLmClients, unbatched, false)
    ->Threads(32)
    ->Unit(benchmark::kMillisecond)
    ->MinTime(3)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_InferLmClients, batched, true)
    ->Threads(32)
    ->Unit(benchmark::kMillisecond)
    ->MinTime(3)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_InferRecClients, unbatched, false)
    ->Threads(32)
    ->Unit(benchmark::kMillisecond)
    ->MinTime(5)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_InferRecClients, batched, true)
    ->Threads(32)
    ->Unit(benchmark::kMillisecond)
    ->MinTime(5)
    ->UseRealTime();
BENCHMARK(BM_Upload100MB)->Unit(benchmark::kMillisecond)->MinTime(2)->UseRealTime();
BENCHMARK(BM_DownloadArtifact)->Unit(benchmark::kMillisecond)->MinTime(2)->UseRealTime();
BENCHMARK(BM_TensorJobEndToEnd)->Unit(benchmark::kMillisecond)->MinTime(3)->UseRealTime();
BENCHMARK(BM_TensorExpandDirect)->Unit(benchmark::kMillisecond)->MinTime(3)->UseRealTime();
BENCHMARK(BM_DirectoryUpload)->Unit(benchmark::kMillisecond)->Iterations(2)->UseRealTime();
BENCHMARK(BM_DirectoryUploadStored)->Unit(benchmark::kMillisecond)->Iterations(2)->UseRealTime();
BENCHMARK(BM_DirectoryJob)->Unit(benchmark::kMillisecond)->Iterations(2)->UseRealTime();
BENCHMARK(BM_ExpandInMemoryBf16)->Unit(benchmark::kMillisecond)->MinTime(3)->UseRealTime();

}  // namespace
