// File: server/log.h
//
// Plain, readable log lines on stderr: "2026-11-23T10:00:00.123Z INFO  job job-... SUCCEEDED".
// (Abseil 20220623 has no absl::log; glog comes with LibTorch but prints its own prefix format.)
#ifndef FPXINT_SERVER_LOG_H_
#define FPXINT_SERVER_LOG_H_

#include "absl/strings/string_view.h"

namespace fpxint::server {

void LogInfo(absl::string_view msg);
void LogWarning(absl::string_view msg);
void LogError(absl::string_view msg);

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_LOG_H_
