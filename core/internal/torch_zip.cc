// File: core/internal/torch_zip.cc
#include "core/internal/torch_zip.h"

#include "core/status_macros.h"

namespace fpxint::core::internal {

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

}  // namespace fpxint::core::internal
