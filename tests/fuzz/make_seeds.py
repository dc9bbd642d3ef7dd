#!/usr/bin/python3
"""Writes the seed corpus of every fuzz target into OUTDIR/<target>/ (inputs the fuzzers mutate
from): small safetensors files, upload streams of real chunk messages (with and without a
matching hash), ModelInfer requests (raw and typed contents), job specs and upload headers, .npy /
JSON tensors and YAML job files, packed codes, torch.save files, and every file kept in
tests/fuzz/corpus/<target>/ (artifacts, and inputs shaped like the attacks the parsers bound).

Usage: /usr/bin/python3 tests/fuzz/make_seeds.py OUTDIR
"""

import io
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def protos():
    out = tempfile.mkdtemp(prefix="fpxint-seeds-")
    files = ["fpxint/v1/quantizer.proto", "fpxint/v1/server_state.proto", "inference/grpc_service.proto"]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", os.path.join(REPO, "proto"),
                    f"--python_out={out}"] + files, check=True)
    sys.path.insert(0, out)
    import fpxint.v1.quantizer_pb2 as q  # noqa: E402
    import inference.grpc_service_pb2 as inf  # noqa: E402
    return q, inf


def safetensors(tensors, metadata=None):
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, arr in tensors.items():
        b = arr.tobytes()
        dt = {np.float32: "F32", np.float16: "F16", np.int8: "I8", np.uint8: "U8", np.int64: "I64",
              np.float64: "F64", np.int32: "I32"}[arr.dtype.type]
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def npy(arr):
    f = io.BytesIO()
    np.save(f, arr)
    return f.getvalue()


def frame(msgs):
    out = b""
    for m in msgs:
        b = m.SerializeToString()
        out += struct.pack("<H", len(b)) + b
    return out


def packed_weight_image(rows, cols, group, bits, terms):
    """A valid core::LowbitLinear image (FPXLL001, see core/lowbit_linear.cc)."""
    groups = (cols + group - 1) // group
    row_bytes = (cols * bits + 7) // 8 if bits in (1, 2, 4) else cols
    out = b"FPXLL001" + struct.pack("<5q", rows, cols, group, groups, terms)
    for k in range(terms):
        out += struct.pack("<2i", bits, 1)
        out += bytes((i * 37 + k) % 256 for i in range(rows * row_bytes))
        out += struct.pack(f"<{rows * groups}f", *([0.25 / (k + 1)] * (rows * groups)))
        out += struct.pack(f"<{rows * groups}f", *([0.0] * (rows * groups)))
    return out


def torch_seeds():
    """Mode 0: whole torch.save files; mode 1: their data.pkl alone (the fuzzer supplies storages
    "0" of 64 bytes and "1" of 7 bytes)."""
    import zipfile
    import torch
    torch.manual_seed(0)
    out = []
    small = {"w": torch.randn(4, 4), "b": torch.zeros(3, dtype=torch.int64)[:1]}
    objs = [small, {"model": {"fc.weight": torch.randn(2, 8).t()}, "epoch": 3, "lr": [0.1, (1, 2)]},
            torch.nn.Linear(3, 2).state_dict(), {"p": torch.nn.Parameter(torch.randn(16))}]
    for obj in objs:
        f = io.BytesIO()
        torch.save(obj, f)
        data = f.getvalue()
        out.append(b"\0" + data)
        z = zipfile.ZipFile(io.BytesIO(data))
        pkl = z.read([n for n in z.namelist() if n.endswith("/data.pkl")][0])
        out.append(b"\1" + pkl)
    return out


def main(outdir):
    q, inf = protos()
    rng = np.random.RandomState(0)
    seeds = {t: [] for t in ("fuzz_safetensors", "fuzz_upload", "fuzz_oip_request", "fuzz_job_spec",
                             "fuzz_client_parsers", "fuzz_packing", "fuzz_packed_weight",
                             "fuzz_torch_state_dict", "fuzz_artifact", "fuzz_hf_index")}
    st = safetensors({"w": rng.randn(4, 6).astype(np.float32), "b": rng.randn(4).astype(np.float16),
                      "codes": rng.randint(0, 255, (2, 3)).astype(np.uint8)}, {"format": "pt"})
    seeds["fuzz_safetensors"] += [st, safetensors({}), safetensors({"x": np.zeros((0, 3), np.float32)})]
    for flags, fmt, payload in ((1, q.SAFETENSORS, st), (0, q.SAFETENSORS, st), (3, q.TORCHSCRIPT, b"PK\x03\x04" + b"\0" * 40)):
        hdr = q.UploadChunk(header=q.UploadHeader(name="m", format=fmt, sha256="0" * 64,
                                                  size_bytes=len(payload)))
        chunks = [hdr] + [q.UploadChunk(data=payload[i:i + 64]) for i in range(0, len(payload), 64)]
        seeds["fuzz_upload"].append(bytes([flags]) + frame(chunks))
    x = rng.rand(1, 3, 8, 8).astype(np.float32)
    r0 = inf.ModelInferRequest(model_name="m", inputs=[inf.ModelInferRequest.InferInputTensor(
        name="input__0", datatype="FP32", shape=[1, 3, 8, 8])], raw_input_contents=[x.tobytes()])
    r1 = inf.ModelInferRequest(model_name="m", inputs=[inf.ModelInferRequest.InferInputTensor(
        name="input__0", datatype="FP32", shape=[2, 16],
        contents=inf.InferTensorContents(fp32_contents=list(rng.rand(32))))])
    r1.parameters["fpxint_terms"].int64_param = 2
    r2 = inf.ModelInferRequest(model_name="m", inputs=[inf.ModelInferRequest.InferInputTensor(
        name="tokens", datatype="INT64", shape=[1, 5])], raw_input_contents=[np.arange(5, dtype=np.int64).tobytes()])
    seeds["fuzz_oip_request"] += [b"\0" + r0.SerializeToString(), b"\1" + r1.SerializeToString(),
                                  b"\2" + r2.SerializeToString()]
    spec = q.JobSpec(model="m", granularity=q.LAYER, weight_bits=4, weight_terms=2, scale=q.PER_GROUP,
                     group_size=32, act_bits=4, act_terms=2, include="conv.*", exclude="^fc$",
                     outputs=[q.PACKED_SAFETENSORS], deploy=q.DeploySpec(enabled=True))
    seeds["fuzz_job_spec"] += [b"\2" + spec.SerializeToString(),
                               b"\0" + q.JobSpec(model="m", granularity=q.TENSOR).SerializeToString(),
                               b"\1" + q.UploadHeader(name="ok.name-1", format=q.TORCHSCRIPT, sha256="a" * 64,
                                                      inputs=[q.TensorSignature(name="x", datatype="FP32",
                                                                                shape=[-1, 3])]).SerializeToString()]
    seeds["fuzz_client_parsers"] += [
        b"\0" + npy(rng.rand(2, 3).astype(np.float32)), b"\0" + npy(np.arange(4, dtype=np.int64)),
        b"\0" + npy(np.zeros((), np.uint8)),
        b"\1" + json.dumps({"shape": [2, 2], "data": [1, 2, 3, 4], "datatype": "INT32"}).encode(),
        b"\1" + json.dumps([[0.5, 1.5], [2.5, 3.5]]).encode(),
        b"\2" + b"model: m\ngranularity: layer\nbits: 4\nterms: 2\nscale: group\ngroup_size: 32\n"
                b"outputs: [packed_safetensors, dequantized_torchscript]\ndeploy:\n  enabled: true\n  name: x\n",
        b"\2" + json.dumps({"model": "m", "granularity": "TENSOR", "weight_bits": 8}).encode(),
    ]
    seeds["fuzz_packing"] += [bytes([b]) + bytes(range(0, 256, 7)) for b in (1, 2, 4, 0x84, 0x83, 7)]
    seeds["fuzz_packed_weight"] += [packed_weight_image(rows, cols, group, bits, terms)
                                    for rows, cols, group, bits, terms in
                                    ((3, 8, 8, 4, 2), (2, 10, 4, 2, 1), (4, 5, 5, 3, 3), (1, 16, 8, 8, 1))]
    seeds["fuzz_torch_state_dict"] += torch_seeds()
    index = json.dumps({"metadata": {"total_size": 1234, "format": "pt"},
                        "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                       "model.layers.0.mlp.up_proj.weight": "model-00002-of-00002.safetensors",
                                       "lm_head.weight": "sub/dir/model-00002-of-00002.safetensors"}}).encode()
    seeds["fuzz_hf_index"] += [index, b'{"weight_map": {"a": "../x"}}', b'{"weight_map": {}}']
    hdr = q.UploadChunk(header=q.UploadHeader(name="m", format=q.HF_DIRECTORY, sha256="0" * 64,
                                              file_path="model.safetensors.index.json",
                                              size_bytes=len(index)))
    seeds["fuzz_upload"].append(bytes([1]) + frame([hdr, q.UploadChunk(data=index)]))
    # Kept in tests/fuzz/corpus/<target>/: artifacts written by `fpxint expand` (packed 4/2-bit and
    # byte codes; channel, group and tensor scales; sym, mid, asym; rescaled and digits), and
    # inputs shaped like the attacks the parsers bound (corpus/make_attack_seeds.py).
    corpus = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
    for target in sorted(os.listdir(corpus)):
        if target not in seeds:
            continue
        for f in sorted(os.listdir(os.path.join(corpus, target))):
            with open(os.path.join(corpus, target, f), "rb") as fh:
                seeds[target].append(fh.read())
    if not seeds["fuzz_artifact"]:
        sys.exit(f"no artifact seeds in {corpus}/fuzz_artifact")
    for target, items in seeds.items():
        d = os.path.join(outdir, target)
        os.makedirs(d, exist_ok=True)
        for i, data in enumerate(items):
            with open(os.path.join(d, f"seed{i}"), "wb") as f:
                f.write(data)
    print(f"seeds written to {outdir}: " + ", ".join(f"{t} {len(v)}" for t, v in seeds.items()))


if __name__ == "__main__":
    main(sys.argv[1])
