#include "core/term_budget.h"

#include <cmath>
#include <functional>
#include <limits>

#include "gtest/gtest.h"

namespace fpxint::core {
namespace {

// A layer whose error falls geometrically with its terms, as a b-bit series does: e(K) =
// a * ratio^(K-1).
LayerBudget Geometric(const std::string& name, double a, double ratio, uint64_t bytes,
                      int max_terms = 4) {
  LayerBudget l;
  l.name = name;
  l.bytes_per_term = bytes;
  for (int k = 0; k < max_terms; ++k) l.error.push_back(a * std::pow(ratio, k));
  return l;
}

// Every allocation in [min, max]^n (small n only): the fewest bytes whose estimate meets the
// target, or UINT64_MAX when none does.
uint64_t BruteForceBytes(const std::vector<LayerBudget>& layers, const BudgetOptions& o) {
  uint64_t best = std::numeric_limits<uint64_t>::max();
  std::vector<int> k(layers.size(), o.min_terms);
  std::function<void(size_t)> walk = [&](size_t i) {
    if (i == layers.size()) {
      double sum = 0;
      uint64_t bytes = 0;
      for (size_t j = 0; j < layers.size(); ++j) {
        sum += layers[j].error[k[j] - 1] * layers[j].error[k[j] - 1];
        bytes += static_cast<uint64_t>(k[j]) * layers[j].bytes_per_term;
      }
      if (std::sqrt(sum) <= o.target && bytes < best) best = bytes;
      return;
    }
    for (k[i] = o.min_terms; k[i] <= o.max_terms; ++k[i]) walk(i + 1);
  };
  walk(0);
  return best;
}

// Layers of one size with geometric errors: each layer's gains fall term after term, so adding
// the largest gain first is optimal, and the allocation has the brute force's bytes for every
// target from loose to unmeetable.
TEST(TermBudget, MeetsTheTargetAtTheOptimalBytesOnASyntheticNetwork) {
  const std::vector<LayerBudget> layers = {
      Geometric("conv1", 0.30, 1 / 16.0, 1000), Geometric("conv2", 0.05, 1 / 16.0, 1000),
      Geometric("fc", 0.80, 1 / 8.0, 1000), Geometric("head", 0.01, 1 / 16.0, 1000),
      Geometric("proj", 0.20, 1 / 4.0, 1000)};
  for (double target : {1.0, 0.5, 0.1, 0.03, 0.01, 3e-3, 1e-3, 1e-4, 1e-6}) {
    BudgetOptions o;
    o.target = target;
    absl::StatusOr<BudgetResult> r = AllocateTerms(layers, o);
    ASSERT_TRUE(r.ok()) << r.status();
    const uint64_t optimal = BruteForceBytes(layers, o);
    if (optimal == std::numeric_limits<uint64_t>::max()) {
      EXPECT_FALSE(r->met) << target;
      EXPECT_EQ(r->terms, std::vector<int>(layers.size(), 4)) << target;
      continue;
    }
    EXPECT_TRUE(r->met) << target;
    EXPECT_LE(r->estimated_error, target);
    EXPECT_EQ(r->bytes, optimal) << "target " << target;
  }
}

// Layers of different sizes: the target is met, and the terms go where they buy the most per
// byte (the small sensitive layer before the large insensitive one).
TEST(TermBudget, SpendsTermsWhereTheyBuyTheMostPerByte) {
  const std::vector<LayerBudget> layers = {Geometric("big", 0.02, 1 / 16.0, 100000),
                                           Geometric("small", 0.2, 1 / 16.0, 1000)};
  BudgetOptions o;
  o.target = 0.03;
  absl::StatusOr<BudgetResult> r = AllocateTerms(layers, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->terms, (std::vector<int>{1, 2}));
  EXPECT_TRUE(r->met);
  EXPECT_EQ(r->bytes, 100000u + 2 * 1000u);
  EXPECT_EQ(BruteForceBytes(layers, o), r->bytes);
}

TEST(TermBudget, IsDeterministicAndBreaksTiesByLayerOrder) {
  const std::vector<LayerBudget> twins = {Geometric("a", 0.1, 0.25, 500),
                                          Geometric("b", 0.1, 0.25, 500)};
  BudgetOptions o;
  o.target = 0.11;  // one more term in either layer is enough
  absl::StatusOr<BudgetResult> first = AllocateTerms(twins, o);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->terms, (std::vector<int>{2, 1}));
  for (int i = 0; i < 5; ++i) {
    absl::StatusOr<BudgetResult> again = AllocateTerms(twins, o);
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(again->terms, first->terms);
    EXPECT_EQ(again->estimated_error, first->estimated_error);
  }
}

TEST(TermBudget, PinnedLayersKeepTheirTermsAndBoundsHold) {
  std::vector<LayerBudget> layers = {Geometric("pinned", 0.5, 0.5, 100),
                                     Geometric("free", 0.5, 0.5, 100)};
  layers[0].pinned = 1;
  BudgetOptions o;
  o.target = 0.5;
  o.min_terms = 2;
  o.max_terms = 3;
  absl::StatusOr<BudgetResult> r = AllocateTerms(layers, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->terms[0], 1);
  EXPECT_EQ(r->terms[1], 3);  // grows to max_terms; the pinned layer's 0.5 keeps it above
  EXPECT_FALSE(r->met);
  EXPECT_NEAR(r->estimated_error, std::sqrt(0.25 + 0.125 * 0.125), 1e-12);
}

// The whole model measured above the target: Tighten goes on from the allocation (no layer
// loses a term) and the new estimate is lower.
TEST(TermBudget, TightenGrowsFromTheMeasuredAllocation) {
  const std::vector<LayerBudget> layers = {Geometric("a", 0.3, 1 / 8.0, 100),
                                           Geometric("b", 0.2, 1 / 8.0, 100),
                                           Geometric("c", 0.1, 1 / 8.0, 100)};
  BudgetOptions o;
  o.target = 0.05;
  absl::StatusOr<BudgetResult> r = AllocateTerms(layers, o);
  ASSERT_TRUE(r.ok() && r->met);
  absl::StatusOr<BudgetResult> t = Tighten(layers, o, *r, /*measured=*/0.08);
  ASSERT_TRUE(t.ok()) << t.status();
  for (size_t i = 0; i < layers.size(); ++i) EXPECT_GE(t->terms[i], r->terms[i]);
  EXPECT_GT(t->bytes, r->bytes);
  EXPECT_LE(t->estimated_error, o.target * r->estimated_error / 0.08);
  EXPECT_TRUE(t->met);
}

TEST(TermBudget, BadInputNamesWhatIsWrong) {
  const std::vector<LayerBudget> ok = {Geometric("x", 0.1, 0.5, 10)};
  BudgetOptions o;
  o.target = 0;
  EXPECT_NE(AllocateTerms(ok, o).status().message().find("target_rel_error"), std::string::npos);
  o.target = 0.1;
  o.min_terms = 3;
  o.max_terms = 2;
  EXPECT_EQ(AllocateTerms(ok, o).status().code(), absl::StatusCode::kInvalidArgument);
  o = BudgetOptions{};
  o.target = 0.1;
  o.max_terms = 5;  // the table has 4
  EXPECT_NE(AllocateTerms(ok, o).status().message().find("layer 'x'"), std::string::npos);
  std::vector<LayerBudget> bad = ok;
  bad[0].error[2] = std::nan("");
  o.max_terms = 4;
  EXPECT_EQ(AllocateTerms(bad, o).status().code(), absl::StatusCode::kInvalidArgument);
  bad = ok;
  bad[0].bytes_per_term = 0;
  EXPECT_EQ(AllocateTerms(bad, o).status().code(), absl::StatusCode::kInvalidArgument);
  bad = ok;
  bad[0].pinned = 9;
  EXPECT_EQ(AllocateTerms(bad, o).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(AllocateTerms({}, o).ok()) << "no layer: nothing to allocate";
}

}  // namespace
}  // namespace fpxint::core
