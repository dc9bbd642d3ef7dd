// File: server/log.cc
#include "server/log.h"

#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace fpxint::server {
namespace {

void Emit(absl::string_view level, absl::string_view msg) {
  const std::string line =
      absl::StrCat(absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone()), " ",
                   level, " ", msg, "\n");
  std::fwrite(line.data(), 1, line.size(), stderr);  // one write: lines do not interleave
}

}  // namespace

void LogInfo(absl::string_view msg) { Emit("INFO ", msg); }
void LogWarning(absl::string_view msg) { Emit("WARN ", msg); }
void LogError(absl::string_view msg) { Emit("ERROR", msg); }

}  // namespace fpxint::server
