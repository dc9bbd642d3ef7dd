// File: client/tensor_io.h
//
// Tensors as the CLI reads and writes them for `fpxint infer`: NumPy .npy files (format 1.0–3.0,
// C order, little-endian), JSON ({"datatype","shape","data"} or a nested list) and raw bytes with
// a shape given on the command line. The bytes are the OIP raw layout: row-major, little-endian.
// Every header field is checked before use; a file that lies about its size is refused.
#ifndef FPXINT_CLIENT_TENSOR_IO_H_
#define FPXINT_CLIENT_TENSOR_IO_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace fpxint::client {

struct HostTensor {
  std::string name;      // empty: take it from the model's metadata
  std::string datatype;  // OIP name: FP32, FP16, FP64, INT64, INT32, INT16, INT8, UINT8, BOOL
  std::vector<int64_t> shape;
  std::string bytes;     // row-major, little-endian
};

// Bytes per element of an OIP datatype, or 0 when the CLI does not handle it.
size_t DatatypeSize(absl::string_view datatype);

// Element count of `shape` (1 for rank 0); an error for negative dims or overflow.
absl::StatusOr<int64_t> ElementCount(const std::vector<int64_t>& shape);

// .npy bytes -> tensor (the whole file content in `data`).
absl::StatusOr<HostTensor> ParseNpy(absl::string_view data);
// Tensor -> .npy bytes (format 1.0).
absl::StatusOr<std::string> EncodeNpy(const HostTensor& t);

// JSON text -> tensor. `datatype` is used when the JSON does not say (a plain nested list).
absl::StatusOr<HostTensor> ParseTensorJson(absl::string_view text, absl::string_view datatype);

// The elements as JSON numbers (FP16 widened to float), for printing and --json.
absl::StatusOr<nlohmann::json> TensorValues(const HostTensor& t);

// Reads a whole file (errors name the path).
absl::StatusOr<std::string> ReadWholeFile(const std::string& path);
// Writes a file atomically (temp name, rename).
absl::Status WriteWholeFile(const std::string& path, absl::string_view data);

}  // namespace fpxint::client

#endif  // FPXINT_CLIENT_TENSOR_IO_H_
