// File: server/stream_guard.cc
#include "server/stream_guard.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "server/log.h"

namespace fpxint::server {

StreamGuard::StreamGuard(std::string what, std::string flag, int max_open,
                         absl::Duration idle_timeout)
    : what_(std::move(what)),
      flag_(std::move(flag)),
      max_open_(max_open),
      idle_timeout_(idle_timeout),
      thread_([this] { Loop(); }) {}

StreamGuard::~StreamGuard() {
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
  }
  thread_.join();
}

absl::StatusOr<std::unique_ptr<StreamGuard::Lease>> StreamGuard::Open(grpc::ServerContext* ctx) {
  absl::MutexLock l(&mu_);
  if (static_cast<int>(open_.size()) >= max_open_) {
    return absl::ResourceExhaustedError(absl::StrCat(max_open_, " ", what_,
                                                     " are in progress, the server's limit (",
                                                     flag_, "); retry shortly"));
  }
  const uint64_t id = next_id_++;
  std::unique_ptr<Lease> lease(new Lease(this, id));
  open_[id] = Entry{ctx, lease.get(), absl::Now()};
  return lease;
}

int StreamGuard::open() const {
  absl::MutexLock l(&mu_);
  return static_cast<int>(open_.size());
}

StreamGuard::Lease::~Lease() {
  absl::MutexLock l(&guard_->mu_);
  guard_->open_.erase(id_);
}

void StreamGuard::Lease::Progress() {
  absl::MutexLock l(&guard_->mu_);
  auto it = guard_->open_.find(id_);
  if (it != guard_->open_.end()) it->second.last = absl::Now();
}

absl::Status StreamGuard::Lease::IdleError() const {
  return absl::DeadlineExceededError(
      absl::StrCat("no message moved for ", absl::FormatDuration(guard_->idle_timeout_),
                   " (--stream-idle-timeout); the call was cancelled"));
}

void StreamGuard::Loop() {
  const absl::Duration tick = std::min(absl::Seconds(1), idle_timeout_ / 4);
  absl::MutexLock l(&mu_);
  while (!mu_.AwaitWithTimeout(absl::Condition(&stop_), tick)) {
    const absl::Time now = absl::Now();
    for (auto& [id, e] : open_) {
      if (now - e.last < idle_timeout_ || e.lease->timed_out_.load()) continue;
      // TryCancel may be called from any thread; the blocked Read/Write returns false.
      e.lease->timed_out_.store(true);
      e.ctx->TryCancel();
      LogWarning(absl::StrCat("cancelled one of the ", what_, ": idle for ",
                              absl::FormatDuration(now - e.last), " (", "--stream-idle-timeout)"));
    }
  }
}

}  // namespace fpxint::server
