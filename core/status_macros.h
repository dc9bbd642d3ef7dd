// File: core/status_macros.h
//
// Abseil 20220623 (the version Debian ships) has no status macros. These twins of Abseil HEAD's
// ABSL_RETURN_IF_ERROR / ABSL_ASSIGN_OR_RETURN have the same meaning.
#ifndef FPXINT_CORE_STATUS_MACROS_H_
#define FPXINT_CORE_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// Evaluates `expr` (an absl::Status); returns it from the enclosing function if it is not OK.
#define FPX_RETURN_IF_ERROR(expr)                                  \
  do {                                                             \
    if (::absl::Status fpx_status_ = (expr); !fpx_status_.ok()) {  \
      return fpx_status_;                                          \
    }                                                              \
  } while (false)

#define FPX_STATUS_CONCAT_INNER_(a, b) a##b
#define FPX_STATUS_CONCAT_(a, b) FPX_STATUS_CONCAT_INNER_(a, b)

// `FPX_ASSIGN_OR_RETURN(auto x, MakeX());` evaluates an absl::StatusOr<T>; on error returns its
// status, otherwise moves the value into the declaration on the left.
#define FPX_ASSIGN_OR_RETURN(lhs, rexpr) \
  FPX_ASSIGN_OR_RETURN_IMPL_(FPX_STATUS_CONCAT_(fpx_statusor_, __LINE__), lhs, rexpr)
#define FPX_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                               \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

#endif  // FPXINT_CORE_STATUS_MACROS_H_
