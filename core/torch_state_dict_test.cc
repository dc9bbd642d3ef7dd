// Tests of the torch.save reader (core/torch_state_dict.h) on files assembled here byte by byte:
// a stored zip and a protocol-2 pickle like the ones torch.save writes, so the test needs neither
// Python nor LibTorch. tests/integration/test_state_dict.py checks files that PyTorch writes.
#include "core/torch_state_dict.h"

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace fpxint::core {
namespace {

void Put16(std::string* s, uint32_t v) {
  s->push_back(static_cast<char>(v & 0xff));
  s->push_back(static_cast<char>((v >> 8) & 0xff));
}
void Put32(std::string* s, uint32_t v) {
  Put16(s, v & 0xffff);
  Put16(s, v >> 16);
}

struct ZipFile {
  std::string name;
  std::string data;
  // When set, the central directory entry points at this earlier entry's local header (and so
  // at its bytes) instead of a copy of its own.
  int alias_of = -1;
};

// A stored zip of `files`; CRCs are left 0 (the reader does not check them).
std::string Zip(const std::vector<ZipFile>& files) {
  std::string out, cd;
  std::vector<uint32_t> locals;
  for (const ZipFile& f : files) {
    const uint32_t size = static_cast<uint32_t>(f.data.size());
    uint32_t local = static_cast<uint32_t>(out.size());
    if (f.alias_of >= 0) {
      local = locals[static_cast<size_t>(f.alias_of)];
    } else {
      Put32(&out, 0x04034b50); Put16(&out, 20); Put16(&out, 0); Put16(&out, 0);
      Put32(&out, 0); Put32(&out, 0); Put32(&out, size); Put32(&out, size);
      Put16(&out, static_cast<uint32_t>(f.name.size())); Put16(&out, 0);
      out += f.name;
      out += f.data;
    }
    locals.push_back(local);
    Put32(&cd, 0x02014b50); Put16(&cd, 20); Put16(&cd, 20); Put16(&cd, 0); Put16(&cd, 0);
    Put32(&cd, 0); Put32(&cd, 0); Put32(&cd, size); Put32(&cd, size);
    Put16(&cd, static_cast<uint32_t>(f.name.size())); Put16(&cd, 0); Put16(&cd, 0);
    Put16(&cd, 0); Put16(&cd, 0); Put32(&cd, 0); Put32(&cd, local);
    cd += f.name;
  }
  const uint32_t cd_off = static_cast<uint32_t>(out.size());
  out += cd;
  Put32(&out, 0x06054b50); Put16(&out, 0); Put16(&out, 0);
  Put16(&out, static_cast<uint32_t>(files.size()));
  Put16(&out, static_cast<uint32_t>(files.size()));
  Put32(&out, static_cast<uint32_t>(cd.size())); Put32(&out, cd_off); Put16(&out, 0);
  return out;
}

// Writes pickle opcodes (protocol 2, as torch.save does).
class Pickle {
 public:
  Pickle() { b_ = "\x80\x02"; }
  Pickle& Op(char op) { b_.push_back(op); return *this; }
  Pickle& Str(const std::string& s) {  // BINUNICODE
    Op('X');
    Put32(&b_, static_cast<uint32_t>(s.size()));
    b_ += s;
    return *this;
  }
  Pickle& Int(int32_t v) {  // BININT
    Op('J');
    Put32(&b_, static_cast<uint32_t>(v));
    return *this;
  }
  Pickle& Global(const std::string& module, const std::string& name) {
    Op('c');
    b_ += module + "\n" + name + "\n";
    return *this;
  }
  Pickle& Put(uint32_t key) { Op('r'); Put32(&b_, key); return *this; }  // LONG_BINPUT
  Pickle& Get(uint32_t key) { Op('j'); Put32(&b_, key); return *this; }  // LONG_BINGET
  Pickle& IntTuple(const std::vector<int64_t>& v) {
    Op('(');
    for (int64_t x : v) Int(static_cast<int32_t>(x));
    return Op('t');
  }
  // torch._utils._rebuild_tensor_v2(<float storage `key` of `numel`>, offset, shape, stride,
  // False, OrderedDict()), as torch.save writes a tensor.
  Pickle& Tensor(const std::string& key, int64_t numel, const std::vector<int64_t>& shape,
                 const std::vector<int64_t>& stride, int64_t offset = 0) {
    Global("torch._utils", "_rebuild_tensor_v2");
    Op('(');
    Op('(').Str("storage").Global("torch", "FloatStorage").Str(key).Str("cpu");
    Int(static_cast<int32_t>(numel)).Op('t').Op('Q');
    Int(static_cast<int32_t>(offset)).IntTuple(shape).IntTuple(stride).Op('\x89');
    Global("collections", "OrderedDict").Op(')').Op('R');
    return Op('t').Op('R');
  }
  std::string Stop() { return b_ + "."; }

 private:
  std::string b_;
};

// A torch.save file of `pkl` and float storages "0", "1", ... of the given element counts.
std::string TorchFile(const std::string& pkl, const std::vector<int64_t>& storage_numels) {
  std::vector<ZipFile> files = {{"archive/data.pkl", pkl}};
  for (size_t i = 0; i < storage_numels.size(); ++i) {
    std::string data(static_cast<size_t>(storage_numels[i]) * 4, '\0');
    for (size_t k = 0; k < data.size(); k += 4) {
      const float v = static_cast<float>(k / 4) + 0.5f * static_cast<float>(i);
      std::memcpy(&data[k], &v, 4);
    }
    files.push_back({absl::StrCat("archive/data/", i), std::move(data)});
  }
  return Zip(files);
}

absl::StatusOr<std::unique_ptr<TorchStateDict>> Read(const std::string& file,
                                                     const StateDictLimits& limits = {}) {
  return TorchStateDict::FromBuffer(
      absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(file.data()), file.size()), limits);
}

// The error message, "" when the file is accepted; every refusal is InvalidArgument.
std::string ErrorOf(const std::string& file, const StateDictLimits& limits = {}) {
  absl::StatusOr<std::unique_ptr<TorchStateDict>> sd = Read(file, limits);
  if (sd.ok()) return "";
  EXPECT_EQ(sd.status().code(), absl::StatusCode::kInvalidArgument) << sd.status();
  return std::string(sd.status().message());
}

// {"<name_i>": <the tensor memoized under 0>} for `names` names: one tensor under many names.
std::string OneTensorUnderManyNames(int names, const std::vector<int64_t>& shape,
                                    const std::vector<int64_t>& stride, int64_t storage_numel) {
  Pickle p;
  p.Op('}').Op('(');
  for (int i = 0; i < names; ++i) {
    p.Str(absl::StrCat("n", i));
    if (i == 0) {
      p.Tensor("0", storage_numel, shape, stride).Put(0);
    } else {
      p.Get(0);
    }
  }
  return TorchFile(p.Op('u').Stop(), {storage_numel});
}

TEST(TorchStateDict, ReadsViewsAndTiedWeights) {
  // {"w": 3x4 over storage 0, "wt": its transpose, "tied": w again, "b": storage 1}
  Pickle p;
  p.Op('}').Op('(');
  p.Str("w").Tensor("0", 12, {3, 4}, {4, 1}).Put(0);
  p.Str("wt").Tensor("0", 12, {4, 3}, {1, 4});
  p.Str("tied").Get(0);
  p.Str("b").Tensor("1", 3, {3}, {1});
  const std::string file = TorchFile(p.Op('u').Stop(), {12, 3});
  absl::StatusOr<std::unique_ptr<TorchStateDict>> sd = Read(file);
  ASSERT_TRUE(sd.ok()) << sd.status();
  const std::vector<StateDictTensor>& t = (*sd)->tensors();
  ASSERT_EQ(t.size(), 4u);
  EXPECT_EQ(t[0].name, "w");
  EXPECT_EQ(t[1].name, "wt");
  EXPECT_EQ(t[2].name, "tied");
  EXPECT_EQ(t[3].name, "b");
  EXPECT_FALSE(t[1].contiguous());
  std::vector<float> wt(12);
  t[1].CopyTo(reinterpret_cast<uint8_t*>(wt.data()));
  EXPECT_EQ(wt, (std::vector<float>{0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11}));
  // Each name counts in full: 3 x 12 + 3 floats, from storages of 12 + 3.
  EXPECT_EQ((*sd)->total_tensor_bytes(), 39u * 4);
  EXPECT_EQ((*sd)->storage_bytes(), 15u * 4);
}

// One storage viewed by more tensors than a checkpoint has (tied weights share a storage a few
// times) is refused, whether the names repeat one memoized tensor or each rebuilds a view.
TEST(TorchStateDict, RefusesAStorageSharedByTooManyTensors) {
  EXPECT_EQ(ErrorOf(OneTensorUnderManyNames(64, {4}, {1}, 4)), "");
  const std::string err = ErrorOf(OneTensorUnderManyNames(65, {4}, {1}, 4));
  EXPECT_NE(err.find("tensor 'n64'"), std::string::npos) << err;
  EXPECT_NE(err.find("storage '0'"), std::string::npos) << err;
  EXPECT_NE(err.find("more than 64 tensors"), std::string::npos) << err;

  Pickle views;
  views.Op(']').Op('(');
  for (int i = 0; i < 65; ++i) views.Tensor("0", 65, {1}, {1}, i);  // 65 disjoint one-element views
  const std::string err2 = ErrorOf(TorchFile(views.Op('e').Stop(), {65}));
  EXPECT_NE(err2.find("tensor '64'"), std::string::npos) << err2;
  EXPECT_NE(err2.find("more than 64 tensors"), std::string::npos) << err2;
}

// A small file whose pickle names the same few tensors again and again under long keys: the names
// alone would take gigabytes; their total size is bounded.
TEST(TorchStateDict, BoundsTheBytesOfTensorNames) {
  // {"<4000 x 'k'>": [t0 x 64, t1 x 64, ..., t79 x 64]}: 5120 names of ~4 KB = 20 MB.
  const int kStorages = 80, kRefs = 64;
  Pickle p;
  p.Op('}').Str(std::string(4000, 'k')).Op(']').Op('(');
  for (int s = 0; s < kStorages; ++s) {
    p.Tensor(absl::StrCat(s), 1, {1}, {1}).Put(static_cast<uint32_t>(s));
    for (int r = 1; r < kRefs; ++r) p.Get(static_cast<uint32_t>(s));
  }
  const std::string file = TorchFile(p.Op('e').Op('s').Stop(), std::vector<int64_t>(kStorages, 1));
  ASSERT_LT(file.size(), 64u << 10);
  const std::string err = ErrorOf(file);
  EXPECT_NE(err.find("names of the tensors"), std::string::npos) << err;
  EXPECT_NE(err.find("more than 16777216 bytes"), std::string::npos) << err;
}

// Views that repeat their storage's elements (stride 0) and tensors named more than once make
// the tensors larger than the file; all of them together may take at most 4 times the bytes of
// the storages plus one broadcast view's worth.
TEST(TorchStateDict, BoundsTheBytesOfAllTensorsByTheStoredBytes) {
  const int64_t kBroadcast = int64_t{64} << 20;  // StateDictLimits::max_broadcast_bytes
  // One 64 MiB stride-0 view of a single float is accepted, and counted at its full size...
  absl::StatusOr<std::unique_ptr<TorchStateDict>> one =
      Read(OneTensorUnderManyNames(1, {kBroadcast / 4}, {0}, 1));
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ((*one)->total_tensor_bytes(), static_cast<uint64_t>(kBroadcast));
  EXPECT_EQ((*one)->storage_bytes(), 4u);
  // ...but not twice: 128 MiB of tensors from 4 bytes of storage.
  const std::string err = ErrorOf(OneTensorUnderManyNames(2, {kBroadcast / 4}, {0}, 1));
  EXPECT_NE(err.find("tensor 'n1'"), std::string::npos) << err;
  EXPECT_NE(err.find("134217728 bytes of tensors"), std::string::npos) << err;
  EXPECT_NE(err.find("4 bytes of storages"), std::string::npos) << err;
  // Tied weights (a tensor under two names) are fine.
  absl::StatusOr<std::unique_ptr<TorchStateDict>> tied =
      Read(OneTensorUnderManyNames(2, {1 << 20}, {1}, 1 << 20));
  ASSERT_TRUE(tied.ok()) << tied.status();
  EXPECT_EQ((*tied)->total_tensor_bytes(), 8u << 20);
}

// Walking the values builds each one's name: 100000 values under a 4000-byte key, reached through
// one shared list, would copy 400 MB for a 7 KB file. The bytes the walk builds are bounded.
TEST(TorchStateDict, BoundsTheBytesTheWalkOverValuesBuilds) {
  Pickle p;
  p.Op('}').Op('(').Str("w").Tensor("0", 1, {1}, {1});
  p.Op(']').Op('(');
  for (int i = 0; i < 1000; ++i) p.Op('N');
  p.Op('e').Put(0).Op('0');  // L = [None] * 1000, memoized, off the stack
  p.Str(std::string(4000, 'k')).Op(']').Op('(');
  for (int i = 0; i < 100; ++i) p.Get(0);
  // {"w": w, "kkk...": [L] * 100}
  const std::string file = TorchFile(p.Op('e').Op('u').Stop(), {1});
  ASSERT_LT(file.size(), 8u << 10);
  const std::string err = ErrorOf(file);
  EXPECT_NE(err.find("more than 268435456 bytes of names and keys"), std::string::npos) << err;
}

// The storages' bytes are what bound the tensors: two zip entries may not share bytes (one
// 64-byte entry listed 100 times would count as 6400 bytes).
TEST(TorchStateDict, RefusesZipEntriesThatShareBytes) {
  Pickle p;
  p.Op('}').Op('(');
  p.Str("a").Tensor("0", 16, {16}, {1});
  p.Str("b").Tensor("1", 16, {16}, {1});
  const std::string pkl = p.Op('u').Stop();
  const std::string data(64, '\0');
  EXPECT_EQ(ErrorOf(Zip({{"archive/data.pkl", pkl}, {"archive/data/0", data},
                         {"archive/data/1", data}})),
            "");
  const std::string err = ErrorOf(Zip({{"archive/data.pkl", pkl}, {"archive/data/0", data},
                                       {"archive/data/1", data, /*alias_of=*/1}}));
  EXPECT_NE(err.find("'archive/data/1'"), std::string::npos) << err;
  EXPECT_NE(err.find("overlap"), std::string::npos) << err;
}

TEST(TorchStateDict, CountsTensorsAgainstTheLimit) {
  StateDictLimits limits;
  limits.max_tensors = 3;
  Pickle p;
  p.Op(']').Op('(');
  for (int i = 0; i < 4; ++i) p.Tensor(absl::StrCat(i), 1, {1}, {1});
  const std::string file = TorchFile(p.Op('e').Stop(), {1, 1, 1, 1});
  const std::string err = ErrorOf(file, limits);
  EXPECT_NE(err.find("tensor '3'"), std::string::npos) << err;
  EXPECT_NE(err.find("more than 3 tensors"), std::string::npos) << err;
  limits.max_tensors = 4;
  EXPECT_EQ(ErrorOf(file, limits), "");
}

}  // namespace
}  // namespace fpxint::core
