// libFuzzer target: the upload stream assembler (server/upload.h) fed a stream of UploadChunk
// messages built from the input, into a real BlobStore in a temp directory.
//
// Input layout: byte 0 = flags (bit 0: replace the header's sha256 with the true hash of the
// data, so that the content checks are reached; bit 1: caller is admin; bits 2-3: TorchScript
// policy), then repeated [u16 little-endian length][serialized UploadChunk].
// Invariants checked: nothing is left in the store's temp directory after a refused upload, and
// a committed blob's bytes hash to its name.
#include <dirent.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/sha256.h"
#include "server/upload.h"

namespace {

fpxint::server::BlobStore* Store() {
  static fpxint::server::BlobStore* store = [] {
    char tmpl[] = "/tmp/fpxint-fuzz-upload-XXXXXX";
    const char* dir = ::mkdtemp(tmpl);
    if (dir == nullptr) std::abort();
    auto s = fpxint::server::BlobStore::Open(dir);
    if (!s.ok()) std::abort();
    return s->release();
  }();
  return store;
}

int CountTempFiles(const std::string& dir) {
  int n = 0;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) n += e->d_name[0] != '.';
    ::closedir(d);
  }
  return n;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t flags = data[0];
  std::vector<fpxint::v1::UploadChunk> chunks;
  size_t pos = 1;
  while (pos + 2 <= size && chunks.size() < 64) {
    const size_t len = data[pos] | (static_cast<size_t>(data[pos + 1]) << 8);
    pos += 2;
    if (len > size - pos) break;
    fpxint::v1::UploadChunk c;
    if (!c.ParseFromArray(data + pos, static_cast<int>(len))) return 0;
    chunks.push_back(std::move(c));
    pos += len;
  }
  if ((flags & 1) && !chunks.empty() && chunks[0].has_header()) {
    fpxint::core::Sha256 h;
    for (size_t i = 1; i < chunks.size(); ++i) h.Update(chunks[i].data());
    chunks[0].mutable_header()->set_sha256(h.HexDigest());
  }
  fpxint::server::UploadPolicy policy;
  policy.max_upload_bytes = 1 << 20;
  policy.torchscript = static_cast<fpxint::server::TorchScriptUploads>((flags >> 2) % 3);
  fpxint::server::BlobStore* store = Store();
  {
    fpxint::server::UploadAssembler up(store, policy, (flags & 2) != 0);
    absl::Status s;
    for (const auto& c : chunks) {
      s = up.Add(c);
      if (!s.ok()) break;
    }
    if (s.ok()) {
      auto blob = up.Finish([store](const std::string& sha) { store->Remove(sha).IgnoreError(); });
      if (blob.ok()) {
        // The committed blob hashes to its name.
        std::string path = store->PathOf(blob->sha256);
        FILE* f = std::fopen(path.c_str(), "rb");
        if (f == nullptr) std::abort();
        fpxint::core::Sha256 h;
        char buf[4096];
        size_t n;
        while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) h.Update(absl::string_view(buf, n));
        std::fclose(f);
        if (h.HexDigest() != blob->sha256) std::abort();
        store->Remove(blob->sha256).IgnoreError();
      }
    }
  }
  // Refused or finished, the assembler leaves no temp file behind.
  if (CountTempFiles(store->temp_dir()) != 0) std::abort();
  return 0;
}
