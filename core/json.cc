#include "core/json.h"

#include <cmath>
#include <cstdlib>

#include "absl/container/flat_hash_set.h"
#include "absl/hash/hash.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

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

namespace {

using Members = std::vector<std::pair<std::string, JsonValue>>;

// Tells whether the key of an object's newest member repeats an earlier one: a scan while the
// object is small, then a hash set of member indices (hashed by key, so it needs no copy of the
// keys and survives the vector growing), in expected O(1) per key.
class DuplicateKeys {
 public:
  explicit DuplicateKeys(const Members* members)
      : members_(members), set_(0, Hash{members}, Eq{members}) {}

  bool LastIsDuplicate() {
    const Members& m = *members_;
    const size_t last = m.size() - 1;
    if (m.size() <= kScanUpTo) {
      for (size_t i = 0; i < last; ++i) {
        if (m[i].first == m[last].first) return true;
      }
      return false;
    }
    if (set_.empty()) {
      for (size_t i = 0; i < last; ++i) set_.insert(i);
    }
    return !set_.insert(last).second;
  }

 private:
  static constexpr size_t kScanUpTo = 8;
  struct Hash {
    const Members* m;
    size_t operator()(size_t i) const { return absl::Hash<absl::string_view>()((*m)[i].first); }
  };
  struct Eq {
    const Members* m;
    bool operator()(size_t a, size_t b) const { return (*m)[a].first == (*m)[b].first; }
  };
  const Members* members_;
  absl::flat_hash_set<size_t, Hash, Eq> set_;
};

}  // namespace

class JsonParser {
 public:
  JsonParser(absl::string_view text, const JsonLimits& limits) : s_(text), limits_(limits) {}

  absl::StatusOr<JsonValue> Parse() {
    JsonValue v;
    SkipWs();
    if (absl::Status st = ParseValue(&v, 0); !st.ok()) return st;
    SkipWs();
    if (pos_ != s_.size()) return Error("unexpected trailing characters");
    return v;
  }

 private:
  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat("JSON: ", what, " at byte ", pos_));
  }
  void SkipWs() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' ||
                                s_[pos_] == '\r')) {
      ++pos_;
    }
  }
  bool Consume(absl::string_view lit) {
    if (s_.substr(pos_, lit.size()) != lit) return false;
    pos_ += lit.size();
    return true;
  }

  absl::Status ParseValue(JsonValue* v, int depth) {
    if (depth > limits_.max_depth) return Error("nesting too deep");
    if (pos_ >= s_.size()) return Error("unexpected end of input");
    const char c = s_[pos_];
    if (c == '{') return ParseObject(v, depth);
    if (c == '[') return ParseArray(v, depth);
    if (c == '"') {
      v->kind_ = JsonValue::Kind::kString;
      return ParseString(&v->str_);
    }
    if (c == '-' || (c >= '0' && c <= '9')) return ParseNumber(v);
    if (Consume("true")) {
      v->kind_ = JsonValue::Kind::kBool;
      v->bool_ = true;
      return absl::OkStatus();
    }
    if (Consume("false")) {
      v->kind_ = JsonValue::Kind::kBool;
      return absl::OkStatus();
    }
    if (Consume("null")) return absl::OkStatus();
    return Error("invalid value");
  }

  absl::Status ParseObject(JsonValue* v, int depth) {
    v->kind_ = JsonValue::Kind::kObject;
    ++pos_;  // '{'
    SkipWs();
    if (pos_ < s_.size() && s_[pos_] == '}') {
      ++pos_;
      return absl::OkStatus();
    }
    Members& members = v->object_;
    DuplicateKeys duplicates(&members);
    while (true) {
      SkipWs();
      // Another member follows (or the document is invalid): stop here when it is one too many.
      if (members.size() >= limits_.max_members) {
        return absl::ResourceExhaustedError(absl::StrCat("JSON: an object with more than ",
                                                         limits_.max_members,
                                                         " members (the limit) at byte ", pos_));
      }
      if (pos_ >= s_.size() || s_[pos_] != '"') return Error("expected a string key");
      members.emplace_back();
      std::string& key = members.back().first;
      if (absl::Status st = ParseString(&key); !st.ok()) return st;
      if (duplicates.LastIsDuplicate()) {
        return Error(absl::StrCat("duplicate key \"", key, "\""));
      }
      SkipWs();
      if (pos_ >= s_.size() || s_[pos_] != ':') return Error("expected ':'");
      ++pos_;
      SkipWs();
      // (The member's value is parsed in place: nothing else touches `members` meanwhile.)
      if (absl::Status st = ParseValue(&members.back().second, depth + 1); !st.ok()) return st;
      SkipWs();
      if (pos_ >= s_.size()) return Error("unterminated object");
      if (s_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (s_[pos_] == '}') {
        ++pos_;
        return absl::OkStatus();
      }
      return Error("expected ',' or '}'");
    }
  }

  absl::Status ParseArray(JsonValue* v, int depth) {
    v->kind_ = JsonValue::Kind::kArray;
    ++pos_;  // '['
    SkipWs();
    if (pos_ < s_.size() && s_[pos_] == ']') {
      ++pos_;
      return absl::OkStatus();
    }
    while (true) {
      SkipWs();
      JsonValue child;
      if (absl::Status st = ParseValue(&child, depth + 1); !st.ok()) return st;
      v->array_.push_back(std::move(child));
      SkipWs();
      if (pos_ >= s_.size()) return Error("unterminated array");
      if (s_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (s_[pos_] == ']') {
        ++pos_;
        return absl::OkStatus();
      }
      return Error("expected ',' or ']'");
    }
  }

  absl::Status ParseNumber(JsonValue* v) {
    const size_t start = pos_;
    auto digits = [&] {
      size_t n = 0;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_, ++n;
      return n;
    };
    if (s_[pos_] == '-') ++pos_;
    if (pos_ < s_.size() && s_[pos_] == '0') {
      ++pos_;
    } else if (digits() == 0) {
      return Error("invalid number");
    }
    if (pos_ < s_.size() && s_[pos_] == '.') {
      ++pos_;
      if (digits() == 0) return Error("invalid number fraction");
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      if (digits() == 0) return Error("invalid number exponent");
    }
    v->kind_ = JsonValue::Kind::kNumber;
    v->str_ = std::string(s_.substr(start, pos_ - start));
    return absl::OkStatus();
  }

  static void AppendUtf8(std::string* out, uint32_t cp) {
    if (cp < 0x80) {
      out->push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  absl::Status ParseHex4(uint32_t* cp) {
    if (s_.size() - pos_ < 4) return Error("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = s_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else return Error("invalid \\u escape");
    }
    *cp = v;
    return absl::OkStatus();
  }

  absl::Status ParseString(std::string* out) {
    ++pos_;  // opening quote
    while (true) {
      if (pos_ >= s_.size()) return Error("unterminated string");
      const unsigned char c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        ++pos_;
        return absl::OkStatus();
      }
      if (c < 0x20) return Error("control character in string");
      if (c != '\\') {
        out->push_back(static_cast<char>(c));
        ++pos_;
        continue;
      }
      ++pos_;
      if (pos_ >= s_.size()) return Error("unterminated escape");
      const char e = s_[pos_++];
      switch (e) {
        case '"': out->push_back('"'); break;
        case '\\': out->push_back('\\'); break;
        case '/': out->push_back('/'); break;
        case 'b': out->push_back('\b'); break;
        case 'f': out->push_back('\f'); break;
        case 'n': out->push_back('\n'); break;
        case 'r': out->push_back('\r'); break;
        case 't': out->push_back('\t'); break;
        case 'u': {
          uint32_t cp = 0;
          if (absl::Status st = ParseHex4(&cp); !st.ok()) return st;
          if (cp >= 0xD800 && cp <= 0xDBFF) {  // high surrogate: a low one must follow
            uint32_t lo = 0;
            if (!Consume("\\u")) return Error("unpaired surrogate");
            if (absl::Status st = ParseHex4(&lo); !st.ok()) return st;
            if (lo < 0xDC00 || lo > 0xDFFF) return Error("unpaired surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            return Error("unpaired surrogate");
          }
          AppendUtf8(out, cp);
          break;
        }
        default:
          return Error("invalid escape");
      }
    }
  }

  absl::string_view s_;
  size_t pos_ = 0;
  const JsonLimits& limits_;
};

absl::StatusOr<JsonValue> ParseJson(absl::string_view text, const JsonLimits& limits) {
  return JsonParser(text, limits).Parse();
}

absl::StatusOr<JsonValue> ParseJson(absl::string_view text, int max_depth) {
  JsonLimits limits;
  limits.max_depth = max_depth;
  return ParseJson(text, limits);
}

void AppendJsonString(std::string* out, absl::string_view s) {
  out->push_back('"');
  for (const char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out->append("\\\""); break;
      case '\\': out->append("\\\\"); break;
      case '\n': out->append("\\n"); break;
      case '\r': out->append("\\r"); break;
      case '\t': out->append("\\t"); break;
      default:
        if (c < 0x20) {
          absl::StrAppend(out, absl::StrFormat("\\u%04x", c));
        } else {
          out->push_back(ch);
        }
    }
  }
  out->push_back('"');
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
  if (!std::isfinite(v)) {
    out_.append("null");
  } else {
    // Shortest of 15..17 significant digits that reads back to the same double.
    std::string text;
    for (int digits = 15; digits <= 17; ++digits) {
      text = absl::StrFormat("%.*g", digits, v);
      if (std::strtod(text.c_str(), nullptr) == v) break;
    }
    out_.append(text);
  }
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
