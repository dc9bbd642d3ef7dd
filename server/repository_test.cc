// The served models of the repository (server/repository.h, ServedModel): calls run on the
// instances' own threads, waiting calls are taken in order by the instance that frees up, and
// every call ends exactly once: run, refused (queue full), expired (deadline) or ended by an
// unload.
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "server/repository.h"
#include "tests/support/test_support.h"

namespace fpxint::server {
namespace {

std::unique_ptr<ServedModel> Serve(int instances, InferQueueLimits limits) {
  std::vector<std::unique_ptr<model::Model>> nets;
  for (int i = 0; i < instances; ++i) {
    model::Model::Options o;
    o.threads = 1;
    auto m = model::Model::Load(testing::TinyModelFile("tiny_cnn.pt"), o);
    EXPECT_TRUE(m.ok()) << m.status();
    if (m.ok()) nets.push_back(*std::move(m));
  }
  v1::Deployment d;
  d.set_name("tiny");
  d.set_version("1");
  d.set_platform(kPlatformFp);
  return std::make_unique<ServedModel>(d, std::move(nets), limits);
}

// What one call saw.
struct Outcome {
  absl::Notification done;
  absl::Status status;
  std::thread::id thread;
};

ServedModel::Work Record(Outcome* o, absl::Notification* hold = nullptr) {
  return [o, hold](absl::StatusOr<model::Model*> net, uint64_t) {
    o->status = net.status();
    o->thread = std::this_thread::get_id();
    if (hold != nullptr) hold->WaitForNotification();
    o->done.Notify();
  };
}

TEST(ServedModel, RunsACallOnTheInstanceThreadAndComputes) {
  auto m = Serve(1, {});
  absl::Notification done;
  absl::Status st;
  std::vector<int64_t> shape;
  std::thread::id ran_on;
  m->Submit(0, 0, absl::InfiniteFuture(), [&](absl::StatusOr<model::Model*> net, uint64_t) {
    ran_on = std::this_thread::get_id();
    st = net.status();
    if (st.ok()) {
      const model::HostTensor x = model::HostTensor::Float({1, 3, 8, 8}, std::vector<float>(192, 0.5f));
      st = (*net)->Forward(model::HostTensorRef::Of(x),
                           [&](absl::Span<const int64_t> s, absl::Span<const float>) {
                             shape.assign(s.begin(), s.end());
                             return absl::OkStatus();
                           });
    }
    done.Notify();
  });
  done.WaitForNotification();
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(shape, (std::vector<int64_t>{1, 6}));
  EXPECT_NE(ran_on, std::this_thread::get_id());  // Submit never runs the network itself
}

TEST(ServedModel, WaitingCallsRunInOrderOnTheInstanceThatFreesUp) {
  auto m = Serve(1, {});
  absl::Notification release;
  Outcome first;
  m->Submit(0, 0, absl::InfiniteFuture(), Record(&first, &release));
  absl::Mutex mu;
  std::vector<int> order;
  std::vector<std::thread::id> threads;
  absl::Notification all;
  for (int i = 0; i < 3; ++i) {
    m->Submit(0, 0, absl::InfiniteFuture(), [&, i](absl::StatusOr<model::Model*> net, uint64_t) {
      EXPECT_TRUE(net.ok()) << net.status();
      absl::MutexLock l(&mu);
      order.push_back(i);
      threads.push_back(std::this_thread::get_id());
      if (order.size() == 3) all.Notify();
    });
  }
  {
    absl::MutexLock l(&mu);
    EXPECT_TRUE(order.empty());  // the only instance is still busy
  }
  release.Notify();
  all.WaitForNotification();
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2}));
  for (const auto& t : threads) EXPECT_EQ(t, first.thread);
}

TEST(ServedModel, AFullQueueRefusesAtOnce) {
  InferQueueLimits limits;
  limits.max_waiting = 2;
  auto m = Serve(1, limits);
  absl::Notification release;
  Outcome busy, w1, w2, refused;
  m->Submit(0, 0, absl::InfiniteFuture(), Record(&busy, &release));
  m->Submit(0, 0, absl::InfiniteFuture(), Record(&w1));
  m->Submit(0, 0, absl::InfiniteFuture(), Record(&w2));
  m->Submit(0, 0, absl::InfiniteFuture(), Record(&refused));
  // Refused inline, on the submitting thread, while the others still wait.
  ASSERT_TRUE(refused.done.HasBeenNotified());
  EXPECT_EQ(refused.status.code(), absl::StatusCode::kResourceExhausted) << refused.status;
  EXPECT_NE(refused.status.message().find("--infer-queue-limit"), std::string::npos);
  EXPECT_EQ(refused.thread, std::this_thread::get_id());
  EXPECT_FALSE(w1.done.HasBeenNotified());
  release.Notify();
  w1.done.WaitForNotification();
  w2.done.WaitForNotification();
  EXPECT_TRUE(w1.status.ok() && w2.status.ok());
}

TEST(ServedModel, AWaitingCallExpiresAtItsDeadlineWhileTheInstanceIsBusy) {
  InferQueueLimits limits;
  limits.max_wait = absl::Milliseconds(50);  // --infer-queue-timeout
  auto m = Serve(1, limits);
  absl::Notification release;
  Outcome busy, by_timeout, by_deadline;
  m->Submit(0, 0, absl::InfiniteFuture(), Record(&busy, &release));
  m->Submit(0, 0, absl::InfiniteFuture(), Record(&by_timeout));
  m->Submit(0, 0, absl::Now() + absl::Milliseconds(10), Record(&by_deadline));
  by_timeout.done.WaitForNotification();
  by_deadline.done.WaitForNotification();
  EXPECT_FALSE(busy.done.HasBeenNotified());  // ended while the instance was still busy
  EXPECT_EQ(by_timeout.status.code(), absl::StatusCode::kDeadlineExceeded) << by_timeout.status;
  EXPECT_NE(by_timeout.status.message().find("--infer-queue-timeout"), std::string::npos);
  EXPECT_EQ(by_deadline.status.code(), absl::StatusCode::kDeadlineExceeded);
  release.Notify();
  busy.done.WaitForNotification();
  EXPECT_TRUE(busy.status.ok());
  EXPECT_NE(by_timeout.thread, busy.thread);  // the timer ended it, not the instance
}

TEST(ServedModel, UnloadEndsWaitingCallsAndLetsTheRunningOneFinish) {
  auto m = Serve(1, {});
  absl::Notification release;
  Outcome running, waiting;
  m->Submit(0, 0, absl::InfiniteFuture(), Record(&running, &release));
  m->Submit(0, 0, absl::InfiniteFuture(), Record(&waiting));
  std::thread unload([&] { m.reset(); });
  waiting.done.WaitForNotification();
  EXPECT_EQ(waiting.status.code(), absl::StatusCode::kUnavailable) << waiting.status;
  EXPECT_NE(waiting.status.message().find("unloaded"), std::string::npos);
  EXPECT_FALSE(running.done.HasBeenNotified());
  release.Notify();
  unload.join();
  EXPECT_TRUE(running.done.HasBeenNotified());
  EXPECT_TRUE(running.status.ok());
}

TEST(ServedModel, TwoInstancesRunTwoCallsAtOnce) {
  auto m = Serve(2, {});
  absl::Notification release;
  Outcome a, b;
  absl::Notification both_started;
  absl::Mutex mu;
  int started = 0;
  auto work = [&](Outcome* o) -> ServedModel::Work {
    return [&, o](absl::StatusOr<model::Model*> net, uint64_t) {
      o->status = net.status();
      o->thread = std::this_thread::get_id();
      {
        absl::MutexLock l(&mu);
        if (++started == 2) both_started.Notify();
      }
      release.WaitForNotification();
      o->done.Notify();
    };
  };
  m->Submit(0, 0, absl::InfiniteFuture(), work(&a));
  m->Submit(0, 0, absl::InfiniteFuture(), work(&b));
  both_started.WaitForNotification();  // would hang with one call at a time
  EXPECT_NE(a.thread, b.thread);
  release.Notify();
  a.done.WaitForNotification();
  b.done.WaitForNotification();
}

}  // namespace
}  // namespace fpxint::server
