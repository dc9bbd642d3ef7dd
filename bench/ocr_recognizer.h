// File: bench/ocr_recognizer.h
//
// The OCR recognizer and its first rendered evaluation line, as the benchmarks time them
// (fpxint-bench "Model/*" and fpxint-model-pairs). No LibTorch types here.
#ifndef FPXINT_BENCH_OCR_RECOGNIZER_H_
#define FPXINT_BENCH_OCR_RECOGNIZER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/model.h"

namespace fpxint::bench {

// FPXINT_MODELS_DIR, else scripts/fetch_models.sh's default (~/.cache/fpxint/models).
std::string ModelsDir();

// ocr/ocr_rec.pt on 2 threads with packed ops: FP32 for terms == 0, otherwise the expansion
// b = 4, K = terms, weight-only (act_terms == 0) or W×A with 4-bit activation terms, holding
// only the packed terms as the server does. folded: weights and activations variant D on the
// mid grid (W×A term products folded into one u8 × s8 product per 1x1 convolution and matmul).
absl::StatusOr<std::unique_ptr<model::Model>> LoadRecognizer(const std::string& models_dir,
                                                             int terms, int act_terms = 0,
                                                             bool folded = false);

// The first `lines` lines of ocr/ocr_eval.safetensors "rec_images": [lines, 3, 48, 320] F32.
absl::StatusOr<model::HostTensor> FirstRecognizerLine(const std::string& models_dir,
                                                      int64_t lines = 1);

}  // namespace fpxint::bench

#endif  // FPXINT_BENCH_OCR_RECOGNIZER_H_
