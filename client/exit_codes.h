// File: client/exit_codes.h
//
// Exit codes of the `fpxint` command-line client (documented in README.md; scripts rely on them).
#ifndef FPXINT_CLIENT_EXIT_CODES_H_
#define FPXINT_CLIENT_EXIT_CODES_H_

#include "absl/status/status.h"

namespace fpxint::client {

enum ExitCode : int {
  kExitOk = 0,
  kExitUsage = 2,       // bad flags or flag values
  kExitBadInput = 3,    // an input file or request the tool cannot accept
  kExitIoError = 4,     // reading or writing failed (missing file, permissions, disk full), server error
  kExitJobFailed = 5,
  kExitCancelled = 6,
  kExitAuth = 7,
};

// InvalidArgument / DataLoss / OutOfRange / Unimplemented / FailedPrecondition -> kExitBadInput,
// Cancelled -> kExitCancelled, Unauthenticated / PermissionDenied on a server -> kExitAuth is
// decided by the caller; everything else -> kExitIoError.
inline int ExitCodeFor(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kOk: return kExitOk;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kDataLoss:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kUnimplemented:
    case absl::StatusCode::kFailedPrecondition: return kExitBadInput;
    case absl::StatusCode::kCancelled: return kExitCancelled;
    default: return kExitIoError;
  }
}

}  // namespace fpxint::client

#endif  // FPXINT_CLIENT_EXIT_CODES_H_
