// File: core/artifact.h
//
// The fpxint artifact: a safetensors file holding the expansion of every selected tensor of a
// source safetensors file. Other tools read it; the contract is exact (docs/FORMAT.md):
//
//   Data order: first the tensors copied unchanged (rank < 2, non-floating, excluded), in source
//   order; then term-major: for k = 1..K, for each expanded tensor <name> in source order:
//     <name>.t{k}.codes  U8 (packed, or asym) / I8 (signed, one per byte), [dim0, packed row bytes]
//     <name>.t{k}.scale  F32, [1,1] (tensor) | [dim0,1] (channel) | [dim0, ceil(row/g)] (group)
//     <name>.t{k}.zero   F32, same shape as the scale (asym only)
//   so a reader that needs only K' terms reads a prefix of the data section.
//   __metadata__: format="fpxint", format_version="1", bits, terms, grid, variant, scale,
//   group_size, packing, source_sha256, and for every expanded tensor <name>.shape (JSON list of
//   the original shape) and <name>.terms (its number of terms: < terms only after an eps stop).
#ifndef FPXINT_CORE_ARTIFACT_H_
#define FPXINT_CORE_ARTIFACT_H_

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "core/expansion.h"
#include "core/safetensors.h"

namespace fpxint::core {

inline constexpr char kArtifactFormat[] = "fpxint";
inline constexpr char kArtifactVersion[] = "1";

struct ExpandProgress {
  int tensor_index = 0;  // 0-based index among the tensors being expanded
  int tensor_count = 0;
  std::string name;
  uint64_t bytes_done = 0;  // source bytes of the tensors finished so far
  uint64_t bytes_total = 0;
};

// The tensors a transformer checkpoint keeps unexpanded (`--preset transformer`): token and
// position embeddings (embed_tokens, word_embeddings, wte, wpe, ...), every norm (input_layernorm,
// ln_f, LayerNorm, ...), biases and the output head (lm_head). RE2, searched in the tensor name.
inline constexpr char kTransformerPresetKeep[] =
    "(?i)(embed|norm|(^|[._])(wte|wpe|lm_head|ln_[a-z0-9]+)([._]|$)|[._]bias$)";

struct ArtifactOptions {
  ExpansionSpec spec;
  std::string include_regex;  // RE2 (core/name_pattern.h), searched in the tensor name; empty: all
  std::string exclude_regex;  // empty excludes none
  // A preset's selection (kTransformerPresetKeep): matching tensors are copied unchanged unless
  // include_regex (non-empty) matches them too. Empty: none.
  std::string keep_regex;
  std::string keep_reason = "kept by the preset";
  ExpandOptions expand;
  // The source file's SHA-256 when the caller already knows it (a content-addressed store names
  // files by it); empty: computed while the tensors expand.
  std::string source_sha256;
  // Called before each tensor and once at the end (tensor_index == tensor_count).
  std::function<void(const ExpandProgress&)> progress;
  // Per-tensor term counts (an error-budgeted expansion, docs/ALGORITHM.md §6a): a tensor named
  // here gets this many terms, 1 .. spec.terms, recorded as its `.terms`; the others get
  // spec.terms. Naming a tensor that is not expanded is an error.
  absl::flat_hash_map<std::string, int> terms_for;
};

struct TensorReport {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  double source_fro = 0;  // ‖W‖_F, to aggregate errors over tensors
  std::vector<TermError> terms;
};

// Errors of all expanded weights together after k terms.
struct TermSummary {
  int k = 0;
  double rel_fro = 0;        // sqrt(Σ_t ‖R_k,t‖² / Σ_t ‖W_t‖²) over the expanded tensors
  double worst_rel_fro = 0;  // the largest per-tensor rel_fro
  double worst_rel_max = 0;
  double min_sqnr_db = 0;
  int tensors = 0;  // tensors that have a term k
};

struct CopiedTensor {
  std::string name;
  // "rank < 2", "not floating point", "excluded", "not included", "empty", or for an
  // unsupported dtype "dtype X is not read by fpxint (accepted: ...); its bytes are copied
  // unchanged".
  std::string reason;
};

struct ExpandReport {
  ExpansionSpec spec;
  std::string source_sha256;
  std::string artifact_sha256;  // of the file written
  std::string kernel;
  int threads = 1;
  std::vector<TensorReport> tensors;
  std::vector<CopiedTensor> copied;
  uint64_t bytes_in = 0;   // source file size
  uint64_t bytes_out = 0;  // artifact file size
  double wall_seconds = 0;

  std::vector<TermSummary> Summary() const;
  // The --report JSON: {"spec": {...}, "tensors": [{"name", "shape", "terms": [{"k", "rel_fro",
  // "rel_max", "sqnr_db"}]}], "bytes_in", "bytes_out", "compression_ratio", "wall_seconds", ...}.
  std::string ToJson() const;
};

// Reads `in_path`, expands the selected tensors and writes the artifact to `out_path`
// atomically. InvalidArgument for a bad spec or regex, or a malformed input (the message names
// the tensor); I/O errors as in SafetensorsWriter::WriteFile.
absl::StatusOr<ExpandReport> ExpandSafetensorsFile(const std::string& in_path,
                                                   const std::string& out_path,
                                                   const ArtifactOptions& options);

// The dequantized counterpart of a source file: the source's tensors in its order and under its
// names, each expanded one replaced by the sum of all its terms in the artifact (summed in fp64,
// rounded once), in the source's dtype (F32, F64, F16, BF16; an FP8 source as BF16, which holds
// its dequantized values exactly enough to load anywhere the source loaded), every other tensor
// copied byte for byte; the source's metadata plus "fpxint.dequantized" naming the spec. Written
// atomically to `out_path`; returns its SHA-256. InvalidArgument when the artifact's recorded
// source SHA-256 differs from `source_sha256` (when given), or a tensor's shape differs. Memory:
// one expanded tensor at a time: each is reconstructed as it is written (SafetensorsWriter::
// AddLazy), and the copied tensors' source pages are released once written.
absl::StatusOr<std::string> WriteDequantizedSafetensors(const std::string& source_path,
                                                        const std::string& artifact_path,
                                                        const std::string& out_path,
                                                        absl::string_view source_sha256 = {},
                                                        ThreadPool* pool = nullptr);

// A parsed, validated artifact over a SafetensorsReader (which must outlive it).
class ArtifactView {
 public:
  struct Entry {
    std::string name;
    TensorLayout layout;
    int terms = 0;
  };

  // InvalidArgument when the metadata or any term tensor does not follow the contract.
  static absl::StatusOr<ArtifactView> Parse(const SafetensorsReader& reader);

  const ExpansionSpec& spec() const { return spec_; }
  const std::vector<Entry>& tensors() const { return entries_; }
  // Tensors stored unchanged (everything that is not part of an expansion).
  const std::vector<const TensorInfo*>& copied() const { return copied_; }
  const std::string& source_sha256() const { return source_sha256_; }

  // The expansion of `name` with its first `num_terms` terms (all when num_terms < 0).
  absl::StatusOr<TensorExpansion> Load(absl::string_view name, int num_terms = -1) const;

 private:
  const SafetensorsReader* reader_ = nullptr;
  ExpansionSpec spec_;
  std::string source_sha256_;
  std::vector<Entry> entries_;
  std::vector<const TensorInfo*> copied_;
};

}  // namespace fpxint::core

#endif  // FPXINT_CORE_ARTIFACT_H_
