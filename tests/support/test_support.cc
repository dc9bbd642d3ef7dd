#include "tests/support/test_support.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "core/safetensors.h"
#include "gtest/gtest.h"

namespace fpxint::testing {

const char* DistName(Dist d) {
  switch (d) {
    case Dist::kGaussian: return "gaussian";
    case Dist::kLaplace: return "laplace";
    case Dist::kStudentT3: return "student_t3";
  }
  return "?";
}

std::vector<double> RandomValues(Dist d, int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::exponential_distribution<double> expo(1.0);
  std::student_t_distribution<double> student(3.0);
  std::bernoulli_distribution coin(0.5);
  std::vector<double> v(n);
  for (int64_t i = 0; i < n; ++i) {
    switch (d) {
      case Dist::kGaussian: v[i] = normal(rng); break;
      case Dist::kLaplace: v[i] = coin(rng) ? expo(rng) : -expo(rng); break;
      case Dist::kStudentT3: v[i] = student(rng); break;
    }
  }
  return v;
}

std::vector<float> ToFloat(const std::vector<double>& v) { return {v.begin(), v.end()}; }

ScratchDir::ScratchDir() {
  const char* tmp = std::getenv("TMPDIR");
  std::string templ = std::string(tmp != nullptr && *tmp ? tmp : "/tmp") + "/fpxint-test-XXXXXX";
  char* p = ::mkdtemp(templ.data());
  if (p == nullptr) std::abort();
  path_ = p;
}

ScratchDir::~ScratchDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    ADD_FAILURE() << "cannot read " << path;
    return "";
  }
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void WriteFileOrDie(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f << bytes;
  if (!f) ADD_FAILURE() << "cannot write " << path;
}

std::string TinyModelFile(const std::string& name) {
  const char* dir = std::getenv("FPXINT_TINY_MODELS_DIR");
  if (dir == nullptr || *dir == '\0') {
    ADD_FAILURE() << "FPXINT_TINY_MODELS_DIR is not set: run through ctest (fixture.tiny_models)";
    return name;
  }
  return std::string(dir) + "/" + name;
}

std::string RealModelsDir() {
  const char* dir = std::getenv("FPXINT_MODELS_DIR");
  if (dir == nullptr || *dir == '\0') {
    ADD_FAILURE() << "FPXINT_MODELS_DIR is not set: run scripts/fetch_models.sh (make test does)";
    return "";
  }
  struct stat st;
  if (::stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
    ADD_FAILURE() << "FPXINT_MODELS_DIR=" << dir << " does not exist: scripts/fetch_models.sh failed?";
    return "";
  }
  return dir;
}

std::vector<double> ReferenceGaussian512() {
  const char* dir = std::getenv("FPXINT_REFERENCE_DIR");
  if (dir == nullptr || *dir == '\0') {
    ADD_FAILURE() << "FPXINT_REFERENCE_DIR is not set; run through ctest (fixture.reference_tensors)";
    return {};
  }
  const std::string bytes = ReadFileOrDie(std::string(dir) + "/gaussian512_seed0.f64");
  if (bytes.size() != 512 * 512 * 8) {
    ADD_FAILURE() << "reference tensor has " << bytes.size() << " bytes, expected " << 512 * 512 * 8;
    return {};
  }
  std::vector<double> v(512 * 512);
  std::memcpy(v.data(), bytes.data(), bytes.size());
  return v;
}

std::string SmallWeightsSafetensors(uint32_t seed) {
  core::SafetensorsWriter w;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, uint64_t s) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const std::vector<float> v = ToFloat(RandomValues(Dist::kGaussian, n, s));
    const auto* p = reinterpret_cast<const uint8_t*>(v.data());
    w.AddOwned(name, core::DType::kF32, shape, std::vector<uint8_t>(p, p + v.size() * 4))
        .IgnoreError();
  };
  add("fc1.weight", {64, 32}, seed);
  add("fc1.bias", {64}, seed + 1);
  add("fc2.weight", {16, 64}, seed + 2);
  auto bytes = w.Serialize();
  return std::string(bytes.begin(), bytes.end());
}

}  // namespace fpxint::testing
