#include "core/artifact.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <future>

#include "core/name_pattern.h"

#include "absl/container/flat_hash_map.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "core/json.h"
#include "core/kernels.h"
#include "core/mapped_file.h"
#include "core/sha256.h"
#include "core/status_macros.h"
#include "core/thread_pool.h"
#include "core/torch_state_dict.h"
#include "core/unique_fd.h"

namespace fpxint::core {
namespace {

std::string ShapeJson(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

template <typename Vec>
absl::Span<const uint8_t> Bytes(const Vec& v) {
  return absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(v.data()),
                             v.size() * sizeof(typename Vec::value_type));
}

DType CodesDType(const ExpansionSpec& spec) {
  return (spec.is_packed() || !spec.is_signed()) ? DType::kU8 : DType::kI8;
}

// The terms of the tensors expanded so far, spilled to one unnamed temporary file per term k
// (term-major order needs term 1 of every tensor before term 2 of any): the expansion of a
// tensor is freed as soon as it is spilled, so a job's memory is one tensor's expansion, not the
// whole artifact. The files are mapped read-only for the final write and vanish when closed.
class TermSpill {
 public:
  explicit TermSpill(std::string dir) : dir_(std::move(dir)) {}
  ~TermSpill() {
    for (auto& f : files_) {
      if (f.map != nullptr) ::munmap(f.map, f.size);
      if (f.fd >= 0) ::close(f.fd);
    }
  }
  TermSpill(const TermSpill&) = delete;
  TermSpill& operator=(const TermSpill&) = delete;

  // Appends bytes to term k's file; returns the offset they start at.
  absl::StatusOr<uint64_t> Append(int k, absl::Span<const uint8_t> bytes) {
    if (files_.size() < static_cast<size_t>(k)) files_.resize(static_cast<size_t>(k));
    File& f = files_[static_cast<size_t>(k - 1)];
    if (f.fd < 0) {
      f.fd = ::open(dir_.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
      if (f.fd < 0) {  // no O_TMPFILE on this file system: a named file, unlinked at once
        const std::string name = absl::StrCat(dir_, "/.fpxint-spill-", ::getpid(), "-", k);
        f.fd = ::open(name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
        if (f.fd < 0) return ErrnoToStatus(errno, "cannot create a spill file in", dir_);
        ::unlink(name.c_str());
      }
    }
    const uint64_t at = f.size;
    size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = ::write(f.fd, bytes.data() + done, bytes.size() - done);
      if (n < 0) {
        if (errno == EINTR) continue;
        return ErrnoToStatus(errno, "cannot write a spill file in", dir_);
      }
      done += static_cast<size_t>(n);
    }
    f.size += bytes.size();
    return at;
  }

  // Maps every file; then Data(k, offset, n) views the bytes.
  absl::Status Map() {
    for (File& f : files_) {
      if (f.size == 0) continue;
      void* m = ::mmap(nullptr, f.size, PROT_READ, MAP_SHARED, f.fd, 0);
      if (m == MAP_FAILED) return ErrnoToStatus(errno, "cannot map a spill file in", dir_);
      f.map = static_cast<uint8_t*>(m);
    }
    return absl::OkStatus();
  }
  absl::Span<const uint8_t> Data(int k, uint64_t offset, uint64_t n) const {
    return absl::MakeConstSpan(files_[static_cast<size_t>(k - 1)].map + offset, n);
  }
  // Whether `s` lies in one of the mapped files.
  bool Holds(absl::Span<const uint8_t> s) const {
    for (const File& f : files_) {
      if (f.map != nullptr && s.data() >= f.map && s.data() + s.size() <= f.map + f.size) return true;
    }
    return false;
  }

 private:
  struct File {
    int fd = -1;
    uint64_t size = 0;
    uint8_t* map = nullptr;
  };
  std::string dir_;
  std::vector<File> files_;
};

// Where one spilled piece of a term lives.
struct SpilledPart {
  uint64_t offset = 0, size = 0;
};
struct SpilledTerm {
  SpilledPart codes, scale, zero;
};
struct SpilledTensor {
  std::vector<SpilledTerm> terms;
};

}  // namespace

namespace {

// The tensors of an input file: safetensors, or a torch.save state dict (read without running
// pickle code; strided views are copied out row-major, everything else stays in the mapping).
struct SourceTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  absl::Span<const uint8_t> data;
  std::string other_dtype_name;  // kOther: the file's spelling, written back unchanged

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

struct SourceFile {
  std::unique_ptr<SafetensorsReader> safetensors;
  std::unique_ptr<TorchStateDict> state_dict;
  std::vector<std::vector<uint8_t>> copies;
  std::vector<SourceTensor> tensors;
  absl::Span<const uint8_t> bytes;  // the whole file

  static absl::StatusOr<std::unique_ptr<SourceFile>> Open(const std::string& path) {
    auto f = std::make_unique<SourceFile>();
    uint8_t magic[9] = {};
    {
      const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) return ErrnoToStatus(errno, "cannot open", path);
      const ssize_t n = ::pread(fd, magic, sizeof(magic), 0);
      ::close(fd);
      if (n < 0) return ErrnoToStatus(errno, "cannot read", path);
    }
    // A legacy (pre-1.6) torch.save file starts with a protocol-2 pickle of a LONG1 magic number;
    // the state-dict reader explains that format. (A safetensors header starts with '{'.)
    const bool legacy_torch = magic[0] == 0x80 && magic[1] == 0x02 && magic[2] == 0x8a &&
                              magic[8] != '{';
    if (!LooksLikeZip(magic) && !legacy_torch) {
      FPX_ASSIGN_OR_RETURN(f->safetensors, SafetensorsReader::Open(path));
      f->bytes = f->safetensors->bytes();
      for (const TensorInfo& t : f->safetensors->tensors()) {
        f->tensors.push_back({t.name, t.dtype, t.shape, f->safetensors->Data(t),
                              t.dtype == DType::kOther ? t.dtype_name : ""});
      }
      return f;
    }
    FPX_ASSIGN_OR_RETURN(f->state_dict, TorchStateDict::Open(path));
    f->bytes = f->state_dict->bytes();
    for (const StateDictTensor& t : f->state_dict->tensors()) {
      const size_t size = static_cast<size_t>(t.numel()) * DTypeSize(t.dtype);
      absl::Span<const uint8_t> data;
      if (size > 0 && t.contiguous()) {
        data = t.storage.subspan(static_cast<size_t>(t.offset) * DTypeSize(t.dtype), size);
      } else if (size > 0) {
        f->copies.emplace_back(size);
        t.CopyTo(f->copies.back().data());
        data = f->copies.back();
      }
      f->tensors.push_back({t.name, t.dtype, t.shape, data, ""});
    }
    return f;
  }
};

}  // namespace

absl::StatusOr<ExpandReport> ExpandSafetensorsFile(const std::string& in_path,
                                                   const std::string& out_path,
                                                   const ArtifactOptions& options) {
  const absl::Time start = absl::Now();
  const ExpansionSpec& spec = options.spec;
  FPX_RETURN_IF_ERROR(spec.Validate());
  if (spec.unsigned_first) {
    return absl::InvalidArgumentError(
        "unsigned_first is for activations; weight artifacts store signed terms");
  }
  std::optional<NamePattern> include, exclude;
  if (!options.include_regex.empty()) {
    FPX_ASSIGN_OR_RETURN(include, NamePattern::Compile(options.include_regex, "include"));
  }
  if (!options.exclude_regex.empty()) {
    FPX_ASSIGN_OR_RETURN(exclude, NamePattern::Compile(options.exclude_regex, "exclude"));
  }
  std::optional<NamePattern> keep;
  if (!options.keep_regex.empty()) {
    FPX_ASSIGN_OR_RETURN(keep, NamePattern::Compile(options.keep_regex, "preset"));
  }
  FPX_ASSIGN_OR_RETURN(std::unique_ptr<SourceFile> source, SourceFile::Open(in_path));

  ExpandReport report;
  report.spec = spec;
  // The source's hash goes into the header. It is computed on its own thread while the
  // tensors expand: hashing is sequential, so done first it would leave the other core idle for
  // as long (about half the time of a b=4 K=2 expansion of a large file). A hash the caller
  // already knows is returned without a thread (std::launch::deferred).
  std::atomic<bool> stop_hashing{false};
  std::future<std::string> source_hash = std::async(
      options.source_sha256.empty() ? std::launch::async : std::launch::deferred, [&] {
    if (!options.source_sha256.empty()) return options.source_sha256;
    Sha256 h;
    const absl::Span<const uint8_t> all = source->bytes;
    constexpr size_t kChunk = size_t{8} << 20;
    for (size_t at = 0; at < all.size() && !stop_hashing.load(std::memory_order_relaxed);
         at += kChunk) {
      h.Update(all.subspan(at, std::min(kChunk, all.size() - at)));
    }
    return h.HexDigest();
  });
  // Every return below waits for the hash (the future's destructor); stop it early on errors.
  struct StopOnExit {
    std::atomic<bool>* stop;
    ~StopOnExit() { stop->store(true); }
  } stop_on_exit{&stop_hashing};
  report.bytes_in = source->bytes.size();
  const KernelTable& kt =
      options.expand.kernels != nullptr ? *options.expand.kernels : ActiveKernels();
  report.kernel = kt.name;
  report.threads = options.expand.pool == nullptr ? 1 : options.expand.pool->size();

  std::vector<const SourceTensor*> selected, copied;
  for (const SourceTensor& t : source->tensors) {
    std::string reason;
    if (t.dtype == DType::kOther) {
      reason = absl::StrCat("dtype ", t.other_dtype_name, " is not read by fpxint (accepted: ",
                            AcceptedDTypeNames(), "); its bytes are copied unchanged");
    } else if (t.shape.size() < 2) {
      reason = "rank < 2";
    } else if (!IsFloating(t.dtype)) {
      reason = "not floating point";
    } else if (t.numel() == 0) {
      reason = "empty";
    } else if (include && !include->Matches(t.name)) {
      reason = "not included";
    } else if (exclude && exclude->Matches(t.name)) {
      reason = "excluded";
    } else if (keep && keep->Matches(t.name) && !include) {
      reason = options.keep_reason;
    }
    if (!reason.empty()) {
      report.copied.push_back({t.name, std::move(reason)});
      copied.push_back(&t);
    } else {
      selected.push_back(&t);
    }
  }

  // The source is read once, front to back: with no hashing thread still reading it, each
  // tensor's pages are released once it is expanded (and the copied ones once written), so the
  // resident set holds one tensor at a time, not the file.
  const bool release_source = !options.source_sha256.empty();
  auto in_source = [&](absl::Span<const uint8_t> s) {
    return !s.empty() && s.data() >= source->bytes.data() &&
           s.data() + s.size() <= source->bytes.data() + source->bytes.size();
  };

  // Each tensor's term count: spec.terms, or what terms_for gives it.
  std::vector<int> terms_of(selected.size(), spec.terms);
  {
    absl::flat_hash_map<std::string, int> left = options.terms_for;
    for (size_t i = 0; i < selected.size(); ++i) {
      auto it = left.find(selected[i]->name);
      if (it == left.end()) continue;
      if (it->second < 1 || it->second > spec.terms) {
        return absl::InvalidArgumentError(absl::StrCat("terms for '", it->first, "': ", it->second,
                                                       "; accepted 1..", spec.terms));
      }
      terms_of[i] = it->second;
      left.erase(it);
    }
    if (!left.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("terms for '", left.begin()->first,
                                                     "': no such expanded tensor"));
    }
  }
  ExpandProgress progress;
  progress.tensor_count = static_cast<int>(selected.size());
  for (const SourceTensor* t : selected) progress.bytes_total += t->data.size();

  // The artifact's header, the same for both ways of writing it: metadata, the copied tensors
  // and every term of every expanded tensor, term-major. `add_term` adds one term part.
  SafetensorsWriter w;
  const DType codes_dtype = CodesDType(spec);
  auto build = [&](const std::vector<int>& tensor_terms,
                   const std::function<absl::Status(size_t i, int k, const std::string& name,
                                                    DType dtype, std::vector<int64_t> shape,
                                                    int part)>& add_term) -> absl::Status {
    w.SetMetadata("format", kArtifactFormat);
    w.SetMetadata("format_version", kArtifactVersion);
    w.SetMetadata("bits", absl::StrCat(spec.bits));
    w.SetMetadata("terms", absl::StrCat(spec.terms));
    w.SetMetadata("grid", GridName(spec.grid));
    w.SetMetadata("variant", VariantName(spec.variant));
    w.SetMetadata("scale", ScaleName(spec.scale));
    w.SetMetadata("group_size", absl::StrCat(spec.group_size));
    w.SetMetadata("packing", spec.packing_name());
    w.SetMetadata("source_sha256", report.source_sha256);
    if (spec.eps > 0) w.SetMetadata("eps", absl::StrCat(spec.eps));
    for (size_t i = 0; i < selected.size(); ++i) {
      w.SetMetadata(absl::StrCat(selected[i]->name, ".shape"), ShapeJson(selected[i]->shape));
      w.SetMetadata(absl::StrCat(selected[i]->name, ".terms"), absl::StrCat(tensor_terms[i]));
    }
    for (const SourceTensor* t : copied) {
      FPX_RETURN_IF_ERROR(w.Add(t->name, t->dtype, t->shape, t->data, t->other_dtype_name));
    }
    for (int k = 1; k <= spec.terms; ++k) {
      for (size_t i = 0; i < selected.size(); ++i) {
        if (k > tensor_terms[i]) continue;
        FPX_ASSIGN_OR_RETURN(TensorLayout l, TensorLayout::Make(selected[i]->shape, spec));
        const std::string prefix = absl::StrCat(selected[i]->name, ".t", k);
        absl::Status s = add_term(i, k, absl::StrCat(prefix, ".codes"), codes_dtype,
                                  {l.rows, l.packed_row_bytes}, 0);
        if (s.ok()) {
          s = add_term(i, k, absl::StrCat(prefix, ".scale"), DType::kF32, l.scale_shape(spec), 1);
        }
        if (s.ok() && spec.grid == Grid::kAsym) {
          s = add_term(i, k, absl::StrCat(prefix, ".zero"), DType::kF32, l.scale_shape(spec), 2);
        }
        if (!s.ok()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "output name clash: ", s.message(), "; rename the source tensor or exclude it"));
        }
      }
    }
    return absl::OkStatus();
  };
  auto part_bytes = [](const TermData& term, int part) {
    return part == 0 ? Bytes(term.codes) : part == 1 ? Bytes(term.scale) : Bytes(term.zero);
  };
  // Tensors of 1 MiB and more are read from the file into one buffer, reused for each (pread,
  // split over the pool), not through the mapping: every first touch of a mapped page is a
  // fault, which costs more than a copy into pages mapped once, most on virtual machines
  // (docs/BENCHMARKS.md, "Checkpoint directories"). The buffer holds the largest such tensor;
  // smaller tensors and copies of strided views are read where they are.
  constexpr size_t kStageMin = size_t{1} << 20;
  UniqueFd source_fd(::open(in_path.c_str(), O_RDONLY | O_CLOEXEC));
  std::vector<uint8_t> staging;
  {
    size_t largest = 0;
    for (const SourceTensor* t : selected) {
      if (in_source(t->data) && t->data.size() >= kStageMin) {
        largest = std::max(largest, t->data.size());
      }
    }
    if (source_fd.get() >= 0) staging.resize(largest);
  }
  auto staged = [&](absl::Span<const uint8_t> data) -> absl::StatusOr<absl::Span<const uint8_t>> {
    // staging is empty when the file could not be opened again: the mapping serves.
    if (!in_source(data) || data.size() < kStageMin || data.size() > staging.size()) {
      return data;
    }
    const uint64_t offset = static_cast<uint64_t>(data.data() - source->bytes.data());
    constexpr size_t kPiece = size_t{4} << 20;
    const int64_t pieces = static_cast<int64_t>((data.size() + kPiece - 1) / kPiece);
    std::vector<absl::Status> errors(static_cast<size_t>(pieces));
    RunTasks(options.expand.pool, pieces, [&](int64_t p) {
      const size_t at = static_cast<size_t>(p) * kPiece;
      errors[static_cast<size_t>(p)] = ReadFileRange(
          source_fd.get(), offset + at,
          absl::MakeSpan(staging.data() + at, std::min(kPiece, data.size() - at)), in_path);
    });
    for (const absl::Status& e : errors) FPX_RETURN_IF_ERROR(e);
    return absl::MakeConstSpan(staging.data(), data.size());
  };
  auto expand = [&](size_t i) -> absl::StatusOr<TensorExpansion> {
    const SourceTensor& t = *selected[i];
    progress.tensor_index = static_cast<int>(i);
    progress.name = t.name;
    if (options.progress) options.progress(progress);
    ExpansionSpec tensor_spec = spec;
    tensor_spec.terms = terms_of[i];
    FPX_ASSIGN_OR_RETURN(const absl::Span<const uint8_t> data, staged(t.data));
    absl::StatusOr<TensorExpansion> e =
        ExpandTensor(t.dtype, t.shape, data, tensor_spec, options.expand);
    if (!e.ok()) {
      return absl::Status(e.status().code(),
                          absl::StrCat("tensor '", t.name, "': ", e.status().message()));
    }
    progress.bytes_done += t.data.size();
    if (release_source && in_source(t.data)) ReleaseMappedPages(t.data);
    report.tensors.push_back(
        {t.name, std::string(DTypeName(t.dtype)), t.shape, e->source_fro, e->errors});
    return e;
  };
  auto done_expanding = [&] {
    progress.tensor_index = progress.tensor_count;
    progress.name.clear();
    if (options.progress) options.progress(progress);
  };

  if (spec.eps == 0 && !options.source_sha256.empty()) {
    // Every tensor gets spec.terms terms, so the file's layout is known from the shapes: each
    // term goes straight to its place in the artifact as its tensor is expanded, written once,
    // and its disk writes start at once (they overlap the next tensor's expansion).
    report.source_sha256 = source_hash.get();
    FPX_RETURN_IF_ERROR(build(terms_of,
                              [&](size_t, int, const std::string& name, DType dtype,
                                  std::vector<int64_t> shape, int) {
                                return w.Reserve(name, dtype, std::move(shape));
                              }));
    FPX_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsWriter::PlacedFile> file,
                         w.BeginPlaced(out_path));
    if (release_source) {
      for (const SourceTensor* t : copied) {
        if (in_source(t->data)) ReleaseMappedPages(t->data);
      }
    }
    for (size_t i = 0; i < selected.size(); ++i) {
      FPX_ASSIGN_OR_RETURN(TensorExpansion e, expand(i));
      if (e.terms.size() != static_cast<size_t>(terms_of[i])) {
        return absl::InternalError(absl::StrCat("tensor '", selected[i]->name, "': ",
                                                e.terms.size(), " terms, not ", terms_of[i]));
      }
      for (int k = 1; k <= terms_of[i]; ++k) {
        const std::string prefix = absl::StrCat(selected[i]->name, ".t", k);
        const TermData& term = e.terms[static_cast<size_t>(k - 1)];
        FPX_RETURN_IF_ERROR(file->Write(absl::StrCat(prefix, ".codes"), part_bytes(term, 0)));
        FPX_RETURN_IF_ERROR(file->Write(absl::StrCat(prefix, ".scale"), part_bytes(term, 1)));
        if (spec.grid == Grid::kAsym) {
          FPX_RETURN_IF_ERROR(file->Write(absl::StrCat(prefix, ".zero"), part_bytes(term, 2)));
        }
      }
      file->StartWriteback();
    }
    done_expanding();
    FPX_RETURN_IF_ERROR(file->Commit(&report.artifact_sha256));
  } else {
    // With eps a tensor may stop early, so the layout is known only at the end: the terms are
    // spilled (one file per k) and the artifact written from them.
    const size_t slash = out_path.rfind('/');
    TermSpill spill(slash == std::string::npos ? "."
                                               : (slash == 0 ? "/" : out_path.substr(0, slash)));
    std::vector<SpilledTensor> expansions;
    expansions.reserve(selected.size());
    for (size_t i = 0; i < selected.size(); ++i) {
      FPX_ASSIGN_OR_RETURN(TensorExpansion e, expand(i));
      SpilledTensor st;
      for (size_t k = 1; k <= e.terms.size(); ++k) {
        SpilledTerm sp;
        SpilledPart* parts[3] = {&sp.codes, &sp.scale, &sp.zero};
        for (int part = 0; part < (spec.grid == Grid::kAsym ? 3 : 2); ++part) {
          const absl::Span<const uint8_t> b = part_bytes(e.terms[k - 1], part);
          FPX_ASSIGN_OR_RETURN(parts[part]->offset, spill.Append(static_cast<int>(k), b));
          parts[part]->size = b.size();
        }
        st.terms.push_back(sp);
      }
      expansions.push_back(std::move(st));  // the expansion itself is freed here
    }
    done_expanding();
    FPX_RETURN_IF_ERROR(spill.Map());
    report.source_sha256 = source_hash.get();
    std::vector<int> spilled_terms;
    for (const SpilledTensor& e : expansions) {
      spilled_terms.push_back(static_cast<int>(e.terms.size()));
    }
    FPX_RETURN_IF_ERROR(build(spilled_terms, [&](size_t i, int k, const std::string& name, DType dtype,
                                            std::vector<int64_t> shape, int part) {
      const SpilledTerm& term = expansions[i].terms[static_cast<size_t>(k - 1)];
      const SpilledPart& p = part == 0 ? term.codes : part == 1 ? term.scale : term.zero;
      return w.Add(name, dtype, std::move(shape), spill.Data(k, p.offset, p.size));
    }));
    FPX_RETURN_IF_ERROR(w.WriteFile(out_path, &report.artifact_sha256,
                                    [&](absl::Span<const uint8_t> written) {
                                      if (spill.Holds(written) ||
                                          (release_source && in_source(written))) {
                                        ReleaseMappedPages(written);
                                      }
                                    }));
  }
  report.bytes_out = w.FileSize();
  report.wall_seconds = absl::ToDoubleSeconds(absl::Now() - start);
  return report;
}

std::vector<TermSummary> ExpandReport::Summary() const {
  std::vector<TermSummary> out;
  for (int k = 1; k <= spec.terms; ++k) {
    TermSummary s;
    s.k = k;
    s.min_sqnr_db = INFINITY;
    double num = 0, den = 0;
    for (const TensorReport& t : tensors) {
      // A tensor that stopped early (eps) keeps its last error for later k.
      if (t.terms.empty()) continue;
      const TermError& e = t.terms[std::min<size_t>(k, t.terms.size()) - 1];
      if (k <= static_cast<int>(t.terms.size())) ++s.tensors;
      num += e.rel_fro * e.rel_fro * t.source_fro * t.source_fro;
      den += t.source_fro * t.source_fro;
      s.worst_rel_fro = std::max(s.worst_rel_fro, e.rel_fro);
      s.worst_rel_max = std::max(s.worst_rel_max, e.rel_max);
      s.min_sqnr_db = std::min(s.min_sqnr_db, e.sqnr_db);
    }
    if (s.tensors == 0) break;
    s.rel_fro = den > 0 ? std::sqrt(num / den) : 0;
    out.push_back(s);
  }
  return out;
}

std::string ExpandReport::ToJson() const {
  JsonWriter w;
  w.BeginObject();
  w.Key("spec").BeginObject();
  w.Key("bits").Int(spec.bits);
  w.Key("terms").Int(spec.terms);
  w.Key("grid").String(GridName(spec.grid));
  w.Key("variant").String(VariantName(spec.variant));
  w.Key("scale").String(ScaleName(spec.scale));
  w.Key("group_size").Int(spec.group_size);
  w.Key("eps").Double(spec.eps);
  w.Key("effective_bits").Int(static_cast<int64_t>(spec.bits) * spec.terms);
  w.Key("calibration_data").String("none");
  w.EndObject();
  w.Key("tensors").BeginArray();
  for (const TensorReport& t : tensors) {
    w.BeginObject();
    w.Key("name").String(t.name);
    w.Key("dtype").String(t.dtype);
    w.Key("shape").BeginArray();
    for (int64_t d : t.shape) w.Int(d);
    w.EndArray();
    w.Key("terms").BeginArray();
    for (const TermError& e : t.terms) {
      w.BeginObject();
      w.Key("k").Int(e.k);
      w.Key("rel_fro").Double(e.rel_fro);
      w.Key("rel_max").Double(e.rel_max);
      w.Key("sqnr_db").Double(e.sqnr_db);  // null when the residual is exactly zero
      w.EndObject();
    }
    w.EndArray();
    w.EndObject();
  }
  w.EndArray();
  w.Key("summary").BeginArray();
  for (const TermSummary& s : Summary()) {
    w.BeginObject();
    w.Key("k").Int(s.k);
    w.Key("rel_fro").Double(s.rel_fro);
    w.Key("worst_rel_fro").Double(s.worst_rel_fro);
    w.Key("worst_rel_max").Double(s.worst_rel_max);
    w.Key("min_sqnr_db").Double(s.min_sqnr_db);
    w.Key("tensors").Int(s.tensors);
    w.EndObject();
  }
  w.EndArray();
  w.Key("copied").BeginArray();
  for (const CopiedTensor& c : copied) {
    w.BeginObject().Key("name").String(c.name).Key("reason").String(c.reason).EndObject();
  }
  w.EndArray();
  w.Key("source_sha256").String(source_sha256);
  w.Key("artifact_sha256").String(artifact_sha256);
  w.Key("bytes_in").Int(static_cast<int64_t>(bytes_in));
  w.Key("bytes_out").Int(static_cast<int64_t>(bytes_out));
  w.Key("compression_ratio").Double(bytes_out > 0 ? static_cast<double>(bytes_in) / bytes_out : 0);
  w.Key("wall_seconds").Double(wall_seconds);
  w.Key("kernel").String(kernel);
  w.Key("threads").Int(threads);
  w.EndObject();
  return w.str();
}

// ---------------------------------------------------------------------------------------------

namespace {

absl::Status BadArtifact(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("fpxint artifact: ", what));
}

absl::StatusOr<std::string> RequireMeta(const SafetensorsReader& r, absl::string_view key) {
  std::optional<std::string> v = r.Metadata(key);
  if (!v) return BadArtifact(absl::StrCat("missing __metadata__ key '", key, "'"));
  return *v;
}

absl::StatusOr<int> MetaInt(const SafetensorsReader& r, absl::string_view key) {
  FPX_ASSIGN_OR_RETURN(std::string v, RequireMeta(r, key));
  int n;
  if (!absl::SimpleAtoi(v, &n)) {
    return BadArtifact(absl::StrCat("__metadata__ '", key, "' = '", v, "' is not an integer"));
  }
  return n;
}

absl::Status CheckTensor(const SafetensorsReader& r, const std::string& name, DType dtype,
                         const std::vector<int64_t>& shape) {
  const TensorInfo* t = r.Find(name);
  if (t == nullptr) return BadArtifact(absl::StrCat("missing tensor '", name, "'"));
  if (t->dtype != dtype || t->shape != shape) {
    return BadArtifact(absl::StrCat("tensor '", name, "' is ", DTypeName(t->dtype),
                                    ShapeJson(t->shape), "; expected ", DTypeName(dtype),
                                    ShapeJson(shape)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ArtifactView> ArtifactView::Parse(const SafetensorsReader& r) {
  ArtifactView v;
  v.reader_ = &r;
  FPX_ASSIGN_OR_RETURN(std::string format, RequireMeta(r, "format"));
  if (format != kArtifactFormat) {
    return BadArtifact(absl::StrCat("format is '", format, "', expected '", kArtifactFormat, "'"));
  }
  FPX_ASSIGN_OR_RETURN(std::string version, RequireMeta(r, "format_version"));
  if (version != kArtifactVersion) {
    return BadArtifact(absl::StrCat("format_version '", version, "' is not supported (reads ",
                                    kArtifactVersion, ")"));
  }
  ExpansionSpec& spec = v.spec_;
  FPX_ASSIGN_OR_RETURN(spec.bits, MetaInt(r, "bits"));
  FPX_ASSIGN_OR_RETURN(spec.terms, MetaInt(r, "terms"));
  FPX_ASSIGN_OR_RETURN(int group_size, MetaInt(r, "group_size"));
  spec.group_size = group_size;
  FPX_ASSIGN_OR_RETURN(std::string grid, RequireMeta(r, "grid"));
  FPX_ASSIGN_OR_RETURN(std::string variant, RequireMeta(r, "variant"));
  FPX_ASSIGN_OR_RETURN(std::string scale, RequireMeta(r, "scale"));
  FPX_ASSIGN_OR_RETURN(std::string packing, RequireMeta(r, "packing"));
  std::optional<Grid> g = ParseGrid(grid);
  std::optional<Variant> var = ParseVariant(variant);
  std::optional<ScaleGranularity> sc = ParseScale(scale);
  if (!g || !var || !sc) {
    return BadArtifact(absl::StrCat("unknown grid/variant/scale '", grid, "'/'", variant, "'/'",
                                    scale, "'"));
  }
  spec.grid = *g;
  spec.variant = *var;
  spec.scale = *sc;
  if (absl::Status s = spec.Validate(); !s.ok()) return BadArtifact(s.message());
  if (packing != spec.packing_name()) {
    return BadArtifact(absl::StrCat("packing '", packing, "' does not match bits ", spec.bits,
                                    " (expected '", spec.packing_name(), "')"));
  }
  v.source_sha256_ = r.Metadata("source_sha256").value_or("");

  absl::flat_hash_map<std::string, bool> part_of_expansion;
  constexpr absl::string_view kShapeSuffix = ".shape";
  for (const auto& [key, value] : r.metadata()) {
    if (key.size() <= kShapeSuffix.size() || !absl::EndsWith(key, kShapeSuffix)) continue;
    Entry e;
    e.name = key.substr(0, key.size() - kShapeSuffix.size());
    absl::StatusOr<JsonValue> js = ParseJson(value, 2);
    std::vector<int64_t> shape;
    bool ok = js.ok() && js->is_array();
    if (ok) {
      for (const JsonValue& d : js->array()) {
        std::optional<uint64_t> n = d.AsUint64();
        if (!n || *n > (uint64_t{1} << 40)) {
          ok = false;
          break;
        }
        shape.push_back(static_cast<int64_t>(*n));
      }
    }
    if (!ok) return BadArtifact(absl::StrCat("'", key, "' = '", value, "' is not a shape list"));
    absl::StatusOr<TensorLayout> layout = TensorLayout::Make(shape, spec);
    if (!layout.ok()) return BadArtifact(absl::StrCat("'", key, "': ", layout.status().message()));
    e.layout = *std::move(layout);
    e.terms = spec.terms;
    if (std::optional<std::string> t = r.Metadata(absl::StrCat(e.name, ".terms"))) {
      if (!absl::SimpleAtoi(*t, &e.terms) || e.terms < 1 || e.terms > spec.terms) {
        return BadArtifact(absl::StrCat("'", e.name, ".terms' = '", *t, "'; accepted 1..",
                                        spec.terms));
      }
    }
    const DType codes_dtype = CodesDType(spec);
    for (int k = 1; k <= e.terms; ++k) {
      const std::string prefix = absl::StrCat(e.name, ".t", k);
      FPX_RETURN_IF_ERROR(CheckTensor(r, absl::StrCat(prefix, ".codes"), codes_dtype,
                                      {e.layout.rows, e.layout.packed_row_bytes}));
      FPX_RETURN_IF_ERROR(
          CheckTensor(r, absl::StrCat(prefix, ".scale"), DType::kF32, e.layout.scale_shape(spec)));
      part_of_expansion[absl::StrCat(prefix, ".codes")] = true;
      part_of_expansion[absl::StrCat(prefix, ".scale")] = true;
      if (spec.grid == Grid::kAsym) {
        FPX_RETURN_IF_ERROR(CheckTensor(r, absl::StrCat(prefix, ".zero"), DType::kF32,
                                        e.layout.scale_shape(spec)));
        part_of_expansion[absl::StrCat(prefix, ".zero")] = true;
      }
    }
    v.entries_.push_back(std::move(e));
  }
  for (const TensorInfo& t : r.tensors()) {
    if (!part_of_expansion.contains(t.name)) v.copied_.push_back(&t);
  }
  return v;
}

absl::StatusOr<TensorExpansion> ArtifactView::Load(absl::string_view name, int num_terms) const {
  const Entry* entry = nullptr;
  for (const Entry& e : entries_) {
    if (e.name == name) entry = &e;
  }
  if (entry == nullptr) return absl::NotFoundError(absl::StrCat("no expanded tensor '", name, "'"));
  TensorExpansion out;
  out.spec = spec_;
  out.layout = entry->layout;
  const int n = num_terms < 0 ? entry->terms : std::min(num_terms, entry->terms);
  for (int k = 1; k <= n; ++k) {
    const std::string prefix = absl::StrCat(name, ".t", k);
    TermData term;
    absl::Span<const uint8_t> codes = reader_->Data(*reader_->Find(absl::StrCat(prefix, ".codes")));
    term.codes.assign(codes.begin(), codes.end());
    auto floats = [&](absl::string_view suffix) {
      absl::Span<const uint8_t> b = reader_->Data(*reader_->Find(absl::StrCat(prefix, suffix)));
      std::vector<float> f(b.size() / 4);
      std::memcpy(f.data(), b.data(), b.size());
      return f;
    };
    term.scale = floats(".scale");
    if (spec_.grid == Grid::kAsym) term.zero = floats(".zero");
    out.terms.push_back(std::move(term));
  }
  return out;
}

absl::StatusOr<std::string> WriteDequantizedSafetensors(const std::string& source_path,
                                                        const std::string& artifact_path,
                                                        const std::string& out_path,
                                                        absl::string_view source_sha256,
                                                        ThreadPool* pool) {
  FPX_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsReader> src, SafetensorsReader::Open(source_path));
  FPX_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsReader> art,
                       SafetensorsReader::Open(artifact_path));
  FPX_ASSIGN_OR_RETURN(ArtifactView view, ArtifactView::Parse(*art));
  if (!source_sha256.empty() && !view.source_sha256().empty() &&
      view.source_sha256() != source_sha256) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the artifact was made from source ", view.source_sha256(), ", not from ", source_sha256));
  }
  absl::flat_hash_map<std::string, const ArtifactView::Entry*> expanded;
  for (const ArtifactView::Entry& e : view.tensors()) expanded[e.name] = &e;
  SafetensorsWriter w;
  for (const auto& [key, value] : src->metadata()) w.SetMetadata(key, value);
  const ExpansionSpec& spec = view.spec();
  w.SetMetadata("fpxint.dequantized",
                absl::StrCat("sum of ", spec.terms, " terms of ", spec.bits, " bits (grid ",
                             GridName(spec.grid), ", variant ", VariantName(spec.variant),
                             ", scale ", ScaleName(spec.scale), ")"));
  for (const TensorInfo& t : src->tensors()) {
    auto it = expanded.find(t.name);
    if (it == expanded.end()) {
      // Borrowed from the source's mapping, which outlives the write below.
      FPX_RETURN_IF_ERROR(w.Add(t.name, t.dtype, t.shape, src->Data(t), t.dtype_name));
      continue;
    }
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    if (it->second->layout.numel() != numel) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", t.name, "': the artifact holds ", it->second->layout.numel(),
          " values, the source ", numel, " (an artifact of another source?)"));
    }
    // F32 and F64 keep their dtype; F16 too; BF16 and FP8 sources come out as BF16.
    const DType out = t.dtype == DType::kF64 || t.dtype == DType::kF32 || t.dtype == DType::kF16
                          ? t.dtype
                          : DType::kBF16;
    // Made when written, one tensor at a time: the output is never whole in memory.
    FPX_RETURN_IF_ERROR(w.AddLazy(
        t.name, out, t.shape,
        [&view, name = t.name, numel, out, pool]() -> absl::StatusOr<std::vector<uint8_t>> {
          FPX_ASSIGN_OR_RETURN(TensorExpansion e, view.Load(name));
          const std::vector<double> v = Reconstruct(e, static_cast<int>(e.terms.size()), pool);
          std::vector<uint8_t> bytes(static_cast<size_t>(numel) * DTypeSize(out));
          if (out == DType::kF64) {
            std::memcpy(bytes.data(), v.data(), bytes.size());
          } else if (out == DType::kF32) {
            float* f = reinterpret_cast<float*>(bytes.data());
            for (int64_t i = 0; i < numel; ++i) f[i] = static_cast<float>(v[i]);
          } else {
            for (int64_t i = 0; i < numel; ++i) {
              const float f = static_cast<float>(v[i]);
              const uint16_t h = out == DType::kF16 ? FloatToHalf(f) : FloatToBFloat16(f);
              std::memcpy(bytes.data() + 2 * i, &h, 2);
            }
          }
          return bytes;
        }));
  }
  std::string sha;
  const absl::Span<const uint8_t> source = src->bytes();
  FPX_RETURN_IF_ERROR(w.WriteFile(out_path, &sha, [&](absl::Span<const uint8_t> written) {
    // A copied tensor's pages: read once, released once written.
    if (written.data() >= source.data() && written.data() + written.size() <= source.data() + source.size()) {
      ReleaseMappedPages(written);
    }
  }));
  return sha;
}

}  // namespace fpxint::core
