#include "client/progress.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>

#include "absl/strings/str_format.h"

namespace fpxint::client {

ProgressBar::ProgressBar(std::FILE* out, bool enabled)
    : out_(out), active_(enabled && ::isatty(::fileno(out)) != 0) {
  start_ = last_ = std::chrono::steady_clock::now();
}

void ProgressBar::Update(uint64_t done, uint64_t total, const std::string& label) {
  if (!active_) return;
  const auto now = std::chrono::steady_clock::now();
  if (drawn_ && done < total && now - last_ < std::chrono::milliseconds(100)) return;
  last_ = now;
  struct winsize ws {};
  int cols = 80;
  if (::ioctl(::fileno(out_), TIOCGWINSZ, &ws) == 0 && ws.ws_col > 20) cols = ws.ws_col;
  const double frac = total == 0 ? 1.0 : std::min(1.0, static_cast<double>(done) / total);
  const double secs = std::chrono::duration<double>(now - start_).count();
  std::string eta = "";
  if (frac > 0.02 && frac < 1.0 && secs > 0.5) {
    eta = absl::StrFormat(" ETA %.0fs", secs * (1 - frac) / frac);
  }
  const int width = 24;
  const int filled = static_cast<int>(frac * width);
  std::string bar = std::string(filled, '#') + std::string(width - filled, '.');
  std::string line = absl::StrFormat("[%s] %3.0f%%%s %s", bar, frac * 100, eta, label);
  if (static_cast<int>(line.size()) > cols - 1) line.resize(cols - 1);
  std::fprintf(out_, "\r%-*s", cols - 1, line.c_str());
  std::fflush(out_);
  drawn_ = true;
}

void ProgressBar::Finish() {
  if (!active_ || !drawn_) return;
  std::fprintf(out_, "\r\033[K");
  std::fflush(out_);
  drawn_ = false;
}

std::string HumanBytes(uint64_t bytes) {
  if (bytes >= (1ull << 30)) return absl::StrFormat("%.2f GB", bytes / double(1ull << 30));
  if (bytes >= (1ull << 20)) return absl::StrFormat("%.1f MB", bytes / double(1ull << 20));
  if (bytes >= (1ull << 10)) return absl::StrFormat("%.0f KB", bytes / double(1ull << 10));
  return absl::StrFormat("%d B", bytes);
}

}  // namespace fpxint::client
