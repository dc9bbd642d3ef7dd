// main() of the Google Benchmark programs (fpxint-bench, fpxint-service-bench): as
// BENCHMARK_MAIN(), with the allocator the server runs with (core::RetainTensorMemory).
#include <benchmark/benchmark.h>

#include "core/runtime.h"

int main(int argc, char** argv) {
  fpxint::core::RetainTensorMemory();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
