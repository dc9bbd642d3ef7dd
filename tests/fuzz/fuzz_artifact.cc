// libFuzzer target: the expansion artifact reader (core::ArtifactView over a safetensors
// buffer), which reads the packed codes, scales and metadata of artifacts that the server keeps
// in its store and users hand back to it. Every accepted artifact's tensors must load,
// reconstruct, and run as packed low-bit weights (a forward pass on the small-batch and the
// large-batch schedule, a dequantization) without reading out of bounds.
#include <cstdint>
#include <vector>

#include "core/artifact.h"
#include "core/expansion.h"
#include "core/lowbit_linear.h"
#include "core/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace fpxint::core;
  const SafetensorsLimits limits;  // the production limits
  auto reader = SafetensorsReader::FromBuffer(absl::MakeConstSpan(data, size), limits);
  if (!reader.ok()) return 0;
  auto view = ArtifactView::Parse(**reader);
  if (!view.ok()) return 0;
  for (const ArtifactView::Entry& entry : view->tensors()) {
    if (entry.layout.numel() > (int64_t{1} << 20)) continue;  // bounded work per input
    for (int terms : {1, -1}) {
      auto e = view->Load(entry.name, terms);
      if (!e.ok()) continue;
      const std::vector<double> w = Reconstruct(*e, static_cast<int>(e->terms.size()));
      if (static_cast<int64_t>(w.size()) != entry.layout.numel()) __builtin_trap();
      auto l = LowbitLinear::FromExpansion(*e);
      if (!l.ok()) continue;
      std::vector<float> x(static_cast<size_t>(12 * l->in_features()), 0.25f);
      std::vector<float> y(static_cast<size_t>(12 * l->out_features()));
      l->Forward(x.data(), 1, y.data());
      l->Forward(x.data(), 12, y.data());
      std::vector<float> dense(static_cast<size_t>(l->out_features() * l->in_features()));
      l->Dequantize(dense.data());
    }
  }
  return 0;
}
