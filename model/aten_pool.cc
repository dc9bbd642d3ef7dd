#include "model/aten_pool.h"

#include <ATen/Parallel.h>

namespace fpxint::model {
namespace {

class AtenThreadPool : public core::ThreadPool {
 public:
  AtenThreadPool() : core::ThreadPool(1) {}  // no threads of its own
  void ParallelFor(int64_t n, const std::function<void(int64_t)>& fn) override {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) fn(i);
    });
  }
};

}  // namespace

core::ThreadPool& AtenPool() {
  static AtenThreadPool pool;
  return pool;
}

}  // namespace fpxint::model
