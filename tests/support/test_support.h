// File: tests/support/test_support.h
//
// Shared helpers for fpxint tests: reproducible random tensors of several distributions, scratch
// directories, and the location of the real models fetched by scripts/fetch_models.sh.
#ifndef FPXINT_TESTS_SUPPORT_TEST_SUPPORT_H_
#define FPXINT_TESTS_SUPPORT_TEST_SUPPORT_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace fpxint::testing {

enum class Dist { kGaussian, kLaplace, kStudentT3 };
const char* DistName(Dist d);

// n values of N(0,1), Laplace(0,1) or Student-t with 3 degrees of freedom (heavy tails),
// deterministic for a given seed.
std::vector<double> RandomValues(Dist d, int64_t n, uint64_t seed);
std::vector<float> ToFloat(const std::vector<double>& v);

// A fresh empty directory under $TMPDIR, removed by the destructor.
class ScratchDir {
 public:
  ScratchDir();
  ~ScratchDir();
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

std::string ReadFileOrDie(const std::string& path);
void WriteFileOrDie(const std::string& path, const std::string& bytes);

// Directory with the real models (scripts/fetch_models.sh output), from $FPXINT_MODELS_DIR.
// Fails the current test loudly (ADD_FAILURE) and returns "" when it is not set or missing:
// `make test` fetches the models first, so a missing model is a real failure.
std::string RealModelsDir();

// tests/reference/make_tiny_models.py's file `name` in $FPXINT_TINY_MODELS_DIR (the ctest
// fixture tiny_models). Fails the current test loudly when the variable is not set.
std::string TinyModelFile(const std::string& name);

// A small safetensors file (F32 fc1.weight [64,32], fc1.bias [64], fc2.weight [16,64]) of
// N(0,1) values from `seed`: an upload for job and service tests.
std::string SmallWeightsSafetensors(uint32_t seed);

// max |got - want| / max |want| over the elements (the absolute max when want is all zero).
template <typename A, typename B>
double MaxRelErr(const std::vector<A>& got, const std::vector<B>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i])));
    den = std::max(den, std::fabs(static_cast<double>(want[i])));
  }
  return den == 0 ? num : num / den;
}

// The 512x512 N(0,1) tensor of docs/ALGORITHM.md §7 (numpy default_rng(0)), written by the ctest
// fixture tests/reference/make_reference_tensors.py into $FPXINT_REFERENCE_DIR. Fails the test
// loudly (and returns an empty vector) when it is missing.
std::vector<double> ReferenceGaussian512();

}  // namespace fpxint::testing

#endif  // FPXINT_TESTS_SUPPORT_TEST_SUPPORT_H_
