// File: client/progress.h
//
// A one-line progress bar on a terminal (redrawn with \r, at most every 100 ms), or nothing when
// the stream is not a terminal: pipelines get the final result, not a stream of redraws.
#ifndef FPXINT_CLIENT_PROGRESS_H_
#define FPXINT_CLIENT_PROGRESS_H_

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace fpxint::client {

class ProgressBar {
 public:
  // Draws on `out` only when it is a terminal and `enabled`.
  ProgressBar(std::FILE* out, bool enabled);
  ~ProgressBar() { Finish(); }
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  bool active() const { return active_; }
  // done/total in the caller's unit (bytes, layers); `label` is shown after the bar.
  void Update(uint64_t done, uint64_t total, const std::string& label);
  // Clears the line. Idempotent.
  void Finish();

 private:
  std::FILE* out_;
  bool active_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point start_, last_;
};

// "1.5 MB", "312 KB", "17 B".
std::string HumanBytes(uint64_t bytes);

}  // namespace fpxint::client

#endif  // FPXINT_CLIENT_PROGRESS_H_
