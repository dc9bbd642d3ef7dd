// File: core/schedule.h
//
// The one decision of how a packed layer runs a call (core::LowbitLinear's schedules), from the
// number of activation rows, the layer's shape and what the CPU's kernel table offers. The
// packed ops (model/lowbit_ops.cc) ask once per call and run the schedule they get;
// LowbitLinear::ForwardRows asks the same function, so neither undoes the other's choice.
//
//   kCodes       dot products straight on the packed codes, all K' terms per pass over the
//                activations: few rows (≤ 4, or ≤ 8 with the table-lookup code path)
//   kPanels      32 decoded weight rows in L1 × row-major activations (linear layers, 17–48 rows,
//                at most 1024 inputs, kernel tables with gemm_wr)
//   kTransposed  16 decoded rows × transposed activations (im2col columns for convolutions)
//   kDepthwise   depthwise convolutions on the image (kernel tables with depthwise_row)
//   kDense       a transient fp32 weight and LibTorch: beyond `max_packed_rows`, and grouped
//                convolutions beyond a few output pixels (im2col would copy every input kh·kw
//                times for a handful of weights)
//
// The row bounds were measured on this project's 2-core AVX-512 machine (docs/BENCHMARKS.md).
#ifndef FPXINT_CORE_SCHEDULE_H_
#define FPXINT_CORE_SCHEDULE_H_

#include <cstdint>
#include <limits>

namespace fpxint::core {

enum class Schedule { kCodes, kPanels, kTransposed, kDepthwise, kDense };
const char* ScheduleName(Schedule s);

enum class LayerShape {
  kLinear,         // linear and matmul: rows are tokens
  kConv,           // ungrouped convolution: rows are output pixels
  kGroupedConv,    // grouped, not depthwise
  kDepthwiseConv,  // one input channel per output channel
};

struct ScheduleQuery {
  LayerShape shape = LayerShape::kLinear;
  int64_t rows = 0;         // activation rows of the call
  int64_t in_features = 0;  // weight row length
  bool table_lookup = false;  // the kernel table's table-lookup code path fits the weight
  bool panels = false;        // the kernel table has gemm_wr
  bool depthwise = false;     // it has depthwise_row and the call's geometry fits it
  int64_t max_packed_rows = std::numeric_limits<int64_t>::max();  // beyond: kDense
};

inline constexpr int64_t kCodesMaxRows = 4;             // dot_codes takes up to 4 rows
inline constexpr int64_t kCodesMaxRowsTableLookup = 8;  // dot_codes_perm up to 8
inline constexpr int64_t kPanelMinRows = 16;            // exclusive
inline constexpr int64_t kPanelMaxRows = 48;
inline constexpr int64_t kPanelMaxIn = 1024;

Schedule ChooseSchedule(const ScheduleQuery& q);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_SCHEDULE_H_
