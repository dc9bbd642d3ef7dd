// The served models of the repository (server/repository.h, ServedModel): calls run on the
// instances' own threads, waiting calls are taken in order by the instance that frees up, and
// every call ends exactly once: run, refused (queue full), expired (deadline) or ended by an
// unload.
#include <deque>
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

std::unique_ptr<ServedModel> Serve(int instances, InferQueueLimits limits,
                                   const v1::DynamicBatching& batching = {},
                                   const std::string& file = "tiny_cnn.pt") {
  std::vector<std::unique_ptr<model::Model>> nets;
  for (int i = 0; i < instances; ++i) {
    model::Model::Options o;
    o.threads = 1;
    auto m = model::Model::Load(testing::TinyModelFile(file), o);
    EXPECT_TRUE(m.ok()) << m.status();
    if (m.ok()) nets.push_back(*std::move(m));
  }
  v1::Deployment d;
  d.set_name("tiny");
  d.set_version("1");
  d.set_platform(kPlatformFp);
  *d.mutable_batching() = batching;
  return std::make_unique<ServedModel>(d, std::move(nets), limits);
}

v1::DynamicBatching Batching(uint32_t max, std::vector<uint32_t> preferred, uint64_t delay_us) {
  v1::DynamicBatching b;
  b.set_max_batch_size(max);
  for (uint32_t p : preferred) b.add_preferred_batch_size(p);
  b.set_max_queue_delay_microseconds(delay_us);
  return b;
}

// What one batched call saw.
struct Shared {
  absl::Notification done;
  absl::Status status;
  std::vector<int64_t> shape;
  std::vector<float> values;
  int64_t pass_rows = 0;
  int pass_calls = 0;
  bool first = false;
};

ServedModel::BatchedWork Keep(Shared* o) {
  return [o](const absl::Status& s, const ServedModel::Share& share) {
    o->status = s;
    o->shape.assign(share.shape.begin(), share.shape.end());
    o->values.assign(share.values.begin(), share.values.end());
    o->pass_rows = share.pass_rows;
    o->pass_calls = share.pass_calls;
    o->first = share.first;
    o->done.Notify();
  };
}

// Distinct inputs [rows, 3, 8, 8] for tiny_cnn.
model::HostTensor CnnInput(int64_t rows, uint64_t seed) {
  return model::HostTensor::Float({rows, 3, 8, 8},
                                  testing::ToFloat(testing::RandomValues(
                                      testing::Dist::kGaussian, rows * 192, seed)));
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

// Dynamic batching: concurrent calls run as one pass over their concatenated rows, and each
// gets exactly its own rows of the output (against the same network run on each input alone).
TEST(ServedModel, BatchedCallsShareAPassAndGetTheirOwnRows) {
  // One instance; a pass waits (up to 10 s) until max_batch_size rows wait.
  auto m = Serve(1, {}, Batching(8, {}, 10'000'000));
  auto alone = Serve(1, {});
  const std::vector<int64_t> rows = {1, 2, 1, 2};
  std::vector<model::HostTensor> in;
  for (size_t i = 0; i < rows.size(); ++i) in.push_back(CnnInput(rows[i], 40 + i));
  // A pass needs max_batch_size (8) rows or the delay: add a 2-row call to reach 8.
  in.push_back(CnnInput(2, 50));
  std::deque<Shared> got(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    m->SubmitBatched(0, 0, absl::InfiniteFuture(), model::HostTensorRef::Of(in[i]), Keep(&got[i]));
  }
  int firsts = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    got[i].done.WaitForNotification();
    ASSERT_TRUE(got[i].status.ok()) << i << ": " << got[i].status;
    EXPECT_EQ(got[i].pass_rows, 8) << i;
    EXPECT_EQ(got[i].pass_calls, 5) << i;
    firsts += got[i].first;
    EXPECT_EQ(got[i].shape, (std::vector<int64_t>{in[i].shape[0], 6})) << i;
    // The same rows run alone.
    absl::Notification done;
    std::vector<float> want;
    alone->Submit(0, 0, absl::InfiniteFuture(), [&](absl::StatusOr<model::Model*> net, uint64_t) {
      ASSERT_TRUE(net.ok());
      auto y = (*net)->Forward(in[i]);
      ASSERT_TRUE(y.ok()) << y.status();
      want = y->f32;
      done.Notify();
    });
    done.WaitForNotification();
    EXPECT_LT(testing::MaxRelErr(got[i].values, want), 1e-5) << i;
  }
  EXPECT_EQ(firsts, 1);
}

// Preferred sizes cut a pass; the delay lets a lone call run; max_batch_size bounds every pass.
TEST(ServedModel, APassIsCutToTheLargestPreferredSizeItReaches) {
  auto m = Serve(1, {}, Batching(8, {2, 3}, 50'000));
  std::vector<model::HostTensor> in;
  for (int i = 0; i < 7; ++i) in.push_back(CnnInput(1, 60 + i));
  std::deque<Shared> got(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    m->SubmitBatched(0, 0, absl::InfiniteFuture(), model::HostTensorRef::Of(in[i]), Keep(&got[i]));
  }
  int calls = 0;
  for (Shared& g : got) {
    g.done.WaitForNotification();
    ASSERT_TRUE(g.status.ok()) << g.status;
    EXPECT_LE(g.pass_rows, 3);
    EXPECT_NE(g.pass_rows, 0);
    calls += g.first ? g.pass_calls : 0;
  }
  EXPECT_EQ(calls, 7);  // every call in exactly one pass
}

// A model that cannot batch (its output has one row whatever the input's) still answers every
// call: the failed pass runs its calls one by one.
TEST(ServedModel, APassThatCannotBeSplitRunsItsCallsAlone) {
  auto m = Serve(1, {}, Batching(4, {}, 10'000'000), "fixed_batch.pt");
  std::vector<model::HostTensor> in;
  for (int i = 0; i < 4; ++i) {
    in.push_back(model::HostTensor::Float({1, 5}, std::vector<float>(5, static_cast<float>(i))));
  }
  std::deque<Shared> got(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    m->SubmitBatched(0, 0, absl::InfiniteFuture(), model::HostTensorRef::Of(in[i]), Keep(&got[i]));
  }
  model::Model::Options o;
  o.threads = 1;
  auto alone = model::Model::Load(testing::TinyModelFile("fixed_batch.pt"), o);
  ASSERT_TRUE(alone.ok()) << alone.status();
  for (size_t i = 0; i < in.size(); ++i) {
    got[i].done.WaitForNotification();
    ASSERT_TRUE(got[i].status.ok()) << got[i].status;
    EXPECT_EQ(got[i].pass_calls, 1);
    EXPECT_EQ(got[i].shape, (std::vector<int64_t>{1, 5}));
    auto want = (*alone)->Forward(in[i]);
    ASSERT_TRUE(want.ok()) << want.status();
    EXPECT_EQ(got[i].values, want->f32) << i;
  }
}

// Waiting batched calls end like any other: at their deadline, or when the model is unloaded.
TEST(ServedModel, WaitingBatchedCallsExpireOrEndAtUnload) {
  auto m = Serve(1, {}, Batching(8, {}, 10'000'000));
  const model::HostTensor x = CnnInput(1, 70);
  Shared expiring, unloaded;
  m->SubmitBatched(0, 0, absl::Now() + absl::Milliseconds(50), model::HostTensorRef::Of(x),
                   Keep(&expiring));
  expiring.done.WaitForNotification();
  EXPECT_EQ(expiring.status.code(), absl::StatusCode::kDeadlineExceeded) << expiring.status;
  m->SubmitBatched(0, 0, absl::InfiniteFuture(), model::HostTensorRef::Of(x), Keep(&unloaded));
  m.reset();
  ASSERT_TRUE(unloaded.done.HasBeenNotified());
  EXPECT_EQ(unloaded.status.code(), absl::StatusCode::kUnavailable) << unloaded.status;
}

}  // namespace
}  // namespace fpxint::server
