// File: server/vetting.cc
#include "server/vetting.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/status_macros.h"
#include "core/unique_fd.h"
#include "model/vet.h"
#include "server/log.h"
#include "server/status_util.h"
#include "server/store.h"

namespace fpxint::server {
namespace {

namespace fs = std::filesystem;

constexpr size_t kMaxVerdictBytes = 1 << 20;  // stdout kept from the vetting process
constexpr size_t kMaxStderrBytes = 16 << 10;  // stderr kept, for the log

using Fd = core::UniqueFd;

std::string DefaultVetBinary() {
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return "fpxint-vet";
  return (self.parent_path() / "fpxint-vet").string();
}

std::string LastLine(const std::string& s) {
  std::vector<absl::string_view> lines = absl::StrSplit(s, '\n', absl::SkipWhitespace());
  return lines.empty() ? std::string() : std::string(lines.back());
}

}  // namespace

absl::StatusOr<std::unique_ptr<TorchScriptVetter>> TorchScriptVetter::Create(Options o,
                                                                            Journal* journal) {
  if (o.vet_binary.empty()) o.vet_binary = DefaultVetBinary();
  if (::access(o.vet_binary.c_str(), X_OK) != 0) {
    return absl::NotFoundError(absl::StrCat(
        "--vet-binary: cannot run '", o.vet_binary,
        "' (fpxint-vet vets TorchScript uploads; it is installed next to fpxint-server)"));
  }
  model::OpAllowList list = model::OpAllowList::BuiltIn();
  for (const std::string& f : o.allow_ops_files) {
    FPX_ASSIGN_OR_RETURN(std::string text, ReadTextFile(f, "--torchscript-allow-ops"));
    FPX_RETURN_IF_ERROR(list.AddText(text, absl::StrCat("--torchscript-allow-ops ", f)));
  }
  return std::unique_ptr<TorchScriptVetter>(
      new TorchScriptVetter(std::move(o), journal, list.Digest()));
}

absl::StatusOr<TorchScriptVerdict> TorchScriptVetter::Vet(const std::string& sha256,
                                                          const std::string& path) {
  FPX_ASSIGN_OR_RETURN(std::optional<TorchScriptVerdict> known,
                       journal_->GetVerdict(sha256, digest_));
  if (known) return *known;
  {
    absl::MutexLock l(&mu_);
    mu_.Await(absl::Condition(
        +[](TorchScriptVetter* v) ABSL_NO_THREAD_SAFETY_ANALYSIS {
          return v->running_ < std::max(1, v->opts_.max_concurrent);
        },
        this));
    ++running_;
  }
  const uint64_t t0 = SteadyNowNs();
  absl::StatusOr<TorchScriptVerdict> v = Run(path);
  {
    absl::MutexLock l(&mu_);
    --running_;
  }
  if (!v.ok()) return v.status();
  LogInfo(absl::StrCat("TorchScript ", sha256.substr(0, 12), " vetted in ",
                       (SteadyNowNs() - t0) / 1000000, " ms: ", v->summary));
  FPX_RETURN_IF_ERROR(journal_->PutVerdict(sha256, digest_, *v));
  return v;
}

absl::Status TorchScriptVetter::Require(const std::string& sha256, const std::string& path) {
  FPX_ASSIGN_OR_RETURN(TorchScriptVerdict v, Vet(sha256, path));
  if (v.passed) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "the TorchScript model was refused by vetting, so the server does not run it: ", v.summary,
      " (operators may extend the allow-list with --torchscript-allow-ops)"));
}

absl::StatusOr<TorchScriptVerdict> TorchScriptVetter::Run(const std::string& path) {
  Fd model(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (model.get() < 0) {
    return absl::InternalError(absl::StrCat("vetting: cannot open the stored upload: ",
                                            std::strerror(errno)));
  }
  struct stat st;
  if (::fstat(model.get(), &st) != 0) return absl::InternalError("vetting: fstat failed");
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  const uint64_t memory = opts_.memory_bytes ? opts_.memory_bytes : (uint64_t{2} << 30) + 4 * size;
  int out[2], err[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return absl::InternalError("vetting: pipe failed");
  Fd out_r(out[0]), out_w(out[1]);
  if (::pipe2(err, O_CLOEXEC) != 0) return absl::InternalError("vetting: pipe failed");
  Fd err_r(err[0]), err_w(err[1]);

  std::vector<std::string> args = {opts_.vet_binary,
                                   "--max-bytes",
                                   std::to_string(size),
                                   "--cpu-seconds",
                                   std::to_string(opts_.cpu_seconds),
                                   "--memory-bytes",
                                   std::to_string(memory)};
  for (const std::string& f : opts_.allow_ops_files) {
    args.push_back("--allow-ops");
    args.push_back(f);
  }
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  // A clean environment: nothing of the server's (tokens' paths, database URLs) reaches the
  // child, and LibTorch runs one thread.
  std::vector<std::string> env = {"PATH=/usr/bin:/bin", "LC_ALL=C", "OMP_NUM_THREADS=1",
                                  "OPENBLAS_NUM_THREADS=1", "MKL_NUM_THREADS=1"};
  // Sanitizer settings (suppressions, exit codes) apply to the child of a sanitizer build too.
  for (const char* name : {"ASAN_OPTIONS", "TSAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS"}) {
    if (const char* v = std::getenv(name)) env.push_back(absl::StrCat(name, "=", v));
  }
  std::vector<char*> envp;
  for (std::string& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);

  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, model.get(), STDIN_FILENO);
  posix_spawn_file_actions_adddup2(&fa, out_w.get(), STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&fa, err_w.get(), STDERR_FILENO);
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, opts_.vet_binary.c_str(), &fa, nullptr, argv.data(),
                               envp.data());
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) {
    return absl::UnavailableError(absl::StrCat("vetting: cannot start '", opts_.vet_binary,
                                               "': ", std::strerror(rc)));
  }
  out_w.Reset();
  err_w.Reset();
  model.Reset();

  // Both pipes until EOF or the deadline, each kept up to its bound.
  std::string verdict, diag;
  const absl::Time deadline = absl::Now() + opts_.timeout;
  bool timed_out = false;
  bool out_open = true, err_open = true;
  char buf[8192];
  while (out_open || err_open) {
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      timed_out = true;
      break;
    }
    struct pollfd p[2] = {{out_r.get(), POLLIN, 0}, {err_r.get(), POLLIN, 0}};
    if (!out_open) p[0].fd = -1;
    if (!err_open) p[1].fd = -1;
    const int n = ::poll(p, 2, static_cast<int>(absl::ToInt64Milliseconds(left)) + 1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    for (int i = 0; i < 2; ++i) {
      if (p[i].fd < 0 || (p[i].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
      const ssize_t got = ::read(p[i].fd, buf, sizeof(buf));
      if (got <= 0) {
        (i == 0 ? out_open : err_open) = false;
        continue;
      }
      std::string& dst = i == 0 ? verdict : diag;
      const size_t cap = i == 0 ? kMaxVerdictBytes : kMaxStderrBytes;
      dst.append(buf, std::min(static_cast<size_t>(got), cap - std::min(cap, dst.size())));
    }
  }
  if (timed_out) ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (timed_out) {
    return TorchScriptVerdict{
        false, absl::StrCat("loading it took longer than ", absl::FormatDuration(opts_.timeout),
                            " in the vetting sandbox")};
  }
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    return TorchScriptVerdict{
        false, absl::StrCat("the vetting process was killed by signal ", sig, " (",
                            sig == SIGXCPU ? "CPU time limit"
                            : sig == SIGSYS ? "a forbidden system call"
                                            : strsignal(sig),
                            ") while loading it in the sandbox")};
  }
  const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  if (code != 0 && code != 3 && code != 4) {
    LogError(absl::StrCat("fpxint-vet exited ", code, ": ", LastLine(diag)));
    return absl::UnavailableError(absl::StrCat(
        "vetting: fpxint-vet exited with code ", code, " and no verdict: ", LastLine(diag)));
  }
  nlohmann::json j = nlohmann::json::parse(LastLine(verdict), nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("passed") || !j["passed"].is_boolean() ||
      !j.contains("summary") || !j["summary"].is_string()) {
    return absl::UnavailableError("vetting: fpxint-vet printed no verdict");
  }
  TorchScriptVerdict v;
  v.passed = j["passed"].get<bool>() && code == 0;
  v.summary = j["summary"].get<std::string>();
  if (code == 4) v.summary = absl::StrCat("it does not load in the vetting sandbox: ", v.summary);
  return v;
}

}  // namespace fpxint::server
