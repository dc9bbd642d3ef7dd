// File: server/main.cc
//
// fpxint-server: the FP=xINT quantization service. Every flag can also be set by an environment
// variable (FPXINT_<FLAG>, shown in --help), for containers.
//
// Exit codes: 0 clean shutdown (SIGTERM / SIGINT), 2 bad flags, 1 could not start.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <thread>

#include "core/runtime.h"
#include "server/log.h"
#include "server/server.h"

namespace {

int g_signal_pipe[2] = {-1, -1};

void OnSignal(int sig) {
  const unsigned char b = static_cast<unsigned char>(sig);
  // Async-signal-safe; a second signal while shutting down is ignored (the pipe has the first).
  [[maybe_unused]] ssize_t n = ::write(g_signal_pipe[1], &b, 1);
}

}  // namespace

int main(int argc, char** argv) {
  fpxint::server::ServerConfig c;
  c.metrics_listen = "0.0.0.0:8002";  // Triton's metrics port (docs/ARCHITECTURE.md "Metrics")
  CLI::App app{
      "fpxint-server: quantizes neural networks with the FP=xINT low-bit series expansion and "
      "serves them.\n\n"
      "gRPC services on --listen: fpxint.v1.Quantizer (upload, expansion jobs, artifacts), "
      "inference.GRPCInferenceService (KServe v2 / Open Inference Protocol, Triton repository and "
      "statistics extensions), grpc.health.v1.Health and server reflection.\n"
      "State lives in --data-dir: content-addressed blobs, the journal (SQLite, or PostgreSQL "
      "with --database-url) and the model repository; a restart on the same state runs "
      "interrupted jobs again. One server per data directory and per database.\n"
      "SIGTERM or SIGINT: stop accepting, let running jobs finish for --shutdown-grace seconds "
      "(then re-queue them), exit 0.",
      "fpxint-server"};
  app.set_version_flag("--version", FPXINT_VERSION);
  app.option_defaults()->always_capture_default();
  app.add_option("--listen", c.listen,
                 "gRPC address HOST:PORT (port 0: any free port). Default 0.0.0.0:8001 with "
                 "--token-file, else 127.0.0.1:8001; a non-loopback address without "
                 "--token-file needs --insecure-no-auth")
      ->envname("FPXINT_LISTEN");
  app.add_option("--data-dir", c.data_dir, "directory for blobs, journal and model repository")
      ->envname("FPXINT_DATA_DIR");
  app.add_option("--database-url", c.database_url,
                 "keep the journal (models, jobs, artifacts, deployments) in PostgreSQL: a libpq "
                 "URI, postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?sslmode=...] or "
                 "postgresql:///DB?host=/socket/dir; empty: SQLite in --data-dir")
      ->envname("FPXINT_DATABASE_URL");
  app.add_option("--replica-id", c.replica_id,
                 "this server's name in logs and in the store's temp directory "
                 "(<data-dir>/tmp/<replica-id>/); 1-128 of A-Z a-z 0-9 . _ : -, starting with a "
                 "letter or digit "
                 "(default: hostname:pid)")
      ->envname("FPXINT_REPLICA_ID");
  app.add_option("--workers", c.workers, "expansion jobs that run at the same time")
      ->envname("FPXINT_WORKERS");
  app.add_option("--max-job-attempts", c.max_job_attempts,
                 "a job whose replica went away during this many of its runs (crash, kill, OOM, "
                 "a stall past its lease) ends FAILED with the reason instead of running again; "
                 "a job interrupted by a clean shutdown is not counted against it")
      ->envname("FPXINT_MAX_JOB_ATTEMPTS");
  app.add_option("--job-lease-seconds", c.job_lease_seconds,
                 "a running job's lease (3-3600 s): its replica renews it every third of this; "
                 "a job whose lease expires goes back to the queue for any replica, and the "
                 "replica that lost it can no longer write it")
      ->envname("FPXINT_JOB_LEASE_SECONDS");
  app.add_option("--queue-limit", c.queue_limit,
                 "queued jobs beyond which SubmitJob answers RESOURCE_EXHAUSTED")
      ->envname("FPXINT_QUEUE_LIMIT");
  app.add_option("--max-upload-bytes", c.max_upload_bytes, "largest accepted upload, in bytes (a model directory: each of its files)")
      ->envname("FPXINT_MAX_UPLOAD_BYTES");
  app.add_option("--min-free-bytes", c.min_free_bytes,
                 "free bytes the data directory keeps: an upload that would leave less answers "
                 "RESOURCE_EXHAUSTED with both figures (0: no floor)")
      ->envname("FPXINT_MIN_FREE_BYTES");
  app.add_option("--upload-quota-bytes", c.upload_quota_bytes,
                 "bytes the uploads of one caller (token; everyone together on a server without "
                 "tokens) may hold; beyond, RESOURCE_EXHAUSTED with the figures (0: no quota)")
      ->envname("FPXINT_UPLOAD_QUOTA_BYTES");
  app.add_option("--orphan-min-age", c.orphan_min_age_seconds,
                 "blobs no record references and older than this many seconds are removed, and "
                 "so are older staging marks of uncommitted directory uploads: at start, and "
                 "every hour (then at least an hour old)")
      ->envname("FPXINT_ORPHAN_MIN_AGE");
  app.add_option("--retain-jobs-days", c.retain_jobs_days,
                 "finished jobs (and their artifacts) older than this many days are deleted, at "
                 "start and every hour (0: keep every job)")
      ->envname("FPXINT_RETAIN_JOBS_DAYS");
  app.add_option("--job-memory-limit", c.job_memory_limit,
                 "memory one job may plan to hold, in bytes (0: no limit); estimated from the "
                 "shapes before the expansion starts, a job above it fails RESOURCE_EXHAUSTED "
                 "with both figures. With --workers N, N jobs may hold it at once")
      ->envname("FPXINT_JOB_MEMORY_LIMIT");
  app.add_option("--threads", c.threads,
                 "compute threads for expansion and inference (0: all cores)")
      ->envname("FPXINT_THREADS");
  app.add_option("--infer-instances", c.infer_instances,
                 "copies of each served model version (concurrent ModelInfer per version)")
      ->envname("FPXINT_INFER_INSTANCES");
  app.add_option("--packed-weights", c.packed_weights,
                 "serve weight-only quantized models on the packed low-bit ops (true: weights "
                 "stay K·b/32 of FP32 in memory, packed once per version into model.packed.pt); "
                 "false: dequantized fp32 weights")
      ->envname("FPXINT_PACKED_WEIGHTS");
  app.add_option("--token-file", c.token_file,
                 "bearer tokens with roles, one '<token> <role>[,<role>]' per line; roles "
                 "quantize, infer, admin (empty: no authentication)")
      ->envname("FPXINT_TOKEN_FILE");
  app.add_flag("--insecure-no-auth", c.insecure_no_auth,
               "allow --listen on a non-loopback address without --token-file: anyone who can "
               "reach the port may upload, run jobs and serve (warned at every start)")
      ->envname("FPXINT_INSECURE_NO_AUTH");
  app.add_option("--tls-cert", c.tls_cert, "server certificate chain (PEM); enables TLS")
      ->envname("FPXINT_TLS_CERT");
  app.add_option("--tls-key", c.tls_key, "server private key (PEM)")->envname("FPXINT_TLS_KEY");
  app.add_option("--tls-client-ca", c.tls_client_ca,
                 "CA bundle (PEM) that client certificates must chain to; enables mutual TLS")
      ->envname("FPXINT_TLS_CLIENT_CA");
  app.add_option("--allow-torchscript-uploads", c.allow_torchscript_uploads,
                 "who may upload TorchScript: all (callers with the quantize role), admin (admin "
                 "tokens only; an open server has none, so it refuses them), none. Every "
                 "TorchScript upload is vetted in a sandboxed process either way")
      ->envname("FPXINT_ALLOW_TORCHSCRIPT_UPLOADS")
      ->check(CLI::IsMember({"all", "admin", "none"}));
  app.add_option("--torchscript-allow-ops", c.torchscript_allow_ops,
                 "extra operations a TorchScript upload may use, one node kind (aten::name) per "
                 "line, on top of the built-in allow-list (fpxint-vet --list-ops); repeatable")
      ->envname("FPXINT_TORCHSCRIPT_ALLOW_OPS")
      ->check(CLI::ExistingFile);
  app.add_option("--vet-binary", c.vet_binary,
                 "the fpxint-vet program that vets TorchScript uploads in a sandbox (default: "
                 "next to fpxint-server)")
      ->envname("FPXINT_VET_BINARY");
  app.add_option("--vet-timeout", c.vet_timeout_seconds,
                 "seconds one vetting may take (also its CPU-time limit); beyond, the upload is "
                 "refused")
      ->envname("FPXINT_VET_TIMEOUT");
  app.add_option("--port-file", c.port_file, "write HOST:PORT here once serving")
      ->envname("FPXINT_PORT_FILE");
  app.add_option("--metrics-listen", c.metrics_listen,
                 "Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port; "
                 "empty: off)")
      ->envname("FPXINT_METRICS_LISTEN")
      ->capture_default_str();
  app.add_option("--metrics-port-file", c.metrics_port_file,
                 "write the metrics HOST:PORT here once serving")
      ->envname("FPXINT_METRICS_PORT_FILE");
  app.add_option("--shutdown-grace", c.shutdown_grace_seconds,
                 "seconds running jobs get to finish on shutdown before they are re-queued")
      ->envname("FPXINT_SHUTDOWN_GRACE");
  app.add_option("--max-message-bytes", c.max_message_bytes,
                 "largest gRPC message (ModelInfer request or response), in bytes")
      ->envname("FPXINT_MAX_MESSAGE_BYTES");
  app.add_option("--max-precisions", c.max_precisions,
                 "dense networks one served instance keeps for the (fpxint_terms, "
                 "fpxint_act_terms) pairs callers ask for (each holds the weights in fp32; the "
                 "packed weight-only path needs none); a new pair beyond is RESOURCE_EXHAUSTED")
      ->envname("FPXINT_MAX_PRECISIONS");
  app.add_option("--infer-queue-limit", c.infer_queue_limit,
                 "ModelInfer calls that may wait for a free instance of one served version; "
                 "beyond, RESOURCE_EXHAUSTED")
      ->envname("FPXINT_INFER_QUEUE_LIMIT");
  app.add_option("--infer-queue-timeout", c.infer_queue_timeout_seconds,
                 "seconds a ModelInfer call waits for a free instance (or less, by the call's "
                 "deadline); beyond, DEADLINE_EXCEEDED")
      ->envname("FPXINT_INFER_QUEUE_TIMEOUT");
  app.add_option("--max-rpc-threads", c.max_rpc_threads,
                 "gRPC handler threads (the resource quota's thread limit)")
      ->envname("FPXINT_MAX_RPC_THREADS");
  app.add_option("--grpc-memory-bytes", c.grpc_memory_bytes,
                 "memory gRPC may hold for buffers (resource quota; 0: 16 x --max-message-bytes)")
      ->envname("FPXINT_GRPC_MEMORY_BYTES");
  app.add_option("--max-concurrent-streams", c.max_concurrent_streams,
                 "concurrent calls per client connection (HTTP/2 max concurrent streams)")
      ->envname("FPXINT_MAX_CONCURRENT_STREAMS");
  app.add_option("--max-uploads", c.max_uploads,
                 "UploadModel calls at once; beyond, RESOURCE_EXHAUSTED")
      ->envname("FPXINT_MAX_UPLOADS");
  app.add_option("--max-downloads", c.max_downloads,
                 "DownloadArtifact calls at once; beyond, RESOURCE_EXHAUSTED")
      ->envname("FPXINT_MAX_DOWNLOADS");
  app.add_option("--stream-idle-timeout", c.stream_idle_timeout_seconds,
                 "seconds an upload or download may move no message before it is cancelled "
                 "(DEADLINE_EXCEEDED), freeing its thread")
      ->envname("FPXINT_STREAM_IDLE_TIMEOUT");
  app.add_option("--keepalive", c.keepalive_seconds,
                 "seconds between the server's keepalive pings on a connection")
      ->envname("FPXINT_KEEPALIVE");
  app.add_option("--keepalive-timeout", c.keepalive_timeout_seconds,
                 "seconds an unanswered keepalive ping waits before the connection is closed")
      ->envname("FPXINT_KEEPALIVE_TIMEOUT");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  if (auto s = c.Validate(); !s.ok()) {
    std::fprintf(stderr, "fpxint-server: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  // Signals: a handler (any thread may receive them; LibTorch and OpenBLAS start threads before
  // main) writes the signal number to a pipe; one thread reads it and stops the server.
  if (::pipe2(g_signal_pipe, O_CLOEXEC) != 0) {
    std::perror("fpxint-server: pipe");
    return 1;
  }
  struct sigaction sa = {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  if (fpxint::core::RetainTensorMemory()) {
    fpxint::server::LogInfo(
        "allocator: blocks up to 32 MiB come from the heap, free heap up to 256 MiB (and "
        "64 MiB per thread arena) is kept for reuse (FPXINT_MALLOC_RETAIN=0: glibc's defaults)");
  }
  auto server = fpxint::server::Server::Start(c);
  if (!server.ok()) {
    fpxint::server::LogError(server.status().message());
    return 1;
  }
  std::thread signals([&] {
    unsigned char sig = 0;
    while (::read(g_signal_pipe[0], &sig, 1) < 0 && errno == EINTR) {
    }
    fpxint::server::LogInfo(sig == SIGTERM ? "SIGTERM received" : "SIGINT received");
    (*server)->Shutdown();
  });
  (*server)->Wait();
  signals.join();
  server->reset();
  return 0;
}
