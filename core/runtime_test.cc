// core::RetainTensorMemory: after it, tensor-sized blocks come from malloc's heaps and the heaps
// stay mapped once the blocks are freed, in the main arena and in a thread's arena (where the
// server's inference threads allocate).
#include "core/runtime.h"

#include <malloc.h>

#include <cstdlib>
#include <cstring>
#include <thread>

#include "gtest/gtest.h"

namespace fpxint::core {
namespace {

constexpr size_t kBlock = size_t{24} << 20;  // a large activation tensor
void* volatile g_escape = nullptr;             // keeps the compiler from eliding malloc/free

// Sanitizer builds (make fuzz-build, make tsan-build) replace glibc's malloc with their own,
// which mallopt does not reach.
constexpr bool kSanitizerAllocator =
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
    true;
#else
    false;
#endif
#else
    false;
#endif

bool EnvironmentTunesMalloc() {
  for (const char* v : {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                        "GLIBC_TUNABLES", "FPXINT_MALLOC_RETAIN"}) {
    if (std::getenv(v) != nullptr) return true;
  }
  return false;
}

// Allocates, touches and frees one block; returns the bytes glibc had mapped for single blocks
// while it was live (0: it came from a heap) and the heaps' size after the free.
struct BlockTrace {
  size_t mapped_while_live = 0;
  size_t heap_after_free = 0;
};
BlockTrace AllocateAndFree() {
  BlockTrace t;
  const size_t before = mallinfo2().hblkhd;
  void* p = std::malloc(kBlock);
  g_escape = p;
  std::memset(p, 1, kBlock);
  t.mapped_while_live = mallinfo2().hblkhd - before;
  std::free(p);
  t.heap_after_free = mallinfo2().arena;
  return t;
}

TEST(RetainTensorMemory, LargeBlocksComeFromHeapsThatStayMapped) {
  if (kSanitizerAllocator) GTEST_SKIP() << "a sanitizer's allocator replaces glibc's malloc";
  if (EnvironmentTunesMalloc()) GTEST_SKIP() << "the environment tunes malloc itself";
  ASSERT_TRUE(RetainTensorMemory());
  EXPECT_TRUE(RetainTensorMemory());  // idempotent

  const size_t heap_before = mallinfo2().arena;
  const BlockTrace main_arena = AllocateAndFree();
  EXPECT_EQ(main_arena.mapped_while_live, 0u) << "mapped on its own instead of from the heap";
  EXPECT_GE(main_arena.heap_after_free, heap_before + kBlock) << "the heap was trimmed";

  BlockTrace thread_arena;
  std::thread([&] { thread_arena = AllocateAndFree(); }).join();
  EXPECT_EQ(thread_arena.mapped_while_live, 0u) << "a thread's block was mapped on its own";
  EXPECT_GE(thread_arena.heap_after_free, main_arena.heap_after_free + kBlock)
      << "the thread arena's heap was unmapped once free";
}

}  // namespace
}  // namespace fpxint::core
