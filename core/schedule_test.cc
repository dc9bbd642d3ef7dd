// The schedule table: every bound of core::ChooseSchedule on both sides.
#include "core/schedule.h"

#include <string>

#include "gtest/gtest.h"

namespace fpxint::core {
namespace {

struct Row {
  LayerShape shape;
  int64_t rows, in;
  bool table_lookup, panels, depthwise;
  int64_t max_rows;
  Schedule want;
};

constexpr int64_t kNoMax = std::numeric_limits<int64_t>::max();

TEST(ChooseSchedule, Table) {
  using L = LayerShape;
  using S = Schedule;
  const Row table[] = {
      // linear: codes up to 4 rows (8 with table lookup), panels in (16, 48] with at most 1024
      // inputs when the table has them, transposed otherwise, dense beyond the bound
      {L::kLinear, 1, 4096, false, false, false, kNoMax, S::kCodes},
      {L::kLinear, 4, 4096, false, false, false, kNoMax, S::kCodes},
      {L::kLinear, 5, 4096, false, false, false, kNoMax, S::kTransposed},
      {L::kLinear, 8, 4096, true, true, false, kNoMax, S::kCodes},
      {L::kLinear, 9, 4096, true, true, false, kNoMax, S::kTransposed},
      {L::kLinear, 16, 1024, true, true, false, kNoMax, S::kTransposed},
      {L::kLinear, 17, 1024, true, true, false, kNoMax, S::kPanels},
      {L::kLinear, 48, 1024, true, true, false, kNoMax, S::kPanels},
      {L::kLinear, 49, 1024, true, true, false, kNoMax, S::kTransposed},
      {L::kLinear, 40, 1025, true, true, false, kNoMax, S::kTransposed},
      {L::kLinear, 40, 1024, true, false, false, kNoMax, S::kTransposed},
      {L::kLinear, 17, 120, true, true, false, 16, S::kDense},
      {L::kLinear, 1, 120, true, true, false, 0, S::kDense},
      // ungrouped convolutions: codes or transposed
      {L::kConv, 8, 27, true, true, false, kNoMax, S::kCodes},
      {L::kConv, 9, 27, true, true, false, kNoMax, S::kTransposed},
      {L::kConv, 3840, 27, true, true, false, kNoMax, S::kTransposed},
      {L::kConv, 3840, 27, true, true, false, 1000, S::kDense},
      // depthwise: on the image when the table and geometry allow, else dense
      {L::kDepthwiseConv, 4, 9, false, false, true, kNoMax, S::kCodes},
      {L::kDepthwiseConv, 5, 9, false, false, true, kNoMax, S::kDepthwise},
      {L::kDepthwiseConv, 100, 9, true, false, false, kNoMax, S::kDense},
      {L::kDepthwiseConv, 100, 9, true, false, true, 50, S::kDense},
      // other grouped convolutions: codes for a few pixels, else dense
      {L::kGroupedConv, 8, 18, true, false, false, kNoMax, S::kCodes},
      {L::kGroupedConv, 9, 18, true, false, false, kNoMax, S::kDense},
  };
  for (const Row& r : table) {
    ScheduleQuery q;
    q.shape = r.shape;
    q.rows = r.rows;
    q.in_features = r.in;
    q.table_lookup = r.table_lookup;
    q.panels = r.panels;
    q.depthwise = r.depthwise;
    q.max_packed_rows = r.max_rows;
    EXPECT_EQ(ChooseSchedule(q), r.want)
        << "shape " << static_cast<int>(r.shape) << " rows " << r.rows << " in " << r.in
        << ": got " << ScheduleName(ChooseSchedule(q)) << ", want " << ScheduleName(r.want);
  }
}

}  // namespace
}  // namespace fpxint::core
