// File: core/mapped_file.h
//
// A whole regular file mapped read-only (private mapping), for the readers of untrusted model
// files (SafetensorsReader, TorchStateDict): they parse the bytes in place and hand out spans
// into them, valid while the mapping lives.
//
// Example:
//   FPX_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> f, MappedFile::Open(path));
//   absl::Span<const uint8_t> bytes = f->bytes();
#ifndef FPXINT_CORE_MAPPED_FILE_H_
#define FPXINT_CORE_MAPPED_FILE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace fpxint::core {

class MappedFile {
 public:
  // NotFound / PermissionDenied / Internal as ErrnoToStatus gives them ("cannot open", "cannot
  // stat", "cannot map"); InvalidArgument when `path` is not a regular file. An empty file gives
  // an empty span.
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);

  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  absl::Span<const uint8_t> bytes() const {
    return absl::MakeConstSpan(static_cast<const uint8_t*>(map_), len_);
  }

 private:
  MappedFile() = default;
  void* map_ = nullptr;
  size_t len_ = 0;
};

// Drops the whole pages inside `bytes` from this process's memory (madvise MADV_DONTNEED); the
// next access reads them again from the page cache or the file. Only for spans of a read-only
// file mapping (MappedFile, a spill file): on anonymous or heap memory it would zero the data.
// Large files are read once, front to back: releasing what was read keeps the resident set at
// one tensor instead of the whole file.
void ReleaseMappedPages(absl::Span<const uint8_t> bytes);

// Reads out.size() bytes of `fd` at `offset` (pread, retried on EINTR and short reads). A read
// that ends early is an error ("cannot read", naming `path`), as is any errno.
absl::Status ReadFileRange(int fd, uint64_t offset, absl::Span<uint8_t> out,
                           const std::string& path);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_MAPPED_FILE_H_
