// File: model/vet.cc
#include "model/vet.h"

#include <ATen/Parallel.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/passes/inliner.h>
#include <torch/script.h>

#include <map>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/sha256.h"
#include "model/act_expand_op.h"
#include "model/lowbit_ops.h"

// model/torchscript_allowed_ops.txt, embedded at build time (model/CMakeLists.txt).
extern "C" const char kFpxintBuiltInAllowedOps[];

namespace fpxint::model {
namespace {

std::string FirstLine(const std::string& msg) {
  std::vector<std::string> lines = absl::StrSplit(msg, '\n', absl::SkipWhitespace());
  for (const std::string& l : lines) {
    if (absl::StrContains(l, "Error: ") || absl::StrContains(l, "error: ")) return l;
  }
  return lines.empty() ? msg : lines.front();
}

// Every node kind in `block` and its nested blocks, with the count of nodes walked.
void Walk(const torch::jit::Block* block, std::set<std::string>* kinds, int64_t* nodes) {
  for (const torch::jit::Node* n : block->nodes()) {
    ++*nodes;
    kinds->insert(n->kind().toQualString());
    for (const torch::jit::Block* b : n->blocks()) Walk(b, kinds, nodes);
  }
}

}  // namespace

OpAllowList OpAllowList::BuiltIn() {
  OpAllowList l;
  // The built-in text is checked by the build's test (vet_test); a failure here is a build bug.
  absl::Status s = l.AddText(kFpxintBuiltInAllowedOps, "built-in allow-list");
  if (!s.ok()) std::abort();
  return l;
}

absl::Status OpAllowList::AddText(absl::string_view text, absl::string_view source) {
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line.substr(0, line.find('#')));
    if (line.empty()) continue;
    const size_t sep = line.find("::");
    const bool ok = sep != absl::string_view::npos && sep > 0 && sep + 2 < line.size() &&
                    line.find_first_of(" \t") == absl::string_view::npos &&
                    line.find("::", sep + 2) == absl::string_view::npos;
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, " line ", line_no, ": '", line,
          "' is not an operation; expected one node kind per line, such as aten::conv2d"));
    }
    kinds_.emplace(line);
  }
  return absl::OkStatus();
}

std::string OpAllowList::Digest() const {
  core::Sha256 h;
  for (const std::string& k : kinds_) {
    h.Update(k);
    h.Update("\n");
  }
  return h.HexDigest();
}

std::string VetReport::Summary() const {
  if (passed) {
    return absl::StrCat("passed: ", functions, " functions, ", nodes,
                        " nodes, every operation on the allow-list");
  }
  // "aten::from_file (in __torch__.M.forward, __torch__.M.__setstate__); prim::Print (in ...)"
  std::map<std::string, std::vector<std::string>> by_kind;
  std::vector<std::string> order;
  for (const RefusedOp& r : refused) {
    auto [it, fresh] = by_kind.try_emplace(r.kind);
    if (fresh) order.push_back(r.kind);
    it->second.push_back(r.where);
  }
  std::vector<std::string> parts;
  for (const std::string& k : order) {
    parts.push_back(absl::StrCat(k, " (in ", absl::StrJoin(by_kind[k], ", "), ")"));
  }
  return absl::StrCat("refused: operations outside the allow-list: ", absl::StrJoin(parts, "; "));
}

void WarmUpTorch() {
  EnsureActExpandOpRegistered();
  EnsureLowbitOpsRegistered();
  at::set_num_threads(1);
  // A convolution, a matmul and a reduction make LibTorch set up its thread pool, CPU feature
  // dispatch and allocator now, while files can still be opened.
  at::Tensor x = torch::ones({1, 2, 4, 4});
  at::Tensor w = torch::ones({2, 2, 3, 3});
  at::Tensor y = at::conv2d(x, w).flatten().matmul(torch::ones({8}));
  (void)y.sum().item<float>();
}

absl::StatusOr<VetReport> VetTorchScript(const std::string& bytes, const OpAllowList& allow) {
  VetReport report;
  try {
    std::istringstream in(bytes);
    torch::jit::Module m = torch::jit::load(in);
    // Every function the archive compiled: module and class methods (__setstate__ and hooks
    // among them) and free functions. Inlining follows the calls between them, so an operation
    // reached only through a call is seen in its caller too.
    std::shared_ptr<torch::jit::CompilationUnit> cu = m._ivalue()->compilation_unit();
    std::vector<torch::jit::Function*> fns = cu->get_functions();
    // Methods of the module types that the compilation unit does not list itself.
    for (const torch::jit::Module& sub : m.modules()) {
      for (torch::jit::Function* f : sub.type()->methods()) fns.push_back(f);
      for (torch::jit::Function* f : sub.type()->getForwardHooks()) fns.push_back(f);
      for (torch::jit::Function* f : sub.type()->getForwardPreHooks()) fns.push_back(f);
    }
    std::set<std::string> seen_fns;
    for (torch::jit::Function* f : fns) {
      const std::string where = f->qualname().qualifiedName();
      if (!seen_fns.insert(where).second) continue;
      ++report.functions;
      if (!f->isGraphFunction()) {
        report.refused.push_back({"<native function>", where});
        continue;
      }
      std::shared_ptr<torch::jit::Graph> g = torch::jit::toGraphFunction(*f).graph()->copy();
      torch::jit::Inline(*g);
      std::set<std::string> kinds;
      Walk(g->block(), &kinds, &report.nodes);
      for (const std::string& k : kinds) {
        if (!allow.Allows(k)) report.refused.push_back({k, where});
      }
    }
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        "not a loadable TorchScript archive: ", FirstLine(e.what_without_backtrace())));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a loadable TorchScript archive: ", FirstLine(e.what())));
  }
  report.passed = report.refused.empty();
  return report;
}

}  // namespace fpxint::model
