// File: model/vet.h
//
// Vetting of untrusted TorchScript: what a model's code would do when the server loads and runs
// it. LibTorch's loader runs a module's `__setstate__` while it unpickles, and `forward` may call
// any registered operator, `aten::from_file` (which reads a path) among them. So before any byte
// of an uploaded TorchScript archive runs in the server, a separate, sandboxed process
// (fpxint-vet, server/vet_main.cc) loads it with this code, inlines every function of its
// compilation unit (every method of every class and module, `__setstate__` and hooks included),
// walks every node of every graph and nested block, and checks each node kind against an
// allow-list of pure tensor and control-flow operations. A model passes only if every node of
// every function is on the list.
//
// LibTorch stays in vet.cc; this header has none of it.
#ifndef FPXINT_MODEL_VET_H_
#define FPXINT_MODEL_VET_H_

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace fpxint::model {

// Node kinds ("aten::conv2d", "prim::If") a vetted model may contain.
class OpAllowList {
 public:
  // The list built into the binary: the operations of the real networks fpxint is tested on
  // and the usual convolution, attention, normalization and activation operations
  // (model/torchscript_allowed_ops.txt).
  static OpAllowList BuiltIn();
  // Adds the kinds in `text`: one per line, '#' starts a comment. InvalidArgument naming the
  // line for anything that is not `namespace::name`.
  absl::Status AddText(absl::string_view text, absl::string_view source);

  bool Allows(const std::string& kind) const { return kinds_.count(kind) != 0; }
  const std::set<std::string>& kinds() const { return kinds_; }
  size_t size() const { return kinds_.size(); }
  // SHA-256 (hex) of the sorted list: a verdict is valid for the list it was made against.
  std::string Digest() const;

 private:
  std::set<std::string> kinds_;
};

struct RefusedOp {
  std::string kind;   // "aten::from_file"
  std::string where;  // qualified function: "__torch__.Reader.__setstate__"
};

struct VetReport {
  bool passed = false;
  int functions = 0;               // functions walked
  int64_t nodes = 0;               // nodes walked (after inlining)
  std::vector<RefusedOp> refused;  // one entry per (kind, function), in walk order
  // One line a person can read: "passed: 14 functions, 812 nodes" or the refused operations.
  std::string Summary() const;
};

// Loads the archive in `bytes` (no file is opened) and walks it. InvalidArgument when LibTorch
// cannot load it (the message says why, including a failure inside `__setstate__`).
absl::StatusOr<VetReport> VetTorchScript(const std::string& bytes, const OpAllowList& allow);

// Initializes what LibTorch sets up lazily (thread pools, CPU feature detection, the operator
// registry), so that a process can drop its privileges afterwards and still load models.
void WarmUpTorch();

}  // namespace fpxint::model

#endif  // FPXINT_MODEL_VET_H_
