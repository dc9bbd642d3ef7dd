#include "core/torch_state_dict.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/mapped_file.h"
#include "core/safetensors.h"
#include "core/status_macros.h"

namespace fpxint::core {
namespace {

absl::Status Bad(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("not a readable torch.save file: ", what));
}

uint16_t Le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t Le32(const uint8_t* p) {
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
}
uint64_t Le64(const uint8_t* p) { return uint64_t{Le32(p)} | (uint64_t{Le32(p + 4)} << 32); }

// ---- zip ---------------------------------------------------------------------------------------

struct ZipEntry {
  std::string name;
  absl::Span<const uint8_t> data;  // the stored bytes (compressed ones when !stored)
  bool stored = true;
};

absl::Status NotStored(absl::string_view name) {
  return Bad(absl::StrCat("'", name, "' is compressed; torch.save writes stored entries only"));
}

// The central directory's entries, each resolved to its bytes; sizes and offsets from Zip64
// extra fields when present. Only stored entries (method 0, all torch.save writes) are usable.
absl::StatusOr<std::vector<ZipEntry>> ReadZip(absl::Span<const uint8_t> f,
                                              const StateDictLimits& limits) {
  const uint64_t n = f.size();
  if (n < 22) return Bad("shorter than a zip end record");
  // End of central directory: 22 bytes plus a comment of at most 65535.
  uint64_t eocd = n;  // not found
  const uint64_t lowest = n > 22 + 65535 ? n - 22 - 65535 : 0;
  for (uint64_t at = n - 22 + 1; at-- > lowest;) {
    if (Le32(f.data() + at) == 0x06054b50 && at + 22 + Le16(f.data() + at + 20) == n) {
      eocd = at;
      break;
    }
  }
  if (eocd == n) return Bad("no zip end-of-central-directory record");
  const uint8_t* e = f.data() + eocd;
  uint64_t entries = Le16(e + 10);
  uint64_t cd_size = Le32(e + 12);
  uint64_t cd_off = Le32(e + 16);
  if (Le16(e + 4) != 0 && Le16(e + 4) != 0xFFFF) return Bad("multi-disk zip archives");
  if (entries == 0xFFFF || cd_size == 0xFFFFFFFFu || cd_off == 0xFFFFFFFFu) {
    // Zip64: a locator right before the end record points at the Zip64 end record.
    if (eocd < 20 || Le32(e - 20) != 0x07064b50) return Bad("Zip64 locator missing");
    const uint64_t z = Le64(e - 20 + 8);
    if (z > eocd || eocd - z < 56 || Le32(f.data() + z) != 0x06064b50) {
      return Bad("Zip64 end record out of bounds");
    }
    entries = Le64(f.data() + z + 32);
    cd_size = Le64(f.data() + z + 40);
    cd_off = Le64(f.data() + z + 48);
  }
  if (entries > limits.max_entries) {
    return Bad(absl::StrCat(entries, " zip entries (the limit is ", limits.max_entries, ")"));
  }
  if (cd_off > n || cd_size > n - cd_off) return Bad("central directory out of bounds");
  std::vector<ZipEntry> out;
  out.reserve(static_cast<size_t>(std::min<uint64_t>(entries, cd_size / 46)));
  uint64_t at = cd_off;
  const uint64_t cd_end = cd_off + cd_size;
  for (uint64_t i = 0; i < entries; ++i) {
    if (cd_end - at < 46 || Le32(f.data() + at) != 0x02014b50) {
      return Bad(absl::StrCat("central directory entry ", i, " malformed"));
    }
    const uint8_t* c = f.data() + at;
    const uint16_t flags = Le16(c + 8), method = Le16(c + 10);
    uint64_t csize = Le32(c + 20), usize = Le32(c + 24);
    const uint64_t name_len = Le16(c + 28), extra_len = Le16(c + 30), comment_len = Le16(c + 32);
    uint64_t local = Le32(c + 42);
    if (cd_end - at - 46 < name_len + extra_len + comment_len) {
      return Bad(absl::StrCat("central directory entry ", i, " overruns the directory"));
    }
    std::string name(reinterpret_cast<const char*>(c + 46), name_len);
    // Zip64 extended information: the 0xFFFFFFFF fields, in this order.
    const uint8_t* x = c + 46 + name_len;
    for (uint64_t xo = 0; xo + 4 <= extra_len;) {
      const uint16_t id = Le16(x + xo), len = Le16(x + xo + 2);
      if (xo + 4 + len > extra_len) return Bad(absl::StrCat("'", name, "': bad extra field"));
      if (id == 0x0001) {
        const uint8_t* z = x + xo + 4;
        uint64_t used = 0;
        for (uint64_t* field : {&usize, &csize, &local}) {
          if (*field != 0xFFFFFFFFu) continue;
          if (used + 8 > len) return Bad(absl::StrCat("'", name, "': short Zip64 field"));
          *field = Le64(z + used);
          used += 8;
        }
      }
      xo += 4 + len;
    }
    if (flags & 1) return Bad(absl::StrCat("'", name, "' is encrypted"));
    const bool stored = method == 0 && csize == usize;
    if (local > n || n - local < 30 || Le32(f.data() + local) != 0x04034b50) {
      return Bad(absl::StrCat("'", name, "': local header out of bounds"));
    }
    const uint64_t begin = local + 30 + Le16(f.data() + local + 26) + Le16(f.data() + local + 28);
    if (begin > n || csize > n - begin) {
      return Bad(absl::StrCat("'", name, "': data out of bounds"));
    }
    out.push_back({std::move(name), f.subspan(begin, csize), stored});
    at += 46 + name_len + extra_len + comment_len;
  }
  // No two entries may share bytes (torch.save writes them one after the other): the storages'
  // bytes then add up to at most the file's size, and they bound the tensors (Collector).
  std::vector<const ZipEntry*> by_begin;
  by_begin.reserve(out.size());
  for (const ZipEntry& z : out) {
    if (!z.data.empty()) by_begin.push_back(&z);
  }
  std::sort(by_begin.begin(), by_begin.end(), [](const ZipEntry* a, const ZipEntry* b) {
    return a->data.data() < b->data.data();
  });
  for (size_t i = 1; i < by_begin.size(); ++i) {
    const ZipEntry& prev = *by_begin[i - 1];
    if (by_begin[i]->data.data() < prev.data.data() + prev.data.size()) {
      return Bad(absl::StrCat("'", by_begin[i]->name, "': its bytes overlap those of '", prev.name,
                              "' (zip entries may not share bytes)"));
    }
  }
  return out;
}

// ---- pickle values -----------------------------------------------------------------------------

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

const char* KindName(Value::Kind k) {
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

bool StorageDType(absl::string_view cls, DType* out) {
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

absl::Status Unpickler::SetItems(Value* dict, Items kv) {
  if (dict->kind != Value::kDict) {
    return Err(absl::StrCat("SETITEM(S) on a ", KindName(dict->kind)));
  }
  if (kv.size() % 2 != 0) return Err("SETITEMS with an odd number of values");
  for (size_t k = 0; k < kv.size(); k += 2) {
    dict->pairs->emplace_back(std::move(kv[k]), std::move(kv[k + 1]));
  }
  return absl::OkStatus();
}

absl::StatusOr<Value> Unpickler::PersistentLoad(const Value& pid) {
  // ('storage', torch.<T>Storage, key, location, numel)
  if (pid.kind != Value::kTuple || pid.items->size() != 5 || (*pid.items)[0].kind != Value::kString ||
      *(*pid.items)[0].s != "storage") {
    return Err("a persistent id that is not ('storage', type, key, location, numel)");
  }
  const Items& t = *pid.items;
  DType dt;
  if (t[1].kind != Value::kGlobal || !StorageDType(*t[1].s, &dt)) {
    return Err("storage type is not a torch.<T>Storage class");
  }
  if (t[2].kind != Value::kString || t[4].kind != Value::kInt || t[4].i < 0) {
    return Err("storage key must be a string and numel a non-negative int");
  }
  const std::string& key = *t[2].s;
  if (auto it = storage_by_key_.find(key); it != storage_by_key_.end()) {
    if (storages[it->second].dtype != dt) return Err(absl::StrCat("storage '", key, "' retyped"));
    Value v;
    v.kind = Value::kStorage;
    v.i = it->second;
    return v;
  }
  auto e = entries_.find(absl::StrCat(prefix_, "data/", key));
  if (e == entries_.end()) return Err(absl::StrCat("storage '", key, "' has no data/", key, " entry"));
  if (!e->second->stored) return NotStored(e->second->name);
  const absl::Span<const uint8_t> bytes = e->second->data;
  const uint64_t item = DTypeSize(dt);
  const uint64_t numel = static_cast<uint64_t>(t[4].i);
  if (numel > bytes.size() / item) {
    return Err(absl::StrCat("storage '", key, "' claims ", numel, " elements of ", item,
                            " bytes but its entry holds ", bytes.size(), " bytes"));
  }
  storages.push_back({key, dt, bytes.subspan(0, numel * item), static_cast<int64_t>(numel)});
  storage_by_key_[key] = static_cast<int>(storages.size() - 1);
  Value v;
  v.kind = Value::kStorage;
  v.i = static_cast<int64_t>(storages.size() - 1);
  return v;
}

absl::StatusOr<Value> Unpickler::Reduce(const Value& fn, const Value& args) {
  if (fn.kind != Value::kGlobal) return Err(absl::StrCat("REDUCE calls a ", KindName(fn.kind)));
  if (args.kind != Value::kTuple) return Err("REDUCE arguments are not a tuple");
  const std::string& f = *fn.s;
  const Items& a = *args.items;
  if (f == "collections.OrderedDict") {
    if (!a.empty()) return Err("OrderedDict(...) with arguments");
    return Dict();
  }
  if (f == "torch._utils._rebuild_parameter" || f == "torch._utils._rebuild_parameter_with_state") {
    if (a.size() < 3 || a[0].kind != Value::kTensor) return Err("_rebuild_parameter without a tensor");
    return a[0];
  }
  if (f == "torch._utils._rebuild_tensor_v2") {
    // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
    if (a.size() < 6 || a.size() > 7 || a[0].kind != Value::kStorage || a[1].kind != Value::kInt ||
        a[2].kind != Value::kTuple || a[3].kind != Value::kTuple) {
      return Err("_rebuild_tensor_v2 arguments are not (storage, offset, size, stride, ...)");
    }
    const StorageRec& st = storages[static_cast<size_t>(a[0].i)];
    TensorRec t;
    t.storage = static_cast<int>(a[0].i);
    t.offset = a[1].i;
    if (a[2].items->size() != a[3].items->size()) return Err("tensor size and stride differ in rank");
    if (a[2].items->size() > static_cast<size_t>(limits_.max_rank)) {
      return Err(absl::StrCat("tensor rank ", a[2].items->size(), " (the limit is ",
                              limits_.max_rank, ")"));
    }
    for (size_t d = 0; d < a[2].items->size(); ++d) {
      const Value& sz = (*a[2].items)[d];
      const Value& sd = (*a[3].items)[d];
      if (sz.kind != Value::kInt || sd.kind != Value::kInt || sz.i < 0 || sd.i < 0) {
        return Err("tensor sizes and strides must be non-negative ints");
      }
      t.shape.push_back(sz.i);
      t.stride.push_back(sd.i);
    }
    if (t.offset < 0) return Err("negative storage offset");
    // The highest element the view touches must lie inside the storage (overflow-checked).
    bool empty = false;
    uint64_t last = static_cast<uint64_t>(t.offset), numel = 1;
    for (size_t d = 0; d < t.shape.size(); ++d) {
      if (t.shape[d] == 0) empty = true;
      const uint64_t span = static_cast<uint64_t>(t.shape[d] == 0 ? 0 : t.shape[d] - 1);
      const uint64_t stride = static_cast<uint64_t>(t.stride[d]);
      if (stride != 0 && span > (uint64_t{1} << 62) / stride) return Err("tensor view overflows");
      last += span * stride;
      if (last > (uint64_t{1} << 62)) return Err("tensor view overflows");
      const uint64_t dim = static_cast<uint64_t>(t.shape[d]);
      if (dim != 0 && numel > (uint64_t{1} << 62) / dim) return Err("tensor has too many elements");
      numel *= dim;
    }
    if (!empty && last >= static_cast<uint64_t>(st.numel)) {
      return Err(absl::StrCat("tensor view reaches element ", last, " of a storage of ", st.numel));
    }
    if (empty) t.offset = 0;  // nothing is read; keep the recorded offset inside the storage
    // A view may repeat its storage's elements (stride 0, overlapping strides), so its size is
    // not bounded by the file: one larger than its storage must stay small once copied out.
    const uint64_t item = DTypeSize(st.dtype);
    if (numel > static_cast<uint64_t>(st.numel) && numel > limits_.max_broadcast_bytes / item) {
      return Err(absl::StrCat("a tensor view of ", numel, " elements over a storage of ", st.numel,
                              " (views larger than their storage are accepted up to ",
                              limits_.max_broadcast_bytes, " bytes; save it with .contiguous())"));
    }
    t.numel = numel;
    tensors.push_back(std::move(t));
    Value v;
    v.kind = Value::kTensor;
    v.i = static_cast<int64_t>(tensors.size() - 1);
    return v;
  }
  return Err(absl::StrCat("REDUCE of '", f, "'"));
}

absl::StatusOr<Value> Unpickler::Run() {
  uint64_t ops = 0;
  while (at_ < p_.size()) {
    op_at_ = at_;
    if (++ops > limits_.max_ops) {
      return Err(absl::StrCat("more than ", limits_.max_ops, " pickle opcodes"));
    }
    const uint8_t op = p_[at_++];
    switch (op) {
      case 0x80:  // PROTO
        if (!Need(1)) return Err("truncated PROTO");
        if (p_[at_] < 2 || p_[at_] > 5) return Err(absl::StrCat("pickle protocol ", p_[at_]));
        ++at_;
        break;
      case 0x95:  // FRAME: a length hint only
        if (!Need(8)) return Err("truncated FRAME");
        at_ += 8;
        break;
      case '.': {  // STOP
        if (!marks_.empty() || stack_.size() != 1) return Err("STOP with an unbalanced stack");
        return std::move(stack_.back());
      }
      case '(':
        marks_.push_back(stack_.size());
        break;
      case 't': {
        FPX_ASSIGN_OR_RETURN(Items v, PopToMark());
        stack_.push_back(Seq(Value::kTuple, std::move(v)));
        break;
      }
      case ')':
        stack_.push_back(Seq(Value::kTuple));
        break;
      case 0x85: case 0x86: case 0x87: {  // TUPLE1..3
        const size_t k = op - 0x84;
        if (stack_.size() < Floor() + k) return Err("stack underflow");
        Items v(std::make_move_iterator(stack_.end() - k), std::make_move_iterator(stack_.end()));
        stack_.resize(stack_.size() - k);
        stack_.push_back(Seq(Value::kTuple, std::move(v)));
        break;
      }
      case ']':
        stack_.push_back(Seq(Value::kList));
        break;
      case 'l': {
        FPX_ASSIGN_OR_RETURN(Items v, PopToMark());
        stack_.push_back(Seq(Value::kList, std::move(v)));
        break;
      }
      case 'a': {
        FPX_ASSIGN_OR_RETURN(Value v, Pop());
        FPX_ASSIGN_OR_RETURN(Value * l, Top());
        if (l->kind != Value::kList) return Err(absl::StrCat("APPEND to a ", KindName(l->kind)));
        l->items->push_back(std::move(v));
        break;
      }
      case 'e': {
        FPX_ASSIGN_OR_RETURN(Items v, PopToMark());
        FPX_ASSIGN_OR_RETURN(Value * l, Top());
        if (l->kind != Value::kList) return Err(absl::StrCat("APPENDS to a ", KindName(l->kind)));
        for (Value& x : v) l->items->push_back(std::move(x));
        break;
      }
      case '}':
        stack_.push_back(Dict());
        break;
      case 'd': {
        FPX_ASSIGN_OR_RETURN(Items v, PopToMark());
        Value d = Dict();
        FPX_RETURN_IF_ERROR(SetItems(&d, std::move(v)));
        stack_.push_back(std::move(d));
        break;
      }
      case 's': {
        FPX_ASSIGN_OR_RETURN(Value v, Pop());
        FPX_ASSIGN_OR_RETURN(Value k, Pop());
        FPX_ASSIGN_OR_RETURN(Value * d, Top());
        FPX_RETURN_IF_ERROR(SetItems(d, Items{std::move(k), std::move(v)}));
        break;
      }
      case 'u': {
        FPX_ASSIGN_OR_RETURN(Items v, PopToMark());
        FPX_ASSIGN_OR_RETURN(Value * d, Top());
        FPX_RETURN_IF_ERROR(SetItems(d, std::move(v)));
        break;
      }
      case 'N':
        stack_.push_back(Value());
        break;
      case 0x88: case 0x89: {
        Value v;
        v.kind = Value::kBool;
        v.i = op == 0x88;
        stack_.push_back(v);
        break;
      }
      case 'K':
        if (!Need(1)) return Err("truncated BININT1");
        stack_.push_back(Value::Int(p_[at_]));
        at_ += 1;
        break;
      case 'M':
        if (!Need(2)) return Err("truncated BININT2");
        stack_.push_back(Value::Int(Le16(p_.data() + at_)));
        at_ += 2;
        break;
      case 'J':
        if (!Need(4)) return Err("truncated BININT");
        stack_.push_back(Value::Int(static_cast<int32_t>(Le32(p_.data() + at_))));
        at_ += 4;
        break;
      case 0x8a: {  // LONG1: little-endian two's complement of n ≤ 8 bytes
        if (!Need(1)) return Err("truncated LONG1");
        const uint8_t n = p_[at_++];
        if (n > 8) return Err("integer wider than 64 bits");
        if (!Need(n)) return Err("truncated LONG1");
        uint64_t u = 0;
        for (int k = 0; k < n; ++k) u |= uint64_t{p_[at_ + k]} << (8 * k);
        if (n > 0 && n < 8 && (p_[at_ + n - 1] & 0x80)) u |= ~uint64_t{0} << (8 * n);
        at_ += n;
        stack_.push_back(Value::Int(static_cast<int64_t>(u)));
        break;
      }
      case 'G': {  // BINFLOAT, big-endian
        if (!Need(8)) return Err("truncated BINFLOAT");
        uint64_t u = 0;
        for (int k = 0; k < 8; ++k) u = (u << 8) | p_[at_ + k];
        at_ += 8;
        Value v;
        v.kind = Value::kFloat;
        std::memcpy(&v.f, &u, 8);
        stack_.push_back(v);
        break;
      }
      case 'X': case 'T': case 'B': {  // BINUNICODE, BINSTRING, BINBYTES: u32 length
        if (!Need(4)) return Err("truncated string length");
        const uint64_t n = Le32(p_.data() + at_);
        at_ += 4;
        FPX_ASSIGN_OR_RETURN(Value v, ReadString(n));
        stack_.push_back(std::move(v));
        break;
      }
      case 0x8c: case 'U': case 'C': {  // SHORT_BINUNICODE, SHORT_BINSTRING, SHORT_BINBYTES
        if (!Need(1)) return Err("truncated string length");
        const uint64_t n = p_[at_++];
        FPX_ASSIGN_OR_RETURN(Value v, ReadString(n));
        stack_.push_back(std::move(v));
        break;
      }
      case 0x8d: case 0x8e: {  // BINUNICODE8, BINBYTES8
        if (!Need(8)) return Err("truncated string length");
        const uint64_t n = Le64(p_.data() + at_);
        at_ += 8;
        FPX_ASSIGN_OR_RETURN(Value v, ReadString(n));
        stack_.push_back(std::move(v));
        break;
      }
      case 'q':
        if (!Need(1)) return Err("truncated BINPUT");
        FPX_RETURN_IF_ERROR(Memo(p_[at_]));
        at_ += 1;
        break;
      case 'r':
        if (!Need(4)) return Err("truncated LONG_BINPUT");
        FPX_RETURN_IF_ERROR(Memo(Le32(p_.data() + at_)));
        at_ += 4;
        break;
      case 0x94:  // MEMOIZE
        FPX_RETURN_IF_ERROR(Memo(memo_.size()));
        break;
      case 'h':
        if (!Need(1)) return Err("truncated BINGET");
        FPX_RETURN_IF_ERROR(Get(p_[at_]));
        at_ += 1;
        break;
      case 'j':
        if (!Need(4)) return Err("truncated LONG_BINGET");
        FPX_RETURN_IF_ERROR(Get(Le32(p_.data() + at_)));
        at_ += 4;
        break;
      case 'c': {
        FPX_ASSIGN_OR_RETURN(std::string module, Line());
        FPX_ASSIGN_OR_RETURN(std::string name, Line());
        FPX_ASSIGN_OR_RETURN(Value g, Global(std::move(module), std::move(name)));
        stack_.push_back(std::move(g));
        break;
      }
      case 0x93: {  // STACK_GLOBAL
        FPX_ASSIGN_OR_RETURN(Value name, Pop());
        FPX_ASSIGN_OR_RETURN(Value module, Pop());
        if (name.kind != Value::kString || module.kind != Value::kString) {
          return Err("STACK_GLOBAL needs two strings");
        }
        FPX_ASSIGN_OR_RETURN(Value g, Global(*module.s, *name.s));
        stack_.push_back(std::move(g));
        break;
      }
      case 'R': {
        FPX_ASSIGN_OR_RETURN(Value args, Pop());
        FPX_ASSIGN_OR_RETURN(Value fn, Pop());
        FPX_ASSIGN_OR_RETURN(Value r, Reduce(fn, args));
        stack_.push_back(std::move(r));
        break;
      }
      case 'Q': {
        FPX_ASSIGN_OR_RETURN(Value pid, Pop());
        FPX_ASSIGN_OR_RETURN(Value s, PersistentLoad(pid));
        stack_.push_back(std::move(s));
        break;
      }
      case 'b': {  // BUILD: an OrderedDict's attributes (state_dict._metadata); a tensor's state
        FPX_ASSIGN_OR_RETURN(Value state, Pop());
        FPX_ASSIGN_OR_RETURN(Value * obj, Top());
        if (obj->kind != Value::kDict && obj->kind != Value::kTensor) {
          return Err(absl::StrCat("BUILD on a ", KindName(obj->kind)));
        }
        break;
      }
      case '2': {  // DUP
        FPX_ASSIGN_OR_RETURN(Value * v, Top());
        stack_.push_back(*v);
        break;
      }
      case '0':
        FPX_RETURN_IF_ERROR(Pop().status());
        break;
      case '1':
        FPX_RETURN_IF_ERROR(PopToMark().status());
        break;
      case 0x81: case 0x92: case 'o': case 'i':
        return Err("refused opcode that builds an arbitrary object (NEWOBJ/OBJ/INST)");
      default:
        return Err(absl::StrCat("unsupported pickle opcode 0x", absl::Hex(op)));
    }
  }
  return Err("no STOP opcode");
}

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
