// File: server/server.cc
#include "server/server.h"

#include <unistd.h>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/resource_quota.h>

#include <cstring>
#include <filesystem>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "core/atomic_file.h"
#include "core/kernels.h"
#include "core/status_macros.h"
#include "server/auth.h"
#include "server/jobs.h"
#include "server/journal.h"
#include "server/log.h"
#include "server/repository.h"
#include "server/services.h"
#include "server/store.h"
#include "server/validation.h"

namespace fpxint::server {
namespace {

namespace fs = std::filesystem;

// The control queue (services.h ServeQueued): threads for handlers that may block, and how many
// such calls may wait for one before new ones are refused RESOURCE_EXHAUSTED.
constexpr int kControlThreads = 4;
constexpr size_t kControlQueueLimit = 1024;
// How often a replica converges to the journal's deployments (Repository::Sync).
constexpr absl::Duration kDeploymentSyncPeriod = absl::Seconds(2);

// The host part of HOST:PORT ("[::1]:80" -> "::1").
std::string ListenHost(const std::string& listen) {
  std::string host = listen.substr(0, listen.rfind(':'));
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  return host;
}

// Addresses only this machine can reach: 127.0.0.0/8, ::1, localhost, and Unix sockets.
bool IsLoopback(const std::string& listen) {
  if (absl::StartsWith(listen, "unix:") || absl::StartsWith(listen, "unix-abstract:")) return true;
  const std::string host = ListenHost(listen);
  return host == "localhost" || host == "::1" || absl::StartsWith(host, "127.");
}

}  // namespace

std::string ServerConfig::ListenAddress() const {
  if (!listen.empty()) return listen;
  return token_file.empty() ? "127.0.0.1:8001" : "0.0.0.0:8001";
}

absl::Status ServerConfig::Validate() const {
  auto bad = [](absl::string_view flag, absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": ", what));
  };
  if (max_job_attempts < 1) return bad("--max-job-attempts", "must be at least 1");
  if (!(job_lease_seconds >= 3 && job_lease_seconds <= 3600)) {
    return bad("--job-lease-seconds", "accepted 3 .. 3600");
  }
  if (!replica_id.empty()) FPX_RETURN_IF_ERROR(CheckReplicaId(replica_id, "--replica-id"));
  if (!database_url.empty() && !Journal::IsDatabaseUrl(database_url)) {
    return bad("--database-url", "must be a libpq URI starting postgresql:// or postgres://");
  }
  const std::string addr = ListenAddress();
  if (addr.find(':') == std::string::npos) {
    return bad("--listen", "expected HOST:PORT (port 0 picks a free port)");
  }
  if (token_file.empty() && !insecure_no_auth && !IsLoopback(addr)) {
    return bad("--listen",
               absl::StrCat(addr, " is reachable from other machines, and without --token-file "
                                  "every caller could use every RPC; give --token-file, listen on "
                                  "loopback (127.0.0.1:PORT), or pass --insecure-no-auth"));
  }
  if (data_dir.empty()) return bad("--data-dir", "required");
  if (workers < 1 || workers > 64) return bad("--workers", "accepted 1..64");
  if (queue_limit < 1 || queue_limit > 100000) return bad("--queue-limit", "accepted 1..100000");
  if (max_upload_bytes < 1) return bad("--max-upload-bytes", "must be positive");
  if (threads < 0 || threads > 1024) return bad("--threads", "accepted 0 (all cores)..1024");
  if (infer_instances < 1 || infer_instances > 64)
    return bad("--infer-instances", "accepted 1..64");
  if (tls_cert.empty() != tls_key.empty()) {
    return bad("--tls-cert/--tls-key", "give both or neither");
  }
  if (!tls_client_ca.empty() && tls_cert.empty()) {
    return bad("--tls-client-ca", "needs --tls-cert and --tls-key (mutual TLS is on top of TLS)");
  }
  if (allow_torchscript_uploads != "all" && allow_torchscript_uploads != "admin" &&
      allow_torchscript_uploads != "none") {
    return bad("--allow-torchscript-uploads", "accepted: all, admin, none");
  }
  if (shutdown_grace_seconds < 0) return bad("--shutdown-grace", "must be >= 0");
  if (orphan_min_age_seconds < 0) return bad("--orphan-min-age", "must be >= 0");
  if (retain_jobs_days < 0) return bad("--retain-jobs-days", "must be >= 0 (0: keep every job)");
  if (max_precisions < 1 || max_precisions > 1024) {
    return bad("--max-precisions", "accepted 1..1024");
  }
  if (infer_queue_limit < 0 || infer_queue_limit > 100000) {
    return bad("--infer-queue-limit", "accepted 0..100000");
  }
  if (infer_queue_timeout_seconds <= 0 || infer_queue_timeout_seconds > 3600) {
    return bad("--infer-queue-timeout", "accepted (0, 3600] seconds");
  }
  if (max_rpc_threads < 8 || max_rpc_threads > 4096) {
    return bad("--max-rpc-threads", "accepted 8..4096");
  }
  if (grpc_memory_bytes < 0) return bad("--grpc-memory-bytes", "must be >= 0");
  if (max_uploads < 1 || max_uploads > 4096) return bad("--max-uploads", "accepted 1..4096");
  if (max_downloads < 1 || max_downloads > 4096) return bad("--max-downloads", "accepted 1..4096");
  if (stream_idle_timeout_seconds < 1 || stream_idle_timeout_seconds > 86400) {
    return bad("--stream-idle-timeout", "accepted 1..86400 seconds");
  }
  if (max_concurrent_streams < 1 || max_concurrent_streams > 100000) {
    return bad("--max-concurrent-streams", "accepted 1..100000");
  }
  if (keepalive_seconds < 1 || keepalive_timeout_seconds < 1) {
    return bad("--keepalive/--keepalive-timeout", "at least 1 second");
  }
  if (max_message_bytes < 4096 || max_message_bytes > (int64_t{2} << 30) - 1) {
    return bad("--max-message-bytes", "accepted 4096..2147483647");
  }
  if (vet_timeout_seconds < 1 || vet_timeout_seconds > 3600) {
    return bad("--vet-timeout", "accepted 1..3600 seconds");
  }
  return absl::OkStatus();
}

struct Server::Impl {
  ServerConfig config;
  std::unique_ptr<BlobStore> store;
  std::unique_ptr<Journal> journal;
  std::unique_ptr<core::ThreadPool> pool;
  std::unique_ptr<TorchScriptVetter> vetter;
  std::unique_ptr<StreamGuard> uploads, downloads;
  std::unique_ptr<Repository> repo;
  std::unique_ptr<JobManager> jobs;
  Authorizer auth;
  Metrics metrics;
  std::unique_ptr<MetricsExposer> exposer;
  std::atomic<bool> ready{false};
  // The handlers that may block (journal, store, model loads); outlives grpc_server, whose
  // Wait() returns once every call these hold has finished.
  std::unique_ptr<WorkQueue> control;
  std::unique_ptr<QuantizerService> quantizer;
  std::unique_ptr<InferenceService> inference;
  std::unique_ptr<grpc::Server> grpc_server;
  int port = 0;
  absl::Mutex mu;
  bool shut_down = false;
  absl::Notification done;
  // Retention (--retain-jobs-days): deletes old finished jobs at start and every hour.
  absl::Notification stop_retention;
  std::thread retention;
  // Replicas (a shared journal): Repository::Sync every kDeploymentSyncPeriod.
  absl::Notification stop_sync;
  std::thread deployment_sync;
  // Orders readiness changes: start, shutdown, and the journal's reachability.
  absl::Mutex health_mu;
};

namespace {

// Removes the blobs no record references (and the staging marks of uploads never committed)
// that are older than `min_age`; logs what went.
void SweepUnreferenced(BlobStore* store, Journal* j, absl::Duration min_age) {
  const BlobStore::Swept swept = store->SweepOrphans(
      [j](const std::string& sha) { return j->BlobReferenced(sha); }, min_age);
  if (swept.blobs > 0) {
    LogInfo(absl::StrCat("removed ", swept.blobs, " orphan blob(s), ", swept.bytes,
                         " bytes, that no model, artifact or deployment referenced"));
  }
}

}  // namespace

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Server::~Server() { Shutdown(); }

absl::StatusOr<std::unique_ptr<Server>> Server::Start(const ServerConfig& config) {
  FPX_RETURN_IF_ERROR(config.Validate());
  auto im = std::make_unique<Impl>();
  im->config = config;
  if (im->config.replica_id.empty()) {
    char host[256] = {};
    if (gethostname(host, sizeof(host) - 1) != 0 || host[0] == '\0') std::strcpy(host, "fpxint");
    im->config.replica_id = absl::StrCat(host, ":", getpid());
  }
  const std::string listen = config.ListenAddress();
  if (!config.token_file.empty()) {
    FPX_ASSIGN_OR_RETURN(im->auth, Authorizer::FromFile(config.token_file));
  } else if (!IsLoopback(listen)) {
    LogWarning(absl::StrCat("--insecure-no-auth: listening on ", listen,
                            " without --token-file; anyone who can reach it may upload, run jobs "
                            "and serve models"));
  } else {
    LogWarning("no --token-file: every local caller may use every non-admin RPC (loopback only)");
  }
  // The journal first, and this server the only one on it: another server's jobs and temp
  // files are not this one's to recover or remove.
  {
    std::error_code ec;
    fs::create_directories(config.data_dir, ec);
    if (ec) {
      return absl::InvalidArgumentError(absl::StrCat("--data-dir '", config.data_dir,
                                                     "': cannot create it: ", ec.message()));
    }
  }
  FPX_ASSIGN_OR_RETURN(im->journal,
                       Journal::Open(config.database_url.empty()
                                         ? (fs::path(config.data_dir) / "journal.sqlite").string()
                                         : config.database_url));
  // SQLite is one server's journal: this server must be the only one on it. PostgreSQL is shared
  // by every replica; each says it is alive before it creates its temp directory, so that no
  // other replica takes that directory for a dead one's.
  const bool shared = !config.database_url.empty();
  if (!shared) {
    FPX_ASSIGN_OR_RETURN(bool alone, im->journal->LockExclusive());
    if (!alone) {
      return absl::FailedPreconditionError(
          absl::StrCat("--data-dir '", config.data_dir,
                       "': another fpxint-server is using this data directory; stop it, choose "
                       "another directory, or share a PostgreSQL journal (--database-url) to run "
                       "replicas"));
    }
  }
  if (shared) {
    FPX_ASSIGN_OR_RETURN(bool old_server, im->journal->HeldExclusively());
    if (old_server) {
      return absl::FailedPreconditionError(
          "--database-url: an fpxint-server of a version before replicas holds this database "
          "alone and runs its jobs unfenced; stop it before starting replicas");
    }
  }
  FPX_RETURN_IF_ERROR(im->journal->ReplicaHeartbeat(im->config.replica_id));
  FPX_ASSIGN_OR_RETURN(im->store, BlobStore::Open(config.data_dir, im->config.replica_id));
  // The temp files of replicas that are gone (not heard from within two leases; with SQLite,
  // every other: this server holds the store alone) never became visible: they go.
  FPX_RETURN_IF_ERROR(RemoveTempOfGoneReplicas(im->journal.get(), im->store.get(),
                                               absl::Seconds(config.job_lease_seconds),
                                               /*journal_exclusive=*/!shared)
                          .status());
  im->metrics.SetReplica(im->config.replica_id, im->journal->backend());
  // Blobs no record refers to (an upload refused after its commit, a crash between a commit and
  // its record) are removed before anything is served.
  SweepUnreferenced(im->store.get(), im->journal.get(),
                    absl::Seconds(config.orphan_min_age_seconds));
  {
    TorchScriptVetter::Options vo;
    vo.vet_binary = config.vet_binary;
    vo.allow_ops_files = config.torchscript_allow_ops;
    vo.timeout = absl::Seconds(config.vet_timeout_seconds);
    vo.cpu_seconds = static_cast<int>(config.vet_timeout_seconds);
    FPX_ASSIGN_OR_RETURN(im->vetter, TorchScriptVetter::Create(vo, im->journal.get()));
  }
  const int threads =
      config.threads > 0 ? config.threads : static_cast<int>(std::thread::hardware_concurrency());
  im->pool = std::make_unique<core::ThreadPool>(threads);
  im->repo = std::make_unique<Repository>((fs::path(config.data_dir) / "repository").string(),
                                          im->journal.get(), im->store.get(), im->pool.get(),
                                          Repository::Options{config.infer_instances, threads,
                                                              config.packed_weights, &im->metrics,
                                                              im->vetter.get(),
                                                              InferQueueLimits{
                                                                  config.infer_queue_limit,
                                                                  absl::Seconds(
                                                                      config.infer_queue_timeout_seconds)},
                                                              config.max_precisions,
                                                              shared ? im->config.replica_id
                                                                     : std::string()});
  im->jobs = std::make_unique<JobManager>(
      JobManager::Options{config.workers, config.queue_limit, threads, config.job_memory_limit,
                          &im->metrics, im->vetter.get(), config.max_job_attempts,
                          im->config.replica_id, absl::Seconds(config.job_lease_seconds),
                          /*journal_exclusive=*/!shared},
      im->journal.get(), im->store.get(), im->repo.get(), im->pool.get());

  ServiceContext sc;
  sc.journal = im->journal.get();
  sc.store = im->store.get();
  sc.jobs = im->jobs.get();
  sc.repo = im->repo.get();
  sc.auth = &im->auth;
  sc.vetter = im->vetter.get();
  im->uploads = std::make_unique<StreamGuard>("uploads", "--max-uploads", config.max_uploads,
                                              absl::Seconds(config.stream_idle_timeout_seconds));
  im->downloads = std::make_unique<StreamGuard>(
      "downloads", "--max-downloads", config.max_downloads,
      absl::Seconds(config.stream_idle_timeout_seconds));
  sc.uploads = im->uploads.get();
  sc.downloads = im->downloads.get();
  sc.metrics = &im->metrics;
  sc.upload_policy.max_upload_bytes = config.max_upload_bytes;
  sc.upload_policy.min_free_bytes = config.min_free_bytes;
  sc.upload_policy.quota_bytes = config.upload_quota_bytes;
  sc.upload_policy.torchscript = config.allow_torchscript_uploads == "none" ? TorchScriptUploads::kNone
                           : config.allow_torchscript_uploads == "admin"
                               ? TorchScriptUploads::kAdmin
                               : TorchScriptUploads::kAll;
  sc.ready = &im->ready;
  sc.server_version = FPXINT_VERSION;
  sc.max_message_bytes = config.max_message_bytes;
  im->control = std::make_unique<WorkQueue>(kControlThreads, kControlQueueLimit);
  sc.control = im->control.get();
  im->quantizer = std::make_unique<QuantizerService>(sc);
  im->inference = std::make_unique<InferenceService>(sc);

  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (!config.tls_cert.empty()) {
    grpc::SslServerCredentialsOptions ssl(
        config.tls_client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                     : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    FPX_ASSIGN_OR_RETURN(std::string cert, ReadTextFile(config.tls_cert, "--tls-cert"));
    FPX_ASSIGN_OR_RETURN(std::string key, ReadTextFile(config.tls_key, "--tls-key"));
    ssl.pem_key_cert_pairs.push_back({key, cert});
    if (!config.tls_client_ca.empty()) {
      FPX_ASSIGN_OR_RETURN(ssl.pem_root_certs,
                           ReadTextFile(config.tls_client_ca, "--tls-client-ca"));
    }
    creds = grpc::SslServerCredentials(ssl);
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(listen, creds, &im->port);
  builder.RegisterService(im->quantizer.get());
  builder.RegisterService(im->inference.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(config.max_message_bytes));
  // Bounds on what callers can hold: handler threads and buffer memory (resource quota),
  // streams per connection, and keepalive pings that close dead connections.
  grpc::ResourceQuota quota("fpxint");
  quota.SetMaxThreads(config.max_rpc_threads);
  quota.Resize(static_cast<size_t>(config.grpc_memory_bytes > 0 ? config.grpc_memory_bytes
                                                                : 16 * config.max_message_bytes));
  builder.SetResourceQuota(quota);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, config.max_concurrent_streams);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS,
                             static_cast<int>(config.keepalive_seconds * 1000));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                             static_cast<int>(config.keepalive_timeout_seconds * 1000));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // Clients may ping every 10 s without calls in flight (grpcio's keepalive options) before the
  // server answers with GOAWAY.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(im->metrics.InterceptorFactory());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  im->grpc_server = builder.BuildAndStart();
  if (!im->grpc_server || im->port == 0) {
    return absl::UnavailableError(
        absl::StrCat("--listen ", listen, ": cannot bind (address in use or invalid?)"));
  }
  if (!config.metrics_listen.empty()) {
    FPX_ASSIGN_OR_RETURN(im->exposer, MetricsExposer::Start(config.metrics_listen, &im->metrics));
  }
  // Jobs and served models come back after a restart before the server says it is ready.
  im->repo->Restore();
  {
    // Readiness follows the journal: while it is unreachable the server as a whole and the job
    // service say NOT_SERVING; the inference service goes on serving the models it has loaded.
    Impl* p = im.get();
    im->jobs->SetJournalHealthListener([p](bool reachable) {
      absl::MutexLock l(&p->health_mu);
      if (!p->ready.load()) return;  // not serving yet, or shutting down
      auto* health = p->grpc_server->GetHealthCheckService();
      health->SetServingStatus("", reachable);
      health->SetServingStatus("fpxint.v1.Quantizer", reachable);
    });
  }
  FPX_RETURN_IF_ERROR(im->jobs->Start());
  {
    // Housekeeping, at start and every hour: retention, then the blobs and staging marks that
    // nothing references any more (uploads never committed, outputs of jobs that lost their
    // lease). While jobs and uploads run, a blob is given at least an hour to be recorded.
    Impl* p = im.get();
    im->retention = std::thread([p] {
      bool first = true;
      do {
        if (p->config.retain_jobs_days > 0) {
          const int n = p->jobs->DeleteFinishedBefore(
              absl::Now() - absl::Hours(24) * p->config.retain_jobs_days);
          if (n > 0) {
            LogInfo(absl::StrCat("retention: deleted ", n, " job(s) finished more than ",
                                 p->config.retain_jobs_days, " day(s) ago (--retain-jobs-days)"));
          }
        }
        if (!first) {
          SweepUnreferenced(p->store.get(), p->journal.get(),
                            std::max(absl::Seconds(p->config.orphan_min_age_seconds),
                                     absl::Hours(1)));
        }
        first = false;
      } while (!p->stop_retention.WaitForNotificationWithTimeout(absl::Hours(1)));
    });
  }
  if (shared) {
    // Every replica serves what the journal says is loaded: deploys, loads and unloads made on
    // another replica reach this one within kDeploymentSyncPeriod.
    Impl* p = im.get();
    im->deployment_sync = std::thread([p] {
      while (!p->stop_sync.WaitForNotificationWithTimeout(kDeploymentSyncPeriod)) {
        p->repo->Sync();
      }
    });
  }
  {
    absl::MutexLock l(&im->health_mu);
    im->ready.store(true);
    auto* health = im->grpc_server->GetHealthCheckService();
    health->SetServingStatus(true);
    health->SetServingStatus("inference.GRPCInferenceService", true);
    // The journal may have become unreachable since the job manager started.
    const bool reachable = im->jobs->journal_reachable();
    health->SetServingStatus("", reachable);
    health->SetServingStatus("fpxint.v1.Quantizer", reachable);
  }

  std::unique_ptr<Server> server(new Server(std::move(im)));
  const std::string addr = server->address();
  std::string metrics_note = "; no metrics endpoint";
  if (server->impl_->exposer) {
    const std::string host = config.metrics_listen.substr(0, config.metrics_listen.rfind(':'));
    const std::string maddr = absl::StrCat(host, ":", server->metrics_port());
    metrics_note = absl::StrCat("; metrics on http://", maddr, "/metrics");
    if (!config.metrics_port_file.empty()) {
      FPX_RETURN_IF_ERROR(core::WriteFileAtomic(config.metrics_port_file, maddr + "\n"));
    }
  }
  LogInfo(absl::StrCat("fpxint-server ", FPXINT_VERSION, " listening on ", addr,
                       config.tls_cert.empty()        ? " (plaintext)"
                       : config.tls_client_ca.empty() ? " (TLS)"
                                                      : " (mutual TLS)",
                       "; replica ", server->replica_id(), ", data in ", config.data_dir,
                       config.database_url.empty() ? " (SQLite journal)" : " (PostgreSQL journal)",
                       "; ", config.workers, " worker(s), ", threads,
                       " compute threads, kernels ", core::ActiveKernels().name, metrics_note));
  // The port file last: it tells scripts the server is ready, with its metrics port file in place.
  if (!config.port_file.empty()) {
    FPX_RETURN_IF_ERROR(core::WriteFileAtomic(config.port_file, addr + "\n"));
  }
  return server;
}

int Server::port() const { return impl_->port; }

const std::string& Server::replica_id() const { return impl_->config.replica_id; }

int Server::metrics_port() const { return impl_->exposer ? impl_->exposer->port() : 0; }

std::string Server::MetricsText() const { return impl_->metrics.Text(); }

std::string Server::address() const {
  const std::string l = impl_->config.ListenAddress();
  const std::string host = l.substr(0, l.rfind(':'));
  return absl::StrCat(host, ":", impl_->port);
}

void Server::Shutdown() {
  {
    absl::MutexLock l(&impl_->mu);
    if (impl_->shut_down) return;
    impl_->shut_down = true;
  }
  Impl& im = *impl_;
  LogInfo("shutting down: not ready, finishing running jobs");
  {
    absl::MutexLock l(&im.health_mu);
    im.ready.store(false);
    if (im.grpc_server) {
      auto* health = im.grpc_server->GetHealthCheckService();
      health->SetServingStatus(false);
    }
  }
  im.stop_retention.Notify();
  if (im.retention.joinable()) im.retention.join();
  im.stop_sync.Notify();
  if (im.deployment_sync.joinable()) im.deployment_sync.join();
  im.jobs->Shutdown(absl::Seconds(im.config.shutdown_grace_seconds));
  if (im.grpc_server) {
    im.grpc_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    im.grpc_server->Wait();
  }
  LogInfo("shut down cleanly");
  im.done.Notify();
}

void Server::Wait() { impl_->done.WaitForNotification(); }

}  // namespace fpxint::server
