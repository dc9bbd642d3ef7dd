// File: server/sandbox.cc
#include "server/sandbox.h"

#include <linux/landlock.h>
#include <sched.h>
#include <seccomp.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

// Sanitizer runtimes reserve terabytes of shadow address space at start, so an address-space
// limit would fail every later allocation under them: the limit is left out in those builds.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define FPXINT_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define FPXINT_SANITIZED 1
#endif
#endif

namespace fpxint::server {
namespace {

absl::Status Errno(absl::string_view what) {
  return absl::InternalError(absl::StrCat("sandbox: ", what, ": ", std::strerror(errno)));
}

absl::Status SetLimit(int resource, uint64_t value, absl::string_view name) {
  struct rlimit r;
  r.rlim_cur = value;
  r.rlim_max = value;
  if (::setrlimit(resource, &r) != 0) return Errno(absl::StrCat("setrlimit(", name, ")"));
  return absl::OkStatus();
}

// True when a Landlock ruleset that handles every filesystem right is in force.
bool RestrictFilesystem() {
#ifdef LANDLOCK_CREATE_RULESET_VERSION
  const long abi = ::syscall(SYS_landlock_create_ruleset, nullptr, 0,
                             LANDLOCK_CREATE_RULESET_VERSION);
  if (abi < 1) return false;  // not built into this kernel, or disabled at boot
  struct landlock_ruleset_attr attr = {};
  // ABI 1: execute, read, write, make and remove every kind of file; ABI 2 adds REFER (link or
  // rename across directories), ABI 3 TRUNCATE. Handling a right and granting no rule for it
  // denies it everywhere.
  attr.handled_access_fs = (1ULL << 13) - 1;
  if (abi >= 2) attr.handled_access_fs |= 1ULL << 13;
  if (abi >= 3) attr.handled_access_fs |= 1ULL << 14;
  const long fd = ::syscall(SYS_landlock_create_ruleset, &attr, sizeof(attr), 0);
  if (fd < 0) return false;
  const long rc = ::syscall(SYS_landlock_restrict_self, static_cast<int>(fd), 0);
  ::close(static_cast<int>(fd));
  return rc == 0;
#else
  return false;
#endif
}

// The system calls that fail with EPERM inside the sandbox. Names the running architecture
// does not have are skipped.
constexpr const char* kDenied[] = {
    // files: open, create, link, remove, rename, change
    "open", "openat", "openat2", "creat", "open_by_handle_at", "name_to_handle_at", "link",
    "linkat", "symlink", "symlinkat", "unlink", "unlinkat", "rename", "renameat", "renameat2",
    "mkdir", "mkdirat", "rmdir", "mknod", "mknodat", "chmod", "fchmod", "fchmodat", "chown",
    "fchown", "lchown", "fchownat", "truncate", "ftruncate", "uselib", "chroot", "pivot_root",
    "mount", "umount2", "mount_setattr", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount",
    "open_tree", "quotactl", "acct", "swapon", "swapoff",
    // network
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    // programs, processes and other processes' memory
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev",
    "kill", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "unshare", "setns",
    // kernel paths around the filters above
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open",
    "userfaultfd", "keyctl", "add_key", "request_key", "init_module", "finit_module",
    "delete_module", "kexec_load", "kexec_file_load", "reboot", "sethostname", "setdomainname"};

absl::Status InstallSeccomp() {
  scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
  if (ctx == nullptr) return absl::InternalError("sandbox: seccomp_init failed");
  int rc = 0;
  for (const char* name : kDenied) {
    const int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;
    rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 0);
    if (rc != 0) break;
  }
  // clone makes threads (CLONE_THREAD set) and processes (not set): only threads pass. clone3
  // passes its flags in memory, which a filter cannot read: ENOSYS makes glibc fall back to
  // clone.
  if (rc == 0) {
    rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(clone), 1,
                          SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0));
  }
  if (rc == 0) rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0);
  if (rc == 0) rc = seccomp_load(ctx);
  seccomp_release(ctx);
  if (rc != 0) {
    return absl::InternalError(
        absl::StrCat("sandbox: cannot install the seccomp filter: ", std::strerror(-rc)));
  }
  return absl::OkStatus();
}

}  // namespace

bool SandboxLimitsAddressSpace() {
#ifdef FPXINT_SANITIZED
  return false;
#else
  return true;
#endif
}

void CloseInheritedFds() {
#ifdef SYS_close_range
  if (::syscall(SYS_close_range, 3U, ~0U, 0U) == 0) return;
#endif
  const long max = ::sysconf(_SC_OPEN_MAX);
  for (long fd = 3; fd < (max > 0 ? max : 1024); ++fd) ::close(static_cast<int>(fd));
}

absl::StatusOr<std::string> EnterSandbox(const SandboxLimits& limits) {
  std::vector<std::string> layers;
  if (auto s = SetLimit(RLIMIT_CORE, 0, "RLIMIT_CORE"); !s.ok()) return s;
  if (auto s = SetLimit(RLIMIT_CPU, static_cast<uint64_t>(limits.cpu_seconds), "RLIMIT_CPU");
      !s.ok()) {
    return s;
  }
#ifndef FPXINT_SANITIZED
  if (auto s = SetLimit(RLIMIT_AS, limits.address_space_bytes, "RLIMIT_AS"); !s.ok()) return s;
  layers.push_back("rlimits");
#else
  layers.push_back("rlimits (no address-space limit: sanitizer build)");
#endif
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return Errno("PR_SET_NO_NEW_PRIVS");
  layers.push_back("no_new_privs");
  if (RestrictFilesystem()) layers.push_back("landlock");
  if (auto s = InstallSeccomp(); !s.ok()) return s;
  layers.push_back("seccomp");
  return absl::StrJoin(layers, ", ");
}

}  // namespace fpxint::server
