// File: server/sandbox_test.cc
//
// The sandbox (server/sandbox.h) in forked children: what it must stop fails with EPERM, what a
// model load needs (memory, threads, reading an already open descriptor) still works, and the
// limits hold. Each case runs in its own child, since entering the sandbox is irreversible.
#include "server/sandbox.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <functional>
#include <thread>
#include <vector>

namespace fpxint::server {
namespace {

// Runs `body` in a sandboxed child; returns its exit code (or 128 + signal).
int InSandbox(const std::function<int()>& body, SandboxLimits limits = {}) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    auto layers = EnterSandbox(limits);
    if (!layers.ok()) ::_exit(90);
    ::_exit(body());
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

TEST(Sandbox, ReportsItsLayers) {
  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  const pid_t pid = ::fork();
  if (pid == 0) {
    auto layers = EnterSandbox({});
    const std::string s = layers.ok() ? *layers : "error";
    [[maybe_unused]] ssize_t n = ::write(pipefd[1], s.data(), s.size());
    ::_exit(0);
  }
  ::close(pipefd[1]);
  char buf[256] = {};
  [[maybe_unused]] ssize_t n = ::read(pipefd[0], buf, sizeof(buf) - 1);
  ::waitpid(pid, nullptr, 0);
  const std::string layers(buf);
  EXPECT_NE(layers.find("seccomp"), std::string::npos) << layers;
  EXPECT_NE(layers.find("no_new_privs"), std::string::npos) << layers;
  EXPECT_NE(layers.find("rlimits"), std::string::npos) << layers;
}

TEST(Sandbox, CannotOpenFiles) {
  EXPECT_EQ(InSandbox([] {
              const int fd = ::open("/etc/hostname", O_RDONLY);
              return fd < 0 && errno == EPERM ? 0 : 1;
            }),
            0);
  EXPECT_EQ(InSandbox([] {
              const int fd = ::openat(AT_FDCWD, "/proc/self/environ", O_RDONLY);
              return fd < 0 ? 0 : 1;
            }),
            0);
}

TEST(Sandbox, CannotCreateOrRemoveFiles) {
  char dir[] = "/tmp/fpxint-sandbox-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  const std::string victim = std::string(dir) + "/keep";
  {
    const int fd = ::open(victim.c_str(), O_CREAT | O_WRONLY, 0600);
    ASSERT_GE(fd, 0);
    ::close(fd);
  }
  EXPECT_EQ(InSandbox([&] { return ::unlink(victim.c_str()) != 0 && errno == EPERM ? 0 : 1; }), 0);
  EXPECT_EQ(InSandbox([&] {
              return ::mkdir((std::string(dir) + "/new").c_str(), 0700) != 0 ? 0 : 1;
            }),
            0);
  EXPECT_EQ(::access(victim.c_str(), F_OK), 0);
  ::unlink(victim.c_str());
  ::rmdir(dir);
}

TEST(Sandbox, NoNetworkNoProgramsNoProcesses) {
  EXPECT_EQ(InSandbox([] { return ::socket(AF_INET, SOCK_STREAM, 0) < 0 && errno == EPERM ? 0 : 1; }),
            0);
  EXPECT_EQ(InSandbox([] { return ::socket(AF_UNIX, SOCK_STREAM, 0) < 0 ? 0 : 1; }), 0);
  EXPECT_EQ(InSandbox([] {
              char* argv[] = {const_cast<char*>("/bin/true"), nullptr};
              ::execv("/bin/true", argv);
              return errno == EPERM ? 0 : 1;
            }),
            0);
  EXPECT_EQ(InSandbox([] {
              const pid_t p = ::fork();
              if (p == 0) ::_exit(0);
              return p < 0 && errno == EPERM ? 0 : 1;
            }),
            0);
}

TEST(Sandbox, ThreadsMemoryAndOpenDescriptorsStillWork) {
  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  ASSERT_EQ(::write(pipefd[1], "ok", 2), 2);
  EXPECT_EQ(InSandbox([&] {
              std::vector<char> big(64 << 20, 1);
              int sum = 0;
              std::thread t([&] { sum = big[12345] + big[big.size() - 1]; });
              t.join();
              char buf[2];
              const bool read_ok = ::read(pipefd[0], buf, 2) == 2 && buf[0] == 'o';
              return sum == 2 && read_ok ? 0 : 1;
            }),
            0);
}

TEST(Sandbox, AddressSpaceLimitHolds) {
  if (!SandboxLimitsAddressSpace()) GTEST_SKIP() << "sanitizer build: no address-space limit";
  SandboxLimits l;
  l.address_space_bytes = uint64_t{512} << 20;
  EXPECT_EQ(InSandbox(
                [] {
                  void* p = std::malloc(size_t{1} << 30);
                  return p == nullptr ? 0 : 1;
                },
                l),
            0);
}

}  // namespace
}  // namespace fpxint::server
