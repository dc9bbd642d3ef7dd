#include "client/expand_command.h"

#include <cstdio>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/exit_codes.h"
#include "client/progress.h"
#include "client/tensor_io.h"
#include "core/artifact.h"
#include "core/kernels.h"
#include "core/thread_pool.h"

namespace fpxint::client {
namespace {

struct ExpandFlags {
  std::string input;
  std::string output;
  int bits = 4;
  int terms = 2;
  std::string grid = "sym";
  std::string scale = "channel";
  int64_t group_size = 0;
  std::string variant = "rescaled";
  double eps = 0;
  std::string include;
  std::string exclude;
  std::string preset;
  std::string report;
  int threads = 0;
  std::string kernel = "auto";
};

void PrintError(absl::string_view what) { std::fprintf(stderr, "fpxint expand: %s\n", std::string(what).c_str()); }

void PrintSummary(const core::ExpandReport& r, const std::string& out) {
  std::printf("expanded %zu tensors, copied %zu unchanged  (%s, no calibration data)\n",
              r.tensors.size(), r.copied.size(), r.spec.ToString().c_str());
  std::printf("%s -> %s  (%.2fx smaller)  in %.2f s  [kernel %s, %d thread%s]\n",
              HumanBytes(r.bytes_in).c_str(), HumanBytes(r.bytes_out).c_str(),
              r.bytes_out ? static_cast<double>(r.bytes_in) / r.bytes_out : 0.0, r.wall_seconds,
              r.kernel.c_str(), r.threads, r.threads == 1 ? "" : "s");
  std::vector<core::TermSummary> sum = r.Summary();
  if (!sum.empty()) {
    std::printf("\n  terms  bits/weight   rel. error (all)   worst tensor rel_fro   worst rel_max   min SQNR\n");
    for (const core::TermSummary& s : sum) {
      std::printf("  %5d  %11d   %16.3e   %20.3e   %13.3e   %6.1f dB\n", s.k, s.k * r.spec.bits,
                  s.rel_fro, s.worst_rel_fro, s.worst_rel_max, s.min_sqnr_db);
    }
  }
  std::printf("\nwrote %s\n", out.c_str());
}

int Run(const ExpandFlags& f, const GlobalOptions& g) {
  core::ArtifactOptions o;
  core::ExpansionSpec& spec = o.spec;
  spec.bits = f.bits;
  spec.terms = f.terms;
  spec.grid = *core::ParseGrid(f.grid);  // CLI11 restricted the choices already
  spec.scale = *core::ParseScale(f.scale);
  spec.variant = *core::ParseVariant(f.variant);
  spec.group_size = f.group_size;
  spec.eps = f.eps;
  if (spec.scale == core::ScaleGranularity::kGroup && spec.group_size == 0) {
    PrintError("--scale group needs --group-size G (e.g. --group-size 128)");
    return kExitUsage;
  }
  if (absl::Status s = spec.Validate(); !s.ok()) {
    PrintError(absl::StrCat("invalid options: ", s.message()));
    return kExitUsage;
  }
  if (f.kernel != "auto") {
    o.expand.kernels = core::KernelsByName(f.kernel);
    if (o.expand.kernels == nullptr) {
      PrintError(absl::StrCat("--kernel ", f.kernel, " is not supported on this CPU"));
      return kExitUsage;
    }
  }
  o.include_regex = f.include;
  o.exclude_regex = f.exclude;
  if (f.preset == "transformer") {
    o.keep_regex = core::kTransformerPresetKeep;
    o.keep_reason = "kept by --preset transformer";
  }
  std::unique_ptr<core::ThreadPool> pool;
  if (f.threads != 1) {
    pool = std::make_unique<core::ThreadPool>(f.threads);
    o.expand.pool = pool.get();
  }
  ProgressBar bar(stderr, !g.quiet);
  o.progress = [&](const core::ExpandProgress& p) {
    bar.Update(p.bytes_done, p.bytes_total,
               absl::StrFormat("%d/%d %s", p.tensor_index, p.tensor_count, p.name));
  };
  absl::StatusOr<core::ExpandReport> report = core::ExpandSafetensorsFile(f.input, f.output, o);
  bar.Finish();
  if (!report.ok()) {
    PrintError(report.status().message());
    // Regex mistakes are usage errors; everything about the file's content is bad input.
    if (absl::IsInvalidArgument(report.status()) &&
        (absl::StartsWith(report.status().message(), "include:") ||
         absl::StartsWith(report.status().message(), "exclude:"))) {
      return kExitUsage;
    }
    return ExitCodeFor(report.status());
  }
  const std::string json = report->ToJson();
  if (!f.report.empty() && !WriteWholeFile(f.report, json + "\n").ok()) {
    PrintError(absl::StrCat("cannot write report '", f.report, "'"));
    return kExitIoError;
  }
  if (g.json) {
    std::printf("%s\n", json.c_str());
  } else if (!g.quiet) {
    PrintSummary(*report, f.output);
  }
  return kExitOk;
}

}  // namespace

void AddExpandCommand(CLI::App& app, const GlobalOptions& global, int* exit_code) {
  auto flags = std::make_shared<ExpandFlags>();
  CLI::App* cmd = app.add_subcommand(
      "expand",
      "Expand the weights of a safetensors file (or a torch.save state dict, read without\n"
      "running pickle code) offline into a sum of K low-bit terms\n"
      "(FP=xINT tensor expansion; no calibration data, no server needed).\n"
      "Every floating tensor of rank >= 2 that the filters select is replaced by\n"
      "<name>.t{k}.codes / .scale [/ .zero] for k = 1..K; everything else is copied unchanged.\n"
      "The error shrinks by about 1/(2^b-2) (sym) per term: b=4, K=2 is close to 8-bit quality.");
  cmd->add_option("input", flags->input,
                  "Source weights: .safetensors, or a torch.save file of tensors (state dict or\n"
                  "checkpoint; names join nested keys with '.')")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("-o,--output", flags->output, "Artifact to write (.safetensors), atomically")
      ->required();
  cmd->add_option("-b,--bits", flags->bits, "Bits per term b, 1..8 (sym needs >= 2)")
      ->capture_default_str();
  cmd->add_option("-k,--terms", flags->terms,
                  "Number of terms K (the cap when --eps is given), 1..64")
      ->capture_default_str();
  cmd->add_option("--grid", flags->grid,
                  "Quantizer grid: sym (restricted symmetric), asym (min-max with zero point),\n"
                  "mid (mid-rise, levels at half steps)")
      ->check(CLI::IsMember({"sym", "asym", "mid"}))
      ->capture_default_str();
  cmd->add_option("--scale", flags->scale,
                  "Scale granularity: tensor, channel (dim 0), or group (g elements of a row)")
      ->check(CLI::IsMember({"tensor", "channel", "group"}))
      ->capture_default_str();
  cmd->add_option("-g,--group-size", flags->group_size, "Group size g for --scale group")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--variant", flags->variant,
                  "rescaled: each term takes its scale from its residual (default);\n"
                  "digits: grid mid, s_k+1 = s_k/2^b, the K codes are one (K*b)-bit integer")
      ->check(CLI::IsMember({"rescaled", "digits"}))
      ->capture_default_str();
  cmd->add_option("--eps", flags->eps,
                  "Stop a tensor early once max|residual| <= eps * max|group| (0 = off)")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--include", flags->include,
                  "Only expand tensors whose name matches this regex (RE2 syntax, searched)");
  cmd->add_option("--exclude", flags->exclude, "Do not expand tensors whose name matches this regex");
  cmd->add_option("--preset", flags->preset,
                  "transformer: keep embeddings, norms, biases and lm_head as they are (an "
                  "--include naming them expands them)")
      ->check(CLI::IsMember({"transformer"}));
  cmd->add_option("--report", flags->report,
                  "Also write the JSON report (per tensor and term: rel_fro, rel_max, sqnr_db)");
  cmd->add_option("-j,--threads", flags->threads, "Threads (0 = all cores)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--kernel", flags->kernel, "Kernel variant: auto, ref, avx2, avx512")
      ->check(CLI::IsMember({"auto", "ref", "avx2", "avx512"}))
      ->capture_default_str();
  cmd->footer(
      "\nExamples:\n"
      "  fpxint expand model.safetensors -o model.w4x2.safetensors --bits 4 --terms 2\n"
      "  fpxint expand model.safetensors -o q.safetensors -b 2 -k 4 --grid mid --scale group -g 64 \\\n"
      "      --exclude 'embed|lm_head' --report report.json\n"
      "  fpxint expand model.safetensors -o model.w4x2.safetensors --preset transformer\n"
      "\nExit codes: 0 ok, 2 usage error, 3 bad input file, 4 I/O error.");
  cmd->callback([flags, &global, exit_code] { *exit_code = Run(*flags, global); });
}

}  // namespace fpxint::client
