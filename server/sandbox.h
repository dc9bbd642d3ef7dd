// File: server/sandbox.h
//
// Confinement of a process that is about to handle untrusted code (fpxint-vet loading an
// uploaded TorchScript archive, whose `__setstate__` runs at load). Call it after everything
// the process needs has been read into memory: from then on the process cannot open, create or
// remove files, cannot use the network, cannot start programs or other processes (threads
// still work), and runs under CPU-time, address-space and file-size limits.
//
// The layers, each enough on its own for what it covers:
//   - rlimits: CPU seconds, address space, no core dumps;
//   - no_new_privs: nothing it starts can gain privileges (and seccomp needs it);
//   - Landlock (Linux >= 5.13, when the kernel enables it): no filesystem access at all;
//   - seccomp (libseccomp): the system calls that open, create or remove files, make sockets,
//     start programs or processes, trace or signal other processes, or reach the kernel's
//     bypass paths (io_uring, bpf, user namespaces) fail with EPERM.
#ifndef FPXINT_SERVER_SANDBOX_H_
#define FPXINT_SERVER_SANDBOX_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace fpxint::server {

// True when this build can enforce SandboxLimits::address_space_bytes (not under ASan or TSan).
bool SandboxLimitsAddressSpace();

struct SandboxLimits {
  int cpu_seconds = 60;
  uint64_t address_space_bytes = uint64_t{8} << 30;
};

// Closes every file descriptor above 2 (call first thing, before reading untrusted input).
void CloseInheritedFds();

// Irreversible. Returns the layers in force ("rlimits, no_new_privs, landlock, seccomp"; Landlock
// is left out, not an error, on kernels without it). Internal when a layer that must hold
// (rlimits, no_new_privs, seccomp) cannot be installed.
absl::StatusOr<std::string> EnterSandbox(const SandboxLimits& limits);

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_SANDBOX_H_
