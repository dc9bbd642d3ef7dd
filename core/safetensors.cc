#include "core/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/atomic_file.h"
#include "core/json.h"
#include "core/sha256.h"
#include "core/status_macros.h"

namespace fpxint::core {
namespace {

absl::Status Bad(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("safetensors: ", what));
}
absl::Status BadTensor(absl::string_view name, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("safetensors: tensor '", name, "': ", what));
}

// numel * itemsize without overflow; nullopt when it overflows uint64 or int64.
std::optional<uint64_t> ByteSize(absl::Span<const int64_t> shape, int itemsize) {
  unsigned __int128 n = static_cast<unsigned>(itemsize);
  for (int64_t d : shape) {
    n *= static_cast<uint64_t>(d);
    if (n > static_cast<unsigned __int128>(INT64_MAX)) return std::nullopt;
  }
  return static_cast<uint64_t>(n);
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::Status ErrnoToStatus(int err, absl::string_view op, absl::string_view path) {
  std::string msg = absl::StrCat(op, " '", path, "': ", std::strerror(err));
  switch (err) {
    case ENOENT: return absl::NotFoundError(msg);
    case EACCES:
    case EPERM:
    case EROFS: return absl::PermissionDeniedError(msg);
    case ENOSPC:
    case EDQUOT:
    case EFBIG: return absl::ResourceExhaustedError(msg);
    default: return absl::InternalError(msg);
  }
}

absl::StatusOr<std::unique_ptr<SafetensorsReader>> SafetensorsReader::Open(
    const std::string& path, const SafetensorsLimits& limits) {
  std::unique_ptr<SafetensorsReader> r(new SafetensorsReader());
  FPX_ASSIGN_OR_RETURN(r->map_, MappedFile::Open(path));
  r->bytes_ = r->map_->bytes();
  if (absl::Status s = r->Parse(limits); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  }
  return r;
}

absl::StatusOr<std::unique_ptr<SafetensorsReader>> SafetensorsReader::FromBuffer(
    absl::Span<const uint8_t> bytes, const SafetensorsLimits& limits) {
  std::unique_ptr<SafetensorsReader> r(new SafetensorsReader());
  r->bytes_ = bytes;
  FPX_RETURN_IF_ERROR(r->Parse(limits));
  return r;
}

SafetensorsReader::~SafetensorsReader() = default;

absl::Status SafetensorsReader::Parse(const SafetensorsLimits& limits) {
  const uint64_t size = bytes_.size();
  if (size < 8) {
    return Bad(absl::StrCat("file is ", size,
                            " bytes; a safetensors file starts with an 8-byte header length"));
  }
  uint64_t n = 0;
  std::memcpy(&n, bytes_.data(), 8);
  if (n > limits.max_header_bytes) {
    return Bad(absl::StrCat("header length ", n, " exceeds the limit of ", limits.max_header_bytes,
                            " bytes"));
  }
  if (n > size - 8) {
    return Bad(absl::StrCat("header length ", n, " runs past the end of the file (", size - 8,
                            " bytes follow the length prefix); the file is truncated or not "
                            "safetensors"));
  }
  if (n < 2) return Bad(absl::StrCat("header length ", n, " is too short for a JSON object"));
  header_len_ = n;
  const absl::string_view header(reinterpret_cast<const char*>(bytes_.data() + 8), n);
  if (header[0] != '{') return Bad("header does not start with '{'");
  JsonLimits json_limits;
  json_limits.max_depth = 8;
  // The tensors and "__metadata__" (whose own entries are bounded alike). The parser stops at the
  // first entry past the limit, so a header of millions of keys costs no more than the limit.
  json_limits.max_members =
      limits.max_tensors < SIZE_MAX ? limits.max_tensors + 1 : limits.max_tensors;
  absl::StatusOr<JsonValue> json = ParseJson(header, json_limits);
  if (json.status().code() == absl::StatusCode::kResourceExhausted) {
    return Bad(absl::StrCat("header lists more than ", limits.max_tensors,
                            " tensors (or __metadata__ entries); the limit is ",
                            limits.max_tensors, "; reading stopped there (",
                            json.status().message(), ")"));
  }
  if (!json.ok()) return Bad(absl::StrCat("header is not valid JSON: ", json.status().message()));
  if (!json->is_object()) return Bad("header is not a JSON object");
  data_ = bytes_.subspan(8 + n);
  const uint64_t data_len = data_.size();
  const size_t tensors = json->object().size() - (json->Find("__metadata__") != nullptr ? 1 : 0);
  if (tensors > limits.max_tensors) {
    return Bad(
        absl::StrCat("header lists ", tensors, " tensors; the limit is ", limits.max_tensors));
  }
  for (const auto& [name, entry] : json->object()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) return Bad("__metadata__ must be an object of strings");
      for (const auto& [k, v] : entry.object()) {
        if (!v.is_string()) {
          return Bad(absl::StrCat("__metadata__ value of '", k, "' is a ",
                                  JsonValue::KindName(v.kind()), "; only strings are accepted"));
        }
        metadata_.emplace_back(k, v.str());
      }
      continue;
    }
    if (name.empty()) return Bad("a tensor has an empty name");
    if (!entry.is_object()) {
      return BadTensor(name, absl::StrCat("entry is a ", JsonValue::KindName(entry.kind()),
                                          "; expected an object with dtype, shape, data_offsets"));
    }
    for (const auto& [k, v] : entry.object()) {
      if (k != "dtype" && k != "shape" && k != "data_offsets") {
        return BadTensor(name, absl::StrCat("unknown field '", k,
                                            "'; accepted: dtype, shape, data_offsets"));
      }
    }
    TensorInfo t;
    t.name = name;
    const JsonValue* dtype = entry.Find("dtype");
    if (dtype == nullptr || !dtype->is_string()) {
      return BadTensor(name, "missing or non-string 'dtype'");
    }
    std::optional<DType> dt = ParseDType(dtype->str());
    if (!dt) {
      // A dtype this library does not read: the tensor stays listed, as raw bytes, so that the
      // rest of the file is readable. Only names of the format's shape are kept.
      const std::string& dn = dtype->str();
      const bool plausible = !dn.empty() && dn.size() <= 32 &&
                             std::all_of(dn.begin(), dn.end(), [](char c) {
                               return absl::ascii_isalnum(static_cast<unsigned char>(c)) ||
                                      c == '_';
                             });
      if (!plausible) {
        return BadTensor(name, absl::StrCat("dtype '", absl::CHexEscape(dn.substr(0, 40)),
                                            "' is not a dtype name; accepted: ",
                                            AcceptedDTypeNames()));
      }
      t.dtype = DType::kOther;
      t.dtype_name = dn;
    } else {
      t.dtype = *dt;
      t.dtype_name = std::string(DTypeName(*dt));
    }
    const JsonValue* shape = entry.Find("shape");
    if (shape == nullptr || !shape->is_array()) return BadTensor(name, "missing or non-array 'shape'");
    if (static_cast<int>(shape->array().size()) > limits.max_rank) {
      return BadTensor(name, absl::StrCat("rank ", shape->array().size(), " exceeds the limit of ",
                                          limits.max_rank));
    }
    for (const JsonValue& d : shape->array()) {
      std::optional<uint64_t> v = d.AsUint64();
      if (!v || *v > static_cast<uint64_t>(INT64_MAX)) {
        return BadTensor(name, absl::StrCat("shape entry '", d.str(),
                                            "' is not a non-negative integer"));
      }
      t.shape.push_back(static_cast<int64_t>(*v));
    }
    const JsonValue* offsets = entry.Find("data_offsets");
    if (offsets == nullptr || !offsets->is_array() || offsets->array().size() != 2) {
      return BadTensor(name, "'data_offsets' must be an array [begin, end]");
    }
    std::optional<uint64_t> b = offsets->array()[0].AsUint64();
    std::optional<uint64_t> e = offsets->array()[1].AsUint64();
    if (!b || !e) return BadTensor(name, "'data_offsets' entries must be non-negative integers");
    if (*b > *e) {
      return BadTensor(name, absl::StrCat("data_offsets [", *b, ",", *e, "] has begin > end"));
    }
    if (*e > data_len) {
      return BadTensor(name, absl::StrCat("data_offsets [", *b, ",", *e,
                                          "] exceed the data section of ", data_len,
                                          " bytes (file truncated?)"));
    }
    std::optional<uint64_t> want = ByteSize(t.shape, DTypeSize(t.dtype));
    if (!want) return BadTensor(name, absl::StrCat("shape ", ShapeString(t.shape), " overflows"));
    // An unsupported dtype's element size is unknown: its bytes are only checked to tile.
    if (t.dtype != DType::kOther && *e - *b != *want) {
      return BadTensor(name, absl::StrCat("shape ", ShapeString(t.shape), " of ",
                                          DTypeName(t.dtype), " needs ", *want,
                                          " bytes but data_offsets [", *b, ",", *e, "] hold ",
                                          *e - *b));
    }
    t.begin = *b;
    t.end = *e;
    tensors_.push_back(std::move(t));
  }
  std::stable_sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const TensorInfo& t = tensors_[i];
    if (t.begin < expected) {
      return BadTensor(t.name, absl::StrCat("data_offsets [", t.begin, ",", t.end,
                                            "] overlap the previous tensor '", tensors_[i - 1].name,
                                            "' ending at ", expected));
    }
    if (t.begin > expected) {
      return BadTensor(t.name, absl::StrCat("data_offsets begin at ", t.begin, " leaving a gap after ",
                                            expected, "; tensors must tile the data section"));
    }
    expected = t.end;
    by_name_.emplace(t.name, i);
  }
  if (expected != data_len) {
    return Bad(absl::StrCat("data section is ", data_len, " bytes but the tensors cover ", expected,
                            "; trailing bytes are not allowed"));
  }
  return absl::OkStatus();
}

const TensorInfo* SafetensorsReader::Find(absl::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

absl::Span<const uint8_t> SafetensorsReader::Data(const TensorInfo& t) const {
  return data_.subspan(t.begin, t.end - t.begin);
}

std::optional<std::string> SafetensorsReader::Metadata(absl::string_view key) const {
  for (const auto& [k, v] : metadata_) {
    if (k == key) return v;
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------

void SafetensorsWriter::SetMetadata(absl::string_view key, absl::string_view value) {
  for (auto& [k, v] : metadata_) {
    if (k == key) {
      v = std::string(value);
      return;
    }
  }
  metadata_.emplace_back(std::string(key), std::string(value));
}

absl::Status SafetensorsWriter::Add(absl::string_view name, DType dtype, std::vector<int64_t> shape,
                                    absl::Span<const uint8_t> data,
                                    absl::string_view other_dtype_name) {
  if (name.empty() || name == "__metadata__") {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors writer: invalid tensor name '", name, "'"));
  }
  if (names_.contains(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors writer: duplicate tensor name '", name, "'"));
  }
  for (int64_t d : shape) {
    if (d < 0) return BadTensor(name, "negative dimension");
  }
  if (dtype == DType::kOther && other_dtype_name.empty()) {
    return BadTensor(name, "an unsupported dtype needs its name (TensorInfo::dtype_name)");
  }
  std::optional<uint64_t> want = ByteSize(shape, DTypeSize(dtype));
  if (!want) return BadTensor(name, absl::StrCat("shape ", ShapeString(shape), " overflows"));
  if (dtype != DType::kOther && *want != data.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors writer: tensor '", name, "' shape ", ShapeString(shape), " of ",
        DTypeName(dtype), " does not match ", data.size(), " bytes"));
  }
  names_.emplace(std::string(name), entries_.size());
  entries_.push_back(Entry{std::string(name), dtype,
                           dtype == DType::kOther ? std::string(other_dtype_name) : "",
                           std::move(shape), data, nullptr, data.size(), nullptr});
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::AddLazy(absl::string_view name, DType dtype,
                                        std::vector<int64_t> shape, Producer produce) {
  if (dtype == DType::kOther) return BadTensor(name, "a lazy tensor needs a known dtype");
  std::optional<uint64_t> size = ByteSize(shape, DTypeSize(dtype));
  if (!size) return BadTensor(name, absl::StrCat("shape ", ShapeString(shape), " overflows"));
  // Registered with an empty span of the right size check skipped: validated as Add does.
  if (name.empty() || name == "__metadata__" || names_.contains(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors writer: invalid or duplicate tensor name '", name, "'"));
  }
  for (int64_t d : shape) {
    if (d < 0) return BadTensor(name, "negative dimension");
  }
  names_.emplace(std::string(name), entries_.size());
  entries_.push_back(Entry{std::string(name), dtype, "", std::move(shape), {}, nullptr, *size,
                           std::move(produce)});
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Reserve(absl::string_view name, DType dtype,
                                        std::vector<int64_t> shape) {
  FPX_RETURN_IF_ERROR(AddLazy(name, dtype, std::move(shape), nullptr));
  entries_.back().reserved = true;
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::CheckNoReserved() const {
  for (const Entry& e : entries_) {
    if (e.reserved) {
      return absl::FailedPreconditionError(absl::StrCat(
          "safetensors writer: tensor '", e.name, "' is reserved; write the file with BeginPlaced"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SafetensorsWriter::PlacedFile>> SafetensorsWriter::BeginPlaced(
    const std::string& path) const {
  FPX_ASSIGN_OR_RETURN(AtomicFile f, AtomicFile::Create(path));
  const uint64_t size = FileSize();
  const int fd = f.fd();
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    return ErrnoToStatus(errno, "cannot size", f.temp_path());
  }
  std::unique_ptr<PlacedFile> out(new PlacedFile(std::move(f), size));
  const std::string h = PaddedHeader();
  std::string head(8, '\0');
  const uint64_t n = h.size();
  std::memcpy(head.data(), &n, 8);
  head += h;
  auto put = [&](uint64_t at, const uint8_t* p, size_t len) {
    return PwriteAll(fd, p, len, at, out->file_.temp_path());
  };
  FPX_RETURN_IF_ERROR(put(0, reinterpret_cast<const uint8_t*>(head.data()), head.size()));
  uint64_t at = head.size();
  for (const Entry& e : entries_) {
    if (e.reserved) {
      out->places_[e.name] = PlacedFile::Place{at, e.size, false};
    } else if (e.produce) {
      FPX_ASSIGN_OR_RETURN(std::vector<uint8_t> made, e.produce());
      if (made.size() != e.size) {
        return absl::InternalError(absl::StrCat("safetensors writer: tensor '", e.name, "' made ",
                                                made.size(), " bytes, not ", e.size));
      }
      FPX_RETURN_IF_ERROR(put(at, made.data(), made.size()));
    } else {
      FPX_RETURN_IF_ERROR(put(at, e.data.data(), e.data.size()));
    }
    at += e.size;
  }
  out->written_max_ = head.size();
  return out;
}

absl::Status SafetensorsWriter::PlacedFile::Write(absl::string_view name,
                                                  absl::Span<const uint8_t> bytes) {
  auto it = places_.find(name);
  if (it == places_.end()) {
    return absl::InternalError(absl::StrCat("safetensors writer: '", name, "' is not reserved"));
  }
  Place& p = it->second;
  if (p.written || bytes.size() != p.size) {
    return absl::InternalError(absl::StrCat("safetensors writer: '", name, "' written ",
                                            p.written ? "twice" : "with the wrong size", " (",
                                            bytes.size(), " bytes, reserved ", p.size, ")"));
  }
  FPX_RETURN_IF_ERROR(
      PwriteAll(file_.fd(), bytes.data(), bytes.size(), p.offset, file_.temp_path()));
  p.written = true;
  written_max_ = std::max(written_max_, p.offset + p.size);
  return absl::OkStatus();
}

void SafetensorsWriter::PlacedFile::StartWriteback() {
  // Only a hint: the writes are made durable by Commit's fsync whatever happens here. The whole
  // range written so far is handed over (the kernel skips clean pages).
  if (written_max_ > flushed_) {
    ::sync_file_range(file_.fd(), 0, static_cast<off64_t>(written_max_), SYNC_FILE_RANGE_WRITE);
    flushed_ = written_max_;
  }
}

absl::Status SafetensorsWriter::PlacedFile::Commit(std::string* sha256_hex) {
  for (const auto& [name, p] : places_) {
    if (!p.written) {
      return absl::InternalError(
          absl::StrCat("safetensors writer: reserved tensor '", name, "' was never written"));
    }
  }
  ::sync_file_range(file_.fd(), 0, 0, SYNC_FILE_RANGE_WRITE);  // the disk works while we hash
  if (sha256_hex) {
    UniqueFd in(::open(file_.temp_path().c_str(), O_RDONLY | O_CLOEXEC));
    if (in.get() < 0) return ErrnoToStatus(errno, "cannot read back", file_.temp_path());
    Sha256 hash;
    std::vector<uint8_t> buf(size_t{4} << 20);
    for (uint64_t at = 0; at < size_;) {
      const ssize_t n = ::pread(in.get(), buf.data(),
                                static_cast<size_t>(std::min<uint64_t>(buf.size(), size_ - at)),
                                static_cast<off_t>(at));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return ErrnoToStatus(n < 0 ? errno : EIO, "cannot read back", file_.temp_path());
      hash.Update(absl::MakeConstSpan(buf.data(), static_cast<size_t>(n)));
      at += static_cast<uint64_t>(n);
    }
    *sha256_hex = hash.HexDigest();
  }
  return file_.Commit();
}

absl::Status SafetensorsWriter::AddOwned(absl::string_view name, DType dtype,
                                         std::vector<int64_t> shape, std::vector<uint8_t> data) {
  auto owned = std::make_shared<std::vector<uint8_t>>(std::move(data));
  FPX_RETURN_IF_ERROR(Add(name, dtype, std::move(shape), absl::MakeConstSpan(*owned)));
  entries_.back().owned = std::move(owned);
  return absl::OkStatus();
}

std::string SafetensorsWriter::HeaderJson() const {
  JsonWriter w;
  w.BeginObject();
  if (!metadata_.empty()) {
    w.Key("__metadata__").BeginObject();
    for (const auto& [k, v] : metadata_) w.Key(k).String(v);
    w.EndObject();
  }
  uint64_t offset = 0;
  for (const Entry& e : entries_) {
    w.Key(e.name).BeginObject();
    w.Key("dtype").String(e.dtype == DType::kOther ? absl::string_view(e.other_dtype_name)
                                                   : DTypeName(e.dtype));
    w.Key("shape").BeginArray();
    for (int64_t d : e.shape) w.Int(d);
    w.EndArray();
    w.Key("data_offsets").BeginArray().Int(static_cast<int64_t>(offset));
    offset += e.size;
    w.Int(static_cast<int64_t>(offset)).EndArray();
    w.EndObject();
  }
  w.EndObject();
  return w.str();
}

std::string SafetensorsWriter::PaddedHeader() const {
  std::string h = HeaderJson();
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');
  return h;
}

uint64_t SafetensorsWriter::FileSize() const {
  uint64_t n = 8 + PaddedHeader().size();
  for (const Entry& e : entries_) n += e.size;
  return n;
}

std::vector<uint8_t> SafetensorsWriter::Serialize() const {
  if (!CheckNoReserved().ok()) return {};
  const std::string h = PaddedHeader();
  size_t total = 8 + h.size();
  for (const Entry& e : entries_) total += e.size;
  std::vector<uint8_t> out;
  out.reserve(total);
  const uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(n >> (8 * i)));  // little-endian
  out.insert(out.end(), h.begin(), h.end());
  for (const Entry& e : entries_) {
    if (e.produce) {
      absl::StatusOr<std::vector<uint8_t>> made = e.produce();
      if (made.ok() && made->size() == e.size) out.insert(out.end(), made->begin(), made->end());
      continue;
    }
    out.insert(out.end(), e.data.begin(), e.data.end());
  }
  return out;
}


absl::Status SafetensorsWriter::WriteFile(
    const std::string& path, std::string* sha256_hex,
    const std::function<void(absl::Span<const uint8_t>)>& written) const {
  FPX_RETURN_IF_ERROR(CheckNoReserved());
  FPX_ASSIGN_OR_RETURN(AtomicFile f, AtomicFile::Create(path));
  const std::string h = PaddedHeader();
  const uint64_t n = h.size();
  uint8_t len[8];
  std::memcpy(len, &n, 8);
  Sha256 hash;
  // Hashes each piece just before writing it, while it is in cache.
  auto put = [&](const uint8_t* p, size_t size) {
    if (sha256_hex) hash.Update(absl::MakeConstSpan(p, size));
    return f.Write(p, size);
  };
  FPX_RETURN_IF_ERROR(put(len, 8));
  FPX_RETURN_IF_ERROR(put(reinterpret_cast<const uint8_t*>(h.data()), h.size()));
  for (const Entry& e : entries_) {
    if (e.produce) {
      FPX_ASSIGN_OR_RETURN(std::vector<uint8_t> made, e.produce());
      if (made.size() != e.size) {
        return absl::InternalError(absl::StrCat("safetensors writer: tensor '", e.name, "' made ",
                                                made.size(), " bytes, not ", e.size));
      }
      FPX_RETURN_IF_ERROR(put(made.data(), made.size()));
      continue;
    }
    FPX_RETURN_IF_ERROR(put(e.data.data(), e.data.size()));
    if (written) written(e.data);
  }
  FPX_RETURN_IF_ERROR(f.Commit());
  if (sha256_hex) *sha256_hex = hash.HexDigest();
  return absl::OkStatus();
}

}  // namespace fpxint::core
