// File: model/aten_pool.h
//
// A core::ThreadPool whose ParallelFor runs on LibTorch's intra-op threads (at::parallel_for).
// The TorchScript ops of this directory run core kernels (expansion, IntLinear) in the middle of
// a network whose other ops use those OpenMP threads: a second set of threads made OpenMP's
// spinning workers and ours compete for the same cores. No LibTorch types here.
#ifndef FPXINT_MODEL_ATEN_POOL_H_
#define FPXINT_MODEL_ATEN_POOL_H_

#include "core/thread_pool.h"

namespace fpxint::model {

// The process-wide instance. Nested use (from inside at::parallel_for) runs serially.
core::ThreadPool& AtenPool();

}  // namespace fpxint::model

#endif  // FPXINT_MODEL_ATEN_POOL_H_
