// File: core/safetensors.h
//
// Reader and writer for the safetensors format.
//
// Byte layout (https://github.com/huggingface/safetensors, format version 1):
//   [0, 8)          N: little-endian uint64, length of the header
//   [8, 8+N)        header: UTF-8 JSON object. Each key except "__metadata__" names a tensor:
//                     {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}
//                   "__metadata__" (optional) maps strings to strings. Trailing spaces pad it.
//   [8+N, EOF)      data section; offsets are relative to its start.
//
// The reader trusts nothing: it checks the header length against a limit and the file size,
// parses the JSON strictly and in linear time, stopping at the first entry past the tensor limit,
// and checks every dtype, shape (rank, overflow), offset pair (order, bounds, size = numel *
// itemsize), and that the tensors tile the data section exactly (no overlap, no gap, no trailing
// bytes), as the reference implementation requires. Every error
// is InvalidArgument and names the tensor and field at fault; I/O errors are NotFound /
// PermissionDenied / Internal.
#ifndef FPXINT_CORE_SAFETENSORS_H_
#define FPXINT_CORE_SAFETENSORS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "core/atomic_file.h"
#include "core/dtype.h"
#include "core/mapped_file.h"

namespace fpxint::core {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  // The header's spelling of the dtype: DTypeName(dtype), or for kOther the unsupported name
  // (e.g. "F8_E4M3FNUZ"), whose bytes are readable only as raw bytes.
  std::string dtype_name;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offsets into the data section
  uint64_t end = 0;

  int64_t numel() const;
};

struct SafetensorsLimits {
  uint64_t max_header_bytes = 100ull << 20;  // the reference implementation's limit
  int max_rank = 16;
  // Entries of the header (and of "__metadata__"); reading stops at the first one past it.
  size_t max_tensors = 1u << 20;
};

// Read-only view of a safetensors file or buffer. Thread-compatible: const methods may run
// concurrently. Spans returned stay valid while the reader lives.
class SafetensorsReader {
 public:
  // Maps `path` read-only and validates it.
  static absl::StatusOr<std::unique_ptr<SafetensorsReader>> Open(const std::string& path,
                                                                 const SafetensorsLimits& limits = {});
  // Validates `bytes` in place. The caller keeps `bytes` alive while the reader lives.
  static absl::StatusOr<std::unique_ptr<SafetensorsReader>> FromBuffer(
      absl::Span<const uint8_t> bytes, const SafetensorsLimits& limits = {});

  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;
  ~SafetensorsReader();

  // Tensors in the order of their data offsets.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // nullptr when absent.
  const TensorInfo* Find(absl::string_view name) const;
  // The raw little-endian bytes of `t` (unaligned).
  absl::Span<const uint8_t> Data(const TensorInfo& t) const;
  // "__metadata__" entries in header order.
  const std::vector<std::pair<std::string, std::string>>& metadata() const { return metadata_; }
  std::optional<std::string> Metadata(absl::string_view key) const;
  // The whole file.
  absl::Span<const uint8_t> bytes() const { return bytes_; }
  uint64_t header_bytes() const { return header_len_; }

 private:
  SafetensorsReader() = default;
  absl::Status Parse(const SafetensorsLimits& limits);

  std::unique_ptr<MappedFile> map_;  // Open; nullptr for FromBuffer
  absl::Span<const uint8_t> bytes_;
  uint64_t header_len_ = 0;
  absl::Span<const uint8_t> data_;
  std::vector<TensorInfo> tensors_;
  absl::flat_hash_map<std::string, size_t> by_name_;
  std::vector<std::pair<std::string, std::string>> metadata_;
};

// Collects tensors and writes a safetensors file. Tensors are written in the order they were
// added; the header pads to a multiple of 8 bytes so that data starts aligned.
class SafetensorsWriter {
 public:
  void SetMetadata(absl::string_view key, absl::string_view value);
  // Borrows `data` until Write*/Serialize returns. InvalidArgument when the name is empty,
  // "__metadata__" or already added, or when data.size() != numel * itemsize. A kOther tensor
  // (copied from a reader) needs `other_dtype_name`, its TensorInfo::dtype_name; its bytes are
  // not checked against the shape.
  absl::Status Add(absl::string_view name, DType dtype, std::vector<int64_t> shape,
                   absl::Span<const uint8_t> data, absl::string_view other_dtype_name = {});
  // As Add, but the writer keeps `data`.
  absl::Status AddOwned(absl::string_view name, DType dtype, std::vector<int64_t> shape,
                        std::vector<uint8_t> data);
  // A tensor whose bytes are made only when they are written (and freed right after), so a
  // file larger than memory can be written one tensor at a time. `produce` must return exactly
  // numel * itemsize bytes; an error from it aborts the write.
  using Producer = std::function<absl::StatusOr<std::vector<uint8_t>>()>;
  absl::Status AddLazy(absl::string_view name, DType dtype, std::vector<int64_t> shape,
                       Producer produce);

  // A tensor whose bytes are written later, straight to their place in the file, through the
  // PlacedFile that BeginPlaced returns: for outputs made in another order than the file's and
  // larger than memory (the term-major artifact), written once, with no staging copy.
  absl::Status Reserve(absl::string_view name, DType dtype, std::vector<int64_t> shape);

  // A file being written in place: created at its full size beside its target, with the header
  // and every tensor that has its bytes already written. Removed unless committed.
  class PlacedFile {
   public:
    // Writes a reserved tensor's bytes (exactly its size, once) at its offset.
    absl::Status Write(absl::string_view name, absl::Span<const uint8_t> bytes);
    // Starts the disk writes of what has been written since the last call, without waiting, so
    // that the final flush overlaps with the work that makes the rest.
    void StartWriteback();
    // Checks that every reserved tensor was written, hashes the file (lower-case hex SHA-256,
    // read back from the page cache through a small buffer), then publishes it as WriteFile
    // does (fsync, rename, fsync of the directory).
    absl::Status Commit(std::string* sha256_hex);

   private:
    friend class SafetensorsWriter;
    struct Place {
      uint64_t offset = 0, size = 0;
      bool written = false;
    };
    PlacedFile(AtomicFile file, uint64_t size) : file_(std::move(file)), size_(size) {}
    AtomicFile file_;
    uint64_t size_;
    uint64_t flushed_ = 0;  // StartWriteback covered [0, flushed_) of the writes so far
    uint64_t written_max_ = 0;
    absl::flat_hash_map<std::string, Place> places_;
  };
  // The file for `path`; WriteFile and Serialize refuse a writer with reserved tensors.
  absl::StatusOr<std::unique_ptr<PlacedFile>> BeginPlaced(const std::string& path) const;

  // The header JSON, before padding.
  std::string HeaderJson() const;
  // Total file size Serialize/WriteFile produce.
  uint64_t FileSize() const;
  // The whole file in memory.
  // (Lazy tensors are produced for it; a producer's error leaves them empty.)
  std::vector<uint8_t> Serialize() const;
  // Writes atomically: a temporary file in the same directory, fsync, rename over `path`, fsync of
  // the directory. On error nothing is left at `path` that was not there before.
  // ResourceExhausted when the disk is full, PermissionDenied / Internal for other I/O errors.
  // With `sha256_hex`, also the lower-case hex SHA-256 of the bytes written (so a caller that
  // stores the file content-addressed need not read it back).
  // `written`, when set, is called with each tensor's bytes once they are written (a caller
  // whose tensors are mapped files releases their pages; ReleaseMappedPages).
  absl::Status WriteFile(const std::string& path, std::string* sha256_hex = nullptr,
                         const std::function<void(absl::Span<const uint8_t>)>& written = {}) const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::string other_dtype_name;  // for kOther
    std::vector<int64_t> shape;
    absl::Span<const uint8_t> data;
    std::shared_ptr<std::vector<uint8_t>> owned;
    uint64_t size = 0;  // data.size(), or what `produce` will make
    Producer produce;   // lazy tensors
    bool reserved = false;  // written through a PlacedFile
  };
  absl::Status CheckNoReserved() const;
  std::string PaddedHeader() const;
  std::vector<Entry> entries_;
  absl::flat_hash_map<std::string, size_t> names_;
  std::vector<std::pair<std::string, std::string>> metadata_;
};

// Maps errno from a failed file operation on `path` to a Status with a readable message.
absl::Status ErrnoToStatus(int err, absl::string_view op, absl::string_view path);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_SAFETENSORS_H_
