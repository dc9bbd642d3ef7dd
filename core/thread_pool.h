// File: core/thread_pool.h
//
// A fixed pool of threads for data-parallel loops. The server shares one pool between jobs;
// offline tools make their own. `ThreadPool(n)` runs loops n-wide: the calling thread works too,
// so the pool starts n-1 workers.
//
// Thread-safe: any thread may call ParallelFor; calls run one after another.
#ifndef FPXINT_CORE_THREAD_POOL_H_
#define FPXINT_CORE_THREAD_POOL_H_

#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace fpxint::core {

class ThreadPool {
 public:
  // `threads` participants in each ParallelFor (the caller plus threads-1 workers); 0 means
  // std::thread::hardware_concurrency().
  explicit ThreadPool(int threads);
  virtual ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(i) for every i in [0, n), in chunks claimed dynamically; returns when all are done.
  // Virtual so that code running inside another runtime's pool can lend it instead (model/'s
  // TorchScript ops run core kernels on LibTorch's intra-op threads: a second set of threads
  // would compete with OpenMP's spinning ones).
  virtual void ParallelFor(int64_t n, const std::function<void(int64_t)>& fn)
      ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void WorkerLoop();
  void RunChunks();

  absl::Mutex call_mu_;  // serialises ParallelFor calls
  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  int active_ ABSL_GUARDED_BY(mu_) = 0;
  const std::function<void(int64_t)>* fn_ ABSL_GUARDED_BY(mu_) = nullptr;
  int64_t n_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t next_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::thread> workers_;
};

// fn(i) for every i in [0, n): on `pool` when there is one and more than one task, otherwise on
// the calling thread in order.
void RunTasks(ThreadPool* pool, int64_t n, const std::function<void(int64_t)>& fn);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_THREAD_POOL_H_
