// File: core/torch_state_dict.h
//
// Reads the tensors of a file written by torch.save (the zip format PyTorch writes since 1.6)
// without LibTorch and without running pickle code, so a state dict from an untrusted caller can
// be quantized like a safetensors file.
//
// - The zip reader accepts what torch.save writes: stored (uncompressed) entries, Zip64 sizes and
//   offsets. Every offset and length is checked against the file before use.
// - The unpickler knows the opcodes of pickle protocols 2-5 that plain containers need (dicts,
//   lists, tuples, strings, numbers, memo) and exactly these globals: collections.OrderedDict,
//   torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter(_with_state) and the typed
//   storage classes torch.<T>Storage. Any other global, a persistent id that is not a storage, or
//   an opcode that builds arbitrary objects is refused with an error that names it.
// - Tensors are found anywhere in nested dicts and lists (a checkpoint {"model": state_dict,
//   "epoch": 3} works); a tensor's name joins the keys with '.'. Other values are skipped.
// - Strided views are bounds-checked against their storage and copied out row-major.
// - Every reference to a tensor is a tensor of its own (tied weights appear under each name), so
//   a small pickle could name the same storage millions of times. StateDictLimits bounds the
//   tensors per storage, the names' bytes, and the bytes of all tensors by the bytes of the
//   storages the file holds (zip entries may not share bytes); total_tensor_bytes() is what the
//   tensors take once copied out.
//
// Example:
//   FPX_ASSIGN_OR_RETURN(auto sd, TorchStateDict::Open("model.pt"));
//   FPX_RETURN_IF_ERROR(sd->WriteSafetensors("model.safetensors"));
#ifndef FPXINT_CORE_TORCH_STATE_DICT_H_
#define FPXINT_CORE_TORCH_STATE_DICT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/dtype.h"
#include "core/mapped_file.h"

namespace fpxint::core {

struct StateDictTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<int64_t> stride;        // in elements
  int64_t offset = 0;                 // in elements, into `storage`
  absl::Span<const uint8_t> storage;  // the whole storage, inside the file's bytes

  int64_t numel() const;
  bool contiguous() const;
  // The elements in row-major order: numel() * DTypeSize(dtype) bytes at `dst`.
  void CopyTo(uint8_t* dst) const;
};

struct StateDictLimits {
  uint64_t max_entries = 1u << 20;      // zip entries
  uint64_t max_pickle_bytes = 64u << 20;
  // Pickle opcodes run: each creates at most two values (~80 bytes each), so this bounds the
  // unpickler's memory (a state dict needs about 30 per tensor).
  uint64_t max_ops = 1u << 21;
  int max_depth = 64;                   // nesting of containers
  uint64_t max_visits = 1u << 22;       // values walked while collecting tensors
  // Bytes of the names built and dict keys copied while walking them (a state dict needs about
  // twice its names' size; shared containers under long keys would need gigabytes).
  uint64_t max_walk_bytes = 256u << 20;
  int max_rank = 16;
  uint64_t max_name_bytes = 4096;          // a tensor's dotted name
  uint64_t max_name_total_bytes = 16u << 20;  // the names of all tensors together
  uint64_t max_tensors = 1u << 20;
  // Tensors (names) that view one storage. Tied weights share a storage a few times and a
  // model's views of one buffer a few dozen; each one is copied out on its own.
  uint64_t max_tensors_per_storage = 64;
  // Views may repeat their storage's elements (stride 0), and one tensor may be referenced
  // under many names, so the bytes of the tensors are not bounded by the file's size: a view
  // larger than its storage may take max_broadcast_bytes, and all tensors together (each counted
  // in full, numel * element size) at most max_alias_factor times the bytes of the storages in
  // the file plus max_broadcast_bytes, and never more than max_total_bytes.
  uint64_t max_broadcast_bytes = 64u << 20;
  uint64_t max_alias_factor = 4;
  uint64_t max_total_bytes = uint64_t{1} << 36;
};

class TorchStateDict {
 public:
  // Maps `path` read-only and parses it.
  static absl::StatusOr<std::unique_ptr<TorchStateDict>> Open(const std::string& path,
                                                              const StateDictLimits& limits = {});
  // Parses `bytes` in place; they must outlive the result.
  static absl::StatusOr<std::unique_ptr<TorchStateDict>> FromBuffer(
      absl::Span<const uint8_t> bytes, const StateDictLimits& limits = {});

  TorchStateDict(const TorchStateDict&) = delete;
  TorchStateDict& operator=(const TorchStateDict&) = delete;
  ~TorchStateDict();

  // In the order the pickle lists them.
  const std::vector<StateDictTensor>& tensors() const { return tensors_; }
  // Non-tensor leaves that were skipped (numbers, strings, None, ...).
  int64_t skipped_values() const { return skipped_; }
  // The sum over tensors() of numel * element size: the bytes they take once copied out (a
  // storage shared by several tensors counts once per tensor, a stride-0 view at its full
  // size). At most StateDictLimits::max_alias_factor * storage_bytes() + max_broadcast_bytes.
  uint64_t total_tensor_bytes() const { return total_tensor_bytes_; }
  // The bytes of the distinct storages the pickle loads (each one inside the file).
  uint64_t storage_bytes() const { return storage_bytes_; }
  // The whole file.
  absl::Span<const uint8_t> bytes() const { return bytes_; }

  // The tensors as a safetensors file, written atomically (SafetensorsWriter::WriteFile).
  absl::Status WriteSafetensors(const std::string& path) const;

 private:
  TorchStateDict() = default;
  absl::Status Parse(const StateDictLimits& limits);

  std::unique_ptr<MappedFile> map_;  // Open; nullptr for FromBuffer
  absl::Span<const uint8_t> bytes_;
  std::vector<StateDictTensor> tensors_;
  int64_t skipped_ = 0;
  uint64_t total_tensor_bytes_ = 0;
  uint64_t storage_bytes_ = 0;
};

// True when `bytes` start like a zip archive (what torch.save and torch.jit.save write).
bool LooksLikeZip(absl::Span<const uint8_t> bytes);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_TORCH_STATE_DICT_H_
