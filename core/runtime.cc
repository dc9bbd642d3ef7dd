// File: core/runtime.cc
#include "core/runtime.h"

#include <malloc.h>

#include <cstdlib>
#include <cstring>

namespace fpxint::core {
namespace {

int64_t EnvInt(const char* name, int64_t fallback) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == '\0') return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(e, &end, 10);
  return end != nullptr && *end == '\0' ? static_cast<int64_t>(v) : fallback;
}

RuntimeConfig FromEnvironment() {
  RuntimeConfig c;
  c.isa = IsaSupported(Isa::kAvx512) ? Isa::kAvx512 : IsaSupported(Isa::kAvx2) ? Isa::kAvx2 : Isa::kRef;
  if (const char* forced = std::getenv("FPXINT_KERNEL"); forced != nullptr) {
    for (Isa isa : {Isa::kRef, Isa::kAvx2, Isa::kAvx512}) {
      if (std::strcmp(forced, IsaName(isa)) == 0 && IsaSupported(isa)) c.isa = isa;
    }
  }
  c.prefetch_bytes = EnvInt("FPXINT_PREFETCH_BYTES", c.prefetch_bytes);
  c.packed_max_rows = EnvInt("FPXINT_PACKED_MAX_ROWS", c.packed_max_rows);
  return c;
}

}  // namespace

const CpuFeatures& Cpu() {
  static const CpuFeatures f = [] {
    __builtin_cpu_init();
    CpuFeatures c;
    c.avx2 = __builtin_cpu_supports("avx2");
    c.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    c.avx512vnni = c.avx512 && __builtin_cpu_supports("avx512vnni");
    return c;
  }();
  return f;
}

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kRef: return "ref";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "ref";
}

bool IsaSupported(Isa isa) {
  switch (isa) {
    case Isa::kRef: return true;
    case Isa::kAvx2: return Cpu().avx2;
    case Isa::kAvx512: return Cpu().avx512;
  }
  return false;
}

const RuntimeConfig& Runtime() {
  static const RuntimeConfig c = FromEnvironment();
  return c;
}

bool RetainTensorMemory() {
  static const bool changed = [] {
    if (EnvInt("FPXINT_MALLOC_RETAIN", 1) == 0) return false;
    for (const char* tuned : {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                              "MALLOC_TOP_PAD_", "GLIBC_TUNABLES"}) {
      if (const char* v = std::getenv(tuned); v != nullptr && *v != '\0') return false;
    }
    bool ok = mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1;
    ok = mallopt(M_TRIM_THRESHOLD, 256 << 20) == 1 && ok;
    ok = mallopt(M_TOP_PAD, 64 << 20) == 1 && ok;
    return ok;
  }();
  return changed;
}

}  // namespace fpxint::core
