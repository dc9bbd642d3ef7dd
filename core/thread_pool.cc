#include "core/thread_pool.h"

#include <algorithm>

namespace fpxint::core {

ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
  }
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::RunChunks() {
  while (true) {
    const std::function<void(int64_t)>* fn;
    int64_t i;
    {
      absl::MutexLock l(&mu_);
      if (fn_ == nullptr || next_ >= n_) return;
      fn = fn_;
      i = next_++;
    }
    (*fn)(i);
  }
}

void ThreadPool::WorkerLoop() {
  struct Wake {
    ThreadPool* pool;
    uint64_t seen;
  };
  Wake wake{this, 0};
  while (true) {
    {
      absl::MutexLock l(&mu_);
      mu_.Await(absl::Condition(
          +[](Wake* w) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return w->pool->stop_ || w->pool->generation_ != w->seen;
          },
          &wake));
      if (stop_) return;
      wake.seen = generation_;
      ++active_;
    }
    RunChunks();
    absl::MutexLock l(&mu_);
    --active_;
  }
}

void ThreadPool::ParallelFor(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  if (workers_.empty() || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  absl::MutexLock call(&call_mu_);
  {
    absl::MutexLock l(&mu_);
    fn_ = &fn;
    n_ = n;
    next_ = 0;
    ++generation_;
  }
  RunChunks();
  absl::MutexLock l(&mu_);
  // Wait until no item is left unclaimed and every worker that joined this call has finished.
  mu_.Await(absl::Condition(
      +[](ThreadPool* p) ABSL_NO_THREAD_SAFETY_ANALYSIS { return p->active_ == 0; }, this));
  fn_ = nullptr;
}

void RunTasks(ThreadPool* pool, int64_t n, const std::function<void(int64_t)>& fn) {
  if (pool != nullptr && n > 1) {
    pool->ParallelFor(n, fn);
  } else {
    for (int64_t i = 0; i < n; ++i) fn(i);
  }
}

}  // namespace fpxint::core
