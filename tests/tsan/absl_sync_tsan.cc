// ThreadSanitizer support for Debian's prebuilt Abseil (linked into every binary of the TSan
// build, FPXINT_TSAN=ON; see docs/RELIABILITY.md).
//
// Debian ships Abseil as shared libraries compiled without -fsanitize=thread, so TSan cannot see
// the happens-before edges absl::Mutex, absl::CondVar and absl::Notification create: every access
// that two threads make under the same mutex looks like a race. This file defines the out-of-line
// members fpxint calls (the executable's definition takes precedence over the library's), each
// forwarding to the library's own implementation (dlsym RTLD_NEXT) and telling TSan about the
// synchronization: a release on the mutex's address before it can be unlocked, an acquire after
// it is locked. Nothing else changes, so a race TSan reports in this build is a real one.
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

#define FPX_STR2(x) #x
#define FPX_STR(x) FPX_STR2(x)

namespace {

// "_ZN4absl<len><inline namespace>" + rest: the Itanium mangling of absl::<ns>::<rest>.
std::string Mangled(const char* rest, bool is_const = false) {
  const std::string ns = FPX_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  return std::string(is_const ? "_ZNK4absl" : "_ZN4absl") + std::to_string(ns.size()) + ns + rest;
}

template <typename Fn>
Fn Real(const char* rest, bool is_const = false) {
  const std::string name = Mangled(rest, is_const);
  void* p = dlsym(RTLD_NEXT, name.c_str());
  if (p == nullptr) {
    std::fprintf(stderr, "absl_sync_tsan: %s not found in Abseil: %s\n", name.c_str(), dlerror());
    std::abort();
  }
  return reinterpret_cast<Fn>(p);
}

// Abseil's deadlock detector keeps a lock graph behind its own (uninstrumented) spinlock; TSan
// would see its bookkeeping from several threads without synchronization. It is a debugging aid,
// not part of what is tested here.
const bool kNoDeadlockGraph = [] {
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  return true;
}();

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

void Mutex::Lock() {
  static const auto real = Real<void (*)(Mutex*)>("5Mutex4LockEv");
  real(this);
  __tsan_acquire(this);
}

void Mutex::Unlock() {
  static const auto real = Real<void (*)(Mutex*)>("5Mutex6UnlockEv");
  __tsan_release(this);
  real(this);
}

void Mutex::ReaderLock() {
  static const auto real = Real<void (*)(Mutex*)>("5Mutex10ReaderLockEv");
  real(this);
  __tsan_acquire(this);
}

void Mutex::ReaderUnlock() {
  static const auto real = Real<void (*)(Mutex*)>("5Mutex12ReaderUnlockEv");
  __tsan_release(this);
  real(this);
}

bool Mutex::TryLock() {
  static const auto real = Real<bool (*)(Mutex*)>("5Mutex7TryLockEv");
  const bool ok = real(this);
  if (ok) __tsan_acquire(this);
  return ok;
}

// Await releases the mutex while it waits and holds it again when it returns. Abseil evaluates
// the condition with the mutex held, but inside the library: in the waiter, or in another thread
// that is unlocking. Each evaluation is therefore wrapped as a critical section of its own.
namespace {
struct GuardedCondition {
  Mutex* mu;
  const Condition* cond;
  static bool Eval(GuardedCondition* g) {
    __tsan_acquire(g->mu);
    const bool r = g->cond->Eval();
    __tsan_release(g->mu);
    return r;
  }
};

// Calls one of the library's AwaitWith* members (`real`, with `args` after the condition) on a
// guarded copy of `cond`, the mutex released to TSan while it waits.
template <typename R, typename... Args>
R GuardedAwait(R (*real)(Mutex*, const Condition&, Args...), Mutex* mu, const Condition& cond,
               Args... args) {
  GuardedCondition g{mu, &cond};
  __tsan_release(mu);
  R r = real(mu, Condition(&GuardedCondition::Eval, &g), args...);
  __tsan_acquire(mu);
  return r;
}
}  // namespace

void Mutex::Await(const Condition& cond) {
  static const auto real = Real<void (*)(Mutex*, const Condition&)>("5Mutex5AwaitERKNS0_9ConditionE");
  GuardedCondition g{this, &cond};
  __tsan_release(this);
  real(this, Condition(&GuardedCondition::Eval, &g));
  __tsan_acquire(this);
}

bool Mutex::AwaitWithDeadline(const Condition& cond, absl::Time deadline) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, absl::Time)>(
      "5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  return GuardedAwait(real, this, cond, deadline);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, absl::Duration timeout) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, absl::Duration)>(
      "5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  return GuardedAwait(real, this, cond, timeout);
}

bool CondVar::WaitWithDeadline(Mutex* mu, absl::Time deadline) {
  static const auto real =
      Real<bool (*)(CondVar*, Mutex*, absl::Time)>("7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  __tsan_release(mu);
  const bool timed_out = real(this, mu, deadline);
  __tsan_acquire(mu);
  return timed_out;
}

void CondVar::Wait(Mutex* mu) {
  static const auto real = Real<void (*)(CondVar*, Mutex*)>("7CondVar4WaitEPNS0_5MutexE");
  __tsan_release(mu);
  real(this, mu);
  __tsan_acquire(mu);
}

void Notification::Notify() {
  static const auto real = Real<void (*)(Notification*)>("12Notification6NotifyEv");
  __tsan_release(this);
  real(this);
}

bool Notification::WaitForNotificationWithTimeout(absl::Duration timeout) const {
  static const auto real = Real<bool (*)(const Notification*, absl::Duration)>(
      "12Notification30WaitForNotificationWithTimeoutENS0_8DurationE", true);
  const bool notified = real(this, timeout);
  if (notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

void Notification::WaitForNotification() const {
  static const auto real =
      Real<void (*)(const Notification*)>("12Notification19WaitForNotificationEv", true);
  real(this);
  __tsan_acquire(const_cast<Notification*>(this));
}

ABSL_NAMESPACE_END
}  // namespace absl
