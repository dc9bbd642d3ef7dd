#include "client/job_file.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/util/json_util.h>

#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "client/tensor_io.h"

namespace fpxint::client {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::EnumDescriptor;
using google::protobuf::FieldDescriptor;

struct Line {
  int number;  // 1-based
  int indent;
  std::string text;  // without indentation and comment
};

absl::Status LineError(const Line& l, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("line ", l.number, ": ", what));
}

// Removes a '#' comment that is outside quotes and at the start or after whitespace.
std::string StripComment(absl::string_view s) {
  char quote = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (quote) {
      if (c == quote) quote = 0;
    } else if (c == '"' || c == '\'') {
      quote = c;
    } else if (c == '#' && (i == 0 || s[i - 1] == ' ' || s[i - 1] == '\t')) {
      return std::string(absl::StripTrailingAsciiWhitespace(s.substr(0, i)));
    }
  }
  return std::string(absl::StripTrailingAsciiWhitespace(s));
}

// Splits "a, [b, c], {d: e}" at top-level commas.
std::vector<std::string> SplitFlow(absl::string_view s) {
  std::vector<std::string> out;
  int depth = 0;
  char quote = 0;
  std::string cur;
  for (char c : s) {
    if (quote) {
      if (c == quote) quote = 0;
    } else if (c == '"' || c == '\'') {
      quote = c;
    } else if (c == '[' || c == '{') {
      ++depth;
    } else if (c == ']' || c == '}') {
      --depth;
    } else if (c == ',' && depth == 0) {
      out.push_back(std::string(absl::StripAsciiWhitespace(cur)));
      cur.clear();
      continue;
    }
    cur.push_back(c);
  }
  if (!absl::StripAsciiWhitespace(cur).empty() || !out.empty()) {
    out.push_back(std::string(absl::StripAsciiWhitespace(cur)));
  }
  return out;
}

// Finds "key: value" (the colon followed by space or end, outside quotes). npos if none.
size_t KeyColon(absl::string_view s) {
  char quote = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (quote) {
      if (c == quote) quote = 0;
    } else if (c == '"' || c == '\'') {
      quote = c;
    } else if (c == ':' && (i + 1 == s.size() || s[i + 1] == ' ')) {
      return i;
    } else if (c == '[' || c == '{') {
      return absl::string_view::npos;
    }
  }
  return absl::string_view::npos;
}

absl::StatusOr<nlohmann::json> Scalar(absl::string_view s, const Line& l, int depth = 0);

absl::StatusOr<nlohmann::json> FlowValue(absl::string_view s, const Line& l, int depth) {
  if (depth > 16) return LineError(l, "nested too deeply");
  const bool list = s.front() == '[';
  if (s.back() != (list ? ']' : '}')) return LineError(l, "unterminated flow collection");
  std::vector<std::string> parts = SplitFlow(s.substr(1, s.size() - 2));
  nlohmann::json out = list ? nlohmann::json::array() : nlohmann::json::object();
  for (const std::string& p : parts) {
    if (p.empty()) return LineError(l, "empty entry in a flow collection");
    if (list) {
      auto v = Scalar(p, l, depth + 1);
      if (!v.ok()) return v.status();
      out.push_back(*v);
    } else {
      const size_t c = KeyColon(p);
      if (c == absl::string_view::npos) return LineError(l, absl::StrCat("expected 'key: value' in '", p, "'"));
      auto v = Scalar(absl::StripAsciiWhitespace(absl::string_view(p).substr(c + 1)), l, depth + 1);
      if (!v.ok()) return v.status();
      auto k = Scalar(absl::StripAsciiWhitespace(absl::string_view(p).substr(0, c)), l, depth + 1);
      if (!k.ok()) return k.status();
      out[k->is_string() ? k->get<std::string>() : k->dump()] = *v;
    }
  }
  return out;
}

absl::StatusOr<nlohmann::json> Scalar(absl::string_view s, const Line& l, int depth) {
  if (s.empty() || s == "~" || s == "null") return nlohmann::json(nullptr);
  if (s.front() == '[' || s.front() == '{') return FlowValue(s, l, depth);
  if (s.front() == '"') {
    nlohmann::json j = nlohmann::json::parse(s.begin(), s.end(), nullptr, false);
    if (j.is_discarded() || !j.is_string()) return LineError(l, "bad double-quoted string");
    return j;
  }
  if (s.front() == '\'') {
    if (s.size() < 2 || s.back() != '\'') return LineError(l, "unterminated single-quoted string");
    return nlohmann::json(absl::StrReplaceAll(s.substr(1, s.size() - 2), {{"''", "'"}}));
  }
  if (s == "true" || s == "True") return nlohmann::json(true);
  if (s == "false" || s == "False") return nlohmann::json(false);
  int64_t i;
  if (absl::SimpleAtoi(s, &i)) return nlohmann::json(i);
  double d;
  if ((absl::ascii_isdigit(s.front()) || s.front() == '-' || s.front() == '.') &&
      absl::SimpleAtod(s, &d)) {
    return nlohmann::json(d);
  }
  return nlohmann::json(std::string(s));
}

class BlockParser {
 public:
  explicit BlockParser(std::vector<Line> lines) : lines_(std::move(lines)) {}

  absl::StatusOr<nlohmann::json> Parse() {
    if (lines_.empty()) return nlohmann::json::object();
    auto v = Node(lines_[0].indent, 0);
    if (!v.ok()) return v;
    if (pos_ < lines_.size()) return LineError(lines_[pos_], "unexpected indentation");
    return v;
  }

 private:
  absl::StatusOr<nlohmann::json> Node(int indent, int depth) {
    if (depth > 16) return LineError(lines_[pos_], "nested too deeply");
    const bool list = absl::StartsWith(lines_[pos_].text, "- ") || lines_[pos_].text == "-";
    nlohmann::json out = list ? nlohmann::json::array() : nlohmann::json::object();
    while (pos_ < lines_.size() && lines_[pos_].indent == indent) {
      const Line& l = lines_[pos_];
      const bool item = absl::StartsWith(l.text, "- ") || l.text == "-";
      if (item != list) return LineError(l, "mixes list items and mapping keys at one level");
      absl::string_view body = l.text;
      std::string key;
      if (list) {
        body = absl::StripLeadingAsciiWhitespace(body.substr(1));
        if (KeyColon(body) != absl::string_view::npos) {
          return LineError(l, "mappings inside block lists are not supported; use {k: v}");
        }
      } else {
        const size_t c = KeyColon(body);
        if (c == absl::string_view::npos) return LineError(l, absl::StrCat("expected 'key: value', got '", l.text, "'"));
        auto k = Scalar(absl::StripAsciiWhitespace(body.substr(0, c)), l);
        if (!k.ok()) return k.status();
        key = k->is_string() ? k->get<std::string>() : k->dump();
        if (out.contains(key)) return LineError(l, absl::StrCat("duplicate key '", key, "'"));
        body = absl::StripLeadingAsciiWhitespace(body.substr(c + 1));
      }
      ++pos_;
      nlohmann::json value;
      if (body.empty() && pos_ < lines_.size() && lines_[pos_].indent > indent) {
        auto v = Node(lines_[pos_].indent, depth + 1);
        if (!v.ok()) return v;
        value = std::move(*v);
      } else {
        if (body == "|" || body == ">") return LineError(l, "block scalars are not supported");
        auto v = Scalar(body, l);
        if (!v.ok()) return v;
        value = std::move(*v);
      }
      if (list) {
        out.push_back(std::move(value));
      } else {
        out[key] = std::move(value);
      }
    }
    if (pos_ < lines_.size() && lines_[pos_].indent > indent) {
      return LineError(lines_[pos_], "unexpected indentation");
    }
    return out;
  }

  std::vector<Line> lines_;
  size_t pos_ = 0;
};

// Offset of the first byte that is not part of a valid UTF-8 sequence, or npos.
size_t FirstInvalidUtf8(absl::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (len == 0 || (len == 2 && c < 0xC2) || (len == 4 && c > 0xF4) || i + len > s.size()) return i;
    for (int j = 1; j < len; ++j) {
      if ((static_cast<unsigned char>(s[i + j]) & 0xC0) != 0x80) return i;
    }
    if (len == 3) {  // no overlong forms, no surrogates
      const unsigned char c1 = static_cast<unsigned char>(s[i + 1]);
      if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 >= 0xA0)) return i;
    } else if (len == 4) {
      const unsigned char c1 = static_cast<unsigned char>(s[i + 1]);
      if ((c == 0xF0 && c1 < 0x90) || (c == 0xF4 && c1 >= 0x90)) return i;
    }
    i += static_cast<size_t>(len);
  }
  return absl::string_view::npos;
}

std::string CanonicalKey(std::string k) {
  absl::AsciiStrToLower(&k);
  absl::StrReplaceAll({{"-", "_"}}, &k);
  if (k == "bits") return "weight_bits";
  if (k == "terms") return "weight_terms";
  if (k == "output" || k == "output_formats") return "outputs";
  return k;
}

std::string CanonicalEnum(const FieldDescriptor* f, std::string v) {
  absl::AsciiStrToUpper(&v);
  absl::StrReplaceAll({{"-", "_"}}, &v);
  if (f->enum_type()->name() == "ScaleGranularity") {
    if (v == "TENSOR" || v == "CHANNEL" || v == "GROUP") return "PER_" + v;
  }
  return v;
}

std::string AcceptedEnum(const EnumDescriptor* e) {
  std::vector<std::string> names;
  for (int i = 0; i < e->value_count(); ++i) {
    const std::string& n = e->value(i)->name();
    if (!absl::EndsWith(n, "_UNSPECIFIED")) names.push_back(absl::AsciiStrToLower(n));
  }
  return absl::StrJoin(names, ", ");
}

std::string AcceptedKeys(const Descriptor* d) {
  std::vector<std::string> names;
  for (int i = 0; i < d->field_count(); ++i) names.push_back(d->field(i)->name());
  return absl::StrJoin(names, ", ");
}

// Rewrites `in` into the proto3 JSON form of message `d`, checking keys and enum values.
absl::StatusOr<nlohmann::json> Canonicalize(const nlohmann::json& in, const Descriptor* d,
                                            const std::string& where) {
  if (!in.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(where.empty() ? "job spec" : where, ": expected a mapping"));
  }
  nlohmann::json out = nlohmann::json::object();
  for (auto it = in.begin(); it != in.end(); ++it) {
    std::string key = CanonicalKey(it.key());
    const std::string path = where.empty() ? key : absl::StrCat(where, ".", key);
    nlohmann::json v = it.value();
    if (d->name() == "JobSpec" && key == "deploy_as") {  // the CLI flag's spelling
      if (!v.is_string()) return absl::InvalidArgumentError("deploy_as: expected a model name");
      out["deploy"]["enabled"] = true;
      out["deploy"]["name"] = v;
      continue;
    }
    const FieldDescriptor* f = d->FindFieldByName(key);
    if (f == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("unknown key '", it.key(), "'",
                                                     where.empty() ? "" : " in " + where,
                                                     "; accepted: ", AcceptedKeys(d),
                                                     d->name() == "JobSpec" ? ", bits, terms, deploy_as" : ""));
    }
    if (v.is_null()) continue;
    if (f->type() == FieldDescriptor::TYPE_MESSAGE) {
      if (d->name() == "JobSpec" && key == "deploy" && v.is_boolean()) {
        v = nlohmann::json{{"enabled", v.get<bool>()}};
      }
      auto sub = Canonicalize(v, f->message_type(), path);
      if (!sub.ok()) return sub.status();
      for (auto s = sub->begin(); s != sub->end(); ++s) out[key][s.key()] = s.value();
      continue;
    }
    if (f->type() == FieldDescriptor::TYPE_ENUM) {
      auto one = [&](const nlohmann::json& e) -> absl::StatusOr<nlohmann::json> {
        if (!e.is_string()) {
          return absl::InvalidArgumentError(absl::StrCat(path, ": expected a name; accepted: ",
                                                         AcceptedEnum(f->enum_type())));
        }
        const std::string name = CanonicalEnum(f, e.get<std::string>());
        if (f->enum_type()->FindValueByName(name) == nullptr || absl::EndsWith(name, "_UNSPECIFIED")) {
          return absl::InvalidArgumentError(absl::StrCat(path, ": '", e.get<std::string>(),
                                                         "'; accepted: ", AcceptedEnum(f->enum_type())));
        }
        return nlohmann::json(name);
      };
      if (f->is_repeated()) {
        nlohmann::json list = nlohmann::json::array();
        for (const auto& e : (v.is_array() ? v : nlohmann::json::array({v}))) {
          auto n = one(e);
          if (!n.ok()) return n.status();
          list.push_back(*n);
        }
        out[key] = list;
      } else {
        auto n = one(v);
        if (!n.ok()) return n.status();
        out[key] = *n;
      }
      continue;
    }
    switch (f->cpp_type()) {
      case FieldDescriptor::CPPTYPE_STRING:
        if (!v.is_string()) return absl::InvalidArgumentError(absl::StrCat(path, ": expected a string"));
        break;
      case FieldDescriptor::CPPTYPE_BOOL:
        if (!v.is_boolean()) return absl::InvalidArgumentError(absl::StrCat(path, ": expected true or false"));
        break;
      case FieldDescriptor::CPPTYPE_DOUBLE:
      case FieldDescriptor::CPPTYPE_FLOAT:
        if (!v.is_number()) return absl::InvalidArgumentError(absl::StrCat(path, ": expected a number"));
        break;
      default:
        if (!v.is_number_integer() || v.get<int64_t>() < 0) {
          return absl::InvalidArgumentError(absl::StrCat(path, ": expected a non-negative integer"));
        }
    }
    out[key] = v;
  }
  return out;
}

}  // namespace

absl::StatusOr<nlohmann::json> ParseYamlOrJson(absl::string_view text) {
  // Job files are UTF-8 text; anything else would reach the JSON layer as invalid strings.
  if (size_t bad = FirstInvalidUtf8(text); bad != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("not UTF-8 text (invalid byte at offset ", bad, ")"));
  }
  absl::string_view t = absl::StripLeadingAsciiWhitespace(text);
  if (!t.empty() && t.front() == '{') {
    nlohmann::json j = nlohmann::json::parse(t.begin(), t.end(), nullptr, false);
    if (j.is_discarded()) return absl::InvalidArgumentError("not valid JSON");
    return j;
  }
  std::vector<Line> lines;
  int number = 0;
  for (absl::string_view raw : absl::StrSplit(text, '\n')) {
    ++number;
    absl::ConsumeSuffix(&raw, "\r");
    if (number == 1 || raw == "---") {
      if (raw == "---") continue;
    }
    if (raw.find('\t') != absl::string_view::npos &&
        raw.find_first_not_of(" \t") != absl::string_view::npos &&
        raw.substr(0, raw.find_first_not_of(" \t")).find('\t') != absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("line ", number, ": tabs are not allowed for indentation"));
    }
    std::string s = StripComment(raw);
    const size_t ind = s.find_first_not_of(' ');
    if (ind == std::string::npos) continue;
    lines.push_back(Line{number, static_cast<int>(ind), s.substr(ind)});
  }
  return BlockParser(std::move(lines)).Parse();
}

absl::StatusOr<v1::JobSpec> JobSpecFromJson(const nlohmann::json& j) {
  auto canon = Canonicalize(j, v1::JobSpec::descriptor(), "");
  if (!canon.ok()) return canon.status();
  v1::JobSpec spec;
  google::protobuf::util::JsonParseOptions o;
  o.ignore_unknown_fields = false;
  auto s = google::protobuf::util::JsonStringToMessage(
      canon->dump(-1, ' ', false, nlohmann::json::error_handler_t::replace), &spec, o);
  if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat("job spec: ", s.message().as_string()));
  return spec;
}

absl::StatusOr<nlohmann::json> LoadJobFile(const std::string& path) {
  auto text = ReadWholeFile(path);
  if (!text.ok()) return text.status();
  auto j = ParseYamlOrJson(*text);
  if (!j.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", j.status().message()));
  if (!j->is_object()) return absl::InvalidArgumentError(absl::StrCat(path, ": expected a mapping of job spec keys"));
  return j;
}

}  // namespace fpxint::client
