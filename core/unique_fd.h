// File: core/unique_fd.h
//
// A POSIX file descriptor closed when it goes out of scope (-1: none).
#ifndef FPXINT_CORE_UNIQUE_FD_H_
#define FPXINT_CORE_UNIQUE_FD_H_

#include <unistd.h>

#include <utility>

namespace fpxint::core {

class UniqueFd {
 public:
  explicit UniqueFd(int fd = -1) : fd_(fd) {}
  ~UniqueFd() { Reset(); }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.Release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = o.Release();
    }
    return *this;
  }

  int get() const { return fd_; }
  // Gives up ownership without closing.
  int Release() { return std::exchange(fd_, -1); }
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

}  // namespace fpxint::core

#endif  // FPXINT_CORE_UNIQUE_FD_H_
