#!/usr/bin/python3
"""Trains the Fashion-MNIST CNN fixture (with BatchNorm) and saves it as TorchScript.

Usage: /usr/bin/python3 scripts/train_fmnist_cnn.py OUT_DIR

Data: Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist/*.gz, IDX format).
Model: conv(1->32,3,pad 1)+BN+ReLU+maxpool 2, conv(32->64,3,pad 1)+BN+ReLU+maxpool 2, flatten,
linear(3136->128)+ReLU, linear(128->10). Adam (lr 1e-3), batch 64, 2 epochs, seed 0, a fixed
shuffling order (torch.Generator seeded with 0), 2 CPU threads, deterministic algorithms.

Writes (atomically) into OUT_DIR:
  fmnist_cnn.pt            torch.jit.script of the model in eval mode; any batch size [N,1,28,28]
                           -> logits [N,10]. Graph ops: aten::conv2d, aten::batch_norm,
                           aten::linear; parameters are module attributes (conv1.weight, bn1.*, ...)
  fmnist_test.safetensors  images F32 [10000,1,28,28] normalized as in training
                           ((x/255 - mean) / std, mean/std of the training images, also in the
                           metadata and the JSON), labels I64 [10000]
  fmnist_cnn.json          test_accuracy (of the saved TorchScript on the saved images), epochs,
                           seed, train_seconds, normalization, ...
Prints the FP test accuracy to stdout; progress goes to stderr.
"""

import argparse
import gzip
import io
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from st_write import atomic_write_bytes, atomic_write_json, write_safetensors  # noqa: E402

DATA_DIR = "/usr/share/datasets/fashion-mnist"
SEED = 0
EPOCHS = 2
BATCH = 64
LR = 1e-3
THREADS = 2


def log(msg):
    print("train_fmnist_cnn: " + msg, file=sys.stderr, flush=True)


def read_idx(path, magic, ndim):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    m, = struct.unpack(">I", raw[:4])
    if m != magic:
        raise ValueError("%s: bad IDX magic 0x%08x (expected 0x%08x)" % (path, m, magic))
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError("%s: %d bytes of data for shape %s" % (path, data.size, dims))
    return data.reshape(dims)


def load_split(name):
    images = read_idx(os.path.join(DATA_DIR, "%s-images-idx3-ubyte.gz" % name), 0x803, 3)
    labels = read_idx(os.path.join(DATA_DIR, "%s-labels-idx1-ubyte.gz" % name), 0x801, 1)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError("%s: inconsistent shapes %s / %s" % (name, images.shape, labels.shape))
    return images, labels.astype(np.int64)


class FmnistCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


@torch.no_grad()
def accuracy(model, images, labels, batch=1000):
    correct = 0
    for i in range(0, images.shape[0], batch):
        pred = model(images[i:i + batch]).argmax(dim=1)
        correct += int((pred == labels[i:i + batch]).sum())
    return correct / images.shape[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="directory for fmnist_cnn.pt, fmnist_test.safetensors, fmnist_cnn.json")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)

    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        if not os.path.isfile(os.path.join(DATA_DIR, f)):
            sys.exit("train_fmnist_cnn: error: %s/%s missing; install the Debian package "
                     "dataset-fashion-mnist (scripts/setup.sh)" % (DATA_DIR, f))
    tr_x, tr_y = load_split("train")
    te_x, te_y = load_split("t10k")
    log("loaded %d train / %d test images from %s" % (len(tr_y), len(te_y), DATA_DIR))

    # Normalization constants from the training images (float64, then rounded to float32).
    tr_f = tr_x.astype(np.float64) / 255.0
    mean = float(np.float32(tr_f.mean()))
    std = float(np.float32(tr_f.std()))
    del tr_f

    def normalize(u8):
        x = u8.astype(np.float32) / np.float32(255.0)
        x = (x - np.float32(mean)) / np.float32(std)
        return torch.from_numpy(np.ascontiguousarray(x[:, None, :, :], dtype=np.float32))

    train_x, train_y = normalize(tr_x), torch.from_numpy(tr_y)
    test_x, test_y = normalize(te_x), torch.from_numpy(te_y)

    model = FmnistCNN()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)
    n = train_x.shape[0]
    t0 = time.monotonic()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for i in range(0, n, BATCH):
            idx = perm[i:i + BATCH]
            xb, yb = train_x[idx], train_y[idx]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
            seen += len(idx)
            step = i // BATCH + 1
            if step % 200 == 0:
                log("epoch %d step %d/%d loss %.4f (%.0f s)" %
                    (epoch + 1, step, (n + BATCH - 1) // BATCH, total / seen, time.monotonic() - t0))
        model.eval()
        log("epoch %d done: train loss %.4f, test accuracy %.4f (%.0f s)" %
            (epoch + 1, total / seen, accuracy(model, test_x, test_y), time.monotonic() - t0))
    train_seconds = time.monotonic() - t0

    model.eval()
    scripted = torch.jit.script(model)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    pt_path = os.path.join(args.out_dir, "fmnist_cnn.pt")
    atomic_write_bytes(pt_path, buf.getvalue())

    # Report the accuracy of what the C++ evaluator will load, on exactly the saved data.
    loaded = torch.jit.load(pt_path)
    loaded.eval()
    acc = accuracy(loaded, test_x, test_y)
    eager_acc = accuracy(model, test_x, test_y)
    if abs(acc - eager_acc) > 1e-4:
        sys.exit("train_fmnist_cnn: error: TorchScript accuracy %.4f differs from eager %.4f"
                 % (acc, eager_acc))
    for b in (1, 3, 64):  # batch size is not baked in
        assert tuple(loaded(test_x[:b]).shape) == (b, 10)

    write_safetensors(
        os.path.join(args.out_dir, "fmnist_test.safetensors"),
        {"images": test_x.numpy(), "labels": test_y.numpy()},
        {"dataset": "fashion-mnist t10k", "normalize": "(x/255 - %r) / %r" % (mean, std)})
    atomic_write_json(os.path.join(args.out_dir, "fmnist_cnn.json"), {
        "test_accuracy": round(acc, 6),
        "epochs": EPOCHS,
        "seed": SEED,
        "train_seconds": round(train_seconds, 1),
        "batch_size": BATCH,
        "optimizer": "Adam lr=%g" % LR,
        "threads": THREADS,
        "export": "torch.jit.script (eval mode); any batch size",
        "input_shape": ["N", 1, 28, 28],
        "normalize_mean": mean,
        "normalize_std": std,
        "test_samples": int(test_y.shape[0]),
        "torch_version": torch.__version__,
    })
    log("wrote %s (train %.0f s)" % (args.out_dir, train_seconds))
    print("fmnist_cnn: FP test accuracy %.4f (%d images), %d epochs, train %.0f s"
          % (acc, test_y.shape[0], EPOCHS, train_seconds))


if __name__ == "__main__":
    main()
