// File: server/executor.h
//
// What a job does: validates a JobSpec against the model it names, and runs the expansion at
// tensor, layer or model granularity, writing its files into a scratch directory. The job
// manager owns scheduling, state and the store; this owns the arithmetic (through core/ and
// model/).
#ifndef FPXINT_SERVER_EXECUTOR_H_
#define FPXINT_SERVER_EXECUTOR_H_

#include <atomic>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/thread_pool.h"
#include "fpxint/v1/quantizer.pb.h"
#include "model/model.h"
#include "server/validation.h"

namespace fpxint::server {

// One file of a directory model (HF_DIRECTORY), as the job reads it.
struct SourceFile {
  std::string path;       // in the model directory (ModelFile.path)
  std::string blob_path;  // the stored bytes
  std::string sha256;
  std::string role;  // "shard", "index", "sidecar"
};

struct JobContext {
  std::string source_path;  // the model's blob (empty for HF_DIRECTORY)
  std::vector<SourceFile> files;  // HF_DIRECTORY: every file, shards first in the index's order
  // HF_DIRECTORY TENSOR jobs run as shard tasks, one per shard: the shard (SourceFile::path) this
  // run expands.
  std::string shard;
  v1::Model model;
  std::string scratch_dir;  // empty directory for the outputs
  core::ThreadPool* pool = nullptr;
  int torch_threads = 2;
  // Memory the job may plan to hold, in bytes (0: no limit). Checked before the expansion starts
  // against an estimate from the shapes (no data read); a job above it fails RESOURCE_EXHAUSTED
  // with both figures instead of growing the server.
  uint64_t memory_limit = 0;
  const std::atomic<bool>* cancel = nullptr;
  std::function<void(const v1::Progress&)> progress;
};

// The kind of every job's packed artifact (docs/FORMAT.md); a quantized deployment serves it.
inline constexpr char kPackedArtifactKind[] = "packed_safetensors";
inline constexpr char kDequantizedArtifactKind[] = "dequantized_safetensors";

struct ProducedFile {
  std::string kind;       // Artifact.kind
  std::string file_name;  // as downloaded: a safe relative path ("packed/model-00001-of-00002...")
  std::string path;       // in scratch_dir; empty for a file already stored (a copied sidecar)
  std::string sha256;     // when the writer hashed what it wrote (or the stored file's); empty:
                          // hashed on import
};

struct JobOutput {
  v1::JobResult result;
  std::vector<ProducedFile> files;
};

// Runs a normalized spec (for a directory model's TENSOR job: the shard task ctx.shard).
// Cancelled when *cancel turns true (promptly: polled between rows).
absl::StatusOr<JobOutput> RunJob(const v1::JobSpec& spec, const JobContext& ctx);

// A directory model's shard task that has succeeded: its shard, report and stored outputs.
struct ShardTaskOutput {
  std::string shard;
  v1::JobResult result;
  std::vector<v1::Artifact> artifacts;
};

// The last step of a directory model's TENSOR job, once every shard task has succeeded (given in
// the index's shard order): writes packed/model.fpxint.index.json (every packed tensor mapped to
// its shard) and, with DEQUANTIZED_SAFETENSORS, the source's index with total_size recomputed,
// into ctx.scratch_dir, reading the tasks' stored outputs through `blob_path`. The output lists
// the tasks' artifacts and the sidecars as already stored, and the tasks' reports merged;
// `wall_seconds` (the job's, end to end) gives read_gb_per_second.
absl::StatusOr<JobOutput> AssembleDirectoryJob(
    const v1::JobSpec& spec, const JobContext& ctx, const std::vector<ShardTaskOutput>& tasks,
    const std::function<std::string(const std::string& sha256)>& blob_path, double wall_seconds);

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_EXECUTOR_H_
