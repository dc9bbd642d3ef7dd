// File: core/schedule.cc
#include "core/schedule.h"

namespace fpxint::core {

const char* ScheduleName(Schedule s) {
  switch (s) {
    case Schedule::kCodes: return "codes";
    case Schedule::kPanels: return "panels";
    case Schedule::kTransposed: return "transposed";
    case Schedule::kDepthwise: return "depthwise";
    case Schedule::kDense: return "dense";
  }
  return "?";
}

Schedule ChooseSchedule(const ScheduleQuery& q) {
  if (q.rows > q.max_packed_rows) return Schedule::kDense;
  const int64_t codes_max = q.table_lookup ? kCodesMaxRowsTableLookup : kCodesMaxRows;
  const bool few = q.rows <= codes_max;
  switch (q.shape) {
    case LayerShape::kDepthwiseConv:
      if (few) return Schedule::kCodes;
      return q.depthwise ? Schedule::kDepthwise : Schedule::kDense;
    case LayerShape::kGroupedConv:
      return few ? Schedule::kCodes : Schedule::kDense;
    case LayerShape::kConv:
      return few ? Schedule::kCodes : Schedule::kTransposed;
    case LayerShape::kLinear:
      // At 6625x120 (2 threads) the panels win at 40 rows (0.38 vs 0.50 ms) and lose at 12 and
      // 16; at 4096x4096 they lose at 40 rows (9.5 vs 8.7 ms: the panel re-reads its output per
      // 256-input chunk), hence the input bound.
      if (q.panels && q.rows > kPanelMinRows && q.rows <= kPanelMaxRows &&
          q.in_features <= kPanelMaxIn) {
        return Schedule::kPanels;
      }
      return few ? Schedule::kCodes : Schedule::kTransposed;
  }
  return Schedule::kTransposed;
}

}  // namespace fpxint::core
