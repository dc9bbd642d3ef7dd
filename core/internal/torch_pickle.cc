// File: core/internal/torch_pickle.cc
#include "core/internal/torch_pickle.h"

#include <algorithm>

#include "absl/strings/match.h"

namespace fpxint::core::internal {

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

}  // namespace fpxint::core::internal
