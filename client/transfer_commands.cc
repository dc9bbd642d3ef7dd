// `fpxint upload` and `fpxint download`: streaming transfers with SHA-256 on both ends, a progress
// bar on a terminal, and downloads that resume from a .part file.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/commands.h"
#include "client/exit_codes.h"
#include "client/progress.h"
#include "client/rpc.h"
#include "core/atomic_file.h"
#include "core/hf_checkpoint.h"
#include "core/sha256.h"
#include "core/unique_fd.h"
#include "fpxint/v1/quantizer.grpc.pb.h"

namespace fpxint::client {
namespace {

constexpr size_t kChunk = 1 << 20;

using Fd = core::UniqueFd;

std::string Errno(const std::string& what, const std::string& path) {
  return absl::StrCat(what, " '", path, "': ", std::strerror(errno));
}

// Reads [0, size) of `fd` through `fn` in 1 MiB blocks.
template <typename Fn>
bool ForEachBlock(int fd, uint64_t size, Fn fn) {
  std::vector<char> buf(kChunk);
  uint64_t off = 0;
  while (off < size) {
    const size_t want = static_cast<size_t>(std::min<uint64_t>(kChunk, size - off));
    const ssize_t n = ::pread(fd, buf.data(), want, static_cast<off_t>(off));
    if (n <= 0) return false;
    if (!fn(absl::string_view(buf.data(), static_cast<size_t>(n)), off)) return false;
    off += static_cast<uint64_t>(n);
  }
  return true;
}

// ---- upload ----------------------------------------------------------------------------------

struct UploadFlags {
  std::string file;
  std::string name;
  std::string format = "auto";
  std::vector<std::string> inputs;  // NAME:DATATYPE:D1,D2,...
};

absl::StatusOr<v1::ModelFormat> DetectFormat(const std::string& path, int fd, uint64_t size) {
  if (absl::EndsWithIgnoreCase(path, ".safetensors")) return v1::SAFETENSORS;
  char magic[4] = {};
  if (size >= 4 && ::pread(fd, magic, 4, 0) == 4 && std::memcmp(magic, "PK\x03\x04", 4) == 0) {
    // A TorchScript archive has code/ and constants.pkl entries; torch.save's has data.pkl only.
    // The zip central directory at the end lists every entry name.
    const uint64_t tail = std::min<uint64_t>(size, 1 << 20);
    std::string buf(tail, '\0');
    if (::pread(fd, buf.data(), tail, static_cast<off_t>(size - tail)) == static_cast<ssize_t>(tail)) {
      if (buf.find("/code/") != std::string::npos || buf.find("constants.pkl") != std::string::npos) {
        return v1::TORCHSCRIPT;
      }
      if (buf.find("data.pkl") != std::string::npos) return v1::TORCH_STATE_DICT;
    }
  }
  // A safetensors file starts with an 8-byte header length and then '{'.
  char head[9] = {};
  if (size >= 9 && ::pread(fd, head, 9, 0) == 9 && head[8] == '{') return v1::SAFETENSORS;
  return absl::InvalidArgumentError(absl::StrCat(
      "cannot tell the format of '", path,
      "'; give --format safetensors|torchscript|torch_state_dict"));
}

absl::StatusOr<v1::TensorSignature> ParseSignature(const std::string& s) {
  std::vector<std::string> parts = absl::StrSplit(s, ':');
  const std::string usage = absl::StrCat("--input '", s, "': expected NAME:DATATYPE:DIMS, e.g. x:FP32:1,3,48,-1");
  if (parts.size() != 3) return absl::InvalidArgumentError(usage);
  v1::TensorSignature sig;
  sig.set_name(parts[0]);
  sig.set_datatype(absl::AsciiStrToUpper(parts[1]));
  for (absl::string_view d : absl::StrSplit(parts[2], ',')) {
    int64_t v;
    if (!absl::SimpleAtoi(d, &v)) return absl::InvalidArgumentError(usage);
    sig.add_shape(v);
  }
  return sig;
}

// Streams `size` bytes of `fd` after the header message `first`. Returns the call's status;
// *read_ok is false when the file could not be read.
grpc::Status StreamUpload(const Connection& conn, v1::Quantizer::Stub& stub,
                          const v1::UploadChunk& first, int fd, uint64_t size, ProgressBar* bar,
                          const std::string& label, v1::Model* model, bool* read_ok) {
  grpc::ClientContext ctx;
  conn.Prepare(&ctx, /*deadline=*/false);
  auto writer = stub.UploadModel(&ctx, model);
  bool written = writer->Write(first);
  *read_ok = true;
  v1::UploadChunk chunk;
  if (written) {
    const bool all = ForEachBlock(fd, size, [&](absl::string_view b, uint64_t off) {
      chunk.set_data(b.data(), b.size());
      bar->Update(off + b.size(), size, label);
      written = writer->Write(chunk);  // false: the server ended the call; Finish says why
      return written;
    });
    *read_ok = all || !written;
  }
  writer->WritesDone();
  return writer->Finish();
}

// The SHA-256 of `size` bytes of `fd`, drawing progress as `label`.
absl::StatusOr<std::string> HashFile(int fd, uint64_t size, ProgressBar* bar,
                                     const std::string& label, uint64_t done_before = 0,
                                     uint64_t total = 0) {
  core::Sha256 sha;
  if (!ForEachBlock(fd, size, [&](absl::string_view b, uint64_t off) {
        sha.Update(b);
        bar->Update(done_before + off + b.size(), total ? total : size, label);
        return true;
      })) {
    return absl::DataLossError("cannot read");
  }
  return sha.HexDigest();
}

bool IsDirectory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// ---- upload of a model directory ----

struct LocalFile {
  std::string rel;  // path in the directory
  std::string abs;
  uint64_t size = 0;
  std::string sha256;
};

// The regular files of a model directory, at most 4 levels deep, skipping hidden entries
// (.git, .cache) and names the server would refuse (listed in *skipped).
absl::StatusOr<std::vector<LocalFile>> ListModelDirectory(const std::string& dir,
                                                          std::vector<std::string>* skipped) {
  std::vector<LocalFile> out;
  std::vector<std::pair<std::string, int>> todo = {{"", 0}};
  while (!todo.empty()) {
    auto [rel_dir, depth] = todo.back();
    todo.pop_back();
    const std::string abs_dir = rel_dir.empty() ? dir : dir + "/" + rel_dir;
    std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir(abs_dir.c_str()), ::closedir);
    if (!d) return absl::NotFoundError(Errno("cannot list", abs_dir));
    while (const dirent* e = ::readdir(d.get())) {
      const std::string name = e->d_name;
      if (name.empty() || name[0] == '.') continue;
      const std::string rel = rel_dir.empty() ? name : rel_dir + "/" + name;
      const std::string abs = dir + "/" + rel;
      struct stat st {};
      if (::stat(abs.c_str(), &st) != 0) continue;
      if (S_ISDIR(st.st_mode)) {
        if (depth < 3) todo.push_back({rel, depth + 1});
        else skipped->push_back(rel + "/");
        continue;
      }
      if (!S_ISREG(st.st_mode)) continue;
      if (!core::IsSafeRelativePath(rel)) {
        skipped->push_back(rel);
        continue;
      }
      out.push_back({rel, abs, static_cast<uint64_t>(st.st_size), ""});
    }
  }
  std::sort(out.begin(), out.end(),
            [](const LocalFile& a, const LocalFile& b) { return a.rel < b.rel; });
  return out;
}

int RunUploadDirectory(const UploadFlags& f, const GlobalOptions& g) {
  const std::string cmd = "upload";
  std::string dir = f.file;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  std::vector<std::string> skipped;
  absl::StatusOr<std::vector<LocalFile>> files = ListModelDirectory(dir, &skipped);
  if (!files.ok()) return ReportError(cmd, std::string(files.status().message()), kExitIoError, g);
  const bool has_index = std::any_of(files->begin(), files->end(), [](const LocalFile& l) {
    return l.rel == core::kHfIndexFile;
  });
  const bool has_single = std::any_of(files->begin(), files->end(), [](const LocalFile& l) {
    return l.rel == core::kHfSingleFile;
  });
  if (!has_index && !has_single) {
    return ReportError(cmd, absl::StrCat(dir, " is not a Hugging Face model directory: it has no ",
                                         core::kHfIndexFile, " and no ", core::kHfSingleFile),
                       kExitBadInput, g);
  }
  if (files->size() > 4096) {
    return ReportError(cmd, absl::StrCat(dir, " holds ", files->size(),
                                         " files; a model directory may have 4096"),
                       kExitBadInput, g);
  }
  if (!f.inputs.empty() || (f.format != "auto" && f.format != "hf_directory")) {
    return ReportError(cmd, "a model directory is uploaded as HF_DIRECTORY; --input and --format "
                            "are for single files", kExitUsage, g);
  }
  for (const std::string& s : skipped) {
    if (!g.quiet) std::fprintf(stderr, "fpxint upload: skipping %s (not a plain file name)\n", s.c_str());
  }
  uint64_t total = 0;
  for (const LocalFile& l : *files) total += l.size;

  // 1. Hash every file (the manifest names each by its SHA-256).
  ProgressBar bar(stderr, !g.quiet);
  uint64_t hashed = 0;
  for (size_t i = 0; i < files->size(); ++i) {
    LocalFile& l = (*files)[i];
    Fd fd(::open(l.abs.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) return ReportError(cmd, Errno("cannot open", l.abs), kExitIoError, g);
    absl::StatusOr<std::string> sha =
        HashFile(fd.get(), l.size, &bar, absl::StrCat("hashing [", i + 1, "/", files->size(), "] ", l.rel),
                 hashed, total);
    if (!sha.ok()) return ReportError(cmd, Errno("cannot read", l.abs), kExitIoError, g);
    l.sha256 = *sha;
    hashed += l.size;
  }
  bar.Finish();

  auto conn = Connection::Open(g);
  if (!conn.ok()) return ReportError(cmd, std::string(conn.status().message()), kExitUsage, g);
  auto stub = v1::Quantizer::NewStub((*conn)->channel());
  v1::CommitModelFilesRequest commit;
  commit.set_name(f.name);
  for (const LocalFile& l : *files) {
    v1::ModelFile* mf = commit.add_files();
    mf->set_path(l.rel);
    mf->set_sha256(l.sha256);
    mf->set_size_bytes(l.size);
  }
  auto commit_files = [&](bool dry_run, v1::CommitModelFilesResponse* resp) {
    commit.set_dry_run(dry_run);
    grpc::ClientContext ctx;
    (*conn)->Prepare(&ctx);
    return stub->CommitModelFiles(&ctx, commit, resp);
  };
  // 2. Which files the server lacks: after an interruption, only those are sent again.
  v1::CommitModelFilesResponse plan;
  if (grpc::Status s = commit_files(true, &plan); !s.ok()) return ReportRpcError(cmd, s, g);
  std::set<std::string> missing(plan.missing().begin(), plan.missing().end());

  // 3. Upload them, each as one UploadModel stream.
  uint64_t sent = 0;
  size_t n = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (const LocalFile& l : *files) {
    if (!missing.count(l.rel)) continue;
    ++n;
    Fd fd(::open(l.abs.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) return ReportError(cmd, Errno("cannot open", l.abs), kExitIoError, g);
    v1::UploadChunk first;
    v1::UploadHeader* h = first.mutable_header();
    h->set_name(f.name);
    h->set_format(v1::HF_DIRECTORY);
    h->set_file_path(l.rel);
    h->set_sha256(l.sha256);
    h->set_size_bytes(l.size);
    v1::Model staged;
    bool read_ok = true;
    ProgressBar fbar(stderr, !g.quiet);
    grpc::Status s = StreamUpload(**conn, *stub, first, fd.get(), l.size, &fbar,
                                  absl::StrCat("uploading [", n, "/", missing.size(), "] ", l.rel),
                                  &staged, &read_ok);
    fbar.Finish();
    if (s.ok() && !read_ok) return ReportError(cmd, Errno("cannot read", l.abs), kExitIoError, g);
    if (!s.ok()) {
      return ReportRpcError(cmd, grpc::Status(s.error_code(), absl::StrCat(l.rel, ": ", s.error_message())), g);
    }
    sent += l.size;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // 4. Record the model.
  v1::CommitModelFilesResponse done;
  if (grpc::Status s = commit_files(false, &done); !s.ok()) return ReportRpcError(cmd, s, g);
  const v1::Model& m = done.model();
  int shards = 0;
  for (const v1::ModelFile& mf : m.files()) shards += mf.role() == "shard";
  if (g.json) {
    nlohmann::json j = ProtoToJson(m);
    j["model"] = m.name();
    j["files_sent"] = n;
    j["bytes_sent"] = sent;
    j["files_already_stored"] = files->size() - n;
    j["upload_seconds"] = secs;
    PrintJson(j);
  } else if (!g.quiet) {
    std::vector<std::string> dtypes;
    for (const auto& [d, c] : m.dtypes()) dtypes.push_back(absl::StrCat(d, " ", c));
    std::sort(dtypes.begin(), dtypes.end());
    std::printf("uploaded %s  (hf_directory: %d files, %d shard%s, %s; %llu tensors, %llu "
                "parameters: %s)\n  sent %zu file(s), %s%s; %zu already stored%s\n",
                m.name().c_str(), m.files_size(), shards, shards == 1 ? "" : "s",
                HumanBytes(m.size_bytes()).c_str(),
                static_cast<unsigned long long>(m.tensor_count()),
                static_cast<unsigned long long>(m.parameter_count()),
                absl::StrJoin(dtypes, ", ").c_str(), n, HumanBytes(sent).c_str(),
                sent > 0 && secs > 0 ? absl::StrFormat(" at %s/s", HumanBytes(static_cast<uint64_t>(sent / secs))).c_str() : "",
                files->size() - n, m.deduplicated() ? "; the model was already recorded" : "");
  }
  return kExitOk;
}

int RunUpload(const UploadFlags& f, const GlobalOptions& g) {
  const std::string cmd = "upload";
  if (IsDirectory(f.file)) return RunUploadDirectory(f, g);
  Fd fd(::open(f.file.c_str(), O_RDONLY | O_CLOEXEC));
  struct stat st {};
  if (fd.get() < 0 || ::fstat(fd.get(), &st) != 0) {
    return ReportError(cmd, Errno("cannot open", f.file), kExitBadInput, g);
  }
  if (!S_ISREG(st.st_mode)) return ReportError(cmd, f.file + " is not a regular file", kExitBadInput, g);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  v1::UploadChunk first;
  v1::UploadHeader* h = first.mutable_header();
  h->set_name(f.name);
  h->set_size_bytes(size);
  if (f.format == "auto") {
    auto fmt = DetectFormat(f.file, fd.get(), size);
    if (!fmt.ok()) return ReportError(cmd, std::string(fmt.status().message()), kExitUsage, g);
    h->set_format(*fmt);
  } else if (f.format == "hf_directory") {
    return ReportError(cmd, "--format hf_directory: give the model directory, not a file",
                       kExitUsage, g);
  } else {
    v1::ModelFormat fmt = v1::MODEL_FORMAT_UNSPECIFIED;
    v1::ModelFormat_Parse(absl::AsciiStrToUpper(f.format), &fmt);  // CLI11 checked the choice
    h->set_format(fmt);
  }
  for (const std::string& s : f.inputs) {
    auto sig = ParseSignature(s);
    if (!sig.ok()) return ReportError(cmd, std::string(sig.status().message()), kExitUsage, g);
    *h->add_inputs() = *sig;
  }

  ProgressBar bar(stderr, !g.quiet);
  absl::StatusOr<std::string> sha = HashFile(fd.get(), size, &bar, "hashing " + f.file);
  if (!sha.ok()) return ReportError(cmd, Errno("cannot read", f.file), kExitIoError, g);
  h->set_sha256(*sha);

  auto conn = Connection::Open(g);
  if (!conn.ok()) return ReportError(cmd, std::string(conn.status().message()), kExitUsage, g);
  auto stub = v1::Quantizer::NewStub((*conn)->channel());
  v1::Model model;
  bool read_ok = true;
  grpc::Status s = StreamUpload(**conn, *stub, first, fd.get(), size, &bar,
                                absl::StrCat("uploading ", HumanBytes(size)), &model, &read_ok);
  bar.Finish();
  if (!s.ok()) return ReportRpcError(cmd, s, g);
  if (!read_ok) return ReportError(cmd, Errno("cannot read", f.file), kExitIoError, g);
  if (g.json) {
    nlohmann::json j = ProtoToJson(model);
    j["model"] = model.name();
    PrintJson(j);
  } else if (!g.quiet) {
    std::printf("uploaded %s  (%s, %s, sha256 %s)%s\n", model.name().c_str(),
                absl::AsciiStrToLower(v1::ModelFormat_Name(model.format())).c_str(),
                HumanBytes(model.size_bytes()).c_str(), model.sha256().substr(0, 16).c_str(),
                model.deduplicated() ? "  — already stored, deduplicated" : "");
  }
  return kExitOk;
}

// ---- download --------------------------------------------------------------------------------

struct DownloadFlags {
  std::string id;
  std::string output;
  std::string kind = "packed_safetensors";
  bool all = false;
  bool no_resume = false;
  uint32_t chunk_bytes = 0;
};

struct DownloadResult {
  std::string artifact_id, path, sha256;
  uint64_t size = 0, resumed_from = 0;
  bool already_present = false;
};

// Downloads one artifact to `path` through `path`.part. `expected_sha` may be empty (then the
// server's is used). Returns an exit code; fills *r.
int DownloadOne(const Connection& conn, v1::Quantizer::Stub& stub, const std::string& artifact_id,
                const std::string& expected_sha, const std::string& path, const DownloadFlags& f,
                DownloadResult* r) {
  const GlobalOptions& g = conn.options();
  const std::string cmd = "download";
  r->artifact_id = artifact_id;
  r->path = path;
  if (!expected_sha.empty()) {
    absl::StatusOr<std::string> have = core::Sha256File(path);  // NotFound: not there yet
    struct stat st {};
    if (have.ok() && *have == expected_sha && ::stat(path.c_str(), &st) == 0) {
      r->sha256 = expected_sha;  // already there and intact
      r->size = static_cast<uint64_t>(st.st_size);
      r->already_present = true;
      return kExitOk;
    }
  }
  const std::string part = path + ".part";
  if (f.no_resume) ::unlink(part.c_str());
  for (int attempt = 0; attempt < 2; ++attempt) {
    Fd fd(::open(part.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
    struct stat st {};
    if (fd.get() < 0 || ::fstat(fd.get(), &st) != 0) {
      return ReportError(cmd, Errno("cannot open", part), kExitIoError, g);
    }
    uint64_t offset = static_cast<uint64_t>(st.st_size);
    core::Sha256 sha;
    if (!ForEachBlock(fd.get(), offset, [&](absl::string_view b, uint64_t) {
          sha.Update(b);
          return true;
        })) {
      return ReportError(cmd, Errno("cannot read", part), kExitIoError, g);
    }
    r->resumed_from = offset;
    grpc::ClientContext ctx;
    conn.Prepare(&ctx, /*deadline=*/false);
    v1::ArtifactRef ref;
    ref.set_artifact_id(artifact_id);
    ref.set_offset(offset);
    ref.set_chunk_bytes(f.chunk_bytes);
    auto reader = stub.DownloadArtifact(&ctx, ref);
    v1::ArtifactChunk chunk;
    ProgressBar bar(stderr, !g.quiet);
    std::string server_sha;
    uint64_t total = 0;
    bool write_ok = true, order_ok = true;
    while (reader->Read(&chunk)) {
      server_sha = chunk.sha256();
      total = chunk.total_size();
      if (chunk.offset() != offset) {
        order_ok = false;
        ctx.TryCancel();
        break;
      }
      const std::string& d = chunk.data();
      if (::pwrite(fd.get(), d.data(), d.size(), static_cast<off_t>(offset)) !=
          static_cast<ssize_t>(d.size())) {
        write_ok = false;
        ctx.TryCancel();
        break;
      }
      sha.Update(d);
      offset += d.size();
      bar.Update(offset, total, absl::StrCat(artifact_id, " ", HumanBytes(total)));
    }
    grpc::Status s = reader->Finish();
    bar.Finish();
    if (!write_ok) return ReportError(cmd, Errno("cannot write", part), kExitIoError, g);
    if (!order_ok) return ReportError(cmd, "the server sent chunks out of order", kExitIoError, g);
    if (s.error_code() == grpc::StatusCode::OUT_OF_RANGE && attempt == 0 && r->resumed_from > 0) {
      ::unlink(part.c_str());  // the .part is longer than the artifact: not ours; start over
      continue;
    }
    if (!s.ok()) return ReportRpcError(cmd, s, g);
    const std::string got = sha.HexDigest();
    const std::string want = expected_sha.empty() ? server_sha : expected_sha;
    if (offset != total || got != want) {
      ::unlink(part.c_str());  // a resumed .part that does not match cannot be repaired
      if (attempt == 0 && r->resumed_from > 0) continue;
      return ReportError(cmd, absl::StrCat("SHA-256 mismatch for ", artifact_id, ": got ", got,
                                           ", expected ", want, " (", offset, " of ", total,
                                           " bytes); the partial file was removed, run again"),
                         kExitIoError, g);
    }
    if (absl::Status done = core::PublishFile(part, path); !done.ok()) {
      return ReportError(cmd, absl::StrCat("cannot finish ", path, ": ", done.message()),
                         kExitIoError, g);
    }
    r->sha256 = got;
    r->size = total;
    return kExitOk;
  }
  return ReportError(cmd, "download failed twice", kExitIoError, g);
}

int RunDownload(const DownloadFlags& f, const GlobalOptions& g) {
  const std::string cmd = "download";
  auto conn = Connection::Open(g);
  if (!conn.ok()) return ReportError(cmd, std::string(conn.status().message()), kExitUsage, g);
  auto stub = v1::Quantizer::NewStub((*conn)->channel());
  // Which artifacts: one by id, or those of a job.
  std::vector<v1::Artifact> todo;
  if (absl::StartsWith(f.id, "job-")) {
    grpc::ClientContext ctx;
    (*conn)->Prepare(&ctx);
    v1::JobRef ref;
    ref.set_job_id(f.id);
    v1::Job job;
    grpc::Status s = stub->GetJob(&ctx, ref, &job);
    if (!s.ok()) return ReportRpcError(cmd, s, g);
    if (job.state() != v1::SUCCEEDED) {
      return ReportError(cmd, absl::StrCat("job ", f.id, " is ", v1::JobState_Name(job.state()),
                                           "; artifacts exist once it has SUCCEEDED"),
                         kExitBadInput, g);
    }
    std::vector<std::string> kinds;
    for (const v1::Artifact& a : job.artifacts()) {
      kinds.push_back(a.kind());
      if (f.all || a.kind() == f.kind) todo.push_back(a);
    }
    if (todo.empty()) {
      return ReportError(cmd, absl::StrCat("job ", f.id, " has no artifact of kind '", f.kind,
                                           "'; it has: ", absl::StrJoin(kinds, ", ")),
                         kExitBadInput, g);
    }
  } else {
    v1::Artifact a;
    a.set_artifact_id(f.id);
    todo.push_back(a);
  }
  const bool to_dir = f.all || todo.size() > 1 || f.output.empty() || IsDirectory(f.output);
  for (v1::Artifact& a : todo) {
    if (!to_dir || !a.file_name().empty()) continue;
    // An artifact id alone: its file name arrives with the first chunk; ask for one byte.
    grpc::ClientContext ctx;
    (*conn)->Prepare(&ctx);
    v1::ArtifactRef ref;
    ref.set_artifact_id(a.artifact_id());
    ref.set_chunk_bytes(1);
    auto reader = stub->DownloadArtifact(&ctx, ref);
    v1::ArtifactChunk first;
    if (reader->Read(&first)) {
      a.set_file_name(first.file_name());
      a.set_sha256(first.sha256());
    }
    ctx.TryCancel();
    grpc::Status s = reader->Finish();
    if (!s.ok() && s.error_code() != grpc::StatusCode::CANCELLED) return ReportRpcError(cmd, s, g);
  }
  const std::string dir = f.output.empty() ? "." : f.output;
  if (to_dir && !IsDirectory(dir) && ::mkdir(dir.c_str(), 0755) != 0) {
    return ReportError(cmd, Errno("several artifacts go into a directory; cannot create", dir),
                       kExitIoError, g);
  }
  nlohmann::json out = nlohmann::json::array();
  for (const v1::Artifact& a : todo) {
    std::string name = a.file_name();
    if (name.empty()) name = a.artifact_id();
    // A directory model's outputs keep their layout (packed/..., dequantized/...); a name the
    // server should never send (absolute, "..") falls back to the artifact id.
    if (!core::IsSafeRelativePath(name)) name = a.artifact_id();
    const std::string path =
        to_dir ? (absl::EndsWith(dir, "/") ? dir : dir + "/") + name : f.output;
    if (to_dir && name.find('/') != std::string::npos) {
      std::error_code ec;
      std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
      if (ec) return ReportError(cmd, absl::StrCat("cannot create the directory of ", path, ": ",
                                                   ec.message()), kExitIoError, g);
    }
    DownloadResult r;
    const int rc = DownloadOne(**conn, *stub, a.artifact_id(), a.sha256(), path, f, &r);
    if (rc != kExitOk) return rc;
    if (g.json) {
      out.push_back({{"artifact_id", r.artifact_id}, {"path", r.path}, {"sha256", r.sha256},
                     {"size_bytes", r.size}, {"resumed_from", r.resumed_from},
                     {"already_present", r.already_present}, {"kind", a.kind()}});
    } else if (!g.quiet) {
      std::printf("%s %s -> %s  (%s, sha256 %s verified%s)\n",
                  r.already_present ? "have" : "downloaded", r.artifact_id.c_str(), r.path.c_str(),
                  HumanBytes(r.size).c_str(), r.sha256.substr(0, 16).c_str(),
                  r.resumed_from > 0 ? absl::StrCat(", resumed at ", HumanBytes(r.resumed_from)).c_str() : "");
    }
  }
  if (g.json) PrintJson(f.all ? nlohmann::json{{"artifacts", out}} : out[0]);
  return kExitOk;
}

}  // namespace

void AddTransferCommands(CLI::App& app, const GlobalOptions& g, int* exit_code) {
  auto up = std::make_shared<UploadFlags>();
  CLI::App* u = AddCommand(app,
      "upload",
      "Upload a model file (safetensors weights, a torch.save state dict or a TorchScript model)\n"
      "or a Hugging Face model directory to the server.\n"
      "A file is hashed (SHA-256) and streamed; the server verifies the hash, stores it\n"
      "content-addressed and deduplicates identical bytes. A directory (model.safetensors.index.json\n"
      "and its shards, or model.safetensors, plus config and tokenizer files) is uploaded file by\n"
      "file and recorded as one model; run the same command again after an interruption and only\n"
      "the files the server does not have yet are sent.\n"
      "  fpxint upload ocr_rec.safetensors --name ocr_rec\n"
      "  fpxint upload ocr_rec.pt --name ocr_rec --input x:FP32:1,3,48,320\n"
      "  fpxint upload ./Llama-3.2-1B --name llama-1b");
  u->add_option("PATH", up->file, "the model file, or a Hugging Face model directory")
      ->required()
      ->check(CLI::ExistingPath);
  u->add_option("--name", up->name, "name to store it under ([A-Za-z0-9][A-Za-z0-9._-]*)")->required();
  u->add_option("--format", up->format,
                "auto (from the extension and content; a directory is hf_directory), safetensors, "
                "torchscript, torch_state_dict, hf_directory")
      ->check(CLI::IsMember({"auto", "safetensors", "torchscript", "torch_state_dict",
                             "hf_directory"}));
  u->add_option("--input", up->inputs,
                "TorchScript input signature NAME:DATATYPE:DIMS (-1 = variable), e.g. "
                "x:FP32:1,3,48,-1; used for inference metadata and the probe");
  u->callback([up, &g, exit_code] { *exit_code = RunUpload(*up, g); });

  auto down = std::make_shared<DownloadFlags>();
  CLI::App* d = AddCommand(app,
      "download",
      "Download an artifact, or a finished job's artifacts, verifying SHA-256.\n"
      "Data goes to PATH.part first and is renamed when complete and verified; an interrupted\n"
      "download resumes from the .part file on the next run.\n"
      "  fpxint download job-1a2b3c            # the job's packed safetensors into .\n"
      "  fpxint download job-1a2b3c --all -o out/   # a directory model's job: out/packed/ with\n"
      "                                               # model.fpxint.index.json, out/dequantized/\n"
      "  fpxint download art-4d5e6f -o model.safetensors");
  d->add_option("ID", down->id, "an artifact id (art-...) or a job id (job-...)")->required();
  d->add_option("-o,--output", down->output,
                "file or directory to write (default: the artifact's file name in .)");
  d->add_option("--kind", down->kind,
                "with a job id: which artifacts (packed_safetensors, report_json, "
                "dequantized_safetensors, dequantized_torchscript, basis_torchscript, "
                "packed_index_json, dequantized_index_json, sidecar)");
  d->add_flag("--all", down->all, "with a job id: every artifact of the job, into -o DIR");
  d->add_flag("--no-resume", down->no_resume, "discard an existing .part file and start over");
  d->add_option("--chunk-bytes", down->chunk_bytes, "bytes per streamed message (server default 1 MiB)")
      ->check(CLI::Range(1u, 4u << 20));
  d->callback([down, &g, exit_code] { *exit_code = RunDownload(*down, g); });
}

}  // namespace fpxint::client
