#!/usr/bin/env node
// End-to-end Node client for fpxint-server, written from the repo's protos only.
//
//   cd tests/e2e/node && npm ci --no-audit --no-fund
//   FPXINT_SERVER_BIN=/path/to/fpxint-server FPXINT_MODELS_DIR=~/.cache/fpxint/models node client_e2e.js
//
// Starts its own server on 127.0.0.1:0 (temp data dir, token file, port file), checks health,
// uploads ocr_rec.safetensors, runs and watches a TENSOR job, downloads the packed artifact and
// verifies its SHA-256, uploads ocr_rec.pt, serves it in FP (RepositoryModelLoad), runs ModelInfer
// (raw FP32) on one eval image and checks the output shape; runs a LAYER job deployed as rec-q and
// compares its ModelInfer output with FP (relative error, argmax agreement), a MODEL job with its
// basis TorchScript models, and cancels a running job; and checks that a call without a token
// fails with UNAUTHENTICATED and one with the wrong role with PERMISSION_DENIED. Exits non-zero with a message (and the server's stderr tail) on any
// failure; always kills the server it started.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const crypto = require('crypto');
const { spawn } = require('child_process');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const REPO = path.resolve(__dirname, '..', '..', '..');
const PROTO_DIR = process.env.FPXINT_PROTO_DIR || path.join(REPO, 'proto');
const SERVER_BIN = process.env.FPXINT_SERVER_BIN || path.join(REPO, 'build', 'bin', 'fpxint-server');
const MODELS_DIR = process.env.FPXINT_MODELS_DIR || path.join(os.homedir(), '.cache', 'fpxint', 'models');
const KEEP = process.env.FPXINT_E2E_KEEP === '1';
const CHUNK = 1 << 20;
const TOKENS = {  // the server wants tokens of at least 16 characters
  quantize: 'node-e2e-quantize-4d1e9a', infer: 'node-e2e-infer-88a0c51f', admin: 'node-e2e-admin-b7c3e02d',
};

let server = null;  // { proc, root, stderrPath }
let passed = 0;

class E2EError extends Error {}

function fail(msg) {
  throw new E2EError(msg);
}

function check(cond, msg) {
  if (!cond) fail(msg);
  passed += 1;
}

function step(msg) {
  process.stdout.write(`[node-e2e] ${msg}\n`);
}

function stderrTail(lines = 40) {
  if (!server || !server.stderrPath || !fs.existsSync(server.stderrPath)) return '(no server stderr)';
  const all = fs.readFileSync(server.stderrPath, 'utf8').split('\n');
  return `--- server stderr (last ${lines} lines, ${server.stderrPath}) ---\n` + all.slice(-lines).join('\n');
}

function requireFile(p, what) {
  if (!fs.existsSync(p)) fail(`${what} is missing: ${p}`);
  return p;
}

function sha256File(p) {
  const h = crypto.createHash('sha256');
  const fd = fs.openSync(p, 'r');
  const buf = Buffer.alloc(4 * CHUNK);
  let n;
  while ((n = fs.readSync(fd, buf, 0, buf.length, null)) > 0) h.update(buf.subarray(0, n));
  fs.closeSync(fd);
  return h.digest('hex');
}

function progressOf(job) {
  return job.progress || {};  // an unset message field is null with defaults: true
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

// ---------------------------------------------------------------------------------------------
// server process

async function startServer() {
  requireFile(SERVER_BIN, 'fpxint-server binary (FPXINT_SERVER_BIN)');
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'fpxint-node-e2e-'));
  const dataDir = path.join(root, 'data');
  fs.mkdirSync(dataDir);
  const tokenFile = path.join(root, 'tokens.txt');
  fs.writeFileSync(tokenFile,
    '# node e2e tokens\n' +
    `${TOKENS.quantize} quantize\n${TOKENS.infer} infer\n${TOKENS.admin} admin\n`);
  const portFile = path.join(root, 'port.txt');
  const stderrPath = path.join(root, 'server.stderr.log');
  const args = ['--listen', '127.0.0.1:0', '--data-dir', dataDir, '--workers', '2', '--queue-limit', '8',
    '--max-upload-bytes', String(256 << 20), '--token-file', tokenFile, '--port-file', portFile,
    '--metrics-listen', '127.0.0.1:0',
    '--allow-torchscript-uploads', 'admin'];
  const errFd = fs.openSync(stderrPath, 'w');
  const outFd = fs.openSync(path.join(root, 'server.stdout.log'), 'w');
  const proc = spawn(SERVER_BIN, args, { stdio: ['ignore', outFd, errFd] });
  fs.closeSync(errFd);
  fs.closeSync(outFd);
  server = { proc, root, stderrPath, exited: null };
  proc.on('exit', (code, signal) => { server.exited = { code, signal }; });
  proc.on('error', (e) => { server.exited = { code: null, signal: null, error: e }; });
  const deadline = Date.now() + 60000;
  for (;;) {
    if (server.exited) {
      fail(`fpxint-server exited (${JSON.stringify(server.exited)}) before writing its port file\n` +
           `command: ${SERVER_BIN} ${args.join(' ')}\n${stderrTail()}`);
    }
    if (fs.existsSync(portFile)) {
      const addr = fs.readFileSync(portFile, 'utf8').trim();
      if (/^127\.0\.0\.1:\d+$/.test(addr)) return addr;
    }
    if (Date.now() > deadline) fail(`no port file after 60 s\n${stderrTail()}`);
    await sleep(50);
  }
}

async function stopServer() {
  if (!server) return;
  const s = server;
  if (!s.exited) {
    s.proc.kill('SIGTERM');
    const deadline = Date.now() + 30000;
    while (!s.exited && Date.now() < deadline) await sleep(50);
    if (!s.exited) {
      s.proc.kill('SIGKILL');
      while (!s.exited) await sleep(50);
      fail(`server did not exit within 30 s of SIGTERM\n${stderrTail()}`);
    }
    if (s.exited.code !== 0) fail(`server exit after SIGTERM: ${JSON.stringify(s.exited)}\n${stderrTail()}`);
  }
}

function cleanup() {
  if (server && !server.exited) {
    try { server.proc.kill('SIGKILL'); } catch (e) { /* already gone */ }
  }
  if (server && !KEEP) fs.rmSync(server.root, { recursive: true, force: true });
  else if (server) process.stderr.write(`[node-e2e] kept ${server.root}\n`);
}

// ---------------------------------------------------------------------------------------------
// gRPC

function loadProtos() {
  const files = ['fpxint/v1/quantizer.proto', 'inference/grpc_service.proto', 'grpc/health/v1/health.proto'];
  for (const f of files) requireFile(path.join(PROTO_DIR, f), 'proto');
  const def = protoLoader.loadSync(files, {
    keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: [PROTO_DIR],
  });
  return grpc.loadPackageDefinition(def);
}

function md(role) {
  const m = new grpc.Metadata();
  if (role) m.add('authorization', `Bearer ${TOKENS[role]}`);
  return m;
}

function deadline(sec) {
  return { deadline: new Date(Date.now() + sec * 1000) };
}

function unary(client, method, req, role, sec = 60) {
  return new Promise((resolve, reject) => {
    client[method](req, md(role), deadline(sec), (err, resp) => (err ? reject(err) : resolve(resp)));
  });
}

function codeName(code) {
  return Object.keys(grpc.status).find((k) => grpc.status[k] === code) || String(code);
}

function rpcDesc(err) {
  return err && err.code !== undefined ? `${codeName(err.code)}: ${err.details}` : String(err);
}

async function ok(promise, what) {
  try {
    return await promise;
  } catch (e) {
    fail(`${what} failed: ${rpcDesc(e)}\n${stderrTail()}`);
  }
}

function uploadFile(q, name, file, format, inputs, role) {
  const sha = sha256File(file);
  const size = fs.statSync(file).size;
  return new Promise((resolve, reject) => {
    const call = q.UploadModel(md(role), deadline(300), (err, resp) => (err ? reject(err) : resolve(resp)));
    call.write({ header: { name, format, sha256: sha, size_bytes: String(size), inputs: inputs || [] } });
    const fd = fs.openSync(file, 'r');
    const pump = () => {
      for (;;) {
        const buf = Buffer.alloc(CHUNK);
        const n = fs.readSync(fd, buf, 0, CHUNK, null);
        if (n === 0) {
          fs.closeSync(fd);
          call.end();
          return;
        }
        if (!call.write({ data: buf.subarray(0, n) })) {
          call.once('drain', pump);
          return;
        }
      }
    };
    pump();
  }).then((m) => ({ model: m, sha, size }));
}

function watchJob(q, jobId, role, sec = 180) {
  return new Promise((resolve, reject) => {
    const events = [];
    const call = q.WatchJob({ job_id: jobId }, md(role), deadline(sec));
    call.on('data', (ev) => events.push(ev));
    call.on('error', reject);
    call.on('end', () => resolve(events));
  });
}

function download(q, artifactId, role, offset = 0) {
  return new Promise((resolve, reject) => {
    const parts = [];
    const chunks = [];
    const call = q.DownloadArtifact({ artifact_id: artifactId, offset: String(offset) }, md(role), deadline(300));
    call.on('data', (ch) => {
      parts.push(ch.data);
      chunks.push({ offset: ch.offset, len: ch.data.length, total: ch.total_size, sha: ch.sha256, name: ch.file_name });
    });
    call.on('error', reject);
    call.on('end', () => resolve({ data: Buffer.concat(parts), chunks }));
  });
}

// ---------------------------------------------------------------------------------------------
// safetensors

function stHeader(buf) {
  const n = Number(buf.readBigUInt64LE(0));
  return { header: JSON.parse(buf.subarray(8, 8 + n).toString('utf8')), base: 8 + n };
}

function readEvalImage(file, index) {
  const fd = fs.openSync(file, 'r');
  const lenBuf = Buffer.alloc(8);
  fs.readSync(fd, lenBuf, 0, 8, 0);
  const n = Number(lenBuf.readBigUInt64LE(0));
  const hb = Buffer.alloc(n);
  fs.readSync(fd, hb, 0, n, 8);
  const header = JSON.parse(hb.toString('utf8'));
  const t = header.rec_images;
  if (!t) { fs.closeSync(fd); fail(`${file}: no tensor rec_images`); }
  if (t.dtype !== 'F32' || t.shape.length !== 4 || t.shape[1] !== 3 || t.shape[2] !== 48 || t.shape[3] !== 320) {
    fs.closeSync(fd);
    fail(`${file}: rec_images is ${t.dtype} ${JSON.stringify(t.shape)}, expected F32 [N,3,48,320]`);
  }
  const img = 3 * 48 * 320 * 4;
  const buf = Buffer.alloc(img);
  fs.readSync(fd, buf, 0, img, 8 + n + t.data_offsets[0] + index * img);
  fs.closeSync(fd);
  return buf;
}

// n tensors "w<i>" of rows × cols F32 from a fixed-seed generator (sums of uniforms: bell-shaped).
function writeRandomSafetensors(file, n, rows, cols) {
  const header = {};
  const bytes = rows * cols * 4;
  for (let i = 0; i < n; i++) header[`w${i}`] = { dtype: 'F32', shape: [rows, cols], data_offsets: [i * bytes, (i + 1) * bytes] };
  let hjson = JSON.stringify(header);
  hjson += ' '.repeat((8 - (hjson.length % 8)) % 8);
  const fd = fs.openSync(file, 'w');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(hjson.length));
  fs.writeSync(fd, len);
  fs.writeSync(fd, Buffer.from(hjson, 'utf8'));
  let state = 12345;
  const next = () => { state = (Math.imul(state, 1103515245) + 12345) >>> 0; return state / 4294967296; };
  const vals = new Float32Array(rows * cols);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < vals.length; j++) vals[j] = next() + next() + next() - 1.5;
    fs.writeSync(fd, Buffer.from(vals.buffer));
  }
  fs.closeSync(fd);
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const recSt = requireFile(path.join(MODELS_DIR, 'ocr', 'ocr_rec.safetensors'), 'model file (FPXINT_MODELS_DIR)');
  const recPt = requireFile(path.join(MODELS_DIR, 'ocr', 'ocr_rec.pt'), 'model file (FPXINT_MODELS_DIR)');
  const evalSt = requireFile(path.join(MODELS_DIR, 'ocr', 'ocr_eval.safetensors'), 'model file (FPXINT_MODELS_DIR)');
  const pkg = loadProtos();

  const addr = await startServer();
  step(`server at ${addr}`);
  const creds = grpc.credentials.createInsecure();
  const opts = { 'grpc.max_receive_message_length': 64 << 20, 'grpc.max_send_message_length': 64 << 20 };
  const q = new pkg.fpxint.v1.Quantizer(addr, creds, opts);
  const inf = new pkg.inference.GRPCInferenceService(addr, creds, opts);
  const health = new pkg.grpc.health.v1.Health(addr, creds, opts);
  const clients = [q, inf, health];
  try {
    // health (no token)
    for (const svc of ['', 'inference.GRPCInferenceService']) {
      const h = await ok(unary(health, 'Check', { service: svc }, null, 10), `Health.Check(${JSON.stringify(svc)})`);
      check(h.status === 'SERVING', `health of ${JSON.stringify(svc)}: ${h.status}`);
    }
    step('health SERVING');

    // unauthenticated calls
    for (const [cl, method, req] of [[q, 'ListModels', {}], [inf, 'RepositoryIndex', {}]]) {
      try {
        await unary(cl, method, req, null, 10);
        fail(`${method} without a token succeeded`);
      } catch (e) {
        if (e instanceof E2EError) throw e;
        check(e.code === grpc.status.UNAUTHENTICATED, `${method} without a token: expected UNAUTHENTICATED, got ${rpcDesc(e)}`);
      }
    }
    step('calls without a token: UNAUTHENTICATED');

    // upload the weights, run a TENSOR job
    const up = await ok(uploadFile(q, 'ocr_rec_weights', recSt, 'SAFETENSORS', [], 'quantize'), 'UploadModel(ocr_rec.safetensors)');
    check(up.model.sha256 === up.sha, `uploaded sha256 ${up.model.sha256} != ${up.sha}`);
    check(up.model.size_bytes === String(up.size), `uploaded size ${up.model.size_bytes} != ${up.size}`);
    check(up.model.format === 'SAFETENSORS', `format ${up.model.format}`);
    step(`uploaded ocr_rec.safetensors (${up.size} bytes)`);

    const spec = { model: 'ocr_rec_weights', granularity: 'TENSOR', weight_bits: 4, weight_terms: 2, grid: 'SYM', scale: 'PER_CHANNEL' };
    const job = await ok(unary(q, 'SubmitJob', { spec, idempotency_key: 'node-e2e-tensor' }, 'quantize'), 'SubmitJob');
    check(job.job_id, 'SubmitJob returned no job_id');
    const events = await ok(watchJob(q, job.job_id, 'quantize'), 'WatchJob');
    check(events.length > 0, 'WatchJob gave no event');
    const states = events.map((e) => e.job.state);
    const fractions = events.map((e) => progressOf(e.job).fraction || 0);
    for (let i = 1; i < fractions.length; i++) check(fractions[i] + 1e-9 >= fractions[i - 1], `fraction decreased: ${fractions}`);
    const last = events[events.length - 1].job;
    check(last.state === 'SUCCEEDED', `job ended ${last.state}: ${last.error}; states ${states}`);
    const totals = events.map((e) => progressOf(e.job).layers_total || 0);
    check(totals.some((t) => t > 0), `no event with progress.layers_total > 0: ${totals}`);
    step(`TENSOR job ${job.job_id}: ${states.filter((s, i) => i === 0 || s !== states[i - 1]).join(' -> ')} (${events.length} events)`);

    const packed = last.artifacts.find((a) => a.kind === 'packed_safetensors');
    check(packed, `no packed_safetensors artifact: ${JSON.stringify(last.artifacts.map((a) => a.kind))}`);
    const dl = await ok(download(q, packed.artifact_id, 'quantize'), 'DownloadArtifact');
    const digest = crypto.createHash('sha256').update(dl.data).digest('hex');
    check(dl.data.length === Number(packed.size_bytes), `downloaded ${dl.data.length} bytes, artifact says ${packed.size_bytes}`);
    check(digest === packed.sha256, `artifact SHA-256 ${digest} != Artifact.sha256 ${packed.sha256}`);
    check(dl.chunks.every((c) => c.sha === digest), 'a chunk carries another sha256');
    check(dl.chunks.every((c) => c.total === packed.size_bytes), 'a chunk carries another total_size');
    const { header } = stHeader(dl.data);
    const meta = header.__metadata__ || {};
    check(meta.format === 'fpxint' && meta.bits === '4' && meta.terms === '2',
      `artifact __metadata__: ${JSON.stringify(meta).slice(0, 300)}`);
    step(`downloaded ${packed.file_name} (${dl.data.length} bytes, ${dl.chunks.length} chunks), SHA-256 verified`);

    // resumed download
    const half = Math.floor(dl.data.length / 2) + 1;
    const rest = await ok(download(q, packed.artifact_id, 'quantize', half), 'DownloadArtifact(offset)');
    check(Buffer.concat([dl.data.subarray(0, half), rest.data]).equals(dl.data), 'resumed download differs');
    check(rest.chunks.length > 0 && rest.chunks[0].offset === String(half), `first resumed chunk offset ${rest.chunks[0] && rest.chunks[0].offset}`);

    // FP serving of the TorchScript model
    const inputs = [{ name: 'input__0', datatype: 'FP32', shape: ['1', '3', '48', '320'] }];
    const upPt = await ok(uploadFile(q, 'ocr_rec', recPt, 'TORCHSCRIPT', inputs, 'admin'), 'UploadModel(ocr_rec.pt)');
    check(upPt.model.sha256 === upPt.sha, 'ocr_rec.pt sha256');
    // Serving a bare upload needs the quantize role; an infer token may only load deployments.
    const denied = await unary(inf, 'RepositoryModelLoad', { model_name: 'ocr_rec' }, 'infer', 120).then(
      () => null, (e) => e);
    check(denied !== null && denied.code === grpc.status.PERMISSION_DENIED,
      `RepositoryModelLoad(ocr_rec) with an infer token: ${denied ? denied.code : 'accepted'}, want PERMISSION_DENIED`);
    await ok(unary(inf, 'RepositoryModelLoad', { model_name: 'ocr_rec' }, 'quantize', 120), 'RepositoryModelLoad(ocr_rec)');
    const ready = await ok(unary(inf, 'ModelReady', { name: 'ocr_rec' }, 'infer'), 'ModelReady');
    check(ready.ready === true, 'ModelReady(ocr_rec) false after RepositoryModelLoad');
    const mm = await ok(unary(inf, 'ModelMetadata', { name: 'ocr_rec' }, 'infer'), 'ModelMetadata');
    check(mm.platform === 'pytorch_torchscript', `platform ${mm.platform}`);
    check(mm.inputs.length === 1 && mm.inputs[0].name === 'input__0' && mm.inputs[0].shape.join(',') === '1,3,48,320',
      `ModelMetadata inputs ${JSON.stringify(mm.inputs)}`);
    step('ocr_rec loaded for FP inference');

    const image = readEvalImage(evalSt, 0);
    const req = {
      model_name: 'ocr_rec', id: 'node-req-1',
      inputs: [{ name: 'input__0', datatype: 'FP32', shape: ['1', '3', '48', '320'] }],
      outputs: [{ name: 'output__0' }],
      raw_input_contents: [image],
    };
    const resp = await ok(unary(inf, 'ModelInfer', req, 'infer', 120), 'ModelInfer');
    check(resp.id === 'node-req-1', `id not echoed: ${resp.id}`);
    check(resp.outputs.length === 1, `outputs: ${resp.outputs.length}`);
    const out = resp.outputs[0];
    const shape = out.shape.map(Number);
    check(out.name === 'output__0' && out.datatype === 'FP32', `output ${out.name} ${out.datatype}`);
    check(shape.length === 3 && shape[0] === 1 && shape[1] > 0 && shape[2] === 6625, `output shape ${JSON.stringify(shape)}`);
    check(resp.raw_output_contents.length === 1, 'raw request answered without raw_output_contents');
    const raw = resp.raw_output_contents[0];
    check(raw.length === shape[0] * shape[1] * shape[2] * 4, `raw output ${raw.length} bytes for shape ${shape}`);
    const probs = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.length));
    let finite = true;
    for (const v of probs) if (!Number.isFinite(v)) { finite = false; break; }
    check(finite, 'non-finite output values');
    step(`ModelInfer: output__0 ${JSON.stringify(shape)}`);

    // LAYER job on the TorchScript model, deployed for serving; quantized vs FP outputs
    const layerSpec = {
      model: 'ocr_rec', granularity: 'LAYER', weight_bits: 4, weight_terms: 2, grid: 'SYM', scale: 'PER_CHANNEL',
      deploy: { enabled: true, name: 'rec-q' },
    };
    const ljob = await ok(unary(q, 'SubmitJob', { spec: layerSpec, idempotency_key: 'node-e2e-layer' }, 'quantize'), 'SubmitJob(LAYER)');
    const levents = await ok(watchJob(q, ljob.job_id, 'quantize', 300), 'WatchJob(LAYER)');
    const lj = levents[levents.length - 1].job;
    check(lj.state === 'SUCCEEDED', `LAYER job ended ${lj.state}: ${lj.error}`);
    check(lj.result && lj.result.deployed_name === 'rec-q', `LAYER job result: ${JSON.stringify(lj.result && lj.result.deployed_name)}`);
    check(lj.result.layers.length > 0, 'LAYER job: result.layers is empty');
    check(lj.artifacts.some((a) => a.kind === 'packed_safetensors'), `LAYER artifacts: ${lj.artifacts.map((a) => a.kind)}`);
    step(`LAYER job ${ljob.job_id}: ${lj.result.layers.length} layers, deployed as rec-q`);
    const qresp = await ok(unary(inf, 'ModelInfer', { ...req, model_name: 'rec-q', id: 'node-req-q' }, 'infer', 120), 'ModelInfer(rec-q)');
    const qraw = qresp.raw_output_contents[0];
    check(qresp.outputs.length === 1 && qresp.outputs[0].shape.map(Number).join(',') === shape.join(','),
      `rec-q output shape ${JSON.stringify(qresp.outputs[0] && qresp.outputs[0].shape)} vs FP ${shape}`);
    const qprobs = new Float32Array(qraw.buffer.slice(qraw.byteOffset, qraw.byteOffset + qraw.length));
    let num = 0, den = 0, agree = 0;
    for (let i = 0; i < probs.length; i++) { num += (qprobs[i] - probs[i]) ** 2; den += probs[i] ** 2; }
    const argmax = (a, t) => { let b = 0; for (let c = 1; c < shape[2]; c++) if (a[t * shape[2] + c] > a[t * shape[2] + b]) b = c; return b; };
    for (let t = 0; t < shape[1]; t++) if (argmax(qprobs, t) === argmax(probs, t)) agree += 1;
    const rel = Math.sqrt(num / den);
    check(rel < 0.2, `rec-q (W4x2) vs FP: relative L2 error ${rel}`);  // one line; the Python e2e bounds 8 lines at 0.1
    check(agree / shape[1] >= 0.95, `rec-q vs FP: argmax agreement ${agree}/${shape[1]}`);
    check(rel > 0, 'rec-q output equals FP exactly: not quantized?');
    step(`ModelInfer(rec-q) vs FP: rel L2 ${rel.toPrecision(3)}, argmax agreement ${agree}/${shape[1]}`);

    // MODEL job: K basis TorchScript models
    const mspec = { model: 'ocr_rec', granularity: 'MODEL', weight_bits: 4, weight_terms: 2, outputs: ['BASIS_TORCHSCRIPT'] };
    const mjob = await ok(unary(q, 'SubmitJob', { spec: mspec, idempotency_key: 'node-e2e-model' }, 'quantize'), 'SubmitJob(MODEL)');
    const mevents = await ok(watchJob(q, mjob.job_id, 'quantize', 300), 'WatchJob(MODEL)');
    const mj = mevents[mevents.length - 1].job;
    check(mj.state === 'SUCCEEDED', `MODEL job ended ${mj.state}: ${mj.error}`);
    const basis = mj.artifacts.filter((a) => a.kind === 'basis_torchscript');
    check(basis.length === 2, `MODEL job: ${basis.length} basis artifacts, expected 2`);
    const b0 = await ok(download(q, basis[0].artifact_id, 'quantize'), 'DownloadArtifact(basis)');
    check(crypto.createHash('sha256').update(b0.data).digest('hex') === basis[0].sha256, 'basis artifact SHA-256');
    check(b0.data.subarray(0, 2).toString('latin1') === 'PK', 'basis artifact is not a TorchScript (zip) archive');
    step(`MODEL job ${mjob.job_id}: 2 basis models, ${basis[0].file_name} verified`);

    // cancel a running job: a TENSOR job on ~100 MB of random weights at b=2, K=8
    const bigPath = path.join(server.root, 'big_random.safetensors');
    writeRandomSafetensors(bigPath, 6, 2048, 2048);
    await ok(uploadFile(q, 'big_random', bigPath, 'SAFETENSORS', [], 'quantize'), 'UploadModel(big_random)');
    fs.unlinkSync(bigPath);
    const bjob = await ok(unary(q, 'SubmitJob', { spec: { model: 'big_random', granularity: 'TENSOR', weight_bits: 2, weight_terms: 8 } }, 'quantize'), 'SubmitJob(big_random)');
    let bj = bjob;
    for (const t0 = Date.now(); bj.state !== 'RUNNING' && Date.now() - t0 < 60000;) {
      check(!['SUCCEEDED', 'FAILED', 'CANCELLED'].includes(bj.state), `slow job ended ${bj.state} before it could be cancelled`);
      await sleep(20);
      bj = await ok(unary(q, 'GetJob', { job_id: bjob.job_id }, 'quantize'), 'GetJob');
    }
    check(bj.state === 'RUNNING', `slow job never RUNNING: ${bj.state}`);
    const tCancel = Date.now();
    await ok(unary(q, 'CancelJob', { job_id: bjob.job_id }, 'quantize'), 'CancelJob');
    while (!['SUCCEEDED', 'FAILED', 'CANCELLED'].includes(bj.state) && Date.now() - tCancel < 15000) {
      await sleep(50);
      bj = await ok(unary(q, 'GetJob', { job_id: bjob.job_id }, 'quantize'), 'GetJob');
    }
    check(bj.state === 'CANCELLED', `after CancelJob the job is ${bj.state}`);
    check(bj.error, 'a CANCELLED job says what happened in Job.error');
    check(bj.artifacts.length === 0, 'a CANCELLED job lists artifacts');
    step(`running job cancelled in ${Date.now() - tCancel} ms`);

    // unauthenticated inference
    try {
      await unary(inf, 'ModelInfer', req, null, 30);
      fail('ModelInfer without a token succeeded');
    } catch (e) {
      if (e instanceof E2EError) throw e;
      check(e.code === grpc.status.UNAUTHENTICATED, `ModelInfer without a token: expected UNAUTHENTICATED, got ${rpcDesc(e)}`);
    }
    // wrong role
    try {
      await unary(q, 'ListModels', {}, 'infer', 10);
      fail('ListModels with an infer-only token succeeded');
    } catch (e) {
      if (e instanceof E2EError) throw e;
      check(e.code === grpc.status.PERMISSION_DENIED, `ListModels with the infer token: expected PERMISSION_DENIED, got ${rpcDesc(e)}`);
    }
    step('auth checks passed');
  } finally {
    for (const c of clients) c.close();
  }
  await stopServer();
  step('server stopped with SIGTERM, exit 0');
}

main().then(() => {
  cleanup();
  process.stdout.write(`node-e2e: ${passed} passed, 0 failed\n`);
  process.exit(0);
}).catch((e) => {
  const msg = e instanceof E2EError ? e.message : (e && e.stack) || String(e);
  process.stderr.write(`[node-e2e] FAILED: ${msg}\n`);
  if (!(e instanceof E2EError)) process.stderr.write(stderrTail() + '\n');
  cleanup();
  process.stdout.write(`node-e2e: ${passed} passed, 1 failed\n`);
  process.exit(1);
});
