// `fpxint quantize` and `fpxint jobs list|get|watch|cancel`: submit expansion jobs from flags or a
// job file, follow them with a progress bar (terminal) or plain lines (logs), and gate a pipeline
// on the quantized model's error (--max-rel-error).
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <map>
#include <memory>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/commands.h"
#include "client/exit_codes.h"
#include "client/job_file.h"
#include "client/progress.h"
#include "client/rpc.h"
#include "proto/job_quality.h"
#include "fpxint/v1/quantizer.grpc.pb.h"

namespace fpxint::client {
namespace {

std::string Lower(const std::string& s) { return absl::AsciiStrToLower(s); }

// The --json form of a job: the Job message (proto field names) with `id` for job_id and
// `report` for result, the names the CLI documents.
nlohmann::json JobJson(const v1::Job& job) {
  nlohmann::json j = ProtoToJson(job);
  j["id"] = job.job_id();
  j["report"] = j.contains("result") ? j["result"] : nlohmann::json::object();
  j.erase("job_id");
  j.erase("result");
  return j;
}

int ExitCodeForState(v1::JobState s) {
  if (s == v1::FAILED) return kExitJobFailed;
  if (s == v1::CANCELLED) return kExitCancelled;
  return kExitOk;
}

std::string SpecSummary(const v1::JobSpec& s) {
  std::string out = absl::StrFormat("%s b=%d K=%d %s %s", v1::Granularity_Name(s.granularity()),
                                    s.weight_bits(), s.weight_terms(), Lower(v1::Grid_Name(s.grid())),
                                    Lower(v1::ScaleGranularity_Name(s.scale())));
  if (s.scale() == v1::PER_GROUP) absl::StrAppend(&out, "(", s.group_size(), ")");
  if (s.variant() == v1::DIGITS) absl::StrAppend(&out, " digits");
  if (s.act_bits() > 0) {
    absl::StrAppend(&out, absl::StrFormat(" a=%d K_a=%d", s.act_bits(), s.act_terms()));
    if (s.act_variant() == v1::DIGITS) absl::StrAppend(&out, " digits");
    if (s.truncate()) absl::StrAppend(&out, " truncated");
  }
  return out;
}

std::string TimeString(int64_t unix_ms) {
  if (unix_ms <= 0) return "-";
  const std::time_t t = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm {};
  ::localtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

// The job's error for the quality gate: the probe's output error at the full spec (LAYER/MODEL);
// without a probe, the worst tensor's relative Frobenius error at its last term. -1 if unknown.
double GateError(const v1::Job& job, std::string* what) {
  return JobQualityError(job.result(), what);
}

// A job run as shard tasks: ", shards 2/4 done, 2 running" (empty otherwise).
std::string TasksText(const v1::Progress& p) {
  if (p.tasks_total() == 0) return "";
  return absl::StrFormat(", shards %d/%d done, %d running", p.tasks_done(), p.tasks_total(),
                         p.tasks_running());
}

void PrintJob(const v1::Job& job) {
  const v1::JobSpec& s = job.spec();
  std::printf("job %s  %s  %s  model %s\n", job.job_id().c_str(),
              v1::JobState_Name(job.state()).c_str(), SpecSummary(s).c_str(), s.model().c_str());
  const v1::JobResult& r = job.result();
  std::printf("  created %s", TimeString(job.created_unix_ms()).c_str());
  if (job.finished_unix_ms() > 0 && job.started_unix_ms() > 0) {
    std::printf(", ran %.1f s", (job.finished_unix_ms() - job.started_unix_ms()) / 1000.0);
  }
  if (job.attempts() > 1) std::printf(", attempt %d", job.attempts());
  if (!job.replica().empty()) std::printf(", on replica %s", job.replica().c_str());
  std::printf("\n");
  if (!job.error().empty()) std::printf("  error: %s\n", job.error().c_str());
  if (job.state() == v1::RUNNING || job.state() == v1::QUEUED) {
    const v1::Progress& p = job.progress();
    std::printf("  progress: %s %d/%d layers %.0f%%%s%s\n", p.phase().c_str(), p.layers_done(),
                p.layers_total(), p.fraction() * 100,
                p.eta_seconds() >= 0 ? absl::StrFormat(", ETA %.0f s", p.eta_seconds()).c_str() : "",
                TasksText(p).c_str());
  }
  if (job.state() != v1::SUCCEEDED) return;
  // compression_ratio compares with the FP32 weights (the uploaded file may hold more).
  std::printf("  %d layers; FP32 weights %s -> %s (%.2fx smaller); no calibration data\n",
              r.layers_size(),
              HumanBytes(static_cast<uint64_t>(r.bytes_out() * r.compression_ratio())).c_str(),
              HumanBytes(r.bytes_out()).c_str(), r.compression_ratio());
  if (!r.wa_products().empty()) std::printf("  W×A products: %s\n", r.wa_products().c_str());
  if (r.shards_size() > 0) {
    std::printf("  %d shards, source read at %.2f GB/s:\n", r.shards_size(), r.read_gb_per_second());
    for (const v1::ShardResult& sh : r.shards()) {
      std::printf("    %-40s %4u expanded %4u kept  %9s -> %-9s  worst rel. error %.3e\n",
                  sh.file().c_str(), sh.tensors(), sh.copied(), HumanBytes(sh.bytes_in()).c_str(),
                  HumanBytes(sh.bytes_out()).c_str(), sh.max_rel_fro());
    }
  }
  if (r.probe_size() > 0) {
    std::printf("  output error on a data-free probe input (relative Frobenius):\n");
    for (const v1::ProbeError& p : r.probe()) {
      std::printf("    K_w=%d%s  %.3e\n", p.weight_terms(),
                  p.act_terms() > 0 ? absl::StrFormat(" K_a=%d", p.act_terms()).c_str() : "",
                  p.rel_fro());
    }
  } else if (!r.probe_note().empty()) {
    std::printf("  no probe: %s\n", r.probe_note().c_str());
  }
  if (r.has_allocation()) {
    const v1::TermAllocation& a = r.allocation();
    std::map<uint32_t, int> per_k;
    for (const v1::LayerResult& l : r.layers()) ++per_k[l.weight_terms()];
    std::string ks;
    for (const auto& [k, n] : per_k) absl::StrAppend(&ks, ks.empty() ? "" : ", ", n, " at K=", k);
    std::printf("  error budget: target %.3e, measured %.3e (estimated %.3e) with %s; terms %s\n",
                a.target_rel_error(), a.measured_rel_error(), a.estimated_rel_error(), ks.c_str(),
                HumanBytes(a.weight_bytes()).c_str());
    if (a.activation_floor() > 0) {
      std::printf("    of which the activations alone (every layer at max_terms): %.3e\n",
                  a.activation_floor());
    }
    for (const v1::UniformTerms& u : a.uniform()) {
      if (u.rel_error() <= a.target_rel_error()) {
        std::printf("    uniform K=%u meets it too with %s of terms: the budget saves %.0f%%\n",
                    u.weight_terms(), HumanBytes(u.weight_bytes()).c_str(),
                    u.weight_bytes() ? 100.0 * (1.0 - static_cast<double>(a.weight_bytes()) /
                                                           u.weight_bytes())
                                     : 0.0);
        break;
      }
    }
  }
  if (r.sensitivity_size() > 0) {
    // The top of the ranking; --json has every layer.
    constexpr int kShown = 5;
    std::printf("  most sensitive layers per byte (probe output error with only that layer "
                "quantized):\n");
    for (int i = 0; i < std::min(kShown, r.sensitivity_size()); ++i) {
      const v1::LayerSensitivity& l = r.sensitivity(i);
      std::string errors;
      for (int k = 0; k < l.rel_fro_size(); ++k) {
        absl::StrAppend(&errors, k ? "  " : "", absl::StrFormat("K=%d %.2e", k + 1, l.rel_fro(k)));
      }
      std::printf("    %-36s %s  (%.2e per MiB of a term)\n", l.name().c_str(), errors.c_str(),
                  l.error_per_mib());
    }
    if (r.sensitivity_size() > kShown) {
      std::printf("    ... and %d more layers (--json lists them all)\n",
                  r.sensitivity_size() - kShown);
    }
  }
  std::printf("  artifacts:\n");
  for (const v1::Artifact& a : job.artifacts()) {
    std::printf("    %-22s %-24s %-36s %s\n", a.artifact_id().c_str(), a.kind().c_str(),
                a.file_name().c_str(), HumanBytes(a.size_bytes()).c_str());
  }
  if (!r.deployed_name().empty()) {
    std::printf("  deployed for inference as %s version %s\n", r.deployed_name().c_str(),
                r.deployed_version().c_str());
  }
}

// Follows a job until it ends (WatchJob stream), drawing progress; then fetches the final job.
int FollowJob(const Connection& conn, v1::Quantizer::Stub& stub, const std::string& id,
              const std::string& cmd, v1::Job* final_job) {
  const GlobalOptions& g = conn.options();
  grpc::ClientContext ctx;
  conn.Prepare(&ctx, /*deadline=*/false);
  v1::JobRef ref;
  ref.set_job_id(id);
  auto reader = stub.WatchJob(&ctx, ref);
  ProgressBar bar(stderr, !g.quiet);
  const bool plain = !g.quiet && !bar.active();
  v1::JobEvent ev;
  v1::JobState last_state = v1::JOB_STATE_UNSPECIFIED;
  std::string last_phase;
  uint32_t last_done = ~0u;
  auto last_line = std::chrono::steady_clock::now() - std::chrono::hours(1);
  while (reader->Read(&ev)) {
    const v1::Job& j = ev.job();
    const v1::Progress& p = j.progress();
    const std::string where = absl::StrCat(
        p.layers_total() > 0
            ? absl::StrFormat("%d/%d %s", p.layers_done(), p.layers_total(), p.current_layer())
            : p.current_layer(),
        TasksText(p));
    if (bar.active()) {
      bar.Update(static_cast<uint64_t>(std::lround(p.fraction() * 1000)), 1000,
                 absl::StrCat(Lower(v1::JobState_Name(j.state())), " ", p.phase(), " ", where));
    } else if (plain) {
      const auto now = std::chrono::steady_clock::now();
      const bool changed = j.state() != last_state || p.phase() != last_phase;
      if (changed || (p.layers_done() != last_done && now - last_line >= std::chrono::seconds(1))) {
        std::string line = absl::StrCat(j.job_id(), " ", v1::JobState_Name(j.state()));
        for (const std::string& part : {p.phase(), where}) {
          if (!part.empty()) absl::StrAppend(&line, " ", part);
        }
        absl::StrAppend(&line, absl::StrFormat(" %.0f%%", p.fraction() * 100));
        if (p.eta_seconds() >= 0 && j.state() == v1::RUNNING) {
          absl::StrAppend(&line, absl::StrFormat(" eta %.0fs", p.eta_seconds()));
        }
        std::fprintf(stderr, "%s\n", line.c_str());
        std::fflush(stderr);
        last_line = now;
        last_done = p.layers_done();
      }
    }
    last_state = j.state();
    last_phase = p.phase();
  }
  grpc::Status s = reader->Finish();
  bar.Finish();
  if (!s.ok()) return ReportRpcError(cmd, s, g);
  grpc::ClientContext get_ctx;
  conn.Prepare(&get_ctx);
  s = stub.GetJob(&get_ctx, ref, final_job);
  if (!s.ok()) return ReportRpcError(cmd, s, g);
  return kExitOk;
}

// Prints a finished (or followed) job and returns the exit code its state and gate give.
int FinishJob(const v1::Job& job, const GlobalOptions& g, const std::string& cmd, double max_rel_error) {
  nlohmann::json j = JobJson(job);
  int rc = ExitCodeForState(job.state());
  std::string gate_msg;
  // The server enforced the gate (spec.max_rel_error): a job above it is FAILED with its report.
  if (max_rel_error >= 0 && (job.state() == v1::SUCCEEDED || job.result().probe_size() > 0 ||
                             job.result().layers_size() > 0)) {
    std::string what;
    const double err = GateError(job, &what);
    const bool pass = err >= 0 && err <= max_rel_error;
    j["quality_gate"] = {{"max_rel_error", max_rel_error}, {"rel_error", err}, {"measure", what},
                         {"passed", pass}};
    if (!pass) {
      rc = kExitJobFailed;
      gate_msg = err < 0 ? "the job report has no error figures to check --max-rel-error against"
                         : absl::StrFormat("%s is %.3e, above --max-rel-error %.3e", what, err,
                                           max_rel_error);
    } else if (!g.quiet && !g.json) {
      std::printf("quality gate passed: %s %.3e <= %.3e\n", what.c_str(), err, max_rel_error);
    }
  }
  if (g.json) {
    PrintJson(j);
  } else if (!g.quiet) {
    PrintJob(job);
  }
  if (job.state() == v1::FAILED) {
    std::fprintf(stderr, "fpxint %s: job %s FAILED: %s\n", cmd.c_str(), job.job_id().c_str(),
                 job.error().c_str());
  } else if (job.state() == v1::CANCELLED) {
    std::fprintf(stderr, "fpxint %s: job %s was CANCELLED\n", cmd.c_str(), job.job_id().c_str());
  }
  if (!gate_msg.empty()) {
    std::fprintf(stderr, "fpxint %s: quality gate FAILED: %s\n", cmd.c_str(), gate_msg.c_str());
  }
  return rc;
}

// ---- quantize --------------------------------------------------------------------------------

struct QuantizeFlags {
  std::string job_file;
  std::string model, granularity, grid, scale, variant, act_grid, act_variant, include, exclude,
      preset;
  std::string deploy_as, deploy_version, idempotency_key;
  uint32_t bits = 0, terms = 0, group_size = 0, act_bits = 0, act_terms = 0;
  double eps = 0, target_rel_error = 0;
  uint32_t min_terms = 0, max_terms = 0;
  std::vector<std::string> weight_terms_for;
  bool truncate = false, deploy = false, wait = false;
  uint32_t max_batch_size = 0;
  std::vector<uint32_t> preferred_batch_sizes;
  uint64_t max_queue_delay_us = 0;
  std::vector<std::string> outputs;
  double max_rel_error = -1;
  std::vector<std::pair<std::string, CLI::Option*>> opts;  // spec key -> its flag
};

int RunQuantize(const QuantizeFlags& f, const GlobalOptions& g) {
  const std::string cmd = "quantize";
  nlohmann::json spec = nlohmann::json::object();
  if (!f.job_file.empty()) {
    auto j = LoadJobFile(f.job_file);
    if (!j.ok()) return ReportError(cmd, std::string(j.status().message()), kExitBadInput, g);
    spec = *j;
  }
  if (spec.contains("deploy") && spec["deploy"].is_boolean()) {
    spec["deploy"] = nlohmann::json{{"enabled", spec["deploy"].get<bool>()}};
  }
  // Flags override the file.
  for (const auto& [key, opt] : f.opts) {
    if (opt->count() == 0) continue;
    if (key == "model") spec["model"] = f.model;
    else if (key == "granularity") spec["granularity"] = f.granularity;
    else if (key == "bits") spec["bits"] = f.bits;
    else if (key == "terms") spec["terms"] = f.terms;
    else if (key == "grid") spec["grid"] = f.grid;
    else if (key == "scale") spec["scale"] = f.scale;
    else if (key == "group_size") spec["group_size"] = f.group_size;
    else if (key == "variant") spec["variant"] = f.variant;
    else if (key == "act_bits") spec["act_bits"] = f.act_bits;
    else if (key == "act_terms") spec["act_terms"] = f.act_terms;
    else if (key == "act_grid") spec["act_grid"] = f.act_grid;
    else if (key == "act_variant") spec["act_variant"] = f.act_variant;
    else if (key == "truncate") spec["truncate"] = f.truncate;
    else if (key == "include") spec["include"] = f.include;
    else if (key == "exclude") spec["exclude"] = f.exclude;
    else if (key == "preset") spec["preset"] = f.preset;
    else if (key == "eps") spec["eps"] = f.eps;
    else if (key == "target_rel_error") spec["target_rel_error"] = f.target_rel_error;
    else if (key == "min_terms") spec["min_terms"] = f.min_terms;
    else if (key == "max_terms") spec["max_terms"] = f.max_terms;
    else if (key == "weight_terms_for") spec["weight_terms_for"] = f.weight_terms_for;
    else if (key == "outputs") spec["outputs"] = f.outputs;
    else if (key == "deploy") spec["deploy"]["enabled"] = f.deploy;
    else if (key == "deploy_as") {
      spec["deploy"]["enabled"] = true;
      spec["deploy"]["name"] = f.deploy_as;
    } else if (key == "deploy_version") spec["deploy"]["version"] = f.deploy_version;
    else if (key == "max_batch_size") spec["deploy"]["batching"]["max_batch_size"] = f.max_batch_size;
    else if (key == "preferred_batch_size")
      spec["deploy"]["batching"]["preferred_batch_size"] = f.preferred_batch_sizes;
    else if (key == "max_queue_delay_us")
      spec["deploy"]["batching"]["max_queue_delay_microseconds"] = f.max_queue_delay_us;
  }
  // Canonical spellings are resolved by JobSpecFromJson; keep "deploy_as" from a job file too.
  auto js = JobSpecFromJson(spec);
  if (!js.ok()) {
    return ReportError(cmd, std::string(js.status().message()),
                       f.job_file.empty() ? kExitUsage : kExitBadInput, g);
  }
  if (js->model().empty()) {
    return ReportError(cmd, "--model NAME (or `model:` in the job file) is required", kExitUsage, g);
  }
  if (!f.deploy_version.empty() && !js->deploy().enabled()) {
    return ReportError(cmd, "--deploy-version needs --deploy or --deploy-as", kExitUsage, g);
  }
  if (js->deploy().has_batching() && !js->deploy().enabled()) {
    return ReportError(cmd, "--max-batch-size, --preferred-batch-size and --max-queue-delay-us "
                            "need --deploy or --deploy-as", kExitUsage, g);
  }
  auto conn = Connection::Open(g);
  if (!conn.ok()) return ReportError(cmd, std::string(conn.status().message()), kExitUsage, g);
  auto stub = v1::Quantizer::NewStub((*conn)->channel());
  v1::SubmitJobRequest req;
  *req.mutable_spec() = *js;
  // The gate runs on the server, before anything is stored or deployed.
  if (f.max_rel_error > 0) req.mutable_spec()->set_max_rel_error(f.max_rel_error);
  req.set_idempotency_key(f.idempotency_key);
  v1::Job job;
  {
    grpc::ClientContext ctx;
    (*conn)->Prepare(&ctx);
    grpc::Status s = stub->SubmitJob(&ctx, req, &job);
    if (!s.ok()) return ReportRpcError(cmd, s, g);
  }
  const bool wait = f.wait || f.max_rel_error >= 0;
  if (!wait) {
    if (g.json) {
      PrintJson(JobJson(job));
    } else if (!g.quiet) {
      std::printf("submitted %s (%s, model %s)\n  follow it: fpxint jobs watch %s\n",
                  job.job_id().c_str(), SpecSummary(job.spec()).c_str(), job.spec().model().c_str(),
                  job.job_id().c_str());
    }
    return kExitOk;
  }
  if (!g.quiet && !g.json) {
    std::fprintf(stderr, "submitted %s (%s, model %s)\n", job.job_id().c_str(),
                 SpecSummary(job.spec()).c_str(), job.spec().model().c_str());
  }
  v1::Job final_job;
  if (int rc = FollowJob(**conn, *stub, job.job_id(), cmd, &final_job); rc != kExitOk) return rc;
  return FinishJob(final_job, g, cmd, f.max_rel_error);
}

// ---- jobs ------------------------------------------------------------------------------------

struct JobsFlags {
  std::string id;
  std::string state;
  uint32_t limit = 50;
  bool wait = false;
};

int RunJobsList(const JobsFlags& f, const GlobalOptions& g) {
  const std::string cmd = "jobs list";
  auto conn = Connection::Open(g);
  if (!conn.ok()) return ReportError(cmd, std::string(conn.status().message()), kExitUsage, g);
  auto stub = v1::Quantizer::NewStub((*conn)->channel());
  v1::ListJobsRequest req;
  if (!f.state.empty()) {
    v1::JobState st = v1::JOB_STATE_UNSPECIFIED;
    v1::JobState_Parse(absl::AsciiStrToUpper(f.state), &st);  // CLI11 checked the choice
    req.set_state(st);
  }
  std::vector<v1::Job> jobs;
  std::string next;
  do {
    req.set_page_size(std::min<uint32_t>(f.limit - static_cast<uint32_t>(jobs.size()), 1000));
    req.set_page_token(next);
    grpc::ClientContext ctx;
    (*conn)->Prepare(&ctx);
    v1::ListJobsResponse resp;
    grpc::Status s = stub->ListJobs(&ctx, req, &resp);
    if (!s.ok()) return ReportRpcError(cmd, s, g);
    for (const v1::Job& j : resp.jobs()) jobs.push_back(j);
    next = resp.next_page_token();
  } while (!next.empty() && jobs.size() < f.limit);
  if (g.json) {
    nlohmann::json list = nlohmann::json::array();
    for (const v1::Job& j : jobs) list.push_back(JobJson(j));
    PrintJson({{"jobs", list}, {"next_page_token", next}});
    return kExitOk;
  }
  if (g.quiet) return kExitOk;
  if (jobs.empty()) {
    std::printf("no jobs%s\n", f.state.empty() ? "" : (" in state " + f.state).c_str());
    return kExitOk;
  }
  std::printf("%-22s %-10s %-20s %-40s %s\n", "ID", "STATE", "MODEL", "SPEC", "CREATED");
  for (const v1::Job& j : jobs) {
    std::string state = v1::JobState_Name(j.state());
    if (j.state() == v1::RUNNING) {
      absl::StrAppend(&state, absl::StrFormat(" %.0f%%", j.progress().fraction() * 100));
    }
    std::printf("%-22s %-10s %-20s %-40s %s\n", j.job_id().c_str(), state.c_str(),
                j.spec().model().c_str(), SpecSummary(j.spec()).c_str(),
                TimeString(j.created_unix_ms()).c_str());
  }
  if (!next.empty()) std::printf("(more: --limit %u)\n", f.limit * 2);
  return kExitOk;
}

int RunJobsOne(const JobsFlags& f, const GlobalOptions& g, const std::string& verb) {
  const std::string cmd = "jobs " + verb;
  auto conn = Connection::Open(g);
  if (!conn.ok()) return ReportError(cmd, std::string(conn.status().message()), kExitUsage, g);
  auto stub = v1::Quantizer::NewStub((*conn)->channel());
  v1::JobRef ref;
  ref.set_job_id(f.id);
  v1::Job job;
  if (verb == "watch") {
    if (int rc = FollowJob(**conn, *stub, f.id, cmd, &job); rc != kExitOk) return rc;
    return FinishJob(job, g, cmd, -1);
  }
  grpc::ClientContext ctx;
  (*conn)->Prepare(&ctx);
  if (verb == "delete") {
    v1::DeleteJobResponse del;
    grpc::Status s = stub->DeleteJob(&ctx, ref, &del);
    if (!s.ok()) return ReportRpcError(cmd, s, g);
    if (g.json) {
      PrintJson({{"job_id", f.id},
                 {"deleted", true},
                 {"artifacts_deleted", del.artifacts_deleted()},
                 {"bytes_freed", del.bytes_freed()}});
    } else if (!g.quiet) {
      std::printf("%s: deleted with %u artifact(s); %llu bytes freed\n", f.id.c_str(),
                  del.artifacts_deleted(), static_cast<unsigned long long>(del.bytes_freed()));
    }
    return kExitOk;
  }
  grpc::Status s = verb == "cancel" ? stub->CancelJob(&ctx, ref, &job) : stub->GetJob(&ctx, ref, &job);
  if (!s.ok()) return ReportRpcError(cmd, s, g);
  if (verb == "cancel" && f.wait && job.state() != v1::CANCELLED) {
    if (int rc = FollowJob(**conn, *stub, f.id, cmd, &job); rc != kExitOk) return rc;
  }
  if (g.json) {
    PrintJson(JobJson(job));
  } else if (!g.quiet) {
    if (verb == "cancel") {
      std::printf("%s: %s\n", job.job_id().c_str(),
                  job.state() == v1::CANCELLED ? "cancelled"
                                               : ("cancel requested (now " +
                                                  v1::JobState_Name(job.state()) + ")").c_str());
    } else {
      PrintJob(job);
    }
  }
  return kExitOk;
}

}  // namespace

void AddJobCommands(CLI::App& app, const GlobalOptions& g, int* exit_code) {
  auto q = std::make_shared<QuantizeFlags>();
  CLI::App* c = AddCommand(app,
      "quantize",
      "Submit an FP=xINT expansion job for an uploaded model (no calibration data needed).\n"
      "The spec comes from flags, from a YAML/JSON job file (-f), or both (flags win).\n"
      "  fpxint quantize --model ocr_rec --granularity layer --bits 4 --terms 2 --wait\n"
      "  fpxint quantize --model ocr_rec --granularity layer --bits 4 --terms 2 \\\n"
      "      --act-bits 4 --act-terms 2 --deploy-as ocr_rec_w4a4 --wait\n"
      "  fpxint quantize -f job.yaml --wait --max-rel-error 0.01 --json\n"
      "  fpxint quantize --model ocr_rec --granularity layer --target-rel-error 0.01 --wait\n"
      "Exit: 0 submitted/succeeded, 5 job failed or quality gate failed, 6 cancelled.");
  c->add_option("-f,--job-file", q->job_file, "YAML or JSON job spec (keys as in fpxint.v1.JobSpec)")
      ->check(CLI::ExistingFile);
  auto opt = [&](const std::string& key, CLI::Option* o) {
    q->opts.emplace_back(key, o);
    return o;
  };
  opt("model", c->add_option("--model", q->model, "name of an uploaded model"));
  opt("granularity", c->add_option("--granularity", q->granularity,
                                   "tensor (any weights file), layer or model (TorchScript)"))
      ->check(CLI::IsMember({"tensor", "layer", "model"}));
  opt("bits", c->add_option("--bits", q->bits, "weight bits b per term, 1..8 (default 4)"))
      ->check(CLI::Range(1u, 8u));
  opt("terms", c->add_option("--terms", q->terms, "weight terms K_w, 1..16 (default 2)"))
      ->check(CLI::Range(1u, 16u));
  opt("grid", c->add_option("--grid", q->grid, "quantizer grid: sym (default), asym, mid"))
      ->check(CLI::IsMember({"sym", "asym", "mid"}));
  opt("scale", c->add_option("--scale", q->scale, "scale granularity: channel (default), tensor, group"))
      ->check(CLI::IsMember({"tensor", "channel", "group"}));
  opt("group_size", c->add_option("--group-size", q->group_size, "group size g for --scale group"))
      ->check(CLI::PositiveNumber);
  opt("variant", c->add_option("--variant", q->variant,
                               "rescaled (default: each term rescaled to its residual) or digits "
                               "(mid grid, s_{k+1} = s_k / 2^b)"))
      ->check(CLI::IsMember({"rescaled", "digits"}));
  opt("act_bits", c->add_option("--act-bits", q->act_bits, "activation bits (0 = weight-only)"))
      ->check(CLI::Range(0u, 8u));
  opt("act_terms", c->add_option("--act-terms", q->act_terms, "activation terms K_a"))
      ->check(CLI::Range(0u, 16u));
  opt("act_grid", c->add_option("--act-grid", q->act_grid, "activation grid: sym, asym, mid"))
      ->check(CLI::IsMember({"sym", "asym", "mid"}));
  opt("act_variant",
      c->add_option("--act-variant", q->act_variant,
                    "activation variant: rescaled (default) or digits (with --act-grid mid). "
                    "Digits weights and activations with K*b <= 8 on each side run every term "
                    "product of a layer as one 8-bit product (folded terms)"))
      ->check(CLI::IsMember({"rescaled", "digits"}));
  opt("truncate", c->add_flag("--truncate", q->truncate,
                              "order truncation: only products W_i X_j with i + j <= K + 1"));
  opt("include", c->add_option("--include", q->include, "regex: expand only matching tensors/layers"));
  opt("exclude", c->add_option("--exclude", q->exclude, "regex: leave matching tensors/layers in FP"));
  opt("preset", c->add_option("--preset", q->preset,
                              "TENSOR jobs: 'transformer' keeps embeddings, norms, biases and "
                              "lm_head in their original dtype (an --include naming them expands "
                              "them)"))
      ->check(CLI::IsMember({"transformer"}));
  opt("eps", c->add_option("--eps", q->eps,
                           "stop adding terms once the relative error is below eps (0 < eps < 1)"))
      ->check(CLI::Range(0.0, 0.999999999));
  opt("target_rel_error",
      c->add_option("--target-rel-error", q->target_rel_error,
                    "error budget (weight-only layer/model jobs): each layer gets its own K, "
                    "chosen from its data-free sensitivity, so that the probe output error is at "
                    "most this at the fewest weight bytes; the job fails with the best error "
                    "reached when --max-terms cannot meet it"))
      ->check(CLI::PositiveNumber);
  opt("min_terms", c->add_option("--min-terms", q->min_terms,
                                 "with --target-rel-error: the fewest terms a layer gets (default 1)"))
      ->check(CLI::Range(1u, 16u));
  opt("max_terms", c->add_option("--max-terms", q->max_terms,
                                 "with --target-rel-error: the most terms a layer gets (default 4)"))
      ->check(CLI::Range(1u, 16u));
  opt("weight_terms_for",
      c->add_option("--weight-terms-for", q->weight_terms_for,
                    "with --target-rel-error: PATTERN=K pins the layers whose name the regex "
                    "finds to K terms (repeatable; the first match wins)"));
  opt("outputs", c->add_option("--output-format", q->outputs,
                               "extra artifacts (repeatable): dequantized_safetensors (TENSOR: "
                               "the source's layout and dtypes, weights as the sum of their "
                               "terms), dequantized_torchscript (weight-only LAYER/MODEL), "
                               "basis_torchscript (MODEL); packed safetensors and report are "
                               "always written"))
      ->check(CLI::IsMember({"packed_safetensors", "dequantized_safetensors",
                             "dequantized_torchscript", "basis_torchscript", "report_json"}));
  opt("deploy", c->add_flag("--deploy", q->deploy, "deploy the result for inference (default name: MODEL-fpxint)"));
  opt("deploy_as", c->add_option("--deploy-as", q->deploy_as, "deploy the result for inference under this name"));
  opt("deploy_version", c->add_option("--deploy-version", q->deploy_version,
                                      "version to deploy as (default: the next free number)"));
  opt("max_batch_size",
      c->add_option("--max-batch-size", q->max_batch_size,
                    "dynamic batching of the deployed version: concurrent requests are "
                    "concatenated along their first dimension (which the model's input must "
                    "leave variable, -1) into passes of at most this many rows; larger requests "
                    "are refused (default 0: every request runs alone)"))
      ->check(CLI::Range(0u, 1024u));
  opt("preferred_batch_size",
      c->add_option("--preferred-batch-size", q->preferred_batch_sizes,
                    "with --max-batch-size: a pass runs as soon as it reaches the largest of "
                    "these, and is cut to the largest one it exceeds (repeatable)"))
      ->check(CLI::Range(1u, 1024u));
  opt("max_queue_delay_us",
      c->add_option("--max-queue-delay-us", q->max_queue_delay_us,
                    "with --max-batch-size: how long a request may wait for others, in "
                    "microseconds (default 0: a pass takes whatever is waiting)"))
      ->check(CLI::Range(uint64_t{0}, uint64_t{10000000}));
  c->add_option("--idempotency-key", q->idempotency_key,
                "submitting twice with one key returns the first job instead of a second one");
  c->add_flag("-w,--wait", q->wait, "follow the job to its end (progress bar on a terminal)");
  c->add_option("--max-rel-error", q->max_rel_error,
                "quality gate (implies --wait): exit 5 when the job's error exceeds this; the error "
                "is the probe output error at full K (layer/model) or the worst tensor's relative "
                "Frobenius error (tensor)")
      ->check(CLI::NonNegativeNumber);
  c->callback([q, &g, exit_code] { *exit_code = RunQuantize(*q, g); });

  CLI::App* jobs =
      app.add_subcommand("jobs", "List, inspect, follow, cancel and delete expansion jobs");
  jobs->require_subcommand(1);
  auto jf = std::make_shared<JobsFlags>();
  CLI::App* list = jobs->add_subcommand("list", "Jobs, newest first");
  list->add_option("--state", jf->state, "only jobs in this state")
      ->check(CLI::IsMember({"queued", "running", "succeeded", "failed", "cancelled"}, CLI::ignore_case));
  list->add_option("--limit", jf->limit, "at most this many jobs (default 50)")->check(CLI::Range(1u, 100000u));
  list->callback([jf, &g, exit_code] { *exit_code = RunJobsList(*jf, g); });
  for (const char* verb : {"get", "watch", "cancel", "delete"}) {
    const std::string v = verb;
    CLI::App* sc = jobs->add_subcommand(
        v, v == "get"      ? "Show a job: state, progress, errors per term, artifacts"
           : v == "watch"  ? "Follow a job until it ends; exit 0 succeeded, 5 failed, 6 cancelled"
           : v == "cancel" ? "Cancel a queued or running job (cooperative; prompt)"
                           : "Delete a finished job and its artifacts (a deployment it made "
                             "keeps serving)");
    sc->add_option("JOB_ID", jf->id, "job id (job-...)")->required();
    if (v == "cancel") sc->add_flag("--wait", jf->wait, "wait until the job has stopped");
    sc->callback([jf, &g, exit_code, v] { *exit_code = RunJobsOne(*jf, g, v); });
  }
}

}  // namespace fpxint::client
