"""Minimal safetensors writer (numpy only) and atomic file helpers for the training fixtures.

Debian has no `safetensors` package, so this writes the format by hand (core/safetensors.h):
  [0, 8)      N, little-endian uint64: length of the JSON header
  [8, 8+N)    JSON header {"name": {"dtype", "shape", "data_offsets": [b, e]}, ...,
              "__metadata__": {str: str}}, padded with spaces so that 8+N is a multiple of 8
  [8+N, EOF)  raw little-endian C-contiguous tensor bytes, back to back in the order given,
              no gaps, no trailing bytes

Every file is written atomically: to a temporary file in the same directory, fsync'ed, then
os.replace'd over the destination, so readers never see a partial file.

    from st_write import write_safetensors, atomic_write_bytes, atomic_write_json, sha256_of
    write_safetensors("x.safetensors", {"images": arr_f32, "labels": arr_i64}, {"k": "v"})
"""

import hashlib
import json
import os
import struct
import tempfile

import numpy as np

_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


def sha256_of(path):
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path, chunks):
    """Writes the bytes-like objects in `chunks` to `path` atomically (temp file + os.replace)."""
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = [chunks]
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path, obj):
    """Writes `obj` as indented, key-sorted JSON (plus a newline) atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def safetensors_bytes(tensors, metadata=None):
    """Returns the file as a list of byte chunks: header, then each tensor's data.

    `tensors` is an ordered mapping name -> numpy array (insertion order = data order).
    `metadata` is an optional mapping of str -> str stored as "__metadata__".
    """
    header = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError("safetensors metadata must map str to str: %r: %r" % (k, v))
        header["__metadata__"] = dict(metadata)
    datas = []
    offset = 0
    for name, arr in tensors.items():
        if name == "__metadata__":
            raise ValueError("'__metadata__' is not a valid tensor name")
        a = np.asarray(arr)
        if a.dtype not in _DTYPES:
            raise TypeError("tensor %r: unsupported dtype %s" % (name, a.dtype))
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        b = a.tobytes(order="C")
        assert len(b) == a.size * a.dtype.itemsize
        header[name] = {
            "dtype": _DTYPES[np.dtype(a.dtype.newbyteorder("="))],
            "shape": [int(s) for s in a.shape],
            "data_offsets": [offset, offset + len(b)],
        }
        offset += len(b)
        datas.append(b)
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    h += b" " * ((-(8 + len(h))) % 8)
    return [struct.pack("<Q", len(h)), h] + datas


def write_safetensors(path, tensors, metadata=None):
    """Writes `tensors` (name -> numpy array) to `path` atomically as safetensors."""
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def read_safetensors(path):
    """Reads a safetensors file back into (dict name -> numpy array, metadata) (for self-checks)."""
    inv = {v: k for k, v in _DTYPES.items()}
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    out = {}
    end_max = 0
    for name, info in header.items():
        b, e = info["data_offsets"]
        dt = inv[info["dtype"]].newbyteorder("<")
        out[name] = np.frombuffer(data[b:e], dtype=dt).reshape(info["shape"])
        end_max = max(end_max, e)
    if end_max != len(data):
        raise ValueError("%s: data section has %d bytes, tensors cover %d" % (path, len(data), end_max))
    return out, meta
