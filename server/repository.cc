// File: server/repository.cc
#include "server/repository.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <iterator>
#include <set>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/atomic_file.h"
#include "core/artifact.h"
#include "core/safetensors.h"
#include "core/sha256.h"
#include "core/status_macros.h"
#include "server/executor.h"
#include "server/log.h"
#include "server/status_util.h"
#include "server/validation.h"

namespace fpxint::server {
namespace {

namespace fs = std::filesystem;

}  // namespace

// ---- ServedModel ----

ServedModel::ServedModel(v1::Deployment d, std::vector<std::unique_ptr<model::Model>> nets,
                         InferQueueLimits limits)
    : d_(std::move(d)), limits_(limits) {
  const v1::DynamicBatching& b = d_.batching();
  pass_target_ = b.preferred_batch_size_size() > 0
                     ? *std::max_element(b.preferred_batch_size().begin(),
                                         b.preferred_batch_size().end())
                     : b.max_batch_size();
  if (!nets.empty()) {
    weights_ = nets.front()->weight_memory();
    served_terms_sha256_ = nets.front()->packed_terms_sha256();
  }
  absl::MutexLock l(&mu_);
  for (auto& n : nets) {
    free_.push_back(static_cast<int>(instances_.size()));
    instances_.push_back({std::move(n), -1, -1, std::make_unique<WorkQueue>(1)});
  }
  timer_ = std::thread([this] { ExpireLoop(); });
}

ServedModel::~ServedModel() {
  std::deque<Call> left;
  {
    absl::MutexLock l(&mu_);
    stopping_ = true;
    timer_wake_ = true;
    left.swap(pending_);
  }
  for (Call& c : left) {
    Fail(c, absl::UnavailableError(absl::StrCat("model '", d_.name(), "' version ", d_.version(),
                                                " was unloaded while the call waited for an "
                                                "instance")));
  }
  timer_.join();
  // Each runner finishes the call it holds (stopping_ keeps it from taking another), then joins.
  for (Instance& inst : instances_) inst.runner.reset();
}

int ServedModel::max_weight_terms() const {
  return quantized() ? static_cast<int>(d_.spec().weight_terms()) : 0;
}
int ServedModel::max_act_terms() const {
  return quantized() ? static_cast<int>(d_.spec().act_terms()) : 0;
}

absl::Status ServedModel::Unloading() const {
  return absl::UnavailableError(
      absl::StrCat("model '", d_.name(), "' version ", d_.version(), " is being unloaded"));
}

absl::Status ServedModel::QueueFull() const {
  return absl::ResourceExhaustedError(absl::StrCat(
      "model '", d_.name(), "' version ", d_.version(), " has ", pending_.size(),
      " requests waiting for its ", instances_.size(),
      " instance(s) (--infer-queue-limit); retry later or raise --infer-instances"));
}

void ServedModel::Submit(int kw, int ka, absl::Time deadline, Work work) {
  Call call;
  call.kw = kw;
  call.ka = ka;
  call.deadline = deadline;
  call.t0 = SteadyNowNs();
  call.work = std::move(work);
  absl::Status refused;
  int slot = -1;
  {
    absl::MutexLock l(&mu_);
    if (stopping_) {
      refused = Unloading();
    } else if (!free_.empty()) {
      slot = free_.back();
      free_.pop_back();
    } else if (static_cast<int>(pending_.size()) >= limits_.max_waiting) {
      refused = QueueFull();
    } else {
      call.deadline = std::min(deadline, absl::Now() + limits_.max_wait);
      pending_.push_back(std::move(call));
      timer_wake_ = true;
      return;
    }
  }
  if (slot < 0) {
    std::move(call.work)(refused, 0);
    return;
  }
  instances_[slot].runner->Post(
      [this, slot, c = std::move(call)]() mutable { RunOn(slot, std::move(c)); });
}

// On instance `slot`'s runner: runs `call`, then every call waiting for an instance, until none
// waits; then the instance is free again.
void ServedModel::RunOn(int slot, Call call) {
  Instance& inst = instances_[slot];
  for (;;) {
    const uint64_t queue_ns = SteadyNowNs() - call.t0;
    const absl::Status s = Prepare(inst, call.kw, call.ka);
    std::move(call.work)(s.ok() ? absl::StatusOr<model::Model*>(inst.net.get())
                                : absl::StatusOr<model::Model*>(s),
                         queue_ns);
    absl::MutexLock l(&mu_);
    if (pending_.empty() || stopping_) {
      free_.push_back(slot);
      return;
    }
    call = std::move(pending_.front());
    pending_.pop_front();
  }
}

absl::Status ServedModel::Prepare(Instance& inst, int kw, int ka) {
  if (!quantized() || (inst.kw == kw && inst.ka == ka)) return absl::OkStatus();
  FPX_RETURN_IF_ERROR(inst.net->SetPrecision(kw, ka));
  inst.kw = kw;
  inst.ka = ka;
  return absl::OkStatus();
}

void ServedModel::Fail(Call& c, const absl::Status& s) {
  const uint64_t queue_ns = SteadyNowNs() - c.t0;
  if (c.batched) {
    Share share;
    share.queue_ns = queue_ns;
    std::move(c.batched)(s, share);
  } else {
    std::move(c.work)(s, queue_ns);
  }
}

// ---- Dynamic batching ----

namespace {

// Whether two inputs can be concatenated along the first dimension.
bool SameTrailing(const model::HostTensorRef& a, const model::HostTensorRef& b) {
  return a.type == b.type && a.shape.size() == b.shape.size() &&
         std::equal(a.shape.begin() + 1, a.shape.end(), b.shape.begin() + 1);
}

}  // namespace

void ServedModel::SubmitBatched(int kw, int ka, absl::Time deadline, model::HostTensorRef input,
                                BatchedWork work) {
  Call call;
  call.kw = kw;
  call.ka = ka;
  call.t0 = SteadyNowNs();
  call.arrived = absl::Now();
  call.batched = std::move(work);
  call.input = input;
  absl::Status refused;
  int slot = -1;
  {
    absl::MutexLock l(&mu_);
    if (stopping_) {
      refused = Unloading();
    } else if (static_cast<int>(pending_.size()) >= limits_.max_waiting) {
      refused = QueueFull();
    } else {
      call.deadline = std::min(deadline, call.arrived + limits_.max_wait);
      pending_.push_back(std::move(call));
      timer_wake_ = true;
      if (!free_.empty()) {
        slot = free_.back();
        free_.pop_back();
      }
    }
  }
  if (!refused.ok()) {
    Fail(call, refused);
    return;
  }
  if (slot >= 0) instances_[slot].runner->Post([this, slot] { RunPasses(slot); });
}

int64_t ServedModel::PassRows() const {
  if (pending_.empty()) return 0;
  const Call& first = pending_.front();
  const int64_t max = d_.batching().max_batch_size();
  int64_t rows = 0;
  for (const Call& c : pending_) {
    if (c.kw != first.kw || c.ka != first.ka || !SameTrailing(c.input, first.input)) continue;
    if (rows + c.input.shape[0] > max) break;
    rows += c.input.shape[0];
  }
  return rows;
}

bool ServedModel::PassReady() const {
  return stopping_ || pending_.empty() || PassRows() >= pass_target_;
}

std::vector<ServedModel::Call> ServedModel::TakePass() {
  std::vector<Call> pass;
  if (pending_.empty()) return pass;
  const int64_t max = d_.batching().max_batch_size();
  // Cut to the largest preferred size the waiting rows reach, if any.
  int64_t limit = max;
  const int64_t rows = PassRows();
  int64_t best = 0;
  for (uint32_t p : d_.batching().preferred_batch_size()) {
    if (static_cast<int64_t>(p) <= rows) best = std::max<int64_t>(best, p);
  }
  if (best > 0) limit = best;
  const int kw = pending_.front().kw, ka = pending_.front().ka;
  const model::HostTensorRef first = pending_.front().input;
  int64_t taken = 0;
  for (auto it = pending_.begin(); it != pending_.end();) {
    if (it->kw != kw || it->ka != ka || !SameTrailing(it->input, first)) {
      ++it;  // waits for a pass of its own kind
      continue;
    }
    // The oldest call always goes; the first one that would overflow ends the pass, so that
    // calls of one kind run in their order.
    if (!pass.empty() && taken + it->input.shape[0] > limit) break;
    taken += it->input.shape[0];
    pass.push_back(std::move(*it));
    it = pending_.erase(it);
  }
  return pass;
}

void ServedModel::RunPasses(int slot) {
  Instance& inst = instances_[slot];
  const absl::Duration delay =
      absl::Microseconds(static_cast<int64_t>(d_.batching().max_queue_delay_microseconds()));
  mu_.Lock();
  for (;;) {
    if (stopping_ || pending_.empty()) break;
    // Wait for the pass to fill, at most until its oldest call has waited the queue delay.
    const absl::Time flush = pending_.front().arrived + delay;
    if (delay > absl::ZeroDuration()) {
      mu_.AwaitWithDeadline(absl::Condition(this, &ServedModel::PassReady), flush);
    }
    if (stopping_ || pending_.empty()) break;
    std::vector<Call> pass = TakePass();
    mu_.Unlock();
    RunPass(inst, std::move(pass));
    mu_.Lock();
  }
  free_.push_back(slot);
  mu_.Unlock();
}

void ServedModel::RunPass(Instance& inst, std::vector<Call> calls) {
  const uint64_t start = SteadyNowNs();
  const absl::Status prepared = Prepare(inst, calls.front().kw, calls.front().ka);
  if (!prepared.ok()) {
    for (Call& c : calls) Fail(c, prepared);
    return;
  }
  int64_t rows = 0;
  for (const Call& c : calls) rows += c.input.shape[0];
  auto run_alone = [&](Call& c) {
    Share share;
    share.queue_ns = SteadyNowNs() - c.t0;
    share.pass_rows = c.input.shape[0];
    share.pass_calls = 1;
    share.first = true;
    bool delivered = false;
    const absl::Status st = inst.net->Forward(
        c.input, [&](absl::Span<const int64_t> shape, absl::Span<const float> values) {
          share.shape = shape;
          share.values = values;
          delivered = true;
          std::move(c.batched)(absl::OkStatus(), share);
          return absl::OkStatus();
        });
    if (!delivered) std::move(c.batched)(st.ok() ? absl::InternalError("no output") : st, share);
  };
  if (calls.size() == 1) {
    run_alone(calls.front());
    return;
  }
  // One input: the calls' rows one after another.
  const model::HostTensorRef& first = calls.front().input;
  model::HostTensor in;
  in.type = first.type;
  in.shape.assign(first.shape.begin(), first.shape.end());
  in.shape[0] = rows;
  const bool f32 = first.type == model::HostTensor::Type::kFloat32;
  const size_t elem = f32 ? sizeof(float) : sizeof(int64_t);
  (f32 ? in.f32.resize(static_cast<size_t>(in.numel())) : in.i64.resize(static_cast<size_t>(in.numel())));
  uint8_t* dst = f32 ? reinterpret_cast<uint8_t*>(in.f32.data()) : reinterpret_cast<uint8_t*>(in.i64.data());
  for (const Call& c : calls) {
    const size_t n = static_cast<size_t>(c.input.numel()) * elem;
    std::memcpy(dst, c.input.data, n);
    dst += n;
  }
  bool delivered = false;
  const absl::Status st = inst.net->Forward(
      model::HostTensorRef::Of(in),
      [&](absl::Span<const int64_t> shape, absl::Span<const float> values) -> absl::Status {
        if (shape.empty() || shape[0] % rows != 0) {
          return absl::FailedPreconditionError(absl::StrCat(
              "the output's first dimension (", shape.empty() ? 0 : shape[0],
              ") is not a multiple of the pass's ", rows, " input rows"));
        }
        const int64_t ratio = shape[0] / rows;
        const size_t per_row = shape[0] == 0 ? 0 : values.size() / static_cast<size_t>(shape[0]);
        std::vector<int64_t> part(shape.begin(), shape.end());
        int64_t off = 0;
        delivered = true;
        for (size_t i = 0; i < calls.size(); ++i) {
          Call& c = calls[i];
          const int64_t n = c.input.shape[0] * ratio;
          part[0] = n;
          Share share;
          share.shape = part;
          share.values = values.subspan(static_cast<size_t>(off) * per_row,
                                        static_cast<size_t>(n) * per_row);
          share.queue_ns = start - c.t0;
          share.pass_rows = rows;
          share.pass_calls = static_cast<int>(calls.size());
          share.first = i == 0;
          std::move(c.batched)(absl::OkStatus(), share);
          off += n;
        }
        return absl::OkStatus();
      });
  if (delivered) return;
  // The pass failed before any call had its share: each call runs alone, so that one call's
  // input (or a model that cannot batch) fails only that call.
  LogWarning(absl::StrCat("model '", d_.name(), "' version ", d_.version(), ": a pass of ",
                          calls.size(), " calls (", rows, " rows) failed (", st.message(),
                          "); running them one by one"));
  for (Call& c : calls) run_alone(c);
}

// The model's timer: ends every waiting call whose deadline (the client's, or --infer-queue-
// timeout) passes before an instance takes it.
void ServedModel::ExpireLoop() {
  absl::MutexLock l(&mu_);
  while (!stopping_) {
    absl::Time earliest = absl::InfiniteFuture();
    for (const Call& c : pending_) earliest = std::min(earliest, c.deadline);
    timer_wake_ = false;
    mu_.AwaitWithDeadline(absl::Condition(&timer_wake_), earliest);
    if (stopping_) break;
    const absl::Time now = absl::Now();
    std::vector<Call> expired;
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (it->deadline <= now) {
        expired.push_back(std::move(*it));
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
    if (expired.empty()) continue;
    mu_.Unlock();
    for (Call& c : expired) {
      Fail(c, absl::DeadlineExceededError(absl::StrCat(
                  "no instance of model '", d_.name(), "' version ", d_.version(),
                  " became free within the call's deadline or --infer-queue-timeout (",
                  absl::FormatDuration(limits_.max_wait), ")")));
    }
    mu_.Lock();
  }
}

void ServedModel::Record(bool ok, uint64_t batch, uint64_t queue_ns, uint64_t input_ns,
                         uint64_t infer_ns, uint64_t output_ns, uint64_t total_ns,
                         uint64_t executions) {
  absl::MutexLock l(&mu_);
  if (!ok) {
    stats_.fail.Add(total_ns);
    return;
  }
  stats_.success.Add(total_ns);
  stats_.queue.Add(queue_ns);
  stats_.compute_input.Add(input_ns);
  stats_.compute_infer.Add(infer_ns);
  stats_.compute_output.Add(output_ns);
  stats_.inference_count += batch;
  stats_.execution_count += executions;
  stats_.last_inference_ms = static_cast<uint64_t>(NowUnixMs());
}

ModelStats ServedModel::stats() const {
  absl::MutexLock l(&mu_);
  return stats_;
}

// ---- Repository ----

Repository::Repository(std::string dir, Journal* journal, BlobStore* store, core::ThreadPool* pool,
                       Options o)
    : dir_(std::move(dir)), journal_(journal), store_(store), pool_(pool), opts_(o) {
  std::error_code ec;
  fs::create_directories(dir_, ec);
}

absl::StatusOr<std::shared_ptr<ServedModel>> Repository::Instantiate(const v1::Deployment& d) {
  // The source is an upload: none of it runs here without a passing verdict.
  if (opts_.vetter == nullptr) return absl::InternalError("repository: no TorchScript vetter");
  FPX_RETURN_IF_ERROR(
      opts_.vetter->Require(d.source_sha256(), store_->PathOf(d.source_sha256())));
  const fs::path version_dir = fs::path(dir_) / d.name() / d.version();
  const std::string source = (version_dir / kSourceFile).string();
  const bool series = d.platform() == kPlatformSeries;
  model::Model::Options mo;
  mo.threads = opts_.torch_threads;
  mo.max_built_networks = opts_.max_precisions;
  mo.packed = series && opts_.packed;
  // A quantized version runs its job's artifact: the terms are read from it, never computed
  // again, and the file must be the one the job wrote.
  std::unique_ptr<core::SafetensorsReader> reader;
  std::optional<core::ArtifactView> artifact;
  if (series) {
    const std::string path = (version_dir / kArtifactFile).string();
    FPX_ASSIGN_OR_RETURN(reader, core::SafetensorsReader::Open(path));
    const std::string sha = core::Sha256Hex(reader->bytes());
    if (sha != d.artifact_sha256()) {
      return absl::DataLossError(absl::StrCat(
          "the version's artifact '", path, "' has SHA-256 ", sha, ", its deployment record ",
          d.artifact_sha256(), ": it changed after the job wrote it"));
    }
    FPX_ASSIGN_OR_RETURN(artifact, core::ArtifactView::Parse(*reader));
  }
  std::vector<std::unique_ptr<model::Model>> nets;
  for (int i = 0; i < std::max(1, opts_.instances); ++i) {
    FPX_ASSIGN_OR_RETURN(auto net, model::Model::Load(source, mo));
    if (series) {
      FPX_RETURN_IF_ERROR(net->UseArtifact(ToModelExpansionSpec(d.spec()), *artifact));
      FPX_RETURN_IF_ERROR(net->SetPrecision(d.spec().weight_terms(), d.spec().act_terms()));
      if (!net->packed_terms_sha256().empty()) {
        if (i == 0) FPX_RETURN_IF_ERROR(ExportPacked(d, net.get()));
        // Serving needs only the packed terms: the FP weights and expansions go.
        FPX_RETURN_IF_ERROR(net->ReleaseAllButPacked());
      } else if (i == 0 && mo.packed) {
        LogInfo(absl::StrCat("'", d.name(), "/", d.version(), "' is served unpacked: its W×A "
                             "spec has layers the integer ops do not take"));
      }
    }
    nets.push_back(std::move(net));
  }
  return std::make_shared<ServedModel>(d, std::move(nets), opts_.infer_queue);
}

absl::Status Repository::ExportPacked(const v1::Deployment& d, model::Model* net) {
  const fs::path version_dir = fs::path(dir_) / d.name() / d.version();
  const fs::path packed = version_dir / kPackedExportFile;
  std::error_code ec;
  if (fs::exists(packed, ec)) return absl::OkStatus();
  const std::string tmp = core::TempPathFor(packed.string());
  absl::Status s = net->SavePacked(tmp);
  if (s.ok()) s = core::PublishFile(tmp, packed.string());
  if (!s.ok()) fs::remove(tmp, ec);
  return s;
}

absl::Status Repository::ResolveArtifact(v1::Deployment* d) {
  if (d->platform() != kPlatformSeries || !d->artifact_sha256().empty()) return absl::OkStatus();
  // A record written before versions were built from their job's artifact: find that artifact.
  FPX_ASSIGN_OR_RETURN(std::optional<v1::Job> job, journal_->GetJob(d->job_id()));
  if (job) {
    for (const v1::Artifact& a : job->artifacts()) {
      if (a.kind() == kPackedArtifactKind) {
        d->set_artifact_sha256(a.sha256());
        return journal_->PutDeployment(*d);
      }
    }
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "deployment '", d->name(), "/", d->version(), "' has no packed artifact to serve (its job '",
      d->job_id(), "' and its artifacts are gone); run the job again with a deploy"));
}

absl::Status Repository::WriteVersionDir(const v1::Deployment& d) {
  // Checked at SubmitJob already; checked again where the names become paths.
  FPX_RETURN_IF_ERROR(CheckName(d.name(), "deployment name"));
  FPX_RETURN_IF_ERROR(CheckVersion(d.version(), "deployment version"));
  const fs::path final_dir = fs::path(dir_) / d.name() / d.version();
  const bool series = d.platform() == kPlatformSeries;
  std::error_code ec;
  if (fs::exists(final_dir / "config.json", ec) &&
      (!series || fs::exists(final_dir / kArtifactFile, ec))) {
    return absl::OkStatus();
  }
  // Replicas may publish the same version at once: each writes its own temporary directory.
  const fs::path tmp =
      fs::path(dir_) / d.name() /
      absl::StrCat(".", d.version(), ".",
                   opts_.replica_id.empty() ? absl::StrCat(::getpid()) : opts_.replica_id, ".tmp");
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create '", tmp.string(), "'"));
  // Hard links to the blobs (copies across file systems): the version stays servable whatever
  // happens to the job that made it.
  auto place = [&](const std::string& sha, const char* file) -> absl::Status {
    const std::string blob = store_->PathOf(sha);
    const std::string path = (tmp / file).string();
    if (::link(blob.c_str(), path.c_str()) != 0) {
      fs::copy_file(blob, path, ec);
      if (ec) return absl::InternalError(absl::StrCat("cannot place '", file, "': ", ec.message()));
    }
    return absl::OkStatus();
  };
  FPX_RETURN_IF_ERROR(place(d.source_sha256(), kSourceFile));
  if (series) FPX_RETURN_IF_ERROR(place(d.artifact_sha256(), kArtifactFile));
  FPX_ASSIGN_OR_RETURN(std::string json, ProtoToJson(d));
  FPX_RETURN_IF_ERROR(core::WriteFileAtomic((tmp / "config.json").string(), json));
  if (fs::exists(final_dir / "config.json", ec) &&
      (!series || fs::exists(final_dir / kArtifactFile, ec))) {
    fs::remove_all(tmp, ec);  // another replica published the same version meanwhile
    return absl::OkStatus();
  }
  fs::remove_all(final_dir, ec);
  fs::rename(tmp, final_dir, ec);
  if (ec) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
    // Another replica published the same version a moment before.
    if (!fs::exists(final_dir / "config.json", ignored)) {
      return absl::InternalError(absl::StrCat("cannot publish '", final_dir.string(), "'"));
    }
  }
  return core::SyncDir((fs::path(dir_) / d.name()).string());
}

absl::Status Repository::LoadDeployment(v1::Deployment d, bool if_not_loaded) {
  if (if_not_loaded) {
    absl::MutexLock l(&mu_);
    if (auto it = loaded_.find(d.name());
        it != loaded_.end() && it->second.count(d.version()) > 0) {
      return absl::OkStatus();
    }
  }
  FPX_RETURN_IF_ERROR(ResolveArtifact(&d));
  FPX_RETURN_IF_ERROR(WriteVersionDir(d));
  // The marker outlives the process only when the load never returned (a crash in LibTorch, an
  // abort, a kill): Restore() then quarantines the version instead of loading it again.
  const std::string marker = LoadingMarker(d);
  FPX_RETURN_IF_ERROR(core::WriteFileAtomic(marker, absl::StrCat(NowUnixMs(), "\n")));
  auto served = Instantiate(d);
  std::error_code marker_ec;
  fs::remove(marker, marker_ec);
  absl::MutexLock l(&mu_);
  const std::string key = d.name() + "/" + d.version();
  if (!served.ok()) {
    failures_[key] = std::string(served.status().message());
    return absl::Status(
        served.status().code(),
        absl::StrCat("model '", key, "' failed to load: ", served.status().message()));
  }
  failures_.erase(key);
  const model::Model::WeightMemory& w = (*served)->weights();
  LogInfo(absl::StrCat("loaded '", key, "' (", d.platform(), "): ", w.packed_layers,
                       " layers packed, weights ", w.resident_bytes, " bytes resident per instance of ",
                       w.fp32_bytes, " in FP32 (",
                       absl::StrFormat("%.3f", w.fp32_bytes ? double(w.resident_bytes) / w.fp32_bytes : 0.0),
                       ")"));
  if (opts_.metrics != nullptr) {
    opts_.metrics->SetModelWeights(d.name(), d.version(), w.fp32_bytes, w.resident_bytes);
  }
  loaded_[d.name()][d.version()] = *std::move(served);
  return absl::OkStatus();
}

std::string Repository::LoadingMarker(const v1::Deployment& d) const {
  return (fs::path(dir_) / d.name() / d.version() /
          (opts_.replica_id.empty() ? std::string(".loading")
                                    : absl::StrCat(".loading.", opts_.replica_id)))
      .string();
}

int Repository::Sync() {
  absl::MutexLock load_lock(&load_mu_);
  auto all = journal_->ListDeployments();
  if (!all.ok()) {
    LogError(absl::StrCat("deployment sync: ", all.status().message()));
    return 0;
  }
  std::set<std::string> wanted;
  for (const v1::Deployment& d : *all) {
    if (d.loaded()) wanted.insert(d.name() + "/" + d.version());
  }
  int changed = 0;
  {
    absl::MutexLock l(&mu_);
    for (auto it = loaded_.begin(); it != loaded_.end();) {
      for (auto v = it->second.begin(); v != it->second.end();) {
        if (wanted.count(it->first + "/" + v->first) > 0) {
          ++v;
          continue;
        }
        LogInfo(absl::StrCat("unloaded '", it->first, "/", v->first,
                             "' (unloaded or deleted on another replica)"));
        if (opts_.metrics != nullptr) opts_.metrics->ClearModelWeights(it->first, v->first);
        v = it->second.erase(v);  // requests in flight keep their shared_ptr
        ++changed;
      }
      it = it->second.empty() ? loaded_.erase(it) : std::next(it);
    }
  }
  for (const v1::Deployment& d : *all) {
    if (!d.loaded()) continue;
    {
      absl::MutexLock l(&mu_);
      const std::string key = d.name() + "/" + d.version();
      auto it = loaded_.find(d.name());
      if (it != loaded_.end() && it->second.count(d.version()) > 0) continue;
      if (failures_.count(key) > 0) continue;
    }
    if (LoadDeployment(d, /*if_not_loaded=*/true).ok()) ++changed;  // failures go to failures_
  }
  return changed;
}

void Repository::Restore() {
  auto all = journal_->ListDeployments();
  if (!all.ok()) return;
  for (v1::Deployment& d : *all) {
    if (!d.loaded()) continue;
    std::error_code ec;
    if (fs::exists(LoadingMarker(d), ec)) {
      // The last process died while loading this version: loading it again at every start
      // could crash-loop the server. It waits for an explicit RepositoryModelLoad.
      const std::string reason =
          "quarantined: the server stopped while loading this version (a crash or kill during "
          "the load), so it is not loaded at start-up; RepositoryModelLoad tries again";
      LogError(absl::StrCat("deployment '", d.name(), "/", d.version(), "' ", reason));
      d.set_loaded(false);
      d.set_quarantine_reason(reason);  // what Index() shows for it
      if (journal_->PutDeployment(d).ok()) fs::remove(LoadingMarker(d), ec);
      continue;
    }
    absl::MutexLock load_lock(&load_mu_);
    LoadDeployment(d).IgnoreError();  // recorded in failures_
  }
}

std::vector<std::string> Repository::Versions(const std::string& name) {
  std::vector<std::string> out;
  auto all = journal_->ListDeployments();
  if (!all.ok()) return out;
  for (const v1::Deployment& d : *all) {
    if (d.name() == name) out.push_back(d.version());
  }
  return out;
}

absl::StatusOr<v1::Deployment> Repository::Deploy(v1::Deployment d, bool load) {
  if (d.version().empty()) {
    int64_t next = 1;
    for (const std::string& v : Versions(d.name())) {
      int64_t n = 0;
      if (absl::SimpleAtoi(v, &n)) next = std::max(next, n + 1);
    }
    d.set_version(std::to_string(next));
  }
  d.set_created_unix_ms(NowUnixMs());
  d.set_loaded(load);
  if (d.platform() == kPlatformSeries && !IsSha256Hex(d.artifact_sha256())) {
    return absl::InvalidArgumentError(
        "a quantized deployment needs its job's packed artifact (artifact_sha256)");
  }
  FPX_RETURN_IF_ERROR(WriteVersionDir(d));
  absl::MutexLock load_lock(&load_mu_);
  FPX_RETURN_IF_ERROR(journal_->PutDeployment(d));
  if (load) FPX_RETURN_IF_ERROR(LoadDeployment(d));
  return d;
}

absl::Status Repository::Load(const std::string& name, bool may_load_deployments,
                              bool may_deploy_uploads) {
  FPX_ASSIGN_OR_RETURN(std::vector<v1::Deployment> all, journal_->ListDeployments());
  std::vector<v1::Deployment> mine;
  for (const v1::Deployment& d : all) {
    if (d.name() == name) mine.push_back(d);
  }
  if (mine.empty()) {
    FPX_ASSIGN_OR_RETURN(std::optional<v1::Model> m, journal_->GetModel(name));
    if (!m) {
      return absl::NotFoundError(absl::StrCat(
          "model_name: '", name, "' is neither a deployed model nor an uploaded model"));
    }
    if (!may_deploy_uploads) {
      return absl::PermissionDeniedError(absl::StrCat(
          "model_name: '", name, "' is an upload with no deployment; serving an upload needs "
          "the 'quantize' or 'admin' role"));
    }
    if (m->format() != v1::TORCHSCRIPT) {
      return absl::FailedPreconditionError(
          absl::StrCat("model_name: '", name, "' is a ", v1::ModelFormat_Name(m->format()),
                       " upload; only TORCHSCRIPT models can be served"));
    }
    v1::Deployment d;
    d.set_name(name);
    d.set_version("1");
    d.set_platform(kPlatformFp);
    d.set_source_sha256(m->sha256());
    *d.mutable_inputs() = m->inputs();
    return Deploy(d, true).status();
  }
  if (!may_load_deployments) {
    return absl::PermissionDeniedError(absl::StrCat(
        "model_name: '", name, "' is a deployment; loading it needs the 'infer' or 'admin' role"));
  }
  absl::MutexLock load_lock(&load_mu_);
  for (v1::Deployment& d : mine) {
    d.set_loaded(true);
    d.clear_quarantine_reason();
    FPX_RETURN_IF_ERROR(journal_->PutDeployment(d));
    FPX_RETURN_IF_ERROR(LoadDeployment(d));
  }
  return absl::OkStatus();
}

absl::Status Repository::Unload(const std::string& name) {
  absl::MutexLock load_lock(&load_mu_);
  FPX_ASSIGN_OR_RETURN(std::vector<v1::Deployment> all, journal_->ListDeployments());
  bool found = false;
  for (v1::Deployment& d : all) {
    if (d.name() != name) continue;
    found = true;
    d.set_loaded(false);
    FPX_RETURN_IF_ERROR(journal_->PutDeployment(d));
  }
  if (!found) return absl::NotFoundError(absl::StrCat("model_name: '", name, "' is not deployed"));
  absl::MutexLock l(&mu_);
  if (auto it = loaded_.find(name); it != loaded_.end() && opts_.metrics != nullptr) {
    for (const auto& [version, served] : it->second) opts_.metrics->ClearModelWeights(name, version);
  }
  loaded_.erase(name);  // requests in flight keep their shared_ptr until they finish
  return absl::OkStatus();
}

std::shared_ptr<ServedModel> Repository::StateOf(const v1::Deployment& d, std::string* reason) {
  if (auto it = loaded_.find(d.name()); it != loaded_.end()) {
    if (auto v = it->second.find(d.version()); v != it->second.end()) {
      reason->clear();
      return v->second;
    }
  }
  const auto f = failures_.find(d.name() + "/" + d.version());
  *reason = f != failures_.end()              ? f->second
            : !d.quarantine_reason().empty() ? d.quarantine_reason()
                                              : "unloaded";
  return nullptr;
}

std::vector<Repository::IndexEntry> Repository::Index() {
  std::vector<IndexEntry> out;
  auto all = journal_->ListDeployments();
  if (!all.ok()) return out;
  absl::MutexLock l(&mu_);
  for (const v1::Deployment& d : *all) {
    IndexEntry e{d.name(), d.version(), "UNAVAILABLE", ""};
    if (StateOf(d, &e.reason) != nullptr) e.state = "READY";
    out.push_back(e);
  }
  return out;
}

absl::StatusOr<std::shared_ptr<ServedModel>> Repository::Get(const std::string& name,
                                                             const std::string& version) {
  {
    absl::MutexLock l(&mu_);
    auto it = loaded_.find(name);
    if (it != loaded_.end() && !it->second.empty()) {
      if (version.empty()) {
        // The highest version number.
        std::shared_ptr<ServedModel> best;
        int64_t best_n = -1;
        for (const auto& [v, m] : it->second) {
          int64_t n = 0;
          if (!absl::SimpleAtoi(v, &n)) n = 0;
          if (n > best_n) {
            best_n = n;
            best = m;
          }
        }
        return best;
      }
      auto v = it->second.find(version);
      if (v != it->second.end()) return v->second;
    }
  }
  const std::vector<std::string> versions = Versions(name);
  if (versions.empty()) {
    return absl::NotFoundError(absl::StrCat("model_name: no model '", name, "' is deployed"));
  }
  if (!version.empty() && std::find(versions.begin(), versions.end(), version) == versions.end()) {
    return absl::NotFoundError(
        absl::StrCat("model_version: model '", name, "' has no version '", version, "'"));
  }
  return absl::FailedPreconditionError(
      absl::StrCat("model '", name, "' is not loaded (RepositoryModelLoad loads it)"));
}

absl::StatusOr<v1::DeploymentStatus> Repository::Describe(const std::string& name,
                                                          const std::string& version) {
  FPX_ASSIGN_OR_RETURN(std::vector<v1::Deployment> all, journal_->ListDeployments());
  const v1::Deployment* d = nullptr;
  bool any_version = false;
  for (const v1::Deployment& x : all) {  // ascending versions: the last match is the highest
    if (x.name() != name) continue;
    any_version = true;
    if (version.empty() || x.version() == version) d = &x;
  }
  if (d == nullptr) {
    return absl::NotFoundError(
        any_version ? absl::StrCat("version: model '", name, "' has no version '", version, "'")
                    : absl::StrCat("name: no model '", name, "' is deployed"));
  }
  v1::DeploymentStatus out;
  out.set_name(d->name());
  out.set_version(d->version());
  out.set_platform(d->platform());
  out.set_job_id(d->job_id());
  out.set_source_sha256(d->source_sha256());
  out.set_artifact_sha256(d->artifact_sha256());
  out.set_created_unix_ms(d->created_unix_ms());
  *out.mutable_batching() = d->batching();
  const bool series = d->platform() == kPlatformSeries;
  if (series) {
    *out.mutable_spec() = d->spec();
    const int64_t k = d->spec().weight_terms();
    out.set_composition(
        d->spec().granularity() == v1::MODEL
            ? absl::StrCat("Abelian sum of ", k, " basis models (term k of every expanded layer "
                           "is basis model k), summed inside each layer before its nonlinearity")
            : absl::StrCat("each expanded layer runs the sum of its first K' <= ", k,
                           " terms (fpxint_terms)"));
    if (d->spec().target_rel_error() > 0 && !d->job_id().empty()) {
      // The per-layer K of an error budget. A deleted job leaves the deployment without it.
      FPX_ASSIGN_OR_RETURN(std::optional<v1::Job> job, journal_->GetJob(d->job_id()));
      if (job.has_value()) {
        for (const v1::LayerResult& l : job->result().layers()) {
          v1::LayerTerms* t = out.add_layer_terms();
          t->set_name(l.name());
          t->set_weight_terms(l.weight_terms());
        }
        if (job->result().has_allocation()) {
          *out.mutable_allocation() = job->result().allocation();
        }
      }
    }
  } else {
    out.set_composition("the uploaded TorchScript as it is (FP)");
  }
  std::shared_ptr<ServedModel> served;
  {
    absl::MutexLock l(&mu_);
    served = StateOf(*d, out.mutable_reason());
  }
  out.set_state(served != nullptr ? "READY" : "UNAVAILABLE");
  if (served != nullptr) {
    out.set_served_terms_sha256(served->served_terms_sha256());
    out.set_fp32_weight_bytes(served->weights().fp32_bytes);
    out.set_resident_weight_bytes(served->weights().resident_bytes);
    out.set_packed_layers(served->weights().packed_layers);
    out.set_folded_layers(served->weights().folded_layers);
    out.set_integer_layers(served->weights().integer_layers);
    out.set_fused_post_ops(served->weights().fused_post_ops);
    out.set_fused_tail_steps(served->weights().fused_tail_steps);
  }
  return out;
}

std::vector<std::shared_ptr<ServedModel>> Repository::Loaded() {
  std::vector<std::shared_ptr<ServedModel>> out;
  absl::MutexLock l(&mu_);
  for (const auto& [name, versions] : loaded_) {
    for (const auto& [v, m] : versions) out.push_back(m);
  }
  return out;
}

}  // namespace fpxint::server
