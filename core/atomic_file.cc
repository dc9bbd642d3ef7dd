// File: core/atomic_file.cc
#include "core/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/safetensors.h"  // ErrnoToStatus
#include "core/status_macros.h"

namespace fpxint::core {
namespace {

std::string DirOf(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

std::string UniqueSuffix() {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t seed = std::random_device{}();
  return absl::StrFormat("%d-%x-%d", ::getpid(), seed & 0xffffff, counter.fetch_add(1));
}

std::string TempPathFor(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "" : path.substr(0, slash + 1);
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  return absl::StrCat(dir, ".", name, ".tmp-", UniqueSuffix());
}

absl::Status SyncFile(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return ErrnoToStatus(errno, "cannot open", path);
  if (::fsync(fd.get()) != 0) return ErrnoToStatus(errno, "cannot fsync", path);
  return absl::OkStatus();
}

absl::Status SyncDir(const std::string& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() < 0) return ErrnoToStatus(errno, "cannot open directory", dir);
  if (::fsync(fd.get()) != 0) return ErrnoToStatus(errno, "cannot fsync directory", dir);
  return absl::OkStatus();
}

AtomicFile::AtomicFile(std::string path, std::string tmp, int fd)
    : path_(std::move(path)), tmp_(std::move(tmp)), fd_(fd) {}

AtomicFile::AtomicFile(AtomicFile&& other) noexcept
    : path_(std::move(other.path_)),
      tmp_(std::move(other.tmp_)),
      fd_(other.fd_.Release()),
      done_(std::exchange(other.done_, true)) {}

AtomicFile::~AtomicFile() {
  if (done_) return;
  fd_.Reset();
  ::unlink(tmp_.c_str());
}

absl::StatusOr<AtomicFile> AtomicFile::Create(const std::string& path) {
  std::string tmp = TempPathFor(path);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoToStatus(errno, "cannot create", tmp);
  return AtomicFile(path, std::move(tmp), fd);
}

absl::Status WriteAll(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, std::min<size_t>(n, size_t{1} << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      return ErrnoToStatus(errno, "cannot write", path);
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

absl::Status PwriteAll(int fd, const void* data, size_t n, uint64_t offset,
                       const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, p, std::min<size_t>(n, size_t{1} << 30),
                               static_cast<off_t>(offset));
    if (w < 0) {
      if (errno == EINTR) continue;
      return ErrnoToStatus(errno, "cannot write", path);
    }
    p += w;
    n -= static_cast<size_t>(w);
    offset += static_cast<uint64_t>(w);
  }
  return absl::OkStatus();
}

absl::Status AtomicFile::Write(const void* data, size_t n) {
  return WriteAll(fd_.get(), data, n, tmp_);
}

absl::Status AtomicFile::Commit() {
  if (done_) return absl::FailedPreconditionError("AtomicFile: already committed");
  if (::fsync(fd_.get()) != 0) return ErrnoToStatus(errno, "cannot fsync", tmp_);
  if (::close(fd_.Release()) != 0) return ErrnoToStatus(errno, "cannot close", tmp_);
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    return ErrnoToStatus(errno, "cannot rename into", path_);
  }
  done_ = true;
  return SyncDir(DirOf(path_));
}

absl::Status WriteFileAtomic(const std::string& path, absl::string_view contents) {
  FPX_ASSIGN_OR_RETURN(AtomicFile f, AtomicFile::Create(path));
  FPX_RETURN_IF_ERROR(f.Write(contents));
  return f.Commit();
}

absl::Status PublishFile(const std::string& from, const std::string& to) {
  FPX_RETURN_IF_ERROR(SyncFile(from));
  if (::rename(from.c_str(), to.c_str()) != 0) return ErrnoToStatus(errno, "cannot rename into", to);
  return SyncDir(DirOf(to));
}

}  // namespace fpxint::core
