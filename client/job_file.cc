#include "client/job_file.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/util/json_util.h>
#include <yaml-cpp/yaml.h>

#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "client/tensor_io.h"
#include "core/status_macros.h"

namespace fpxint::client {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::EnumDescriptor;
using google::protobuf::FieldDescriptor;

constexpr int kMaxDepth = 16;        // nesting of mappings and lists
constexpr size_t kMaxBytes = 1 << 20;  // a job file is a few hundred bytes
constexpr size_t kMaxIndent = 64;
constexpr int kMaxNodes = 10000;  // aliases can make a small file a huge tree

// Flow collections nest by brackets, which yaml-cpp parses recursively: bound the depth before
// the parser sees the text, so no file can exhaust the stack.
absl::Status CheckFlowDepth(absl::string_view text) {
  int depth = 0;
  char quote = 0;
  for (char c : text) {
    if (quote != 0) {
      if (c == quote) quote = 0;
    } else if (c == '"' || c == '\'') {
      quote = c;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxDepth) {
        return absl::InvalidArgumentError(
            absl::StrCat("nested too deeply (more than ", kMaxDepth, " levels)"));
      }
    } else if (c == ']' || c == '}') {
      depth = depth > 0 ? depth - 1 : 0;
    } else if (c == '\n') {
      quote = 0;  // a quote does not span lines in a job file
    }
  }
  // Block collections nest by indentation and by "- - -" on one line.
  int number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++number;
    const size_t indent = line.find_first_not_of(' ');
    if (indent == absl::string_view::npos) continue;
    if (indent > kMaxIndent) {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", number, ": indented more than ", kMaxIndent, " columns"));
    }
    absl::string_view rest = line.substr(indent);
    int dashes = 0;
    while (absl::ConsumePrefix(&rest, "- ") || absl::ConsumePrefix(&rest, "? ")) {
      rest = absl::StripLeadingAsciiWhitespace(rest);
      if (++dashes > kMaxDepth) {
        return absl::InvalidArgumentError(absl::StrCat("line ", number, ": nested too deeply"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status NodeError(const YAML::Node& n, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("line ", n.Mark().line + 1, ": ", what));
}

// A plain scalar as YAML 1.2's core schema types it; quoted scalars stay strings.
nlohmann::json ScalarValue(const YAML::Node& n) {
  const std::string& s = n.Scalar();
  if (n.Tag() == "!") return nlohmann::json(s);  // quoted: a string
  if (s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL") return nullptr;
  if (s == "true" || s == "True" || s == "TRUE") return true;
  if (s == "false" || s == "False" || s == "FALSE") return false;
  int64_t i;
  if (absl::SimpleAtoi(s, &i)) return i;
  double d;
  if ((absl::ascii_isdigit(static_cast<unsigned char>(s.front())) || s.front() == '-' ||
       s.front() == '.') &&
      absl::SimpleAtod(s, &d)) {
    return d;
  }
  return nlohmann::json(s);
}

absl::StatusOr<nlohmann::json> ToJson(const YAML::Node& n, int depth, int* nodes) {
  if (depth > kMaxDepth) return NodeError(n, "nested too deeply");
  if (++*nodes > kMaxNodes) {
    return NodeError(n, absl::StrCat("more than ", kMaxNodes, " values (aliases included)"));
  }
  switch (n.Type()) {
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined:
      return nlohmann::json(nullptr);
    case YAML::NodeType::Scalar:
      return ScalarValue(n);
    case YAML::NodeType::Sequence: {
      nlohmann::json out = nlohmann::json::array();
      for (const YAML::Node& item : n) {
        auto v = ToJson(item, depth + 1, nodes);
        if (!v.ok()) return v;
        out.push_back(*std::move(v));
      }
      return out;
    }
    case YAML::NodeType::Map: {
      nlohmann::json out = nlohmann::json::object();
      for (const auto& kv : n) {
        if (!kv.first.IsScalar()) return NodeError(kv.first, "keys must be plain names");
        const std::string key = kv.first.Scalar();
        if (out.contains(key)) return NodeError(kv.first, absl::StrCat("duplicate key '", key, "'"));
        auto v = ToJson(kv.second, depth + 1, nodes);
        if (!v.ok()) return v;
        out[key] = *std::move(v);
      }
      return out;
    }
  }
  return nlohmann::json(nullptr);
}

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
    if (f->is_repeated() && f->cpp_type() == FieldDescriptor::CPPTYPE_STRING) {
      // weight_terms_for: one string or a list of them.
      nlohmann::json list = nlohmann::json::array();
      for (const auto& e : (v.is_array() ? v : nlohmann::json::array({v}))) {
        if (!e.is_string()) {
          return absl::InvalidArgumentError(absl::StrCat(path, ": expected strings"));
        }
        list.push_back(e);
      }
      out[key] = list;
      continue;
    }
    if (f->is_repeated()) {
      // deploy.batching.preferred_batch_size: one integer or a list of them.
      nlohmann::json list = nlohmann::json::array();
      for (const auto& e : (v.is_array() ? v : nlohmann::json::array({v}))) {
        if (!e.is_number_integer() || e.get<int64_t>() < 0) {
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": expected non-negative integers"));
        }
        list.push_back(e);
      }
      out[key] = list;
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
  if (text.size() > kMaxBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("a job file is at most ", kMaxBytes, " bytes; this one has ", text.size()));
  }
  FPX_RETURN_IF_ERROR(CheckFlowDepth(text));
  YAML::Node root;
  try {
    root = YAML::Load(std::string(text));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("line ", e.mark.line + 1, ": ", e.msg));
  }
  if (root.IsNull()) return nlohmann::json::object();
  int nodes = 0;
  return ToJson(root, 0, &nodes);
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
