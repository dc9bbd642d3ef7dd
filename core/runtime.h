// File: core/runtime.h
//
// The one place that decides, once per process, what the CPU offers and which instruction set
// every kernel table follows (core/kernels.h, core/lowbit_linear.h, core/int_linear.h), and the
// tuning knobs the kernels and the packed ops use. The environment is read the first time
// anything asks (before the first kernel runs) and never again:
//
//   FPXINT_KERNEL           ref | avx2 | avx512: force an ISA family (ignored when unsupported)
//   FPXINT_PREFETCH_BYTES   software prefetch distance of the batch-1 AVX-512 kernels (0: off;
//                           default 1024)
//   FPXINT_PACKED_MAX_ROWS  activation rows beyond which packed layers take the dense path
//                           (default -1: automatic, model/lowbit_ops.h)
//   FPXINT_MALLOC_RETAIN    0: RetainTensorMemory() leaves the allocator alone
#ifndef FPXINT_CORE_RUNTIME_H_
#define FPXINT_CORE_RUNTIME_H_

#include <cstdint>
#include <string>

namespace fpxint::core {

struct CpuFeatures {
  bool avx2 = false;
  bool avx512 = false;  // F, VL, BW and DQ: what the avx512 tables use
  bool avx512vnni = false;
};
// What this CPU supports (cpuid, once).
const CpuFeatures& Cpu();

enum class Isa { kRef, kAvx2, kAvx512 };
const char* IsaName(Isa isa);
bool IsaSupported(Isa isa);

struct RuntimeConfig {
  Isa isa = Isa::kRef;           // FPXINT_KERNEL, else the best IsaSupported
  int64_t prefetch_bytes = 1024;
  int64_t packed_max_rows = -1;
};
// The configuration of this process, from the environment at first use.
const RuntimeConfig& Runtime();

// Makes glibc's malloc keep tensor-sized blocks for reuse, for programs that run networks (the
// server, fpxint-eval, the benchmarks): blocks up to 32 MiB (glibc's largest mmap threshold)
// come from the heap instead of a fresh mapping; up to 256 MiB of free heap is kept instead of
// being returned to the kernel (M_TRIM_THRESHOLD); and a thread's arena keeps a heap that has
// become free while less than 64 MiB is spare (M_TOP_PAD: without it a heap of a thread arena is
// unmapped as soon as it is free, whatever the trim threshold). By default glibc maps each large
// block and unmaps it on free, so a forward pass with a new activation size (dynamic batching)
// page-faults its tensors in again; under a virtual machine a fault costs microseconds, and
// docs/BENCHMARKS.md measures what that did to batched serving. Leaves the allocator alone when
// FPXINT_MALLOC_RETAIN=0 or when the environment already tunes it (MALLOC_MMAP_THRESHOLD_,
// MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_, GLIBC_TUNABLES). Returns whether it changed anything;
// idempotent.
bool RetainTensorMemory();

}  // namespace fpxint::core

#endif  // FPXINT_CORE_RUNTIME_H_
