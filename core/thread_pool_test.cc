#include "core/thread_pool.h"

#include <atomic>
#include <vector>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <set>
#include <thread>

#include "gtest/gtest.h"

namespace fpxint::core {
namespace {

TEST(ThreadPool, RunsEveryIndexExactlyOnce) {
  ThreadPool pool(3);
  EXPECT_EQ(pool.size(), 3);
  for (int round = 0; round < 50; ++round) {
    std::vector<std::atomic<int>> hits(1000);
    pool.ParallelFor(1000, [&](int64_t i) { hits[i].fetch_add(1); });
    for (auto& h : hits) ASSERT_EQ(h.load(), 1);
  }
}

TEST(ThreadPool, UsesSeveralThreadsAndAllowsConcurrentCallers) {
  ThreadPool pool(2);
  std::mutex mu;
  std::set<std::thread::id> ids;
  // Every item waits (up to 10 s) until two different threads have taken items, so a worker
  // that wakes late on a loaded machine still gets its share.
  std::condition_variable cv;
  bool gave_up = false;
  pool.ParallelFor(64, [&](int64_t) {
    std::unique_lock<std::mutex> l(mu);
    ids.insert(std::this_thread::get_id());
    cv.notify_all();
    if (!cv.wait_for(l, std::chrono::seconds(10), [&] { return ids.size() >= 2 || gave_up; })) {
      gave_up = true;
    }
  });
  EXPECT_EQ(ids.size(), 2u);
  std::atomic<int64_t> sum{0};
  std::thread a([&] { pool.ParallelFor(100, [&](int64_t i) { sum += i; }); });
  std::thread b([&] { pool.ParallelFor(100, [&](int64_t i) { sum += i; }); });
  a.join();
  b.join();
  EXPECT_EQ(sum.load(), 2 * 4950);
}

TEST(ThreadPool, SingleThreadAndEmptyLoops) {
  ThreadPool pool(1);
  int n = 0;
  pool.ParallelFor(0, [&](int64_t) { ++n; });
  pool.ParallelFor(5, [&](int64_t) { ++n; });
  EXPECT_EQ(n, 5);
}

// RunTasks: without a pool every index on the calling thread in order; with one, every index
// exactly once.
TEST(ThreadPool, RunTasksWithAndWithoutAPool) {
  std::vector<int64_t> order;
  RunTasks(nullptr, 4, [&](int64_t i) { order.push_back(i); });
  EXPECT_EQ(order, (std::vector<int64_t>{0, 1, 2, 3}));
  ThreadPool pool(2);
  std::vector<std::atomic<int>> hits(100);
  RunTasks(&pool, 100, [&](int64_t i) { hits[static_cast<size_t>(i)].fetch_add(1); });
  for (const auto& h : hits) EXPECT_EQ(h.load(), 1);
  int n = 0;
  RunTasks(&pool, 0, [&](int64_t) { ++n; });
  EXPECT_EQ(n, 0);
}

}  // namespace
}  // namespace fpxint::core
