// The fpxint artifact contract (core/artifact.h, docs/FORMAT.md): written by
// ExpandSafetensorsFile, read back by SafetensorsReader + ArtifactView, reconstructed and compared
// with the in-memory expansion; plus the bounds of docs/ALGORITHM.md §7 on real pretrained weights.
#include "core/artifact.h"

#include <cfloat>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/json.h"
#include "core/mapped_file.h"
#include "core/name_pattern.h"
#include "core/sha256.h"
#include "core/thread_pool.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace fpxint::core {
namespace {

using ::fpxint::testing::Dist;
using ::fpxint::testing::RandomValues;
using ::fpxint::testing::ReadFileOrDie;
using ::fpxint::testing::ScratchDir;

template <typename T>
std::vector<uint8_t> AsBytes(const std::vector<T>& v) {
  std::vector<uint8_t> b(v.size() * sizeof(T));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// A small "model": a linear weight (F32), a conv weight (F16), a bias, an integer buffer, and a
// weight that the tests exclude.
std::string WriteSource(const ScratchDir& dir) {
  SafetensorsWriter w;
  w.SetMetadata("format", "pt");
  std::vector<float> lin = ::fpxint::testing::ToFloat(RandomValues(Dist::kGaussian, 48 * 70, 1));
  std::vector<double> convd = RandomValues(Dist::kLaplace, 8 * 3 * 3 * 3, 2);
  std::vector<uint16_t> conv(convd.size());
  for (size_t i = 0; i < conv.size(); ++i) conv[i] = FloatToHalf(static_cast<float>(convd[i] * 0.1));
  EXPECT_TRUE(w.AddOwned("conv.weight", DType::kF16, {8, 3, 3, 3}, AsBytes(conv)).ok());
  EXPECT_TRUE(w.AddOwned("conv.bias", DType::kF32, {8}, AsBytes(std::vector<float>(8, 0.5f))).ok());
  EXPECT_TRUE(w.AddOwned("steps", DType::kI64, {2, 2}, AsBytes(std::vector<int64_t>{1, 2, 3, 4})).ok());
  EXPECT_TRUE(w.AddOwned("fc.weight", DType::kF32, {48, 70}, AsBytes(lin)).ok());
  EXPECT_TRUE(w.AddOwned("head.weight", DType::kF32, {4, 70},
                         AsBytes(::fpxint::testing::ToFloat(RandomValues(Dist::kGaussian, 280, 3))))
                  .ok());
  const std::string path = dir.File("src.safetensors");
  EXPECT_TRUE(w.WriteFile(path).ok());
  return path;
}

ArtifactOptions Options(int bits, int terms, Grid grid, ScaleGranularity scale, int64_t g = 0) {
  ArtifactOptions o;
  o.spec.bits = bits;
  o.spec.terms = terms;
  o.spec.grid = grid;
  o.spec.scale = scale;
  o.spec.group_size = g;
  o.exclude_regex = "^head\\.";
  return o;
}

TEST(Artifact, FollowsTheContractAndRoundTrips) {
  ScratchDir dir;
  const std::string src = WriteSource(dir);
  for (Grid grid : {Grid::kSym, Grid::kAsym, Grid::kMid}) {
    for (int bits : {2, 3, 4}) {
      ArtifactOptions o = Options(bits, 3, grid, ScaleGranularity::kGroup, 16);
      const std::string out = dir.File(absl::StrCat("out_", GridName(grid), bits, ".safetensors"));
      absl::StatusOr<ExpandReport> rep = ExpandSafetensorsFile(src, out, o);
      ASSERT_TRUE(rep.ok()) << rep.status();
      auto reader = SafetensorsReader::Open(out);
      ASSERT_TRUE(reader.ok()) << reader.status();
      const SafetensorsReader& r = **reader;
      // Metadata.
      EXPECT_EQ(r.Metadata("format"), "fpxint");
      EXPECT_EQ(r.Metadata("format_version"), "1");
      EXPECT_EQ(r.Metadata("bits"), absl::StrCat(bits));
      EXPECT_EQ(r.Metadata("terms"), "3");
      EXPECT_EQ(r.Metadata("grid"), GridName(grid));
      EXPECT_EQ(r.Metadata("variant"), "rescaled");
      EXPECT_EQ(r.Metadata("scale"), "group");
      EXPECT_EQ(r.Metadata("group_size"), "16");
      EXPECT_EQ(r.Metadata("packing"), bits == 3 ? "byte" : "lsb_first");
      EXPECT_EQ(r.Metadata("source_sha256"), *Sha256File(src));
      // The hash the writer computed while writing is the file's.
      EXPECT_EQ(rep->artifact_sha256, *Sha256File(out));
      EXPECT_EQ(r.Metadata("conv.weight.shape"), "[8,3,3,3]");
      EXPECT_EQ(r.Metadata("fc.weight.shape"), "[48,70]");
      EXPECT_FALSE(r.Metadata("head.weight.shape").has_value());
      // Copied tensors are byte-identical; head.weight was excluded and is copied too.
      auto src_reader = SafetensorsReader::Open(src);
      for (const char* name : {"conv.bias", "steps", "head.weight"}) {
        const TensorInfo* a = (*src_reader)->Find(name);
        const TensorInfo* b = r.Find(name);
        ASSERT_NE(b, nullptr) << name;
        EXPECT_EQ(a->dtype, b->dtype);
        EXPECT_EQ(a->shape, b->shape);
        EXPECT_TRUE(std::equal((*src_reader)->Data(*a).begin(), (*src_reader)->Data(*a).end(),
                               r.Data(*b).begin()));
      }
      EXPECT_EQ(r.Find("fc.weight"), nullptr);
      // Codes and scale tensors: dtype and shape.
      const TensorInfo* codes = r.Find("fc.weight.t2.codes");
      ASSERT_NE(codes, nullptr);
      EXPECT_EQ(codes->dtype, (bits == 3 && grid != Grid::kAsym) ? DType::kI8 : DType::kU8);
      EXPECT_EQ(codes->shape, (std::vector<int64_t>{48, bits == 3 ? 70 : (70 * bits + 7) / 8}));
      EXPECT_EQ(r.Find("fc.weight.t3.scale")->shape, (std::vector<int64_t>{48, 5}));
      EXPECT_EQ(r.Find("conv.weight.t1.scale")->shape, (std::vector<int64_t>{8, 2}));
      EXPECT_EQ(r.Find("fc.weight.t1.zero") != nullptr, grid == Grid::kAsym);
      // Term-major: every term-k tensor lies before every term-(k+1) tensor.
      for (int k = 1; k < 3; ++k) {
        for (const char* a : {"conv.weight", "fc.weight"}) {
          for (const char* b : {"conv.weight", "fc.weight"}) {
            EXPECT_LT(r.Find(absl::StrCat(a, ".t", k, ".scale"))->end,
                      r.Find(absl::StrCat(b, ".t", k + 1, ".codes"))->end);
          }
        }
      }
      // Reconstruction from the file equals the in-memory expansion, bit for bit.
      absl::StatusOr<ArtifactView> view = ArtifactView::Parse(r);
      ASSERT_TRUE(view.ok()) << view.status();
      EXPECT_EQ(view->tensors().size(), 2u);
      EXPECT_EQ(view->copied().size(), 3u);
      for (const char* name : {"conv.weight", "fc.weight"}) {
        const TensorInfo* t = (*src_reader)->Find(name);
        absl::StatusOr<TensorExpansion> mem =
            ExpandTensor(t->dtype, t->shape, (*src_reader)->Data(*t), o.spec);
        ASSERT_TRUE(mem.ok());
        for (int k : {1, 3}) {
          absl::StatusOr<TensorExpansion> file = view->Load(name, k);
          ASSERT_TRUE(file.ok()) << file.status();
          EXPECT_EQ(Reconstruct(*file, k), Reconstruct(*mem, k)) << name << " k=" << k;
        }
      }
      // Report.
      ASSERT_EQ(rep->tensors.size(), 2u);
      EXPECT_EQ(rep->bytes_out, static_cast<uint64_t>(r.bytes().size()));
    }
  }
}

TEST(Artifact, ReportJsonSchema) {
  ScratchDir dir;
  const std::string src = WriteSource(dir);
  absl::StatusOr<ExpandReport> rep = ExpandSafetensorsFile(
      src, dir.File("o.safetensors"), Options(4, 2, Grid::kSym, ScaleGranularity::kChannel));
  ASSERT_TRUE(rep.ok());
  absl::StatusOr<JsonValue> j = ParseJson(rep->ToJson());
  ASSERT_TRUE(j.ok()) << j.status();
  for (const char* key : {"spec", "tensors", "bytes_in", "bytes_out", "compression_ratio",
                          "wall_seconds", "copied", "source_sha256", "artifact_sha256"}) {
    EXPECT_NE(j->Find(key), nullptr) << key;
  }
  EXPECT_EQ(j->Find("spec")->Find("bits")->AsUint64(), 4u);
  EXPECT_EQ(j->Find("spec")->Find("grid")->str(), "sym");
  EXPECT_EQ(j->Find("spec")->Find("calibration_data")->str(), "none");
  const JsonValue& t0 = j->Find("tensors")->array()[0];
  EXPECT_EQ(t0.Find("name")->str(), "conv.weight");
  EXPECT_EQ(t0.Find("shape")->array().size(), 4u);
  ASSERT_EQ(t0.Find("terms")->array().size(), 2u);
  const JsonValue& term = t0.Find("terms")->array()[1];
  EXPECT_EQ(term.Find("k")->AsUint64(), 2u);
  EXPECT_LT(*term.Find("rel_fro")->AsDouble(), *t0.Find("terms")->array()[0].Find("rel_fro")->AsDouble());
  EXPECT_GT(*term.Find("sqnr_db")->AsDouble(), 30.0);
  EXPECT_GT(*j->Find("compression_ratio")->AsDouble(), 1.0);
}

TEST(Artifact, DeterministicBytesAndPrefixOrder) {
  ScratchDir dir;
  const std::string src = WriteSource(dir);
  ArtifactOptions o = Options(4, 4, Grid::kMid, ScaleGranularity::kChannel);
  ThreadPool pool(2);
  ASSERT_TRUE(ExpandSafetensorsFile(src, dir.File("a"), o).ok());
  o.expand.pool = &pool;
  ASSERT_TRUE(ExpandSafetensorsFile(src, dir.File("b"), o).ok());
  EXPECT_EQ(::fpxint::testing::ReadFileOrDie(dir.File("a")),
            ::fpxint::testing::ReadFileOrDie(dir.File("b")));
}

TEST(Artifact, KnownSourceHashIsRecordedAsGiven) {
  ScratchDir dir;
  const std::string src = WriteSource(dir);
  ArtifactOptions o = Options(4, 2, Grid::kSym, ScaleGranularity::kChannel);
  absl::StatusOr<ExpandReport> computed = ExpandSafetensorsFile(src, dir.File("a"), o);
  ASSERT_TRUE(computed.ok()) << computed.status();
  EXPECT_EQ(computed->source_sha256, *Sha256File(src));
  // A caller that names the source by its hash (the server's blob store) skips the hashing.
  o.source_sha256 = std::string(64, 'a');
  absl::StatusOr<ExpandReport> given = ExpandSafetensorsFile(src, dir.File("b"), o);
  ASSERT_TRUE(given.ok()) << given.status();
  EXPECT_EQ(given->source_sha256, o.source_sha256);
  auto r = SafetensorsReader::Open(dir.File("b"));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)->Metadata("source_sha256"), o.source_sha256);
  // With the hash known, the source's pages are released as it is read (ReleaseMappedPages),
  // and the copied tensors' and spilled terms' once written: the artifact is the same bytes.
  o.source_sha256 = computed->source_sha256;
  ASSERT_TRUE(ExpandSafetensorsFile(src, dir.File("c"), o).ok());
  EXPECT_EQ(::fpxint::testing::ReadFileOrDie(dir.File("a")),
            ::fpxint::testing::ReadFileOrDie(dir.File("c")));
}

// With the source's hash known and no eps, every term is written straight to its place in the
// artifact; otherwise terms are spilled and the file written from them. Both make the same bytes,
// for every grid (asym adds zero points) and scale granularity.
TEST(Artifact, WrittenInPlaceOrFromSpilledTermsTheBytesAreTheSame) {
  ScratchDir dir;
  const std::string src = WriteSource(dir);
  const std::string sha = *Sha256File(src);
  for (Grid g : {Grid::kSym, Grid::kAsym, Grid::kMid}) {
    for (ScaleGranularity sc :
         {ScaleGranularity::kTensor, ScaleGranularity::kChannel, ScaleGranularity::kGroup}) {
      ArtifactOptions o = Options(4, 3, g, sc);
      if (sc == ScaleGranularity::kGroup) o.spec.group_size = 16;
      absl::StatusOr<ExpandReport> spilled = ExpandSafetensorsFile(src, dir.File("spilled"), o);
      ASSERT_TRUE(spilled.ok()) << spilled.status();
      o.source_sha256 = sha;
      absl::StatusOr<ExpandReport> placed = ExpandSafetensorsFile(src, dir.File("placed"), o);
      ASSERT_TRUE(placed.ok()) << placed.status();
      EXPECT_EQ(placed->artifact_sha256, spilled->artifact_sha256);
      EXPECT_EQ(placed->artifact_sha256, *Sha256File(dir.File("placed")));
      EXPECT_EQ(placed->bytes_out, spilled->bytes_out);
      EXPECT_EQ(::fpxint::testing::ReadFileOrDie(dir.File("placed")),
                ::fpxint::testing::ReadFileOrDie(dir.File("spilled")))
          << GridName(g) << " " << ScaleName(sc);
    }
  }
}

// Tensors of 1 MiB and more are read from the file into a reused buffer, not through the
// mapping: each tensor's terms, large or small, at odd offsets, are those ExpandTensor gives on
// its bytes.
TEST(Artifact, LargeTensorsReadIntoABufferExpandAsInMemory) {
  ScratchDir dir;
  SafetensorsWriter w;
  // A 3-byte tensor first puts the large ones at odd offsets; "small" stays below 1 MiB.
  EXPECT_TRUE(w.AddOwned("pad", DType::kU8, {3}, std::vector<uint8_t>{1, 2, 3}).ok());
  std::vector<std::vector<uint8_t>> data;
  const std::vector<std::pair<std::string, std::vector<int64_t>>> tensors = {
      {"big0", {600, 1000}}, {"small", {100, 70}}, {"big1", {1030, 700}}};
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, shape] = tensors[i];
    const std::vector<double> v = RandomValues(Dist::kStudentT3, shape[0] * shape[1], 40 + i);
    std::vector<uint16_t> bf(v.size());
    for (size_t j = 0; j < v.size(); ++j) bf[j] = FloatToBFloat16(static_cast<float>(v[j]));
    data.push_back(AsBytes(bf));
    EXPECT_TRUE(w.AddOwned(name, DType::kBF16, shape, data.back()).ok());
  }
  const std::string src = dir.File("src.safetensors");
  ASSERT_TRUE(w.WriteFile(src).ok());
  ArtifactOptions o = Options(4, 2, Grid::kSym, ScaleGranularity::kGroup, 128);
  o.source_sha256 = *Sha256File(src);
  ThreadPool pool(2);
  o.expand.pool = &pool;
  const std::string out = dir.File("out.safetensors");
  absl::StatusOr<ExpandReport> rep = ExpandSafetensorsFile(src, out, o);
  ASSERT_TRUE(rep.ok()) << rep.status();
  EXPECT_EQ(rep->artifact_sha256, *Sha256File(out));
  auto r = SafetensorsReader::Open(out);
  ASSERT_TRUE(r.ok()) << r.status();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, shape] = tensors[i];
    absl::StatusOr<TensorExpansion> e =
        ExpandTensor(DType::kBF16, shape, data[i], o.spec, o.expand);
    ASSERT_TRUE(e.ok()) << e.status();
    for (int k = 1; k <= 2; ++k) {
      const TensorInfo* codes = (*r)->Find(absl::StrCat(name, ".t", k, ".codes"));
      const TensorInfo* scale = (*r)->Find(absl::StrCat(name, ".t", k, ".scale"));
      ASSERT_NE(codes, nullptr);
      ASSERT_NE(scale, nullptr);
      const auto c = (*r)->Data(*codes);
      const auto sc = (*r)->Data(*scale);
      const TermData& t = e->terms[static_cast<size_t>(k - 1)];
      EXPECT_TRUE(std::equal(c.begin(), c.end(), t.codes.begin(), t.codes.end())) << name << k;
      ASSERT_EQ(sc.size(), t.scale.size() * 4);
      EXPECT_EQ(0, std::memcmp(sc.data(), t.scale.data(), sc.size())) << name << k;
    }
  }
}

// Per-tensor term counts (an error-budgeted expansion): the named tensor keeps its own K,
// recorded as its `.terms`, and its terms equal the first K of the uniform expansion; written in
// place or from spilled terms, the bytes are the same. Bad counts and names are refused.
TEST(Artifact, PerTensorTermsAreKeptAndRecorded) {
  ScratchDir dir;
  const std::string src = WriteSource(dir);
  ArtifactOptions o = Options(4, 3, Grid::kSym, ScaleGranularity::kChannel);
  absl::StatusOr<ExpandReport> all = ExpandSafetensorsFile(src, dir.File("uniform"), o);
  ASSERT_TRUE(all.ok() && all->tensors.size() >= 2) << all.status();
  const std::string two_d = all->tensors[0].name;  // an expanded tensor
  o.terms_for[two_d] = 1;
  absl::StatusOr<ExpandReport> spilled = ExpandSafetensorsFile(src, dir.File("spilled"), o);
  ASSERT_TRUE(spilled.ok()) << spilled.status();
  o.source_sha256 = *Sha256File(src);
  absl::StatusOr<ExpandReport> placed = ExpandSafetensorsFile(src, dir.File("placed"), o);
  ASSERT_TRUE(placed.ok()) << placed.status();
  EXPECT_EQ(::fpxint::testing::ReadFileOrDie(dir.File("placed")),
            ::fpxint::testing::ReadFileOrDie(dir.File("spilled")));
  auto mixed = SafetensorsReader::Open(dir.File("placed"));
  auto uniform = SafetensorsReader::Open(dir.File("uniform"));
  ASSERT_TRUE(mixed.ok() && uniform.ok());
  EXPECT_EQ((*mixed)->Metadata(two_d + ".terms"), "1");
  EXPECT_EQ((*mixed)->Metadata("terms"), "3");
  EXPECT_EQ((*mixed)->Find(two_d + ".t2.codes"), nullptr);
  for (const char* part : {".t1.codes", ".t1.scale"}) {
    const TensorInfo* a = (*mixed)->Find(two_d + part);
    const TensorInfo* b = (*uniform)->Find(two_d + part);
    ASSERT_TRUE(a != nullptr && b != nullptr) << part;
    auto da = (*mixed)->Data(*a), db = (*uniform)->Data(*b);
    EXPECT_TRUE(std::equal(da.begin(), da.end(), db.begin(), db.end())) << part;
  }
  // The reader takes it: the tensor's one term.
  auto view = ArtifactView::Parse(**mixed);
  ASSERT_TRUE(view.ok()) << view.status();
  o.terms_for[two_d] = 4;
  EXPECT_EQ(ExpandSafetensorsFile(src, dir.File("bad"), o).status().code(),
            absl::StatusCode::kInvalidArgument);
  o.terms_for.clear();
  o.terms_for["no.such.tensor"] = 1;
  EXPECT_NE(ExpandSafetensorsFile(src, dir.File("bad"), o).status().message().find("no.such.tensor"),
            std::string::npos);
}

TEST(MappedFile, ReleasedPagesReadBackFromTheFile) {
  ScratchDir dir;
  std::string text(3 * 4096 + 100, '\0');
  for (size_t i = 0; i < text.size(); ++i) text[i] = static_cast<char>(i * 7 + 1);
  ::fpxint::testing::WriteFileOrDie(dir.File("f"), text);
  auto m = MappedFile::Open(dir.File("f"));
  ASSERT_TRUE(m.ok()) << m.status();
  const absl::Span<const uint8_t> all = (*m)->bytes();
  ReleaseMappedPages(all.subspan(10, 2 * 4096));  // an unaligned span: whole pages inside it
  ReleaseMappedPages(all);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(all.data()), all.size()), text);
}

// A tensor of a dtype fpxint does not read is copied into the artifact unchanged, with the
// reason naming its dtype, and the rest of the file expands as usual.
TEST(Artifact, UnsupportedDTypesAreCopiedUnchangedWithTheReason) {
  ScratchDir dir;
  auto src = SafetensorsReader::Open(WriteSource(dir));
  ASSERT_TRUE(src.ok()) << src.status();
  SafetensorsWriter w;
  for (const TensorInfo& t : (*src)->tensors()) {
    ASSERT_TRUE(w.Add(t.name, t.dtype, t.shape, (*src)->Data(t)).ok());
  }
  const std::vector<uint8_t> q = {1, 2, 3, 4, 5, 6, 7, 8};
  ASSERT_TRUE(w.Add("q.weight", DType::kOther, {2, 4}, q, "F8_E4M3FNUZ").ok());
  ASSERT_TRUE(w.WriteFile(dir.File("with_q.safetensors")).ok());
  absl::StatusOr<ExpandReport> rep =
      ExpandSafetensorsFile(dir.File("with_q.safetensors"), dir.File("out.safetensors"),
                            Options(4, 2, Grid::kSym, ScaleGranularity::kChannel));
  ASSERT_TRUE(rep.ok()) << rep.status();
  bool listed = false;
  for (const CopiedTensor& c : rep->copied) {
    if (c.name != "q.weight") continue;
    listed = true;
    EXPECT_NE(c.reason.find("F8_E4M3FNUZ is not read by fpxint"), std::string::npos) << c.reason;
  }
  EXPECT_TRUE(listed);
  EXPECT_EQ(rep->tensors.size(), 2u);  // conv.weight and fc.weight still expand
  auto out = SafetensorsReader::Open(dir.File("out.safetensors"));
  ASSERT_TRUE(out.ok()) << out.status();
  const TensorInfo* t = (*out)->Find("q.weight");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dtype_name, "F8_E4M3FNUZ");
  const auto d = (*out)->Data(*t);
  EXPECT_EQ(std::vector<uint8_t>(d.begin(), d.end()), q);
}

// The dequantized file: the source's names, order, shapes and dtypes; every expanded tensor is
// the artifact's Σ terms (fp64, rounded once to its dtype); every other tensor (a bias, an
// integer buffer, an excluded weight, a dtype fpxint does not read) is the source's bytes; an FP8
// weight comes out as BF16.
TEST(Artifact, DequantizedSafetensorsKeepsTheSourceLayout) {
  ScratchDir dir;
  auto base = SafetensorsReader::Open(WriteSource(dir));
  ASSERT_TRUE(base.ok()) << base.status();
  SafetensorsWriter w;
  w.SetMetadata("format", "pt");
  for (const TensorInfo& t : (*base)->tensors()) {
    ASSERT_TRUE(w.Add(t.name, t.dtype, t.shape, (*base)->Data(t)).ok());
  }
  std::vector<uint8_t> f8(16 * 24);
  for (size_t i = 0; i < f8.size(); ++i) f8[i] = static_cast<uint8_t>((i * 37) % 120);
  ASSERT_TRUE(w.Add("f8.weight", DType::kF8E4M3, {16, 24}, f8).ok());
  std::vector<uint16_t> bf(20 * 10);
  for (size_t i = 0; i < bf.size(); ++i) bf[i] = FloatToBFloat16(std::sin(0.3f * i));
  ASSERT_TRUE(w.AddOwned("bf.weight", DType::kBF16, {20, 10}, AsBytes(bf)).ok());
  const std::vector<uint8_t> q = {1, 2, 3, 4, 5, 6, 7, 8};
  ASSERT_TRUE(w.Add("q.weight", DType::kOther, {2, 4}, q, "F8_E4M3FNUZ").ok());
  const std::string src_path = dir.File("src2.safetensors");
  ASSERT_TRUE(w.WriteFile(src_path).ok());
  const std::string art_path = dir.File("art.safetensors");
  ASSERT_TRUE(ExpandSafetensorsFile(src_path, art_path,
                                    Options(4, 2, Grid::kSym, ScaleGranularity::kChannel))
                  .ok());
  auto sha = WriteDequantizedSafetensors(src_path, art_path, dir.File("deq.safetensors"));
  ASSERT_TRUE(sha.ok()) << sha.status();
  const std::string written = ReadFileOrDie(dir.File("deq.safetensors"));
  EXPECT_EQ(*sha, Sha256Hex(absl::MakeConstSpan(
                      reinterpret_cast<const uint8_t*>(written.data()), written.size())));
  auto src = SafetensorsReader::Open(src_path);
  auto deq = SafetensorsReader::Open(dir.File("deq.safetensors"));
  auto art = SafetensorsReader::Open(art_path);
  ASSERT_TRUE(src.ok() && deq.ok() && art.ok());
  auto view = ArtifactView::Parse(**art);
  ASSERT_TRUE(view.ok()) << view.status();
  ASSERT_EQ((*deq)->tensors().size(), (*src)->tensors().size());
  EXPECT_EQ((*deq)->Metadata("format"), std::optional<std::string>("pt"));
  EXPECT_TRUE((*deq)->Metadata("fpxint.dequantized").has_value());
  int expanded = 0;
  for (size_t i = 0; i < (*src)->tensors().size(); ++i) {
    const TensorInfo& s = (*src)->tensors()[i];
    const TensorInfo& d = (*deq)->tensors()[i];
    EXPECT_EQ(d.name, s.name);
    EXPECT_EQ(d.shape, s.shape);
    const auto sd = (*src)->Data(s);
    const auto dd = (*deq)->Data(d);
    auto e = view->Load(s.name);
    if (!e.ok()) {  // not expanded: the source's bytes
      EXPECT_EQ(d.dtype_name, s.dtype_name) << s.name;
      EXPECT_EQ(std::vector<uint8_t>(dd.begin(), dd.end()),
                std::vector<uint8_t>(sd.begin(), sd.end()))
          << s.name;
      continue;
    }
    ++expanded;
    EXPECT_EQ(d.dtype, s.dtype == DType::kF8E4M3 ? DType::kBF16 : s.dtype) << s.name;
    const std::vector<double> want = Reconstruct(*e, static_cast<int>(e->terms.size()));
    ASSERT_EQ(want.size() * DTypeSize(d.dtype), dd.size()) << s.name;
    std::vector<double> got(want.size());
    ConvertToDouble(d.dtype, dd.data(), static_cast<int64_t>(got.size()), got.data());
    for (size_t j = 0; j < want.size(); ++j) {
      const float f = static_cast<float>(want[j]);
      const double rounded = d.dtype == DType::kF32   ? double{f}
                             : d.dtype == DType::kF16 ? double{HalfToFloat(FloatToHalf(f))}
                                                      : double{BFloat16ToFloat(FloatToBFloat16(f))};
      ASSERT_EQ(got[j], rounded) << s.name << "[" << j << "]";
    }
  }
  EXPECT_EQ(expanded, 4);  // conv, fc, f8, bf (head is excluded, q unread)
  // An artifact of another source is refused.
  auto other = WriteDequantizedSafetensors(src_path, art_path, dir.File("x.safetensors"),
                                           std::string(64, '0'));
  EXPECT_EQ(other.status().code(), absl::StatusCode::kInvalidArgument) << other.status();
}

// The transformer preset's names, from Llama, GPT-2, BERT and Falcon checkpoints.
TEST(Artifact, TransformerPresetKeepsEmbeddingsNormsBiasesAndTheHead) {
  auto keep = NamePattern::Compile(kTransformerPresetKeep, "preset");
  ASSERT_TRUE(keep.ok()) << keep.status();
  for (const char* kept :
       {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
        "model.layers.3.input_layernorm.weight", "model.layers.3.post_attention_layernorm.weight",
        "transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
        "transformer.ln_f.weight", "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.output.LayerNorm.weight", "model.layers.0.mlp.down_proj.bias",
        "transformer.word_embeddings.weight"}) {
    EXPECT_TRUE(keep->Matches(kept)) << kept;
  }
  for (const char* expanded :
       {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_proj.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "transformer.h.0.self_attention.query_key_value.weight"}) {
    EXPECT_FALSE(keep->Matches(expanded)) << expanded;
  }
}

TEST(Artifact, ClearErrors) {
  ScratchDir dir;
  const std::string src = WriteSource(dir);
  ArtifactOptions o = Options(4, 2, Grid::kSym, ScaleGranularity::kChannel);
  o.include_regex = "([";
  absl::Status s = ExpandSafetensorsFile(src, dir.File("o"), o).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "include")) << s;
  o.include_regex.clear();
  EXPECT_EQ(ExpandSafetensorsFile(dir.File("missing"), dir.File("o"), o).status().code(),
            absl::StatusCode::kNotFound);
  // A source tensor whose name collides with an output name.
  SafetensorsWriter w;
  ASSERT_TRUE(w.AddOwned("x", DType::kF32, {2, 2}, std::vector<uint8_t>(16, 0)).ok());
  ASSERT_TRUE(w.AddOwned("x.t1.scale", DType::kF32, {1}, std::vector<uint8_t>(4, 0)).ok());
  ASSERT_TRUE(w.WriteFile(dir.File("clash")).ok());
  s = ExpandSafetensorsFile(dir.File("clash"), dir.File("o"), o).status();
  EXPECT_TRUE(absl::StrContains(s.message(), "x.t1.scale")) << s;
  EXPECT_FALSE(std::ifstream(dir.File("o")).good()) << "nothing is written on error";
  // NaN in a weight names the tensor.
  SafetensorsWriter n;
  ASSERT_TRUE(n.AddOwned("bad.weight", DType::kF32, {2, 2},
                         AsBytes(std::vector<float>{1, NAN, 2, 3})).ok());
  ASSERT_TRUE(n.WriteFile(dir.File("nan")).ok());
  s = ExpandSafetensorsFile(dir.File("nan"), dir.File("o"), o).status();
  EXPECT_TRUE(absl::StrContains(s.message(), "tensor 'bad.weight'")) << s;
}

TEST(Artifact, ViewRejectsTamperedArtifacts) {
  ScratchDir dir;
  const std::string src = WriteSource(dir);
  ASSERT_TRUE(ExpandSafetensorsFile(src, dir.File("a"), Options(4, 2, Grid::kSym,
                                                                ScaleGranularity::kChannel)).ok());
  auto good = SafetensorsReader::Open(dir.File("a"));
  ASSERT_TRUE(good.ok());
  // Rewrite the artifact with one change at a time.
  auto rewrite = [&](const std::string& drop, const std::string& key, const std::string& value) {
    SafetensorsWriter w;
    for (const auto& [k, v] : (*good)->metadata()) w.SetMetadata(k, k == key ? value : v);
    for (const TensorInfo& t : (*good)->tensors()) {
      if (t.name != drop) {
        EXPECT_TRUE(w.Add(t.name, t.dtype, t.shape, (*good)->Data(t)).ok());
      }
    }
    std::vector<uint8_t> bytes = w.Serialize();
    auto r = SafetensorsReader::FromBuffer(bytes);
    EXPECT_TRUE(r.ok());
    absl::StatusOr<ArtifactView> v = ArtifactView::Parse(**r);
    return v.ok() ? std::string() : std::string(v.status().message());
  };
  EXPECT_EQ(rewrite("", "", ""), "");
  EXPECT_TRUE(absl::StrContains(rewrite("", "format", "gguf"), "format is 'gguf'"));
  EXPECT_TRUE(absl::StrContains(rewrite("", "bits", "3"), "packing"));
  EXPECT_TRUE(absl::StrContains(rewrite("", "bits", "x"), "not an integer"));
  EXPECT_TRUE(absl::StrContains(rewrite("fc.weight.t2.codes", "", ""), "missing tensor 'fc.weight.t2.codes'"));
  EXPECT_TRUE(absl::StrContains(rewrite("", "fc.weight.shape", "[48,71]"), "expected U8[48,36]"));
  EXPECT_TRUE(absl::StrContains(rewrite("", "fc.weight.shape", "[48"), "not a shape list"));
  EXPECT_TRUE(absl::StrContains(rewrite("", "fc.weight.terms", "9"), "accepted 1..2"));
}

// docs/ALGORITHM.md §7, C2 and C13 on real pretrained weights (the PaddleOCR recognizer, 2.69 M parameters).
TEST(ArtifactRealWeights, OcrRecognizerBoundsAndConvergence) {
  const std::string models = ::fpxint::testing::RealModelsDir();
  ASSERT_FALSE(models.empty());
  const std::string src = models + "/ocr/ocr_rec.safetensors";
  ScratchDir dir;
  ThreadPool pool(2);
  int64_t tiny_groups = 0;
  for (Grid grid : {Grid::kSym, Grid::kMid, Grid::kAsym}) {
    for (ScaleGranularity scale : {ScaleGranularity::kChannel, ScaleGranularity::kGroup}) {
      ArtifactOptions o;
      o.spec.bits = 4;
      o.spec.terms = 4;
      o.spec.grid = grid;
      o.spec.scale = scale;
      o.spec.group_size = scale == ScaleGranularity::kGroup ? 32 : 0;
      o.expand.pool = &pool;
      absl::StatusOr<ExpandReport> rep = ExpandSafetensorsFile(src, dir.File("o"), o);
      ASSERT_TRUE(rep.ok()) << rep.status();
      EXPECT_GE(rep->tensors.size(), 47u);  // 38 conv + 9 linear weights
      const double r = o.spec.contraction();
      for (const TensorReport& t : rep->tensors) {
        double prev = INFINITY;
        for (const TermError& e : t.terms) {
          EXPECT_LE(e.worst_ratio, std::pow(r, e.k) * (1 + 1e-12)) << t.name << " " << o.spec.ToString();
          // Dead channels of subnormal weights: tracked apart, absolutely tiny.
          EXPECT_LE(e.tiny_max_abs, 256 * FLT_MIN) << t.name;
          tiny_groups += e.tiny_groups;
          EXPECT_LE(e.max_abs, prev) << t.name;
          prev = e.max_abs;
        }
        EXPECT_LT(t.terms[3].rel_fro, 1e-3) << t.name << " " << o.spec.ToString();
      }
    }
  }
  // The recognizer has channels whose weights are all subnormal (max ~3e-40).
  EXPECT_GT(tiny_groups, 0);
}

}  // namespace
}  // namespace fpxint::core
