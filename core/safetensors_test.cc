#include "core/safetensors.h"
#include "core/sha256.h"
#include "core/torch_state_dict.h"

#include <cstring>
#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace fpxint::core {
namespace {

using ::fpxint::testing::ScratchDir;

// A file from a raw header string and a data section.
std::vector<uint8_t> RawFile(const std::string& header, size_t data_bytes, uint64_t len_override = 0) {
  std::vector<uint8_t> f(8);
  const uint64_t n = len_override ? len_override : header.size();
  std::memcpy(f.data(), &n, 8);
  f.insert(f.end(), header.begin(), header.end());
  f.resize(f.size() + data_bytes, 0);
  return f;
}

std::string ErrorOf(const std::vector<uint8_t>& f, const SafetensorsLimits& limits = {}) {
  absl::StatusOr<std::unique_ptr<SafetensorsReader>> r = SafetensorsReader::FromBuffer(f, limits);
  if (r.ok()) return "";
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(r.status().message());
}

TEST(Safetensors, RoundTripsEveryDType) {
  SafetensorsWriter w;
  w.SetMetadata("format", "pt");
  std::vector<std::vector<uint8_t>> payloads;
  const char* names[] = {"F32", "F16", "BF16", "F64", "I8", "U8", "I32", "I64", "BOOL", "U16"};
  std::mt19937 rng(3);
  for (const char* n : names) {
    const DType t = *ParseDType(n);
    std::vector<uint8_t> data(2 * 3 * DTypeSize(t));
    for (auto& b : data) b = static_cast<uint8_t>(rng());
    ASSERT_TRUE(w.AddOwned(absl::StrCat("t.", n), t, {2, 3}, data).ok());
    payloads.push_back(data);
  }
  ASSERT_TRUE(w.AddOwned("scalar", DType::kF32, {}, {0, 0, 128, 63}).ok());
  ASSERT_TRUE(w.AddOwned("empty", DType::kF32, {0, 4}, {}).ok());
  ScratchDir dir;
  ASSERT_TRUE(w.WriteFile(dir.File("a.safetensors")).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsReader>> r = SafetensorsReader::Open(dir.File("a.safetensors"));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->Metadata("format"), "pt");
  EXPECT_EQ((*r)->header_bytes() % 8, 0u);  // data section starts 8-aligned
  EXPECT_EQ((*r)->tensors().size(), 12u);
  for (size_t i = 0; i < payloads.size(); ++i) {
    const TensorInfo* t = (*r)->Find(absl::StrCat("t.", names[i]));
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3}));
    absl::Span<const uint8_t> d = (*r)->Data(*t);
    EXPECT_EQ(std::vector<uint8_t>(d.begin(), d.end()), payloads[i]) << names[i];
  }
  EXPECT_EQ((*r)->Find("scalar")->shape.size(), 0u);
  EXPECT_EQ((*r)->Find("empty")->numel(), 0);
  // Serialize() and WriteFile() agree, and writing is deterministic.
  const std::string on_disk = ::fpxint::testing::ReadFileOrDie(dir.File("a.safetensors"));
  const std::vector<uint8_t> mem = w.Serialize();
  EXPECT_EQ(on_disk, std::string(mem.begin(), mem.end()));
  EXPECT_EQ(w.FileSize(), mem.size());
}

TEST(Safetensors, EachMalformationHasItsOwnError) {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  EXPECT_EQ(ErrorOf(RawFile(ok, 8)), "");
  struct Case {
    const char* what;
    std::vector<uint8_t> file;
    const char* expect;
  } cases[] = {
      {"shorter than the prefix", {1, 2, 3}, "8-byte header length"},
      {"huge header length", RawFile(ok, 8, uint64_t{1} << 40), "exceeds the limit"},
      {"truncated header", RawFile(ok, 8, ok.size() + 100), "runs past the end"},
      {"not JSON", RawFile("{\"a\":", 0), "not valid JSON"},
      {"not an object", RawFile("[1]  ", 0), "does not start with '{'"},
      {"not a dtype name", RawFile(R"({"a":{"dtype":"F 7;","shape":[2],"data_offsets":[0,8]}})", 8), "'F 7;' is not a dtype name"},
      {"shape/size mismatch", RawFile(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "needs 12 bytes"},
      {"negative shape", RawFile(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "not a non-negative integer"},
      {"overflowing shape", RawFile(R"({"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8), "overflows"},
      {"offsets past the data", RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4), "exceed the data section"},
      {"begin > end", RawFile(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8), "begin > end"},
      {"overlapping offsets", RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12), "overlap the previous tensor 'a'"},
      {"gap", RawFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "leaving a gap"},
      {"trailing bytes", RawFile(ok, 16), "trailing bytes"},
      {"missing dtype", RawFile(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8), "'dtype'"},
      {"bad offsets arity", RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8), "[begin, end]"},
      {"unknown field", RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8), "unknown field 'x'"},
      {"metadata not strings", RawFile(R"({"__metadata__":{"k":1}})", 0), "only strings"},
      {"duplicate names", RawFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "duplicate key"},
      {"rank too large", RawFile(R"({"a":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"data_offsets":[0,4]}})", 4), "rank 17"},
      {"fractional offset", RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}})", 8), "non-negative integers"},
  };
  for (const Case& c : cases) {
    const std::string err = ErrorOf(c.file);
    EXPECT_NE(err.find(c.expect), std::string::npos) << c.what << ": got '" << err << "'";
  }
}

// A tensor of a dtype this library does not read stays listed as raw bytes: the rest of the file
// reads as usual, converting it is refused naming the tensor's dtype, and a writer carries it
// through with its own spelling.
TEST(Safetensors, UnsupportedDTypesStayReadableAsRawBytes) {
  const std::string header =
      R"({"q":{"dtype":"F8_E4M3FNUZ","shape":[2,3],"data_offsets":[0,6]},)"
      R"("w":{"dtype":"F32","shape":[2],"data_offsets":[6,14]}})";
  std::vector<uint8_t> f = RawFile(header, 14);
  for (int i = 0; i < 6; ++i) f[8 + header.size() + i] = static_cast<uint8_t>(0x10 + i);
  auto r = SafetensorsReader::FromBuffer(f);
  ASSERT_TRUE(r.ok()) << r.status();
  const TensorInfo* q = (*r)->Find("q");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->dtype, DType::kOther);
  EXPECT_EQ(q->dtype_name, "F8_E4M3FNUZ");
  EXPECT_FALSE(IsFloating(q->dtype));
  EXPECT_EQ((*r)->Data(*q).size(), 6u);
  const TensorInfo* w = (*r)->Find("w");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->dtype_name, "F32");
  EXPECT_EQ((*r)->Data(*w).size(), 8u);
  // Written back, the unsupported tensor keeps its spelling and bytes.
  SafetensorsWriter out;
  for (const TensorInfo& t : (*r)->tensors()) {
    ASSERT_TRUE(out.Add(t.name, t.dtype, t.shape, (*r)->Data(t), t.dtype_name).ok());
  }
  EXPECT_NE(out.HeaderJson().find("\"dtype\":\"F8_E4M3FNUZ\""), std::string::npos)
      << out.HeaderJson();
  const std::vector<uint8_t> again = out.Serialize();
  auto r2 = SafetensorsReader::FromBuffer(again);
  ASSERT_TRUE(r2.ok()) << r2.status();
  const auto d = (*r2)->Data(*(*r2)->Find("q"));
  EXPECT_EQ(std::vector<uint8_t>(d.begin(), d.end()),
            (std::vector<uint8_t>{0x10, 0x11, 0x12, 0x13, 0x14, 0x15}));
  // Without its name, an unsupported tensor cannot be written.
  SafetensorsWriter nameless;
  EXPECT_FALSE(nameless.Add("q", DType::kOther, {2, 3}, (*r)->Data(*q)).ok());
}

TEST(Safetensors, RandomMutationsNeverCrash) {
  SafetensorsWriter w;
  w.SetMetadata("k", "v");
  ASSERT_TRUE(w.AddOwned("w", DType::kF32, {3, 4}, std::vector<uint8_t>(48, 1)).ok());
  ASSERT_TRUE(w.AddOwned("b", DType::kF16, {4}, std::vector<uint8_t>(8, 2)).ok());
  const std::vector<uint8_t> good = w.Serialize();
  std::mt19937 rng(7);
  int rejected = 0;
  for (int i = 0; i < 20000; ++i) {
    std::vector<uint8_t> f = good;
    const int edits = 1 + rng() % 4;
    for (int e = 0; e < edits; ++e) {
      switch (rng() % 3) {
        case 0: f[rng() % f.size()] = static_cast<uint8_t>(rng()); break;
        case 1: f.resize(rng() % (f.size() + 1)); break;
        default: f.insert(f.begin() + rng() % (f.size() + 1), static_cast<uint8_t>(rng())); break;
      }
      if (f.empty()) break;
    }
    absl::StatusOr<std::unique_ptr<SafetensorsReader>> r = SafetensorsReader::FromBuffer(f);
    if (!r.ok()) {
      ++rejected;
      continue;
    }
    // Whatever was accepted must be internally consistent.
    for (const TensorInfo& t : (*r)->tensors()) {
      ASSERT_LE(t.end, f.size());
      // (A mutated dtype name can make an unsupported dtype, whose element size is unknown.)
      if (t.dtype != DType::kOther) {
        ASSERT_EQ((*r)->Data(t).size(), static_cast<size_t>(t.numel()) * DTypeSize(t.dtype));
      }
    }
  }
  EXPECT_GT(rejected, 10000);
}

constexpr char kEmptyTensor[] = R"({"dtype":"F32","shape":[0],"data_offsets":[0,0]})";

// A header listing `n` empty tensors "t0", "t1", ... (kEmptyTensor), without the closing brace.
std::string EmptyTensorsHeader(size_t n) {
  std::string h = "{";
  for (size_t i = 0; i < n; ++i) absl::StrAppend(&h, i ? "," : "", "\"t", i, "\":", kEmptyTensor);
  return h;
}

// The header is read only up to the tensor limit: more tensors than the limit followed by bytes
// that are not JSON is refused for the count, so nothing past the limit was parsed.
TEST(Safetensors, StopsReadingTheHeaderAtTheTensorLimit) {
  SafetensorsLimits limits;
  limits.max_tensors = 1000;
  const std::string at_limit = EmptyTensorsHeader(1000);
  auto read = [&](const std::string& header) {
    return SafetensorsReader::FromBuffer(RawFile(header, 0), limits);
  };
  absl::StatusOr<std::unique_ptr<SafetensorsReader>> r = read(at_limit + "}");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->tensors().size(), 1000u);
  r = read(at_limit + ",\"__metadata__\":{\"k\":\"v\"}}");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_NE(ErrorOf(RawFile(EmptyTensorsHeader(1001) + "}", 0), limits)
                .find("header lists 1001 tensors; the limit is 1000"),
            std::string::npos);
  // The parser stops at the key of the first member past the limit (the limit's tensors plus
  // __metadata__), whatever follows.
  r = read(EmptyTensorsHeader(1002) + ", and then no JSON at all");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string err(r.status().message());
  EXPECT_NE(err.find("more than 1000 tensors"), std::string::npos) << err;
  EXPECT_EQ(err.find("not valid JSON"), std::string::npos) << err;
}

// Under the production limits a header of 200000 tensors is read (each key checked against the
// others for duplicates, in linear time), and a duplicate among them is found.
TEST(Safetensors, ReadsTwoHundredThousandTensorsAndFindsADuplicateAmongThem) {
  const std::string header = EmptyTensorsHeader(200000);
  const std::vector<uint8_t> ok = RawFile(header + "}", 0);
  absl::StatusOr<std::unique_ptr<SafetensorsReader>> r = SafetensorsReader::FromBuffer(ok);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->tensors().size(), 200000u);
  EXPECT_NE((*r)->Find("t199999"), nullptr);
  const std::string dup = absl::StrCat(header, ",\"t123456\":", kEmptyTensor, "}");
  EXPECT_NE(ErrorOf(RawFile(dup, 0)).find("duplicate key \"t123456\""), std::string::npos);
}

TEST(Safetensors, WriterRejectsBadTensorsAndIoErrors) {
  SafetensorsWriter w;
  EXPECT_FALSE(w.AddOwned("", DType::kU8, {1}, {0}).ok());
  EXPECT_FALSE(w.AddOwned("__metadata__", DType::kU8, {1}, {0}).ok());
  EXPECT_TRUE(w.AddOwned("x", DType::kU8, {1}, {0}).ok());
  EXPECT_NE(w.AddOwned("x", DType::kU8, {1}, {0}).message().find("duplicate"), std::string::npos);
  EXPECT_NE(w.AddOwned("y", DType::kF32, {2}, {0}).message().find("does not match"),
            std::string::npos);
  absl::Status s = w.WriteFile("/nonexistent-dir/x.safetensors");
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_EQ(SafetensorsReader::Open("/nonexistent-file").status().code(), absl::StatusCode::kNotFound);
  ScratchDir dir;
  EXPECT_EQ(SafetensorsReader::Open(dir.path()).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fpxint::core

namespace fpxint::core {
namespace {

// Both file readers map through core::MappedFile: the same errors for paths that are not files.
// Lazy tensors are made as they are written: the file is the same as with the bytes given up
// front, and a producer's error (or a wrong size) aborts the write and leaves nothing behind.
TEST(Safetensors, LazyTensorsWriteTheSameFile) {
  ScratchDir dir;
  const std::vector<uint8_t> a(6 * 4, 7), b(3 * 2, 9);
  SafetensorsWriter eager, lazy;
  ASSERT_TRUE(eager.Add("a", DType::kF32, {2, 3}, a).ok());
  ASSERT_TRUE(eager.Add("b", DType::kBF16, {3}, b).ok());
  int made = 0;
  ASSERT_TRUE(lazy.Add("a", DType::kF32, {2, 3}, a).ok());
  ASSERT_TRUE(lazy.AddLazy("b", DType::kBF16, {3}, [&]() -> absl::StatusOr<std::vector<uint8_t>> {
                    ++made;
                    return b;
                  }).ok());
  EXPECT_EQ(lazy.FileSize(), eager.FileSize());
  EXPECT_EQ(lazy.HeaderJson(), eager.HeaderJson());
  ASSERT_TRUE(lazy.WriteFile(dir.File("lazy")).ok());
  EXPECT_EQ(made, 1);
  const std::vector<uint8_t> want = eager.Serialize();
  EXPECT_EQ(::fpxint::testing::ReadFileOrDie(dir.File("lazy")), std::string(want.begin(), want.end()));
  EXPECT_FALSE(lazy.AddLazy("b", DType::kF32, {1}, nullptr).ok()) << "a duplicate name";

  SafetensorsWriter failing;
  ASSERT_TRUE(failing.AddLazy("x", DType::kF32, {4}, []() -> absl::StatusOr<std::vector<uint8_t>> {
                       return absl::CancelledError("stopped");
                     }).ok());
  EXPECT_EQ(failing.WriteFile(dir.File("failing")).code(), absl::StatusCode::kCancelled);
  SafetensorsWriter short_one;
  ASSERT_TRUE(short_one.AddLazy("x", DType::kF32, {4}, []() -> absl::StatusOr<std::vector<uint8_t>> {
                         return std::vector<uint8_t>(3);
                       }).ok());
  EXPECT_FALSE(short_one.WriteFile(dir.File("short")).ok());
  EXPECT_FALSE(std::filesystem::exists(dir.File("failing")));
  EXPECT_FALSE(std::filesystem::exists(dir.File("short")));
}

// Reserved tensors written in any order through a PlacedFile make the file WriteFile makes; an
// unwritten, repeated or wrongly sized one is refused and nothing appears at the path.
TEST(Safetensors, PlacedTensorsWriteTheSameFileInAnyOrder) {
  ScratchDir dir;
  const std::vector<uint8_t> a(6 * 4, 7), b(3 * 2, 9), c(5, 3);
  SafetensorsWriter eager, placed;
  for (SafetensorsWriter* w : {&eager, &placed}) w->SetMetadata("k", "v");
  ASSERT_TRUE(eager.Add("a", DType::kF32, {2, 3}, a).ok());
  ASSERT_TRUE(eager.Add("b", DType::kBF16, {3}, b).ok());
  ASSERT_TRUE(eager.Add("c", DType::kU8, {5}, c).ok());
  ASSERT_TRUE(placed.Add("a", DType::kF32, {2, 3}, a).ok());
  ASSERT_TRUE(placed.Reserve("b", DType::kBF16, {3}).ok());
  ASSERT_TRUE(placed.Reserve("c", DType::kU8, {5}).ok());
  EXPECT_EQ(placed.HeaderJson(), eager.HeaderJson());
  EXPECT_EQ(placed.WriteFile(dir.File("refused")).code(), absl::StatusCode::kFailedPrecondition);
  auto f = placed.BeginPlaced(dir.File("placed"));
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_TRUE((*f)->Write("c", c).ok());
  (*f)->StartWriteback();
  EXPECT_FALSE((*f)->Write("c", c).ok()) << "written twice";
  EXPECT_FALSE((*f)->Write("b", c).ok()) << "the wrong size";
  EXPECT_FALSE((*f)->Write("a", a).ok()) << "not reserved";
  ASSERT_TRUE((*f)->Write("b", b).ok());
  std::string sha;
  ASSERT_TRUE((*f)->Commit(&sha).ok());
  const std::vector<uint8_t> want = eager.Serialize();
  const std::string got = ::fpxint::testing::ReadFileOrDie(dir.File("placed"));
  EXPECT_EQ(got, std::string(want.begin(), want.end()));
  Sha256 h;
  h.Update(absl::MakeConstSpan(want));
  EXPECT_EQ(sha, h.HexDigest());

  auto unfinished = placed.BeginPlaced(dir.File("unfinished"));
  ASSERT_TRUE(unfinished.ok());
  ASSERT_TRUE((*unfinished)->Write("b", b).ok());
  EXPECT_FALSE((*unfinished)->Commit(nullptr).ok()) << "'c' was never written";
  unfinished->reset();
  EXPECT_FALSE(std::filesystem::exists(dir.File("unfinished")));
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
  }
}

TEST(MappedFile, ReadersRefuseWhatIsNotARegularFile) {
  ScratchDir dir;
  EXPECT_EQ(SafetensorsReader::Open(dir.File("missing")).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(TorchStateDict::Open(dir.File("missing")).status().code(),
            absl::StatusCode::kNotFound);
  const absl::Status st = SafetensorsReader::Open(dir.path()).status();
  const absl::Status sd = TorchStateDict::Open(dir.path()).status();
  EXPECT_NE(st.message().find("is not a regular file"), std::string::npos) << st;
  EXPECT_NE(sd.message().find("is not a regular file"), std::string::npos) << sd;
  ::fpxint::testing::WriteFileOrDie(dir.File("empty"), "");
  absl::StatusOr<std::unique_ptr<MappedFile>> empty = MappedFile::Open(dir.File("empty"));
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE((*empty)->bytes().empty());
}

}  // namespace
}  // namespace fpxint::core
