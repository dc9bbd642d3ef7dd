#include "core/json.h"

#include <cmath>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace fpxint::core {

const JsonValue* JsonValue::Find(absl::string_view key) const {
  if (kind_ != Kind::kObject) return nullptr;
  for (const auto& [k, v] : object_) {
    if (k == key) return &v;
  }
  return nullptr;
}

std::optional<uint64_t> JsonValue::AsUint64() const {
  if (kind_ != Kind::kNumber || str_.empty()) return std::nullopt;
  for (char c : str_) {
    if (c < '0' || c > '9') return std::nullopt;  // sign, fraction or exponent
  }
  uint64_t v;
  if (!absl::SimpleAtoi(str_, &v)) return std::nullopt;  // overflow
  return v;
}

std::optional<double> JsonValue::AsDouble() const {
  if (kind_ != Kind::kNumber) return std::nullopt;
  double d;
  if (!absl::SimpleAtod(str_, &d)) return std::nullopt;
  return d;
}

const char* JsonValue::KindName(Kind k) {
  switch (k) {
    case Kind::kNull: return "null";
    case Kind::kBool: return "boolean";
    case Kind::kNumber: return "number";
    case Kind::kString: return "string";
    case Kind::kArray: return "array";
    case Kind::kObject: return "object";
  }
  return "?";
}

// Builds JsonValues from nlohmann's SAX events, which come in document order while nlohmann's
// lexer does the RFC 8259 work (iteratively: no recursion whatever the nesting). Adds what the
// DOM does not give: a depth bound checked as each container opens, a member bound checked at
// each key, duplicate keys found through a per-object hash set (linear overall), and numbers kept
// as lexemes.
class JsonParser final : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit JsonParser(const JsonLimits& limits) : limits_(limits) {}

  bool null() override { return Put(JsonValue::Kind::kNull); }
  bool boolean(bool v) override {
    JsonValue* x = Put(JsonValue::Kind::kBool);
    if (x != nullptr) x->bool_ = v;
    return x != nullptr;
  }
  bool number_integer(number_integer_t v) override { return Number(std::to_string(v)); }
  bool number_unsigned(number_unsigned_t v) override { return Number(std::to_string(v)); }
  bool number_float(number_float_t, const string_t& lexeme) override { return Number(lexeme); }
  bool string(string_t& v) override {
    JsonValue* x = Put(JsonValue::Kind::kString);
    if (x != nullptr) x->str_ = std::move(v);
    return x != nullptr;
  }
  bool binary(binary_t&) override { return Fail(absl::InvalidArgumentError("binary value")); }
  bool start_object(std::size_t) override { return Open(JsonValue::Kind::kObject); }
  bool end_object() override { return Close(); }
  bool start_array(std::size_t) override { return Open(JsonValue::Kind::kArray); }
  bool end_array() override { return Close(); }
  bool key(string_t& k) override {
    Frame& f = stack_.back();
    if (f.value->object_.size() >= limits_.max_members) {
      return Fail(absl::ResourceExhaustedError(absl::StrCat(
          "JSON object with more than ", limits_.max_members, " members (stopped at key \"",
          absl::CEscape(k.substr(0, 64)), "\")")));
    }
    if (!f.keys.insert(k).second) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("duplicate key \"", absl::CEscape(k.substr(0, 64)), "\" in an object")));
    }
    f.value->object_.emplace_back(std::move(k), JsonValue());
    return true;
  }
  bool parse_error(std::size_t position, const std::string&,
                   const nlohmann::detail::exception& e) override {
    // nlohmann's message: "[json.exception.parse_error.101] parse error at line 1, column 5: ...".
    std::string what = e.what();
    if (const size_t colon = what.find(": "); colon != std::string::npos) what = what.substr(colon + 2);
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("invalid JSON at byte ", position > 0 ? position - 1 : 0, ": ", what)));
  }

  absl::StatusOr<JsonValue> Result(bool ok) {
    if (!error_.ok()) return error_;
    if (!ok || !done_) return absl::InvalidArgumentError("invalid JSON: incomplete document");
    return std::move(root_);
  }

 private:
  struct Frame {
    JsonValue* value;
    absl::flat_hash_set<std::string> keys;  // objects only
  };

  bool Fail(absl::Status s) {
    if (error_.ok()) error_ = std::move(s);
    return false;
  }
  // The slot the next value goes to: the root, the next array element, or the member whose key
  // came last.
  JsonValue* Put(JsonValue::Kind kind) {
    JsonValue* slot = nullptr;
    if (stack_.empty()) {
      slot = &root_;
      done_ = true;
    } else if (JsonValue* parent = stack_.back().value; parent->kind_ == JsonValue::Kind::kArray) {
      parent->array_.emplace_back();
      slot = &parent->array_.back();
    } else {
      slot = &parent->object_.back().second;
    }
    slot->kind_ = kind;
    return slot;
  }
  bool Number(std::string lexeme) {
    JsonValue* x = Put(JsonValue::Kind::kNumber);
    x->str_ = std::move(lexeme);
    return true;
  }
  bool Open(JsonValue::Kind kind) {
    if (static_cast<int>(stack_.size()) >= limits_.max_depth) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("JSON nested too deep (more than ", limits_.max_depth, " levels)")));
    }
    stack_.push_back(Frame{Put(kind), {}});
    return true;
  }
  bool Close() {
    stack_.pop_back();
    return true;
  }

  const JsonLimits limits_;
  JsonValue root_;
  bool done_ = false;
  // The open containers, innermost last. Their pointers stay valid: a container grows only while
  // it is the innermost one, and growing moves only its closed elements, which no frame names.
  std::vector<Frame> stack_;
  absl::Status error_;
};

absl::StatusOr<JsonValue> ParseJson(absl::string_view text, const JsonLimits& limits) {
  JsonParser b(limits);
  const bool ok = nlohmann::json::sax_parse(text.begin(), text.end(), &b,
                                            nlohmann::json::input_format_t::json, /*strict=*/true);
  return b.Result(ok);
}

absl::StatusOr<JsonValue> ParseJson(absl::string_view text, int max_depth) {
  JsonLimits limits;
  limits.max_depth = max_depth;
  return ParseJson(text, limits);
}

void AppendJsonString(std::string* out, absl::string_view s) {
  // Invalid UTF-8 becomes U+FFFD rather than an exception: the text stays valid JSON.
  out->append(nlohmann::json(std::string(s)).dump(-1, ' ', false,
                                                  nlohmann::json::error_handler_t::replace));
}

void JsonWriter::Sep() {
  if (need_comma_) out_.push_back(',');
  need_comma_ = true;
}
JsonWriter& JsonWriter::BeginObject() {
  Sep();
  out_.push_back('{');
  need_comma_ = false;
  return *this;
}
JsonWriter& JsonWriter::EndObject() {
  out_.push_back('}');
  need_comma_ = true;
  return *this;
}
JsonWriter& JsonWriter::BeginArray() {
  Sep();
  out_.push_back('[');
  need_comma_ = false;
  return *this;
}
JsonWriter& JsonWriter::EndArray() {
  out_.push_back(']');
  need_comma_ = true;
  return *this;
}
JsonWriter& JsonWriter::Key(absl::string_view k) {
  Sep();
  AppendJsonString(&out_, k);
  out_.push_back(':');
  need_comma_ = false;
  return *this;
}
JsonWriter& JsonWriter::String(absl::string_view s) {
  Sep();
  AppendJsonString(&out_, s);
  return *this;
}
JsonWriter& JsonWriter::Int(int64_t v) {
  Sep();
  absl::StrAppend(&out_, v);
  return *this;
}
JsonWriter& JsonWriter::Double(double v) {
  Sep();
  // The shortest text that reads back to the same double; non-finite values are null.
  out_.append(std::isfinite(v) ? nlohmann::json(v).dump() : "null");
  return *this;
}
JsonWriter& JsonWriter::Bool(bool v) {
  Sep();
  out_.append(v ? "true" : "false");
  return *this;
}
JsonWriter& JsonWriter::Null() {
  Sep();
  out_.append("null");
  return *this;
}

}  // namespace fpxint::core
