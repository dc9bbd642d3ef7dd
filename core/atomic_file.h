// File: core/atomic_file.h
//
// Durable, all-or-nothing files: readers see the old file or the complete new one, never a
// prefix, and a crash (kill -9, power cut) leaves no half-written file under the final name.
// Data goes to a unique temporary file beside the target ("." + name + ".tmp-<pid>-<n>"), which is
// fsynced, renamed over the target, and the directory fsynced. Every writer of the project goes
// through here.
//
// Example:
//   FPX_ASSIGN_OR_RETURN(AtomicFile f, AtomicFile::Create(path));
//   FPX_RETURN_IF_ERROR(f.Write(bytes));
//   FPX_RETURN_IF_ERROR(f.Commit());
#ifndef FPXINT_CORE_ATOMIC_FILE_H_
#define FPXINT_CORE_ATOMIC_FILE_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/unique_fd.h"

namespace fpxint::core {

class AtomicFile {
 public:
  // Creates the temporary file (mode 0644). Errors as ErrnoToStatus gives them.
  static absl::StatusOr<AtomicFile> Create(const std::string& path);
  AtomicFile(AtomicFile&& other) noexcept;
  AtomicFile& operator=(AtomicFile&&) = delete;
  AtomicFile(const AtomicFile&) = delete;
  ~AtomicFile();  // removes the temporary file unless committed

  // Appends, retrying short writes and EINTR.
  absl::Status Write(const void* data, size_t n);
  absl::Status Write(absl::string_view data) { return Write(data.data(), data.size()); }
  // The temporary file's descriptor, for writers that need one (e.g. progress while copying).
  int fd() const { return fd_.get(); }
  const std::string& temp_path() const { return tmp_; }
  // fsync, close, rename over the target, fsync the directory. The object is spent afterwards.
  absl::Status Commit();

 private:
  AtomicFile(std::string path, std::string tmp, int fd);
  std::string path_, tmp_;
  UniqueFd fd_;
  bool done_ = false;
};

// `contents` as the whole of `path`, through AtomicFile.
absl::Status WriteFileAtomic(const std::string& path, absl::string_view contents);
// For files some other writer produced (LibTorch's save, a download): fsyncs `from`, renames it
// to `to` and fsyncs `to`'s directory.
absl::Status PublishFile(const std::string& from, const std::string& to);
// fsync of a file or of a directory (making a rename in it durable).
absl::Status SyncFile(const std::string& path);
absl::Status SyncDir(const std::string& dir);
// Writes all n bytes to `fd`, retrying short writes and EINTR; errors name `path`.
absl::Status WriteAll(int fd, const void* data, size_t n, const std::string& path);
// The same at `offset` (pwrite), leaving the file position alone.
absl::Status PwriteAll(int fd, const void* data, size_t n, uint64_t offset,
                       const std::string& path);
// "<pid>-<random>-<counter>": unique per process and call, for temporary names.
std::string UniqueSuffix();
// "." + the file name + ".tmp-" + UniqueSuffix(), beside `path`.
std::string TempPathFor(const std::string& path);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_ATOMIC_FILE_H_
