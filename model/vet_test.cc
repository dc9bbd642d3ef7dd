// File: model/vet_test.cc
//
// The TorchScript vetting walk (model/vet.h) on hostile archives (tests/security/
// make_attack_models.py) and on every real and tiny model fpxint is tested on. The walk runs in
// this test's process without the sandbox: these archives are the test's own.
#include "model/vet.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>

#include "absl/strings/match.h"
#include "tests/support/test_support.h"

namespace fpxint::model {
namespace {

namespace fs = std::filesystem;

std::string AttackFile(const std::string& name) {
  const char* dir = std::getenv("FPXINT_ATTACK_MODELS_DIR");
  if (dir == nullptr) {
    ADD_FAILURE() << "FPXINT_ATTACK_MODELS_DIR is not set (ctest fixture attack_models)";
    return "";
  }
  return std::string(dir) + "/" + name;
}

VetReport MustVet(const std::string& path, const OpAllowList& allow) {
  auto r = VetTorchScript(testing::ReadFileOrDie(path), allow);
  EXPECT_TRUE(r.ok()) << path << ": " << r.status();
  return r.ok() ? *r : VetReport{};
}

bool Refuses(const VetReport& r, const std::string& kind, const std::string& where_suffix) {
  for (const RefusedOp& op : r.refused) {
    if (op.kind == kind && absl::EndsWith(op.where, where_suffix)) return true;
  }
  return false;
}

TEST(Vet, BuiltInListIsNonTrivialAndLeavesOutFileAccess) {
  const OpAllowList l = OpAllowList::BuiltIn();
  EXPECT_GT(l.size(), 100u);
  EXPECT_TRUE(l.Allows("aten::conv2d"));
  EXPECT_TRUE(l.Allows("prim::Constant"));
  for (const char* k : {"aten::from_file", "aten::save", "prim::CallMethod", "prim::CallFunction",
                        "prim::PythonOp"}) {
    EXPECT_FALSE(l.Allows(k)) << k;
  }
}

TEST(Vet, ForwardThatReadsAFileIsRefusedNamingTheOpAndFunction) {
  const VetReport r = MustVet(AttackFile("reader_forward.pt"), OpAllowList::BuiltIn());
  EXPECT_FALSE(r.passed);
  EXPECT_TRUE(Refuses(r, "aten::from_file", ".forward")) << r.Summary();
  EXPECT_TRUE(absl::StrContains(r.Summary(), "aten::from_file (in __torch__.")) << r.Summary();
}

TEST(Vet, SetstateThatReadsAFileIsRefused) {
  // __setstate__ ran while loading here (the test's own file); the walk still names it.
  const VetReport r = MustVet(AttackFile("reader_setstate.pt"), OpAllowList::BuiltIn());
  EXPECT_FALSE(r.passed);
  EXPECT_TRUE(Refuses(r, "aten::from_file", ".__setstate__")) << r.Summary();
}

TEST(Vet, ReadHiddenInACalledFunctionIsFoundAfterInlining) {
  const VetReport r = MustVet(AttackFile("reader_helper.pt"), OpAllowList::BuiltIn());
  EXPECT_FALSE(r.passed);
  // Seen in forward (inlined there), whatever the helper function itself is listed as.
  EXPECT_TRUE(Refuses(r, "aten::from_file", ".forward")) << r.Summary();
}

TEST(Vet, AnOperatorListExtendsTheBuiltInOne) {
  OpAllowList l = OpAllowList::BuiltIn();
  ASSERT_TRUE(l.AddText("# reading files is fine here\naten::from_file\n", "test").ok());
  EXPECT_NE(l.Digest(), OpAllowList::BuiltIn().Digest());
  EXPECT_TRUE(MustVet(AttackFile("reader_forward.pt"), l).passed);
}

TEST(Vet, MalformedListLinesAreRefusedWithTheLine) {
  OpAllowList l;
  const absl::Status s = l.AddText("aten::conv2d\nfrom_file\n", "extra.txt");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "extra.txt line 2")) << s;
}

TEST(Vet, NotAnArchiveIsInvalidArgument) {
  auto r = VetTorchScript("PK\x03\x04 not really a zip", OpAllowList::BuiltIn());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
}

TEST(Vet, BenignAndTinyModelsPass) {
  const OpAllowList l = OpAllowList::BuiltIn();
  const VetReport b = MustVet(AttackFile("benign.pt"), l);
  EXPECT_TRUE(b.passed) << b.Summary();
  EXPECT_GT(b.nodes, 5);
  const std::string tiny_dir = fs::path(testing::TinyModelFile("x")).parent_path().string();
  int n = 0;
  for (const auto& e : fs::directory_iterator(tiny_dir)) {
    if (e.path().extension() != ".pt") continue;
    const VetReport r = MustVet(e.path().string(), l);
    EXPECT_TRUE(r.passed) << e.path() << ": " << r.Summary();
    ++n;
  }
  EXPECT_GT(n, 0);
}

TEST(Vet, EveryRealModelPasses) {
  // The OCR recognizer and classifier, the CNN and the LM: the list is built from them.
  const std::string dir = testing::RealModelsDir();
  if (dir.empty()) return;  // RealModelsDir() has failed the test
  const OpAllowList l = OpAllowList::BuiltIn();
  int n = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.path().extension() != ".pt") continue;
    const VetReport r = MustVet(e.path().string(), l);
    EXPECT_TRUE(r.passed) << e.path() << ": " << r.Summary();
    ++n;
  }
  EXPECT_GE(n, 4) << "expected the recognizer, classifier, CNN and LM under " << dir;
}

}  // namespace
}  // namespace fpxint::model
