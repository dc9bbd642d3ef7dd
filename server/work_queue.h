// File: server/work_queue.h
//
// A fixed set of threads that run posted tasks in the order they arrive. The server uses one per
// served model instance (its forward passes) and one for the control-plane RPCs, so that gRPC's
// callback threads never block on a network, a disk or the journal.
//
// Thread-safe. Destruction runs every task already posted, then joins the threads.
#ifndef FPXINT_SERVER_WORK_QUEUE_H_
#define FPXINT_SERVER_WORK_QUEUE_H_

#include <cstddef>
#include <deque>
#include <thread>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"

namespace fpxint::server {

class WorkQueue {
 public:
  using Task = absl::AnyInvocable<void() &&>;

  // `threads` >= 1; `max_queued` bounds the tasks waiting for a thread (0: no bound).
  explicit WorkQueue(int threads, size_t max_queued = 0);
  ~WorkQueue();
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  // Queues `task`; false (and the task dropped unrun) when max_queued tasks already wait.
  bool Post(Task task);

 private:
  void Loop();

  const size_t max_queued_;
  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<Task> tasks_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_;
};

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_WORK_QUEUE_H_
