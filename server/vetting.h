// File: server/vetting.h
//
// The gate in front of every uploaded TorchScript archive. No byte of an upload runs in the
// server before fpxint-vet (server/vet_main.cc) has loaded it in a sandboxed child process and
// found only allow-listed operations in every function (model/vet.h). The verdict is stored in
// the journal under the blob's SHA-256 and the allow-list's digest, so an archive is vetted once
// per allow-list: at upload, and again only if the operator changes the list. Loading an upload
// for serving or for a job requires a passing verdict (an upload stored before vetting existed
// is vetted on first use).
//
// Thread-safe. At most `max_concurrent` vetting processes run at once; callers beyond that wait.
#ifndef FPXINT_SERVER_VETTING_H_
#define FPXINT_SERVER_VETTING_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/journal.h"

namespace fpxint::server {

class TorchScriptVetter {
 public:
  struct Options {
    std::string vet_binary;                    // empty: fpxint-vet next to this executable
    std::vector<std::string> allow_ops_files;  // extra operations (--torchscript-allow-ops)
    absl::Duration timeout = absl::Seconds(120);
    int cpu_seconds = 120;
    uint64_t memory_bytes = 0;  // address-space limit; 0: 2 GiB + 4 x the archive
    int max_concurrent = 2;
  };
  // InvalidArgument when an allow-list file does not parse; NotFound without fpxint-vet.
  static absl::StatusOr<std::unique_ptr<TorchScriptVetter>> Create(Options o, Journal* journal);

  // The recorded verdict for (sha256, this allow-list), or a new one made by running fpxint-vet
  // on `path` (and recorded). Unavailable when no verdict could be reached (the vetting process
  // could not start); a model that crashes or exceeds the sandbox's limits is a failing verdict.
  absl::StatusOr<TorchScriptVerdict> Vet(const std::string& sha256, const std::string& path);
  // OK for a passing verdict; FailedPrecondition with the verdict's summary otherwise.
  absl::Status Require(const std::string& sha256, const std::string& path);

  const std::string& allow_list_digest() const { return digest_; }

 private:
  TorchScriptVetter(Options o, Journal* journal, std::string digest)
      : opts_(std::move(o)), journal_(journal), digest_(std::move(digest)) {}
  absl::StatusOr<TorchScriptVerdict> Run(const std::string& path);

  Options opts_;
  Journal* journal_;
  std::string digest_;
  absl::Mutex mu_;
  int running_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_VETTING_H_
