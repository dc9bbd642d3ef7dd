// File: server/journal.cc
#include "server/journal.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace fpxint::server {

bool Journal::IsDatabaseUrl(const std::string& where) {
  return absl::StartsWith(where, "postgresql://") || absl::StartsWith(where, "postgres://");
}

absl::StatusOr<std::unique_ptr<Journal>> Journal::Open(const std::string& where) {
  return IsDatabaseUrl(where) ? OpenPostgresJournal(where) : OpenSqliteJournal(where);
}

absl::Status CheckJournalSchemaVersion(int64_t found, const std::string& where) {
  if (found <= kJournalSchemaVersion) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      where, ": the journal's schema is version ", found, ", newer than this fpxint-server knows (",
      kJournalSchemaVersion, "); a newer server wrote it: run that version, or another journal"));
}

absl::StatusOr<uint64_t> Journal::UploadedBytesBy(const std::string& owner) {
  FPX_ASSIGN_OR_RETURN(std::vector<v1::Model> all, ListModels());
  uint64_t total = 0;
  for (const v1::Model& m : all) {
    if (m.owner() == owner) total += m.size_bytes();
  }
  return total;
}

}  // namespace fpxint::server
