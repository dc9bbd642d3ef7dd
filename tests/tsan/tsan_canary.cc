// Shows that the TSan build (make test-tsan) sees both races and absl synchronization:
//   tsan_canary race   two threads increment a counter without a lock: TSan must report it;
//   tsan_canary mutex  the same under absl::Mutex, with a hand-off through Mutex::Await and
//                      CondVar::WaitWithDeadline and a Notification: TSan must stay silent.
// Without tests/tsan/absl_sync_tsan.cc the second case reports false races (Debian's Abseil is not
// instrumented), and with a broken harness the first would pass silently; ctest checks both.
#include <cstdio>
#include <cstring>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"

namespace {

int counter = 0;  // deliberately plain

void Race() {
  std::thread a([] { for (int i = 0; i < 100000; ++i) ++counter; });
  std::thread b([] { for (int i = 0; i < 100000; ++i) ++counter; });
  a.join();
  b.join();
}

void Locked() {
  absl::Mutex mu;
  absl::CondVar cv;
  int turn = 0;  // guarded by mu: threads alternate through Await and the condition variable
  absl::Notification done;
  std::thread a([&] {
    for (int i = 0; i < 200; ++i) {
      absl::MutexLock l(&mu);
      mu.Await(absl::Condition(+[](int* t) { return *t % 2 == 0; }, &turn));
      ++counter;
      ++turn;
      cv.SignalAll();
    }
  });
  std::thread b([&] {
    for (int i = 0; i < 200; ++i) {
      absl::MutexLock l(&mu);
      while (turn % 2 != 1) cv.WaitWithDeadline(&mu, absl::Now() + absl::Seconds(1));
      ++counter;
      ++turn;
    }
    done.Notify();
  });
  done.WaitForNotification();
  a.join();
  b.join();
  std::printf("counter %d\n", counter);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "race") == 0) {
    Race();
  } else if (argc == 2 && std::strcmp(argv[1], "mutex") == 0) {
    Locked();
  } else {
    std::fprintf(stderr, "usage: tsan_canary race|mutex\n");
    return 2;
  }
  return 0;
}
