// File: proto/job_quality.h
//
// The one figure a quality gate compares (JobSpec.max_rel_error, `fpxint quantize
// --max-rel-error`): the probe output's relative error at the largest K_w (then K_a) the job
// probed, for LAYER and MODEL jobs; for TENSOR jobs, which have no probe, the worst tensor's
// relative Frobenius error at its last term. The server gates on it before deploying; the CLI
// reports it. Header-only, on the generated messages alone.
#ifndef FPXINT_PROTO_JOB_QUALITY_H_
#define FPXINT_PROTO_JOB_QUALITY_H_

#include <algorithm>
#include <cstdio>
#include <string>

#include "fpxint/v1/quantizer.pb.h"

namespace fpxint {

// -1 when the result has no error figure; *what names the measure.
inline double JobQualityError(const v1::JobResult& r, std::string* what) {
  const v1::ProbeError* best = nullptr;
  for (const v1::ProbeError& p : r.probe()) {
    if (best == nullptr || p.weight_terms() > best->weight_terms() ||
        (p.weight_terms() == best->weight_terms() && p.act_terms() > best->act_terms())) {
      best = &p;
    }
  }
  if (best != nullptr) {
    char buf[96];
    std::snprintf(buf, sizeof(buf), "probe output rel. error at K_w=%u K_a=%u",
                  best->weight_terms(), best->act_terms());
    *what = buf;
    return best->rel_fro();
  }
  double worst = -1;
  for (const v1::LayerResult& l : r.layers()) {
    if (l.terms_size() > 0) worst = std::max(worst, l.terms(l.terms_size() - 1).rel_fro());
  }
  *what = "worst tensor rel. Frobenius error at the last term";
  return worst;
}

}  // namespace fpxint

#endif  // FPXINT_PROTO_JOB_QUALITY_H_
