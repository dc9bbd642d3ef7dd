// File: server/stream_guard.h
//
// Bounds on the client-streamed and server-streamed calls that hold a handler thread while they
// last (UploadModel, DownloadArtifact): at most `max_open` of a kind at once (beyond,
// RESOURCE_EXHAUSTED), and a call that moves no message for `idle_timeout` is cancelled from a
// watchdog thread (ServerContext::TryCancel), which unblocks the handler's Read or Write. So a
// client that sends a header and then nothing, or stops reading a download, frees its thread
// after the timeout instead of holding it forever.
//
// Thread-safe.
#ifndef FPXINT_SERVER_STREAM_GUARD_H_
#define FPXINT_SERVER_STREAM_GUARD_H_

#include <grpcpp/server_context.h>

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace fpxint::server {

class StreamGuard {
 public:
  // `what` names the calls and `flag` the limit in messages ("uploads", "--max-uploads").
  StreamGuard(std::string what, std::string flag, int max_open, absl::Duration idle_timeout);
  ~StreamGuard();

  // One open call. Progress() after every message; timed_out() once the watchdog cancelled it.
  class Lease {
   public:
    ~Lease();
    void Progress();
    bool timed_out() const { return timed_out_.load(); }
    // DeadlineExceeded naming the timeout (for the handler to return once timed_out()).
    absl::Status IdleError() const;

   private:
    friend class StreamGuard;
    Lease(StreamGuard* g, uint64_t id) : guard_(g), id_(id) {}
    StreamGuard* guard_;
    uint64_t id_;
    std::atomic<bool> timed_out_{false};
  };

  // ResourceExhausted (naming the limit) when max_open calls of this kind are open.
  absl::StatusOr<std::unique_ptr<Lease>> Open(grpc::ServerContext* ctx);
  int open() const;

 private:
  struct Entry {
    grpc::ServerContext* ctx;
    Lease* lease;
    absl::Time last;
  };
  void Loop();

  const std::string what_, flag_;
  const int max_open_;
  const absl::Duration idle_timeout_;
  mutable absl::Mutex mu_;
  std::map<uint64_t, Entry> open_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_STREAM_GUARD_H_
