#include "server/metrics.h"

#include <dirent.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"
#include "proto/status_names.h"

namespace fpxint::server {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Counter;
using prometheus::Family;
using prometheus::Gauge;
using prometheus::Histogram;

// Latency buckets from 0.5 ms to 60 s (inference and RPCs), and job durations up to 2 h.
const Histogram::BucketBoundaries& LatencyBuckets() {
  static const Histogram::BucketBoundaries b = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                0.1,    0.25,  0.5,    1,     2.5,  5,     10,
                                                30,     60};
  return b;
}
const Histogram::BucketBoundaries& JobBuckets() {
  static const Histogram::BucketBoundaries b = {0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
                                                1800, 3600, 7200};
  return b;
}

prometheus::MetricFamily Single(const std::string& name, const std::string& help,
                                prometheus::MetricType type, double value) {
  prometheus::MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = type;
  prometheus::ClientMetric m;
  if (type == prometheus::MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  f.metric.push_back(m);
  return f;
}

// process_* metrics (the names the Prometheus client libraries use), read from /proc on scrape.
class ProcessCollector : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    std::ifstream in("/proc/self/stat");
    std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // Fields after the command name (which is in parentheses and may contain spaces).
    const size_t close = stat.rfind(')');
    if (close == std::string::npos) return out;
    std::vector<std::string> f = absl::StrSplit(stat.substr(close + 2), ' ');
    // f[0] is field 3 (state): utime = field 14 -> f[11], stime f[12], starttime f[19],
    // vsize f[20], rss (pages) f[21].
    if (f.size() < 22) return out;
    const double tick = static_cast<double>(::sysconf(_SC_CLK_TCK));
    const double page = static_cast<double>(::sysconf(_SC_PAGESIZE));
    out.push_back(Single("process_cpu_seconds_total", "User and system CPU time in seconds.",
                         prometheus::MetricType::Counter,
                         (std::stod(f[11]) + std::stod(f[12])) / tick));
    out.push_back(Single("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                         prometheus::MetricType::Gauge, std::stod(f[20])));
    out.push_back(Single("process_resident_memory_bytes", "Resident memory size in bytes.",
                         prometheus::MetricType::Gauge, std::stod(f[21]) * page));
    out.push_back(Single("process_start_time_seconds", "Start time since the epoch in seconds.",
                         prometheus::MetricType::Gauge, BootTime() + std::stod(f[19]) / tick));
    int fds = 0;
    if (DIR* d = ::opendir("/proc/self/fd")) {
      while (::readdir(d) != nullptr) ++fds;
      ::closedir(d);
      fds -= 3;  // ".", ".." and the directory's own descriptor
    }
    out.push_back(Single("process_open_fds", "Open file descriptors.",
                         prometheus::MetricType::Gauge, fds));
    return out;
  }

 private:
  static double BootTime() {
    std::ifstream in("/proc/stat");
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("btime ", 0) == 0) return std::stod(line.substr(6));
    }
    return 0;
  }
};

}  // namespace

struct Metrics::Impl {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::shared_ptr<ProcessCollector> process = std::make_shared<ProcessCollector>();

  Family<Counter>& infer_requests = BuildCounter()
      .Name("fpxint_inference_requests_total")
      .Help("ModelInfer requests by model, version and gRPC status")
      .Register(*registry);
  Family<Histogram>& infer_duration = BuildHistogram()
      .Name("fpxint_inference_request_duration_seconds")
      .Help("ModelInfer time from arrival to response, in seconds")
      .Register(*registry);
  Family<Histogram>& infer_batch_rows = BuildHistogram()
      .Name("fpxint_inference_batch_rows")
      .Help("First-dimension rows per forward pass of a model with dynamic batching")
      .Register(*registry);
  Family<Histogram>& infer_batch_calls = BuildHistogram()
      .Name("fpxint_inference_batch_requests")
      .Help("ModelInfer requests per forward pass of a model with dynamic batching")
      .Register(*registry);
  Family<Histogram>& infer_queue = BuildHistogram()
      .Name("fpxint_inference_queue_duration_seconds")
      .Help("Time a ModelInfer request waited for a free model instance, in seconds")
      .Register(*registry);
  Gauge& pending = BuildGauge()
      .Name("fpxint_inference_pending_requests")
      .Help("ModelInfer requests being decoded, queued or computed")
      .Register(*registry)
      .Add({});
  Family<Counter>& jobs = BuildCounter()
      .Name("fpxint_jobs_total")
      .Help("Expansion jobs by granularity and state (QUEUED counts submissions)")
      .Register(*registry);
  Counter& job_writes_fenced = BuildCounter()
      .Name("fpxint_job_writes_fenced_total")
      .Help("Writes of a job refused because this replica had lost its lease (another replica "
            "runs it now)")
      .Register(*registry)
      .Add({});
  Family<Gauge>& replica = BuildGauge()
      .Name("fpxint_replica_info")
      .Help("This replica's --replica-id and journal backend (value 1)")
      .Register(*registry);
  Gauge& jobs_queued = BuildGauge()
      .Name("fpxint_jobs_queued")
      .Help("Jobs waiting for a worker, on every replica of the journal")
      .Register(*registry)
      .Add({});
  Gauge& queue_limit = BuildGauge()
      .Name("fpxint_queue_limit")
      .Help("Queued jobs beyond which SubmitJob answers RESOURCE_EXHAUSTED")
      .Register(*registry)
      .Add({});
  Gauge& workers = BuildGauge()
      .Name("fpxint_workers")
      .Help("Job workers (the pool size)")
      .Register(*registry)
      .Add({});
  Gauge& workers_busy = BuildGauge()
      .Name("fpxint_workers_busy")
      .Help("Job workers running a job")
      .Register(*registry)
      .Add({});
  Family<Histogram>& job_duration = BuildHistogram()
      .Name("fpxint_job_duration_seconds")
      .Help("Wall time of finished jobs by granularity, in seconds")
      .Register(*registry);
  Counter& layers = BuildCounter()
      .Name("fpxint_layers_expanded_total")
      .Help("Weight tensors or layers expanded by successful jobs")
      .Register(*registry)
      .Add({});
  Counter& bytes_uploaded = BuildCounter()
      .Name("fpxint_bytes_uploaded_total")
      .Help("Model bytes received by UploadModel")
      .Register(*registry)
      .Add({});
  Counter& bytes_written = BuildCounter()
      .Name("fpxint_bytes_written_total")
      .Help("Artifact bytes written by successful jobs")
      .Register(*registry)
      .Add({});
  Family<Gauge>& model_weights = BuildGauge()
      .Name("fpxint_model_weight_bytes")
      .Help("Weight bytes of one instance of a served model version: form=fp32 is its layers' "
            "FP32 size, form=resident what it holds (packed terms for packed layers)")
      .Register(*registry);
  Family<Counter>& rpcs = BuildCounter()
      .Name("fpxint_grpc_requests_total")
      .Help("gRPC calls by full method name and status code")
      .Register(*registry);
  Family<Histogram>& rpc_duration = BuildHistogram()
      .Name("fpxint_grpc_request_duration_seconds")
      .Help("gRPC call duration by method, in seconds (streams: until the status is sent)")
      .Register(*registry);
};

Metrics::Metrics() : impl_(std::make_unique<Impl>()) {
  // Every job series exists from the start, so rate() and increase() see the first event.
  for (v1::Granularity g : {v1::TENSOR, v1::LAYER, v1::MODEL}) {
    for (v1::JobState s : {v1::QUEUED, v1::SUCCEEDED, v1::FAILED, v1::CANCELLED}) {
      impl_->jobs.Add({{"granularity", v1::Granularity_Name(g)}, {"state", v1::JobState_Name(s)}});
    }
  }
}

Metrics::~Metrics() = default;

void Metrics::Inference(const std::string& model, const std::string& version, const std::string& status,
                        double seconds, double queue_seconds) {
  impl_->infer_requests.Add({{"model", model}, {"version", version}, {"status", status}})
      .Increment();
  impl_->infer_duration.Add({{"model", model}, {"version", version}}, LatencyBuckets())
      .Observe(seconds);
  if (queue_seconds >= 0) {
    impl_->infer_queue.Add({{"model", model}, {"version", version}}, LatencyBuckets())
        .Observe(queue_seconds);
  }
}

namespace {
const Histogram::BucketBoundaries& BatchBuckets() {
  static const Histogram::BucketBoundaries b = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};
  return b;
}
}  // namespace

void Metrics::InferenceBatch(const std::string& model, const std::string& version, int64_t rows,
                             int calls) {
  impl_->infer_batch_rows.Add({{"model", model}, {"version", version}}, BatchBuckets())
      .Observe(static_cast<double>(rows));
  impl_->infer_batch_calls.Add({{"model", model}, {"version", version}}, BatchBuckets())
      .Observe(static_cast<double>(calls));
}

void Metrics::SetModelWeights(const std::string& model, const std::string& version,
                              uint64_t fp32_bytes, uint64_t resident_bytes) {
  impl_->model_weights.Add({{"model", model}, {"version", version}, {"form", "fp32"}})
      .Set(static_cast<double>(fp32_bytes));
  impl_->model_weights.Add({{"model", model}, {"version", version}, {"form", "resident"}})
      .Set(static_cast<double>(resident_bytes));
}

void Metrics::ClearModelWeights(const std::string& model, const std::string& version) {
  for (const char* form : {"fp32", "resident"}) {
    auto& g = impl_->model_weights.Add({{"model", model}, {"version", version}, {"form", form}});
    impl_->model_weights.Remove(&g);
  }
}

void Metrics::PendingAdd(int delta) { impl_->pending.Increment(delta); }

void Metrics::JobSubmitted(v1::Granularity g) {
  impl_->jobs.Add({{"granularity", v1::Granularity_Name(g)}, {"state", "QUEUED"}}).Increment();
}

void Metrics::JobFinished(v1::Granularity g, v1::JobState state, double seconds, int layers,
                          uint64_t bytes_written) {
  const std::string gran = v1::Granularity_Name(g);
  impl_->jobs.Add({{"granularity", gran}, {"state", v1::JobState_Name(state)}}).Increment();
  if (seconds >= 0) impl_->job_duration.Add({{"granularity", gran}}, JobBuckets()).Observe(seconds);
  if (state == v1::SUCCEEDED) {
    impl_->layers.Increment(layers);
    impl_->bytes_written.Increment(static_cast<double>(bytes_written));
  }
}

void Metrics::SetJobsQueued(int n) { impl_->jobs_queued.Set(n); }
void Metrics::JobWriteFenced() { impl_->job_writes_fenced.Increment(); }
void Metrics::SetReplica(const std::string& replica_id, const std::string& journal) {
  impl_->replica.Add({{"replica", replica_id}, {"journal", journal}}).Set(1);
}
void Metrics::SetQueueLimit(int n) { impl_->queue_limit.Set(n); }
void Metrics::SetWorkers(int n) { impl_->workers.Set(n); }
void Metrics::WorkersBusyAdd(int delta) { impl_->workers_busy.Increment(delta); }
void Metrics::BytesUploaded(uint64_t n) { impl_->bytes_uploaded.Increment(static_cast<double>(n)); }

void Metrics::Rpc(const std::string& method, const std::string& code, double seconds) {
  impl_->rpcs.Add({{"method", method}, {"code", code}}).Increment();
  impl_->rpc_duration.Add({{"method", method}}, LatencyBuckets()).Observe(seconds);
}

std::string Metrics::Text() const {
  std::vector<prometheus::MetricFamily> all = impl_->registry->Collect();
  for (auto& f : impl_->process->Collect()) all.push_back(std::move(f));
  return prometheus::TextSerializer().Serialize(all);
}

// ---- the interceptor -------------------------------------------------------------------------

namespace {

class RpcMetricsInterceptor : public grpc::experimental::Interceptor {
 public:
  RpcMetricsInterceptor(grpc::experimental::ServerRpcInfo* info, Metrics* m)
      : method_(info->method() ? info->method() : "unknown"),
        metrics_(m),
        start_(std::chrono::steady_clock::now()) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status s = methods->GetSendStatus();
      metrics_->Rpc(method_, GrpcCodeName(s.error_code()),
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
    }
    methods->Proceed();
  }

 private:
  std::string method_;
  Metrics* metrics_;
  std::chrono::steady_clock::time_point start_;
};

class RpcMetricsFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit RpcMetricsFactory(Metrics* m) : metrics_(m) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new RpcMetricsInterceptor(info, metrics_);
  }

 private:
  Metrics* metrics_;
};

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> Metrics::InterceptorFactory() {
  return std::make_unique<RpcMetricsFactory>(this);
}

// ---- the exposer -----------------------------------------------------------------------------

struct MetricsExposer::State {
  std::unique_ptr<prometheus::Exposer> exposer;
};

absl::StatusOr<std::unique_ptr<MetricsExposer>> MetricsExposer::Start(const std::string& address,
                                                                      Metrics* metrics) {
  std::unique_ptr<MetricsExposer> e(new MetricsExposer());
  e->state_ = std::make_unique<State>();
  try {
    // Two request threads are plenty for a scraper or two.
    e->state_->exposer = std::make_unique<prometheus::Exposer>(address, 2);
  } catch (const std::exception& ex) {
    return absl::UnavailableError(absl::StrCat(
        "--metrics-listen ", address, ": cannot serve metrics (", ex.what(),
        "); is the port in use?"));
  }
  e->state_->exposer->RegisterCollectable(metrics->impl_->registry);
  e->state_->exposer->RegisterCollectable(metrics->impl_->process);
  const std::vector<int> ports = e->state_->exposer->GetListeningPorts();
  if (ports.empty()) return absl::UnavailableError("--metrics-listen: no listening port");
  e->port_ = ports.front();
  return e;
}

MetricsExposer::~MetricsExposer() = default;

}  // namespace fpxint::server
