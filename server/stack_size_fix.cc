// Raises every thread stack this process asks for to at least 1 MiB (docs/ARCHITECTURE.md,
// toolchain trap 2).
//
// prometheus-cpp's civetweb asks pthread_attr_setstacksize for ~100 KiB stacks. With OpenBLAS,
// glog and LibTorch loaded, the static TLS of this process is ~108 KB, so glibc cannot fit it in
// such a stack, pthread_create fails and the Exposer throws "null context ... Possible problem
// binding to port" although the port is free. This interposer is compiled into each executable
// that starts a MetricsExposer (a static library member would never be pulled in by the linker).
#include <dlfcn.h>
#include <pthread.h>

#include <cstddef>

extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t size) {
  using Fn = int (*)(pthread_attr_t*, size_t);
  static const Fn real = reinterpret_cast<Fn>(::dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  constexpr size_t kMinStack = size_t{1} << 20;
  if (real == nullptr) return 22;  // EINVAL: cannot happen with glibc
  return real(attr, size < kMinStack ? kMinStack : size);
}
