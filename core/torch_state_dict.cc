// File: core/torch_state_dict.cc
//
// The tensor collector and the public API; the zip reader is core/internal/torch_zip.h, the
// unpickler core/internal/torch_pickle.h.
#include "core/torch_state_dict.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/internal/torch_pickle.h"
#include "core/internal/torch_zip.h"
#include "core/mapped_file.h"
#include "core/safetensors.h"
#include "core/status_macros.h"

namespace fpxint::core {
namespace {

using internal::Bad;
using internal::Items;
using internal::KindName;
using internal::Pairs;
using internal::NotStored;
using internal::ReadZip;
using internal::StorageRec;
using internal::TensorRec;
using internal::Unpickler;
using internal::Value;
using internal::ZipEntry;

// a * b, or UINT64_MAX when that overflows.
uint64_t SaturatingMul(uint64_t a, uint64_t b) {
  return b != 0 && a > UINT64_MAX / b ? UINT64_MAX : a * b;
}
uint64_t SaturatingAdd(uint64_t a, uint64_t b) { return a > UINT64_MAX - b ? UINT64_MAX : a + b; }

// A tensor's name for an error message: long ones (up to 4 KiB) are cut.
std::string Shown(const std::string& name) {
  constexpr size_t kShown = 120;
  if (name.size() <= kShown) return name;
  return absl::StrCat(name.substr(0, kShown), "... (", name.size(), " bytes)");
}

// Walks the unpickled value and names every tensor.
class Collector {
 public:
  Collector(const Unpickler& u, const StateDictLimits& limits,
            std::vector<StateDictTensor>* out, int64_t* skipped)
      : u_(u), limits_(limits), out_(out), skipped_(skipped),
        tensors_per_storage_(u.storages.size(), 0) {
    for (const StorageRec& s : u.storages) storage_bytes_ += s.bytes.size();
    tensor_bytes_budget_ =
        SaturatingAdd(SaturatingMul(limits.max_alias_factor, storage_bytes_),
                      limits.max_broadcast_bytes);
  }

  uint64_t storage_bytes() const { return storage_bytes_; }
  uint64_t total_bytes() const { return total_bytes_; }

  absl::Status Walk(const Value& v, const std::string& name, int depth) {
    if (name.size() > limits_.max_name_bytes) {
      return Bad(absl::StrCat("a tensor name longer than ", limits_.max_name_bytes, " bytes"));
    }
    if (++visits_ > limits_.max_visits) {
      return Bad(absl::StrCat("more than ", limits_.max_visits, " values (shared containers?)"));
    }
    FPX_RETURN_IF_ERROR(ChargeWalk(name.size()));
    if (depth > limits_.max_depth) {
      return Bad(absl::StrCat("containers nested deeper than ", limits_.max_depth));
    }
    auto child = [&](const std::string& key) { return name.empty() ? key : absl::StrCat(name, ".", key); };
    switch (v.kind) {
      case Value::kTensor: {
        const TensorRec& t = u_.tensors[static_cast<size_t>(v.i)];
        const StorageRec& s = u_.storages[static_cast<size_t>(t.storage)];
        const std::string n = name.empty() ? "tensor" : name;
        if (!names_.insert(n).second) return Bad(absl::StrCat("two tensors are named '", n, "'"));
        // Every reference to a tensor becomes a tensor of its own: bound them all together.
        auto refuse = [&](absl::string_view what) {
          return Bad(absl::StrCat("tensor '", Shown(n), "': ", what));
        };
        if (out_->size() >= limits_.max_tensors) {
          return refuse(absl::StrCat("more than ", limits_.max_tensors, " tensors (the limit)"));
        }
        if (++tensors_per_storage_[static_cast<size_t>(t.storage)] >
            limits_.max_tensors_per_storage) {
          return refuse(absl::StrCat(
              "storage '", s.key, "' is used by more than ", limits_.max_tensors_per_storage,
              " tensors (the limit: tied weights share a storage a few times; save tensors that "
              "are meant to be distinct with .clone())"));
        }
        name_bytes_ += n.size();
        if (name_bytes_ > limits_.max_name_total_bytes) {
          return refuse(absl::StrCat("the names of the tensors take more than ",
                                     limits_.max_name_total_bytes, " bytes (the limit)"));
        }
        // (A view's bytes are checked at unpickling: within its storage, or a broadcast view of
        // at most max_broadcast_bytes; neither overflows, nor does this sum below the limits.)
        total_bytes_ += static_cast<uint64_t>(t.numel) * DTypeSize(s.dtype);
        if (total_bytes_ > tensor_bytes_budget_) {
          return refuse(absl::StrCat(
              total_bytes_, " bytes of tensors in all, more than ", limits_.max_alias_factor,
              " x the ", storage_bytes_, " bytes of storages in the file + ",
              limits_.max_broadcast_bytes, " (the limit on tensors that repeat their storages' "
              "elements: stride-0 views, or one tensor under several names)"));
        }
        if (total_bytes_ > limits_.max_total_bytes) {
          return refuse(absl::StrCat("more than ", limits_.max_total_bytes,
                                     " bytes of tensors in all (the limit)"));
        }
        out_->push_back(StateDictTensor{n, s.dtype, t.shape, t.stride, t.offset, s.bytes});
        return absl::OkStatus();
      }
      case Value::kDict: {
        // As in Python, a key set twice keeps its last value.
        std::vector<std::string> keys;
        keys.reserve(v.pairs->size());
        absl::flat_hash_map<absl::string_view, size_t> last;
        for (const auto& [k, x] : *v.pairs) {
          if (k.kind == Value::kString) keys.push_back(*k.s);
          else if (k.kind == Value::kInt) keys.push_back(absl::StrCat(k.i));
          else return Bad(absl::StrCat("a dict key of type ", KindName(k.kind), " under '", name, "'"));
          FPX_RETURN_IF_ERROR(ChargeWalk(keys.back().size()));
        }
        for (size_t i = 0; i < keys.size(); ++i) last[keys[i]] = i;
        for (size_t i = 0; i < keys.size(); ++i) {
          if (last[keys[i]] != i) continue;
          FPX_RETURN_IF_ERROR(Walk((*v.pairs)[i].second, child(keys[i]), depth + 1));
        }
        return absl::OkStatus();
      }
      case Value::kList:
      case Value::kTuple:
        for (size_t k = 0; k < v.items->size(); ++k) {
          FPX_RETURN_IF_ERROR(Walk((*v.items)[k], child(absl::StrCat(k)), depth + 1));
        }
        return absl::OkStatus();
      default:
        ++*skipped_;
        return absl::OkStatus();
    }
  }

 private:
  // Each value walked builds its name, and each dict walked copies and hashes its keys: shared
  // containers under long keys would make that quadratic, so it is bounded in bytes.
  absl::Status ChargeWalk(uint64_t bytes) {
    walk_bytes_ += bytes;
    if (walk_bytes_ <= limits_.max_walk_bytes) return absl::OkStatus();
    return Bad(absl::StrCat("walking the values builds more than ", limits_.max_walk_bytes,
                            " bytes of names and keys (the limit; containers shared under long "
                            "keys?)"));
  }

  const Unpickler& u_;
  const StateDictLimits& limits_;
  std::vector<StateDictTensor>* out_;
  int64_t* skipped_;
  uint64_t visits_ = 0;
  uint64_t walk_bytes_ = 0;
  std::vector<uint64_t> tensors_per_storage_;
  uint64_t name_bytes_ = 0;
  uint64_t storage_bytes_ = 0;
  uint64_t tensor_bytes_budget_ = 0;
  uint64_t total_bytes_ = 0;
  absl::flat_hash_set<std::string> names_;
};

}  // namespace

int64_t StateDictTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

bool StateDictTensor::contiguous() const {
  int64_t expect = 1;
  for (size_t d = shape.size(); d-- > 0;) {
    if (shape[d] != 1 && stride[d] != expect) return false;
    expect *= shape[d];
  }
  return true;
}

void StateDictTensor::CopyTo(uint8_t* dst) const {
  const size_t item = DTypeSize(dtype);
  const int64_t n = numel();
  if (n == 0) return;
  if (contiguous()) {
    std::memcpy(dst, storage.data() + offset * item, static_cast<size_t>(n) * item);
    return;
  }
  // Odometer over the index, innermost dimension in a loop.
  const size_t rank = shape.size();
  std::vector<int64_t> idx(rank, 0);
  const int64_t inner = shape[rank - 1], inner_stride = stride[rank - 1];
  for (int64_t done = 0; done < n; done += inner) {
    int64_t base = offset;
    for (size_t d = 0; d + 1 < rank; ++d) base += idx[d] * stride[d];
    for (int64_t k = 0; k < inner; ++k) {
      std::memcpy(dst, storage.data() + (base + k * inner_stride) * item, item);
      dst += item;
    }
    for (size_t d = rank - 1; d-- > 0;) {
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
    }
  }
}

bool LooksLikeZip(absl::Span<const uint8_t> bytes) {
  return bytes.size() >= 4 && bytes[0] == 'P' && bytes[1] == 'K' && bytes[2] == 3 && bytes[3] == 4;
}

TorchStateDict::~TorchStateDict() = default;

absl::StatusOr<std::unique_ptr<TorchStateDict>> TorchStateDict::Open(const std::string& path,
                                                                     const StateDictLimits& limits) {
  std::unique_ptr<TorchStateDict> sd(new TorchStateDict);
  FPX_ASSIGN_OR_RETURN(sd->map_, MappedFile::Open(path));
  sd->bytes_ = sd->map_->bytes();
  if (absl::Status s = sd->Parse(limits); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  }
  return sd;
}

absl::StatusOr<std::unique_ptr<TorchStateDict>> TorchStateDict::FromBuffer(
    absl::Span<const uint8_t> bytes, const StateDictLimits& limits) {
  std::unique_ptr<TorchStateDict> sd(new TorchStateDict);
  sd->bytes_ = bytes;
  FPX_RETURN_IF_ERROR(sd->Parse(limits));
  return sd;
}

absl::Status TorchStateDict::Parse(const StateDictLimits& limits) {
  if (!LooksLikeZip(bytes_)) {
    if (bytes_.size() >= 3 && bytes_[0] == 0x80 && bytes_[1] == 0x02 && bytes_[2] == 0x8a) {
      return Bad("the legacy (pre-1.6) torch.save format; save again with a current PyTorch "
                 "(torch.save(obj, f)) or convert to safetensors");
    }
    return Bad("not a zip archive");
  }
  FPX_ASSIGN_OR_RETURN(std::vector<ZipEntry> zip, ReadZip(bytes_, limits));
  absl::flat_hash_map<std::string, const ZipEntry*> entries;
  std::string prefix;
  int pickles = 0;
  for (const ZipEntry& e : zip) {
    entries[e.name] = &e;
    // "<archive>/data.pkl", one directory deep.
    if (absl::EndsWith(e.name, "/data.pkl") && e.name.find('/') == e.name.size() - 9) {
      prefix = e.name.substr(0, e.name.size() - 8);
      ++pickles;
    }
  }
  for (const ZipEntry& e : zip) {
    if (absl::EndsWith(e.name, "/constants.pkl") || absl::StrContains(e.name, "/code/")) {
      return Bad("this is a TorchScript archive (torch.jit.save), not a torch.save state dict");
    }
  }
  if (pickles != 1) {
    return Bad(pickles == 0 ? "no <archive>/data.pkl entry" : "more than one <archive>/data.pkl");
  }
  if (auto bo = entries.find(prefix + "byteorder"); bo != entries.end()) {
    if (!bo->second->stored) return NotStored(bo->second->name);
    const absl::string_view order(reinterpret_cast<const char*>(bo->second->data.data()),
                                  bo->second->data.size());
    if (order != "little") return Bad(absl::StrCat("byte order '", order, "'; only little-endian"));
  }
  const ZipEntry& pkl_entry = *entries[prefix + "data.pkl"];
  if (!pkl_entry.stored) return NotStored(pkl_entry.name);
  const absl::Span<const uint8_t> pkl = pkl_entry.data;
  if (pkl.size() > limits.max_pickle_bytes) {
    return Bad(absl::StrCat("data.pkl is ", pkl.size(), " bytes (the limit is ",
                            limits.max_pickle_bytes, ")"));
  }
  Unpickler u(pkl, prefix, entries, limits);
  FPX_ASSIGN_OR_RETURN(Value root, u.Run());
  Collector c(u, limits, &tensors_, &skipped_);
  FPX_RETURN_IF_ERROR(c.Walk(root, "", 0));
  if (tensors_.empty()) return Bad("no tensors in it");
  total_tensor_bytes_ = c.total_bytes();
  storage_bytes_ = c.storage_bytes();
  return absl::OkStatus();
}

absl::Status TorchStateDict::WriteSafetensors(const std::string& path) const {
  SafetensorsWriter w;
  w.SetMetadata("converted_from", "torch.save");
  for (const StateDictTensor& t : tensors_) {
    const size_t bytes = static_cast<size_t>(t.numel()) * DTypeSize(t.dtype);
    if (bytes == 0) {  // (an empty view's offset is not checked against its storage)
      FPX_RETURN_IF_ERROR(w.Add(t.name, t.dtype, t.shape, {}));
    } else if (t.contiguous()) {
      FPX_RETURN_IF_ERROR(
          w.Add(t.name, t.dtype, t.shape, t.storage.subspan(t.offset * DTypeSize(t.dtype), bytes)));
    } else {
      std::vector<uint8_t> copy(bytes);
      t.CopyTo(copy.data());
      FPX_RETURN_IF_ERROR(w.AddOwned(t.name, t.dtype, t.shape, std::move(copy)));
    }
  }
  return w.WriteFile(path);
}

}  // namespace fpxint::core
