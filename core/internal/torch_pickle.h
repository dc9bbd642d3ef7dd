// File: core/internal/torch_pickle.h
//
// The unpickler of core/torch_state_dict.h: a stack machine over the pickle opcodes a state dict
// needs, which builds plain values, storages and tensor records and refuses every global it does
// not know. Internal to core.
#ifndef FPXINT_CORE_INTERNAL_TORCH_PICKLE_H_
#define FPXINT_CORE_INTERNAL_TORCH_PICKLE_H_

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "core/dtype.h"
#include "core/internal/torch_zip.h"
#include "core/status_macros.h"
#include "core/torch_state_dict.h"

namespace fpxint::core::internal {

struct Value;
using Items = std::vector<Value>;
using Pairs = std::vector<std::pair<Value, Value>>;

struct Value {
  enum Kind : uint8_t { kNone, kBool, kInt, kFloat, kString, kTuple, kList, kDict, kGlobal,
                        kStorage, kTensor };
  Kind kind = kNone;
  int64_t i = 0;  // kBool, kInt; index into storages (kStorage) or tensors (kTensor)
  double f = 0;
  std::shared_ptr<const std::string> s;  // kString, kGlobal ("module.name")
  std::shared_ptr<Items> items;          // kTuple, kList
  std::shared_ptr<Pairs> pairs;          // kDict

  static Value Int(int64_t v) { Value x; x.kind = kInt; x.i = v; return x; }
  static Value Str(std::string v, Kind k = kString) {
    Value x;
    x.kind = k;
    x.s = std::make_shared<const std::string>(std::move(v));
    return x;
  }
  static Value Seq(Kind k, Items v = {}) {
    Value x;
    x.kind = k;
    x.items = std::make_shared<Items>(std::move(v));
    return x;
  }
  static Value Dict() { Value x; x.kind = kDict; x.pairs = std::make_shared<Pairs>(); return x; }
};

inline const char* KindName(Value::Kind k) {
  switch (k) {
    case Value::kNone: return "None";
    case Value::kBool: return "bool";
    case Value::kInt: return "int";
    case Value::kFloat: return "float";
    case Value::kString: return "str";
    case Value::kTuple: return "tuple";
    case Value::kList: return "list";
    case Value::kDict: return "dict";
    case Value::kGlobal: return "global";
    case Value::kStorage: return "storage";
    case Value::kTensor: return "tensor";
  }
  return "?";
}

struct StorageRec {
  std::string key;  // the name of its entry under data/
  DType dtype;
  absl::Span<const uint8_t> bytes;
  int64_t numel;
};

struct TensorRec {
  int storage;
  int64_t offset;
  std::vector<int64_t> shape, stride;
  uint64_t numel = 0;  // the product of shape, checked (at most the storage's, or a broadcast)
};

inline bool StorageDType(absl::string_view cls, DType* out) {
  static const std::pair<const char*, DType> kTypes[] = {
      {"torch.FloatStorage", DType::kF32},  {"torch.DoubleStorage", DType::kF64},
      {"torch.HalfStorage", DType::kF16},   {"torch.BFloat16Storage", DType::kBF16},
      {"torch.LongStorage", DType::kI64},   {"torch.IntStorage", DType::kI32},
      {"torch.ShortStorage", DType::kI16},  {"torch.CharStorage", DType::kI8},
      {"torch.ByteStorage", DType::kU8},    {"torch.BoolStorage", DType::kBool}};
  for (const auto& [name, dt] : kTypes) {
    if (cls == name) {
      *out = dt;
      return true;
    }
  }
  return false;
}

// A stack machine over the pickle opcodes a state dict needs; see the header for what it accepts.
class Unpickler {
 public:
  Unpickler(absl::Span<const uint8_t> p, const std::string& prefix,
            const absl::flat_hash_map<std::string, const ZipEntry*>& entries,
            const StateDictLimits& limits)
      : p_(p), prefix_(prefix), entries_(entries), limits_(limits) {}
  // A hostile pickle can put a list into itself (APPEND of its own memo entry); emptying every
  // container breaks such cycles so their shared_ptrs are freed.
  ~Unpickler() {
    for (const std::shared_ptr<Items>& c : seqs_) c->clear();
    for (const std::shared_ptr<Pairs>& c : dicts_) c->clear();
  }

  absl::StatusOr<Value> Run();

  std::vector<StorageRec> storages;
  std::vector<TensorRec> tensors;

 private:
  absl::Status Err(absl::string_view what) const {
    return Bad(absl::StrCat("data.pkl at byte ", op_at_, ": ", what));
  }
  bool Need(uint64_t k) const { return p_.size() - at_ >= k; }
  absl::StatusOr<Value> Pop() {
    if (stack_.size() <= Floor()) return Err("stack underflow");
    Value v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  size_t Floor() const { return marks_.empty() ? 0 : marks_.back(); }
  absl::StatusOr<Items> PopToMark() {
    if (marks_.empty()) return Err("no MARK to pop to");
    const size_t m = marks_.back();
    marks_.pop_back();
    Items v(std::make_move_iterator(stack_.begin() + m), std::make_move_iterator(stack_.end()));
    stack_.resize(m);
    return v;
  }
  absl::StatusOr<Value*> Top() {
    if (stack_.size() <= Floor()) return Err("stack underflow");
    return &stack_.back();
  }
  absl::StatusOr<std::string> Line() {
    const uint8_t* nl = static_cast<const uint8_t*>(std::memchr(p_.data() + at_, '\n', p_.size() - at_));
    if (nl == nullptr) return Err("unterminated GLOBAL line");
    std::string s(reinterpret_cast<const char*>(p_.data() + at_), nl - (p_.data() + at_));
    at_ = nl - p_.data() + 1;
    return s;
  }
  absl::StatusOr<Value> ReadString(uint64_t len) {
    if (!Need(len)) return Err("string runs past the end");
    Value v = Value::Str(std::string(reinterpret_cast<const char*>(p_.data() + at_), len));
    at_ += len;
    return v;
  }
  // (The memo and the containers grow by at most one entry per opcode byte.)
  absl::Status Memo(uint64_t key) {
    FPX_ASSIGN_OR_RETURN(Value * v, Top());
    memo_[key] = *v;
    return absl::OkStatus();
  }
  absl::Status Get(uint64_t key) {
    auto it = memo_.find(key);
    if (it == memo_.end()) return Err(absl::StrCat("memo key ", key, " was never stored"));
    stack_.push_back(it->second);
    return absl::OkStatus();
  }
  absl::StatusOr<Value> Global(std::string module, std::string name) {
    const std::string full = absl::StrCat(module, ".", name);
    DType dt;
    if (full == "collections.OrderedDict" || full == "torch._utils._rebuild_tensor_v2" ||
        full == "torch._utils._rebuild_parameter" ||
        full == "torch._utils._rebuild_parameter_with_state" || StorageDType(full, &dt)) {
      return Value::Str(full, Value::kGlobal);
    }
    return Err(absl::StrCat("refused global '", full,
                            "' (a state dict holds tensors, storages, OrderedDicts and plain "
                            "containers only; anything else could run code)"));
  }
  absl::StatusOr<Value> Reduce(const Value& fn, const Value& args);
  absl::StatusOr<Value> PersistentLoad(const Value& pid);
  absl::Status SetItems(Value* dict, Items kv);

  Value Seq(Value::Kind k, Items v = {}) {
    Value x = Value::Seq(k, std::move(v));
    seqs_.push_back(x.items);
    return x;
  }
  Value Dict() {
    Value x = Value::Dict();
    dicts_.push_back(x.pairs);
    return x;
  }

  absl::Span<const uint8_t> p_;
  const std::string& prefix_;
  const absl::flat_hash_map<std::string, const ZipEntry*>& entries_;
  const StateDictLimits& limits_;
  uint64_t at_ = 0, op_at_ = 0;
  std::vector<Value> stack_;
  std::vector<size_t> marks_;
  absl::flat_hash_map<uint64_t, Value> memo_;
  absl::flat_hash_map<std::string, int> storage_by_key_;
  std::vector<std::shared_ptr<Items>> seqs_;
  std::vector<std::shared_ptr<Pairs>> dicts_;
};

}  // namespace fpxint::core::internal

#endif  // FPXINT_CORE_INTERNAL_TORCH_PICKLE_H_
