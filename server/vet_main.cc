// File: server/vet_main.cc
//
// fpxint-vet: decides whether an untrusted TorchScript archive may run in fpxint-server. The
// server starts it for every TorchScript upload (server/vetting.h) with the archive on stdin,
// and reads one JSON verdict line from stdout:
//
//   {"passed":false,"summary":"refused: operations outside the allow-list: aten::from_file (in
//    __torch__.Reader.forward)","refused":[{"op":"aten::from_file","in":"__torch__.Reader.forward"}],
//    "functions":2,"nodes":9,"allow_list_sha256":"…","sandbox":"rlimits, no_new_privs, seccomp"}
//
// Order: close inherited descriptors, read the archive and the extra allow-lists into memory,
// warm LibTorch up, enter the sandbox (server/sandbox.h), and only then load the archive — the
// first moment any of its code runs.
//
// Exit codes: 0 passed, 3 refused (operations outside the list), 4 not loadable (including a
// `__setstate__` that failed inside the sandbox), 2 bad flags or input, 1 the sandbox could not
// be set up (no verdict).
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "model/vet.h"
#include "server/sandbox.h"

namespace {

void PrintVerdict(const nlohmann::json& j) {
  std::cout << j.dump() << std::endl;
}

}  // namespace

int main(int argc, char** argv) {
  fpxint::server::CloseInheritedFds();
  std::vector<std::string> allow_files;
  uint64_t max_bytes = uint64_t{4} << 30;
  fpxint::server::SandboxLimits limits;
  bool no_sandbox = false;
  bool list_ops = false;
  CLI::App app{
      "fpxint-vet: vets an untrusted TorchScript archive (read from stdin) before fpxint-server "
      "runs any of it. In a sandbox (no filesystem, no network, no new processes, CPU and memory "
      "limits) it loads the archive, inlines every function of it and checks every operation "
      "against an allow-list of pure tensor operations. Prints one JSON verdict line.\n"
      "Exit codes: 0 passed, 3 refused, 4 not loadable, 2 bad flags or input, 1 no sandbox.",
      "fpxint-vet"};
  app.add_option("--allow-ops", allow_files,
                 "extra allowed operations, one node kind (aten::name) per line; repeatable")
      ->check(CLI::ExistingFile);
  app.add_option("--max-bytes", max_bytes, "largest archive read from stdin")
      ->capture_default_str();
  app.add_option("--cpu-seconds", limits.cpu_seconds, "CPU time limit inside the sandbox")
      ->check(CLI::Range(1, 86400))
      ->capture_default_str();
  app.add_option("--memory-bytes", limits.address_space_bytes,
                 "address-space limit inside the sandbox")
      ->capture_default_str();
  app.add_flag("--no-sandbox", no_sandbox,
               "load without the sandbox: only for inspecting a trusted file (the server never "
               "passes it)");
  app.add_flag("--list-ops", list_ops,
               "print the allow-list (built-in and --allow-ops) and exit");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  fpxint::model::OpAllowList allow = fpxint::model::OpAllowList::BuiltIn();
  for (const std::string& f : allow_files) {
    std::ifstream in(f, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    if (auto s = allow.AddText(ss.str(), f); !s.ok()) {
      std::fprintf(stderr, "fpxint-vet: %s\n", std::string(s.message()).c_str());
      return 2;
    }
  }
  if (list_ops) {
    for (const std::string& k : allow.kinds()) std::printf("%s\n", k.c_str());
    std::fprintf(stderr, "%zu operations, sha256 %s\n", allow.size(), allow.Digest().c_str());
    return 0;
  }
  // The archive, bounded before it is held.
  std::string bytes;
  char buf[1 << 16];
  while (true) {
    const ssize_t n = ::read(STDIN_FILENO, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      std::perror("fpxint-vet: read stdin");
      return 2;
    }
    if (n == 0) break;
    if (bytes.size() + static_cast<uint64_t>(n) > max_bytes) {
      std::fprintf(stderr, "fpxint-vet: the archive on stdin is larger than --max-bytes %llu\n",
                   static_cast<unsigned long long>(max_bytes));
      return 2;
    }
    bytes.append(buf, static_cast<size_t>(n));
  }
  fpxint::model::WarmUpTorch();
  std::string sandbox = "none (--no-sandbox)";
  if (!no_sandbox) {
    auto layers = fpxint::server::EnterSandbox(limits);
    if (!layers.ok()) {
      std::fprintf(stderr, "fpxint-vet: %s\n", std::string(layers.status().message()).c_str());
      return 1;
    }
    sandbox = *layers;
  }
  nlohmann::json v;
  v["allow_list_sha256"] = allow.Digest();
  v["sandbox"] = sandbox;
  auto report = fpxint::model::VetTorchScript(bytes, allow);
  if (!report.ok()) {
    v["passed"] = false;
    v["loadable"] = false;
    v["summary"] = std::string(report.status().message());
    v["refused"] = nlohmann::json::array();
    PrintVerdict(v);
    return 4;
  }
  v["passed"] = report->passed;
  v["loadable"] = true;
  v["summary"] = report->Summary();
  v["functions"] = report->functions;
  v["nodes"] = report->nodes;
  v["refused"] = nlohmann::json::array();
  for (const auto& r : report->refused) v["refused"].push_back({{"op", r.kind}, {"in", r.where}});
  PrintVerdict(v);
  return report->passed ? 0 : 3;
}
