#include "client/tensor_io.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/atomic_file.h"
#include "core/dtype.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace fpxint::client {
namespace {

constexpr int64_t kMaxElements = int64_t{1} << 31;
constexpr size_t kMaxNpyHeader = 1 << 16;

struct NpyType {
  const char* descr;
  const char* datatype;
};
// Little-endian descriptors only ('<'), and '|' for single bytes; '=' means native (x86: little).
constexpr NpyType kNpyTypes[] = {
    {"f4", "FP32"}, {"f2", "FP16"}, {"f8", "FP64"}, {"i8", "INT64"}, {"i4", "INT32"},
    {"i2", "INT16"}, {"i1", "INT8"}, {"u1", "UINT8"}, {"b1", "BOOL"},
};

// FP16 in both directions through core (exact decoding, round-to-nearest-even encoding).
using core::FloatToHalf;
using core::HalfToFloat;

// The value of `key` in a Python dict literal like {'descr': '<f4', 'fortran_order': False,
// 'shape': (2, 3), }. Returns the raw text of the value.
absl::StatusOr<std::string> DictValue(absl::string_view dict, absl::string_view key) {
  const std::string needle = absl::StrCat("'", key, "'");
  size_t p = dict.find(needle);
  if (p == absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("npy header: no '", key, "' field"));
  }
  p = dict.find(':', p + needle.size());
  if (p == absl::string_view::npos) return absl::InvalidArgumentError("npy header: malformed");
  absl::string_view rest = absl::StripLeadingAsciiWhitespace(dict.substr(p + 1));
  size_t end;
  if (!rest.empty() && rest[0] == '(') {
    end = rest.find(')');
    if (end == absl::string_view::npos) return absl::InvalidArgumentError("npy header: shape");
    return std::string(rest.substr(0, end + 1));
  }
  end = rest.find_first_of(",}");
  if (end == absl::string_view::npos) return absl::InvalidArgumentError("npy header: malformed");
  return std::string(absl::StripAsciiWhitespace(rest.substr(0, end)));
}

template <typename T>
T Load(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// Appends the JSON number `v` to `out` in `datatype`; false when it does not fit.
bool AppendValue(const nlohmann::json& v, absl::string_view dt, std::string* out) {
  if (!v.is_number() && !v.is_boolean()) return false;
  const double d = v.is_boolean() ? (v.get<bool>() ? 1.0 : 0.0) : v.get<double>();
  auto put = [out](const auto& x) { out->append(reinterpret_cast<const char*>(&x), sizeof(x)); };
  auto integral = [&](double lo, double hi) { return d == std::floor(d) && d >= lo && d <= hi; };
  if (dt == "FP32") put(static_cast<float>(d));
  else if (dt == "FP64") put(d);
  else if (dt == "FP16") put(FloatToHalf(static_cast<float>(d)));
  else if (dt == "INT64") {
    if (!v.is_number_integer() && !integral(-9.2e18, 9.2e18)) return false;
    put(v.is_number_integer() ? v.get<int64_t>() : static_cast<int64_t>(d));
  } else if (dt == "INT32") {
    if (!integral(-2147483648.0, 2147483647.0)) return false;
    put(static_cast<int32_t>(d));
  } else if (dt == "INT16") {
    if (!integral(-32768, 32767)) return false;
    put(static_cast<int16_t>(d));
  } else if (dt == "INT8") {
    if (!integral(-128, 127)) return false;
    put(static_cast<int8_t>(d));
  } else if (dt == "UINT8" || dt == "BOOL") {
    if (!integral(0, dt == "BOOL" ? 1 : 255)) return false;
    put(static_cast<uint8_t>(d));
  } else {
    return false;
  }
  return true;
}

// Walks a nested list, recording the shape from the first element at each depth and checking
// that every sibling agrees.
absl::Status Flatten(const nlohmann::json& j, size_t depth, std::vector<int64_t>* shape,
                     std::vector<const nlohmann::json*>* leaves) {
  if (depth > 8) return absl::InvalidArgumentError("JSON tensor: more than 8 dimensions");
  if (!j.is_array()) {
    if (depth != shape->size()) return absl::InvalidArgumentError("JSON tensor: ragged nesting");
    leaves->push_back(&j);
    return absl::OkStatus();
  }
  if (depth == shape->size()) {
    if (!leaves->empty()) return absl::InvalidArgumentError("JSON tensor: ragged nesting");
    shape->push_back(static_cast<int64_t>(j.size()));
  } else if (depth > shape->size() || (*shape)[depth] != static_cast<int64_t>(j.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("JSON tensor: ragged list at depth ", depth, " (every row must have the same "
                     "length)"));
  }
  for (const auto& e : j) {
    if (auto s = Flatten(e, depth + 1, shape, leaves); !s.ok()) return s;
    if (leaves->size() > static_cast<size_t>(kMaxElements)) {
      return absl::InvalidArgumentError("JSON tensor: too many elements");
    }
  }
  return absl::OkStatus();
}

}  // namespace

size_t DatatypeSize(absl::string_view dt) {
  if (dt == "FP64" || dt == "INT64" || dt == "UINT64") return 8;
  if (dt == "FP32" || dt == "INT32" || dt == "UINT32") return 4;
  if (dt == "FP16" || dt == "INT16" || dt == "UINT16" || dt == "BF16") return 2;
  if (dt == "INT8" || dt == "UINT8" || dt == "BOOL") return 1;
  return 0;
}

absl::StatusOr<int64_t> ElementCount(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return absl::InvalidArgumentError(absl::StrCat("shape: negative dimension ", d));
    if (d != 0 && n > kMaxElements / d) {
      return absl::InvalidArgumentError("shape: more than 2^31 elements");
    }
    n *= d;
  }
  return n;
}

absl::StatusOr<HostTensor> ParseNpy(absl::string_view data) {
  static constexpr char kMagic[] = "\x93NUMPY";
  if (data.size() < 10 || data.substr(0, 6) != absl::string_view(kMagic, 6)) {
    return absl::InvalidArgumentError("not a .npy file (no \\x93NUMPY magic)");
  }
  const uint8_t major = static_cast<uint8_t>(data[6]);
  size_t header_len, header_start;
  if (major == 1) {
    header_len = static_cast<uint8_t>(data[8]) | (static_cast<size_t>(static_cast<uint8_t>(data[9])) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (data.size() < 12) return absl::InvalidArgumentError("npy: truncated header");
    header_len = Load<uint32_t>(data.data() + 8);
    header_start = 12;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("npy: format version ", major, " (accepted: 1, 2, 3)"));
  }
  if (header_len > kMaxNpyHeader || header_start + header_len > data.size()) {
    return absl::InvalidArgumentError("npy: header length runs past the end of the file");
  }
  const absl::string_view dict = data.substr(header_start, header_len);
  auto descr = DictValue(dict, "descr");
  if (!descr.ok()) return descr.status();
  auto fortran = DictValue(dict, "fortran_order");
  if (!fortran.ok()) return fortran.status();
  auto shape_text = DictValue(dict, "shape");
  if (!shape_text.ok()) return shape_text.status();
  if (*fortran != "False") {
    return absl::InvalidArgumentError("npy: Fortran order; save with np.ascontiguousarray first");
  }
  std::string d = *descr;
  if (d.size() < 4 || (d.front() != '\'' && d.front() != '"') || d.back() != d.front()) {
    return absl::InvalidArgumentError(absl::StrCat("npy: descr ", d, " is not a simple dtype"));
  }
  d = d.substr(1, d.size() - 2);
  const char order = d[0];
  const std::string code = d.substr(1);
  HostTensor t;
  for (const NpyType& nt : kNpyTypes) {
    if (code == nt.descr) t.datatype = nt.datatype;
  }
  const bool single = code.size() == 2 && code[1] == '1';
  if (t.datatype.empty() || order == '>' || (order != '<' && order != '|' && order != '=') ||
      (order == '|' && !single)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "npy: dtype '", d, "'; accepted: little-endian f4, f2, f8, i8, i4, i2, i1, u1, b1"));
  }
  absl::string_view s = *shape_text;
  if (!absl::ConsumePrefix(&s, "(") || !absl::ConsumeSuffix(&s, ")")) {
    return absl::InvalidArgumentError("npy: shape is not a tuple");
  }
  for (absl::string_view part : absl::StrSplit(s, ',', absl::SkipWhitespace())) {
    int64_t dim;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &dim) || dim < 0) {
      return absl::InvalidArgumentError(absl::StrCat("npy: bad shape entry '", part, "'"));
    }
    t.shape.push_back(dim);
    if (t.shape.size() > 16) return absl::InvalidArgumentError("npy: more than 16 dimensions");
  }
  auto n = ElementCount(t.shape);
  if (!n.ok()) return n.status();
  const size_t want = static_cast<size_t>(*n) * DatatypeSize(t.datatype);
  const absl::string_view body = data.substr(header_start + header_len);
  if (body.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("npy: header says ", want, " data bytes, file has ",
                                                   body.size()));
  }
  t.bytes = std::string(body);
  return t;
}

absl::StatusOr<std::string> EncodeNpy(const HostTensor& t) {
  const char* descr = nullptr;
  for (const NpyType& nt : kNpyTypes) {
    if (t.datatype == nt.datatype) descr = nt.descr;
  }
  if (descr == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("cannot save datatype ", t.datatype, " as .npy"));
  }
  const char order = DatatypeSize(t.datatype) == 1 ? '|' : '<';
  std::string shape = absl::StrJoin(t.shape, ", ");
  if (t.shape.size() == 1) shape += ",";
  std::string dict = absl::StrCat("{'descr': '", std::string(1, order), descr,
                                  "', 'fortran_order': False, 'shape': (", shape, "), }");
  // Pad so that the data starts on a 64-byte boundary; the header ends with '\n'.
  const size_t total = 10 + dict.size() + 1;
  dict.append((64 - total % 64) % 64, ' ');
  dict.push_back('\n');
  std::string out("\x93NUMPY\x01\x00", 8);
  out.push_back(static_cast<char>(dict.size() & 0xff));
  out.push_back(static_cast<char>(dict.size() >> 8));
  out += dict;
  out += t.bytes;
  return out;
}

absl::StatusOr<HostTensor> ParseTensorJson(absl::string_view text, absl::string_view datatype) {
  nlohmann::json j = nlohmann::json::parse(text.begin(), text.end(), nullptr, false);
  if (j.is_discarded()) return absl::InvalidArgumentError("not valid JSON");
  HostTensor t;
  t.datatype = std::string(datatype.empty() ? "FP32" : datatype);
  const nlohmann::json* data = &j;
  if (j.is_object()) {
    if (!j.contains("data")) {
      return absl::InvalidArgumentError(
          "JSON tensor: an object needs \"data\" (and optionally \"name\", \"datatype\", \"shape\")");
    }
    if (j.contains("name")) {
      if (!j["name"].is_string()) return absl::InvalidArgumentError("JSON tensor: \"name\" must be a string");
      t.name = j["name"].get<std::string>();
    }
    if (j.contains("datatype")) {
      if (!j["datatype"].is_string()) return absl::InvalidArgumentError("JSON tensor: \"datatype\" must be a string");
      t.datatype = j["datatype"].get<std::string>();
    }
    data = &j["data"];
  }
  if (DatatypeSize(t.datatype) == 0 || t.datatype == "BF16" ||
      (t.datatype.rfind("UINT", 0) == 0 && t.datatype != "UINT8")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "datatype '", t.datatype, "'; accepted: FP32, FP16, FP64, INT64, INT32, INT16, INT8, UINT8, BOOL"));
  }
  std::vector<const nlohmann::json*> leaves;
  std::vector<int64_t> nested_shape;
  if (auto s = Flatten(*data, 0, &nested_shape, &leaves); !s.ok()) return s;
  t.shape = nested_shape;
  if (j.is_object() && j.contains("shape")) {
    const nlohmann::json& sh = j["shape"];
    if (!sh.is_array()) return absl::InvalidArgumentError("JSON tensor: \"shape\" must be a list");
    t.shape.clear();
    for (const auto& d : sh) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) {
        return absl::InvalidArgumentError("JSON tensor: \"shape\" entries are non-negative integers");
      }
      t.shape.push_back(d.get<int64_t>());
    }
    auto n = ElementCount(t.shape);
    if (!n.ok()) return n.status();
    if (static_cast<size_t>(*n) != leaves.size()) {
      return absl::InvalidArgumentError(absl::StrCat("JSON tensor: \"shape\" has ", *n,
                                                     " elements but \"data\" has ", leaves.size()));
    }
  }
  t.bytes.reserve(leaves.size() * DatatypeSize(t.datatype));
  for (size_t i = 0; i < leaves.size(); ++i) {
    if (!AppendValue(*leaves[i], t.datatype, &t.bytes)) {
      return absl::InvalidArgumentError(absl::StrCat("JSON tensor: element ", i, " (", leaves[i]->dump(),
                                                     ") is not a valid ", t.datatype, " value"));
    }
  }
  return t;
}

absl::StatusOr<nlohmann::json> TensorValues(const HostTensor& t) {
  const size_t es = DatatypeSize(t.datatype);
  if (es == 0 || t.datatype == "BF16") {
    return absl::InvalidArgumentError(absl::StrCat("datatype ", t.datatype, " cannot be shown"));
  }
  auto n = ElementCount(t.shape);
  if (!n.ok()) return n.status();
  if (t.bytes.size() != static_cast<size_t>(*n) * es) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "': ", t.bytes.size(),
                                                   " bytes for shape of ", *n, " elements"));
  }
  nlohmann::json out = nlohmann::json::array();
  const char* p = t.bytes.data();
  const std::string& dt = t.datatype;
  for (int64_t i = 0; i < *n; ++i, p += es) {
    if (dt == "FP32") out.push_back(Load<float>(p));
    else if (dt == "FP64") out.push_back(Load<double>(p));
    else if (dt == "FP16") out.push_back(HalfToFloat(Load<uint16_t>(p)));
    else if (dt == "INT64") out.push_back(Load<int64_t>(p));
    else if (dt == "UINT64") out.push_back(Load<uint64_t>(p));
    else if (dt == "INT32") out.push_back(Load<int32_t>(p));
    else if (dt == "UINT32") out.push_back(Load<uint32_t>(p));
    else if (dt == "INT16") out.push_back(Load<int16_t>(p));
    else if (dt == "UINT16") out.push_back(Load<uint16_t>(p));
    else if (dt == "INT8") out.push_back(Load<int8_t>(p));
    else if (dt == "BOOL") out.push_back(*p != 0);
    else out.push_back(Load<uint8_t>(p));
  }
  return out;
}

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open '", path, "'"));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading '", path, "'"));
  return ss.str();
}

absl::Status WriteWholeFile(const std::string& path, absl::string_view data) {
  return core::WriteFileAtomic(path, data);
}

}  // namespace fpxint::client
