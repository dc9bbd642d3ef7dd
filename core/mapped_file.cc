#include "core/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"
#include "core/safetensors.h"  // ErrnoToStatus

namespace fpxint::core {

absl::StatusOr<std::unique_ptr<MappedFile>> MappedFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoToStatus(errno, "cannot open", path);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return ErrnoToStatus(err, "cannot stat", path);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat("'", path, "' is not a regular file"));
  }
  std::unique_ptr<MappedFile> f(new MappedFile());
  const size_t len = static_cast<size_t>(st.st_size);
  if (len > 0) {
    void* p = ::mmap(nullptr, len, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return ErrnoToStatus(err, "cannot map", path);
    }
    f->map_ = p;
    f->len_ = len;
  }
  ::close(fd);
  return f;
}

void ReleaseMappedPages(absl::Span<const uint8_t> bytes) {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(bytes.data()) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(bytes.data()) + bytes.size()) & ~(page - 1);
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

absl::Status ReadFileRange(int fd, uint64_t offset, absl::Span<uint8_t> out,
                           const std::string& path) {
  for (size_t got = 0; got < out.size();) {
    const ssize_t n = ::pread(fd, out.data() + got, out.size() - got,
                              static_cast<off_t>(offset + got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoToStatus(errno, "cannot read", path);
    if (n == 0) {
      return absl::DataLossError(absl::StrCat("cannot read ", path, ": it ends at byte ",
                                              offset + got, ", before byte ", offset + out.size()));
    }
    got += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

MappedFile::~MappedFile() {
  if (map_ != nullptr) ::munmap(map_, len_);
}

}  // namespace fpxint::core
