// File: server/repository.h
//
// The inference model repository, Triton-like on disk: <data>/repository/<name>/<version>/ holds
// model.pt (the TorchScript source, a hard link to its blob), for quantized versions
// model.fpxint.safetensors (the job's packed artifact, a hard link to its blob) and
// model.packed.pt (the packed network, exported once for use outside the server), and
// config.json (the Deployment record). A version directory appears by rename, complete. The
// journal remembers which versions are loaded, so a restart serves the same models.
//
// FP deployments (platform "pytorch_torchscript") run the TorchScript as it is. Quantized ones
// ("fpxint_series") are built from the job's artifact: the source gives the network, the
// artifact every expanded layer's terms (model::Model::UseArtifact), checked against the
// artifact's SHA-256 in the record; nothing is expanded again, so what a user downloads is what
// is served (ServedModel::served_terms_sha256 shows it). They run with the first K_w' ≤ K_w
// weight terms (request parameter fpxint_terms). A MODEL-granularity job's K basis models are
// served as their Abelian sum: term k of every layer is basis model k, summed inside each layer
// before its nonlinearity, which equals running the basis models in lock-step and adding them.
//
// Each loaded version keeps `instances` copies of the network (a Model runs one request at a
// time), each with its own thread; requests beyond that wait in the version's queue, without a
// thread, until an instance takes them (the queue time is in the statistics). A version deployed
// with dynamic batching (Deployment.batching) runs waiting requests of the same precision and
// trailing shape as one forward pass over their concatenated first dimensions (SubmitBatched).
//
// Thread-safe.
#ifndef FPXINT_SERVER_REPOSITORY_H_
#define FPXINT_SERVER_REPOSITORY_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/thread_pool.h"
#include "fpxint/v1/server_state.pb.h"
#include "model/model.h"
#include "server/journal.h"
#include "server/metrics.h"
#include "server/store.h"
#include "server/vetting.h"
#include "server/work_queue.h"

namespace fpxint::server {

inline constexpr char kPlatformFp[] = "pytorch_torchscript";
inline constexpr char kPlatformSeries[] = "fpxint_series";
// Files of a version directory: the uploaded TorchScript, the job's packed artifact, and the
// packed network exported for use outside the server (torch.jit.load with the fpxint op library).
inline constexpr char kSourceFile[] = "model.pt";
inline constexpr char kArtifactFile[] = "model.fpxint.safetensors";
inline constexpr char kPackedExportFile[] = "model.packed.pt";

struct DurationStat {
  uint64_t count = 0;
  uint64_t ns = 0;
  void Add(uint64_t d) {
    ++count;
    ns += d;
  }
};

struct ModelStats {
  uint64_t last_inference_ms = 0;
  uint64_t inference_count = 0;  // batch elements
  uint64_t execution_count = 0;
  DurationStat success, fail, queue, compute_input, compute_infer, compute_output;
};

// How long and how many ModelInfer calls may wait for a free instance of one served version.
struct InferQueueLimits {
  int max_waiting = 64;                           // beyond: RESOURCE_EXHAUSTED
  absl::Duration max_wait = absl::Seconds(10);    // beyond (or the call's deadline): DEADLINE_EXCEEDED
};

class ServedModel {
 public:
  ServedModel(v1::Deployment d, std::vector<std::unique_ptr<model::Model>> instances,
              InferQueueLimits limits = {});
  ~ServedModel();

  const v1::Deployment& deployment() const { return d_; }
  bool quantized() const { return d_.platform() == kPlatformSeries; }
  int max_weight_terms() const;
  int max_act_terms() const;

  // What runs a call: on an instance's own thread with its network set to the call's precision,
  // or with the status that ended the call before it ran. queue_ns: time spent waiting for an
  // instance.
  using Work = absl::AnyInvocable<void(absl::StatusOr<model::Model*> net, uint64_t queue_ns) &&>;

  // Runs `work` exactly once with the first kw weight / ka activation terms (ignored for FP
  // models): on a free instance's thread, or after the calls before it, on the first instance
  // that frees up. Never blocks. Ends it instead with RESOURCE_EXHAUSTED when max_waiting calls
  // already wait (inline), DEADLINE_EXCEEDED when no instance takes it before `deadline` or
  // max_wait (on the model's timer thread), UNAVAILABLE when the model is unloaded first, or
  // SetPrecision's error.
  void Submit(int kw, int ka, absl::Time deadline, Work work);

  // Dynamic batching (deployment().batching().max_batch_size() > 0).
  bool batching() const { return d_.batching().max_batch_size() > 0; }
  // A batched call's share of a forward pass's output, valid during the callback.
  struct Share {
    absl::Span<const int64_t> shape;  // first dimension: the call's rows × the pass's ratio
    absl::Span<const float> values;
    uint64_t queue_ns = 0;     // from Submit until its pass started
    int64_t pass_rows = 0;     // first-dimension rows of the pass it ran in
    int pass_calls = 0;        // calls in that pass
    bool first = false;        // the first call of its pass (records the execution once)
  };
  using BatchedWork = absl::AnyInvocable<void(const absl::Status& s, const Share& share) &&>;
  // Runs `input` (rank >= 1, borrowed until `work` has run; its first dimension ≤
  // max_batch_size) in a pass with other waiting calls of the same kw, ka, type and trailing
  // shape: a pass starts once its rows reach the largest preferred size (or max_batch_size), or
  // once its oldest call has waited max_queue_delay_microseconds, and is cut to the largest
  // preferred size it exceeds. `work` runs exactly once, with its share, or with the status that
  // ended the call (the same refusals as Submit; a pass that fails runs its calls again one by
  // one, so one call cannot fail another).
  void SubmitBatched(int kw, int ka, absl::Time deadline, model::HostTensorRef input,
                     BatchedWork work);

  // executions: forward passes to count (a batched pass counts once, at its first call).
  void Record(bool ok, uint64_t batch, uint64_t queue_ns, uint64_t input_ns, uint64_t infer_ns,
              uint64_t output_ns, uint64_t total_ns, uint64_t executions = 1);
  ModelStats stats() const;
  // One instance's weight memory (model::Model::weight_memory at load).
  const model::Model::WeightMemory& weights() const { return weights_; }
  // model::Model::packed_terms_sha256 of the loaded network: equal to the same digest of the
  // artifact it was built from (empty for FP and dense-served versions).
  const std::string& served_terms_sha256() const { return served_terms_sha256_; }

 private:
  // One thread per instance runs its forward passes: LibTorch's OpenMP keeps a thread team per
  // calling thread, so running them on gRPC's many threads would create team after team and
  // oversubscribe the cores. A call runs on the thread of the instance that takes it; a freed
  // instance takes the oldest waiting call itself, so no thread waits for another.
  struct Instance {
    std::unique_ptr<model::Model> net;
    int kw = -1, ka = -1;  // the network's current precision (its runner's thread only)
    std::unique_ptr<WorkQueue> runner;
  };
  struct Call {
    int kw = 0, ka = 0;
    absl::Time deadline;
    uint64_t t0 = 0;  // SteadyNowNs at Submit
    Work work;        // Submit's calls
    // SubmitBatched's calls.
    BatchedWork batched;
    model::HostTensorRef input;
    absl::Time arrived;
  };
  // Ends a call that never ran with `s`.
  void Fail(Call& c, const absl::Status& s);
  // Why Submit / SubmitBatched refuse a call.
  absl::Status Unloading() const;
  absl::Status QueueFull() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RunOn(int slot, Call call);
  // Batching: on instance `slot`'s runner, forms and runs passes until no call waits.
  void RunPasses(int slot);
  // Rows of the calls the oldest waiting call could share a pass with (up to max_batch_size).
  int64_t PassRows() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool PassReady() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<Call> TakePass() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RunPass(Instance& inst, std::vector<Call> calls);
  // Sets the network's precision for a call; the error ends the calls instead.
  absl::Status Prepare(Instance& inst, int kw, int ka);
  void ExpireLoop();

  v1::Deployment d_;
  mutable absl::Mutex mu_;
  std::vector<Instance> instances_;  // fixed after construction
  std::vector<int> free_ ABSL_GUARDED_BY(mu_);
  std::deque<Call> pending_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int64_t pass_target_ = 0;  // rows at which a pass starts without waiting (batching)
  bool timer_wake_ ABSL_GUARDED_BY(mu_) = false;
  const InferQueueLimits limits_;
  ModelStats stats_ ABSL_GUARDED_BY(mu_);
  model::Model::WeightMemory weights_;
  std::string served_terms_sha256_;
  std::thread timer_;  // ExpireLoop
};

class Repository {
 public:
  struct Options {
    int instances = 1;
    int torch_threads = 2;
    // Weight-only quantized versions run on the packed ops: expanded and packed once into
    // <repo>/<name>/<version>/model.packed.pt (reused after restarts), every instance loaded
    // from it holding only the packed weights.
    bool packed = true;
    Metrics* metrics = nullptr;  // fpxint_model_weight_bytes per loaded version (optional)
    // Every version's source is an upload: it is loaded only with a passing verdict. Required.
    TorchScriptVetter* vetter = nullptr;
    InferQueueLimits infer_queue;
    int max_precisions = 8;  // dense networks per instance (model::Model::Options)
    // Replicas share the repository directory: each marks its own loads in progress
    // (.loading.<replica_id>). Empty: one server alone (.loading).
    std::string replica_id;
  };
  Repository(std::string dir, Journal* journal, BlobStore* store, core::ThreadPool* pool,
             Options o);

  // Loads every deployment the journal marks loaded (at start-up). Failures are logged into
  // the index as UNAVAILABLE with the reason, not fatal.
  // A version whose load never returned in the last process (its .loading marker is still
  // there) is quarantined instead: marked not loaded, with the reason kept for RepositoryIndex.
  void Restore();

  // Converges to the journal's deployments, which other replicas change too: loads the versions
  // marked loaded that are not loaded here, unloads those no longer marked loaded (or deleted).
  // A version that failed to load here is not retried by it (RepositoryModelLoad retries).
  // Returns how many versions it loaded or unloaded.
  int Sync();

  // Writes a new version (d.version() empty: the next number) and loads it when `load`.
  absl::StatusOr<v1::Deployment> Deploy(v1::Deployment d, bool load);
  // RepositoryModelLoad: the versions of `name` (when `may_load_deployments`: the caller has the
  // infer or admin role); or, for an uploaded TorchScript model of that name with no deployment
  // yet, an FP deployment of it as version 1 (when `may_deploy_uploads`: quantize or admin).
  // PermissionDenied naming the role otherwise.
  absl::Status Load(const std::string& name, bool may_load_deployments, bool may_deploy_uploads);
  absl::Status Unload(const std::string& name);

  struct IndexEntry {
    std::string name, version, state, reason;
  };
  std::vector<IndexEntry> Index();

  // A ready version: `version` empty picks the highest loaded one. NotFound for an unknown
  // model, FailedPrecondition (UNAVAILABLE state) for one that is not loaded.
  absl::StatusOr<std::shared_ptr<ServedModel>> Get(const std::string& name,
                                                   const std::string& version);
  // GetDeployment: version `version` of `name` (empty: the highest number), loaded or not.
  // NotFound naming the field.
  absl::StatusOr<v1::DeploymentStatus> Describe(const std::string& name,
                                                const std::string& version);
  // Versions known for `name` (loaded or not), ascending.
  std::vector<std::string> Versions(const std::string& name);
  std::vector<std::shared_ptr<ServedModel>> Loaded();

 private:
  absl::StatusOr<std::shared_ptr<ServedModel>> Instantiate(const v1::Deployment& d);
  // Writes the packed network of a version's first instance as kPackedExportFile, once.
  absl::Status ExportPacked(const v1::Deployment& d, model::Model* net);
  // The loaded model of version `d` (nullptr when it is not loaded, *reason then saying why:
  // its load failure, its quarantine, or "unloaded"). What Index and Describe report.
  std::shared_ptr<ServedModel> StateOf(const v1::Deployment& d, std::string* reason)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Fills artifact_sha256 of a quantized record that predates it from its job's artifacts.
  absl::Status ResolveArtifact(v1::Deployment* d);
  absl::Status WriteVersionDir(const v1::Deployment& d);
  // `if_not_loaded`: a version already loaded here is left as it is (Sync).
  absl::Status LoadDeployment(v1::Deployment d, bool if_not_loaded = false)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(load_mu_);

  const std::string dir_;
  Journal* journal_;
  BlobStore* store_;
  core::ThreadPool* pool_;
  std::string LoadingMarker(const v1::Deployment& d) const;
  const Options opts_;
  // One load at a time (loads use both cores). Also held across every change of what is loaded
  // (Deploy, Load, Unload, Sync: the journal write and the map update together), so that Sync
  // never acts on a deployment list older than a local change.
  absl::Mutex load_mu_;
  absl::Mutex mu_;
  // name -> version -> loaded model
  std::map<std::string, std::map<std::string, std::shared_ptr<ServedModel>>> loaded_
      ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string> failures_ ABSL_GUARDED_BY(mu_);  // "name/version" -> reason
};

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_REPOSITORY_H_
