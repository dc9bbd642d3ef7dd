// File: core/json.h
//
// Strict JSON (RFC 8259) for untrusted headers (safetensors) and for reports, on nlohmann/json
// (its SAX parser, which is iterative, and its serializer). On top of it: linear time (duplicate
// keys are found by hashing), a bound on nesting depth and, when asked, on the members of each
// object (stopping at the key of the first one past the bound), duplicate object keys refused,
// and numbers kept as their lexemes so that 64-bit integers (tensor offsets) are read exactly.
// Trailing garbage, invalid UTF-8 and control characters are refused by nlohmann.
//
// Example:
//   FPX_ASSIGN_OR_RETURN(JsonValue v, ParseJson(text));
//   const JsonValue* shape = v.Find("shape");
#ifndef FPXINT_CORE_JSON_H_
#define FPXINT_CORE_JSON_H_

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace fpxint::core {

class JsonValue {
 public:
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };

  JsonValue() = default;
  Kind kind() const { return kind_; }
  bool is_object() const { return kind_ == Kind::kObject; }
  bool is_array() const { return kind_ == Kind::kArray; }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_number() const { return kind_ == Kind::kNumber; }

  // String value (kString) or number lexeme (kNumber).
  const std::string& str() const { return str_; }
  bool boolean() const { return bool_; }
  const std::vector<JsonValue>& array() const { return array_; }
  // Members in document order.
  const std::vector<std::pair<std::string, JsonValue>>& object() const { return object_; }

  // Object member by key, nullptr when absent or not an object.
  const JsonValue* Find(absl::string_view key) const;
  // The number as an exact non-negative integer; nullopt when not a number, negative,
  // fractional, in exponent form or above UINT64_MAX.
  std::optional<uint64_t> AsUint64() const;
  std::optional<double> AsDouble() const;

  // A short name of the kind ("object", "string", ...) for error messages.
  static const char* KindName(Kind k);

 private:
  friend class JsonParser;
  Kind kind_ = Kind::kNull;
  bool bool_ = false;
  std::string str_;
  std::vector<JsonValue> array_;
  std::vector<std::pair<std::string, JsonValue>> object_;
};

// What ParseJson accepts of a document.
struct JsonLimits {
  int max_depth = 64;  // nesting of arrays and objects
  // Members of any one object. Checked where each member begins (after the comma), so a
  // caller's limit on entries (safetensors: tensors) stops the parser at the first member past it
  // rather than after the whole document.
  size_t max_members = std::numeric_limits<size_t>::max();
};

// Parses a complete document (surrounding whitespace allowed). InvalidArgument names the byte
// offset and the problem for syntax errors, the key for duplicates; ResourceExhausted means an
// object has more than limits.max_members members (the message names the bound and the key where
// reading stopped).
absl::StatusOr<JsonValue> ParseJson(absl::string_view text, const JsonLimits& limits);
absl::StatusOr<JsonValue> ParseJson(absl::string_view text, int max_depth = 64);

// Appends `s` as a quoted JSON string to `out` (escapes quotes, backslashes, control chars).
void AppendJsonString(std::string* out, absl::string_view s);

// Builds compact JSON text. Callers are responsible for well-formed nesting; commas are inserted
// automatically.
class JsonWriter {
 public:
  JsonWriter& BeginObject();
  JsonWriter& EndObject();
  JsonWriter& BeginArray();
  JsonWriter& EndArray();
  JsonWriter& Key(absl::string_view k);
  JsonWriter& String(absl::string_view s);
  JsonWriter& Int(int64_t v);
  // Finite doubles print with the fewest of 15..17 significant digits that round-trip;
  // non-finite values print as null.
  JsonWriter& Double(double v);
  JsonWriter& Bool(bool v);
  JsonWriter& Null();
  const std::string& str() const { return out_; }

 private:
  void Sep();
  std::string out_;
  bool need_comma_ = false;
};

}  // namespace fpxint::core

#endif  // FPXINT_CORE_JSON_H_
