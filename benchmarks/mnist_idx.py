"""An offline MNIST stand-in in MNIST's own IDX format, where ``torchvision.datasets.MNIST(root)`` finds it.

The device machine has no internet, so torchvision's MNIST download fails. This writes
``ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``: with those four files
present, ``MNIST(root=ROOT, download=True)`` skips the download and reads them.

The images are scikit-learn's 8x8 digits (1797 scans, 17 grey levels) upsampled to
20x20, padded to 28x28 like MNIST's centred digits, randomly shifted by up to 2 pixels
and scaled to 0..255. Without scikit-learn, seven-segment digits drawn with random
stroke width, slant and shift stand in. Either way these are *not* MNIST: bits/dim are
not comparable with published MNIST numbers; NFE, T and time per iteration are what
the GPU check compares.

Usage::

    python benchmarks/mnist_idx.py ROOT [--train 60000] [--test 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

import numpy as np

__all__ = ["FILES", "digits", "main", "read_idx", "write_idx", "write_mnist"]

#: The four files torchvision's MNIST looks for in ``ROOT/MNIST/raw``.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_UBYTE = 0x08


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Writes an unsigned-byte array in the IDX format: magic ``0x0000 08 NDIM``, big-endian int32 sizes, data.

    Raises:
        TypeError: If ``array`` is not ``uint8``.
        ValueError: If it has no dimension or more than 255.

    """
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        raise TypeError(f"array must be a numpy uint8 array, got {type(array).__name__} {getattr(array, 'dtype', '')}.")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"array must have 1 to 255 dimensions, got {array.ndim}.")
    header = struct.pack(">BBBB", 0, 0, _UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    Path(path).write_bytes(header + np.ascontiguousarray(array).tobytes())


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an unsigned-byte IDX file back (the format check of the tests; torchvision has its own reader).

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
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg", 5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}  # fmt: skip


def _segment_digit(label: int, rng: np.random.Generator) -> np.ndarray:
    img = np.zeros((20, 20))
    w = int(rng.integers(2, 4))
    lines = {"a": (2, 5, 2, 14), "d": (16, 5, 16, 14), "g": (9, 5, 9, 14)}  # horizontal (row, col0, row, col1)
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
    """``n`` 28x28 uint8 digit images and their labels (scikit-learn's digits, or seven-segment ones)."""
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


def write_mnist(root: str | Path, n_train: int = 60000, n_test: int = 1000, seed: int = 0) -> Path:
    """Writes the four IDX files into ``root/MNIST/raw``; returns that folder."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    train, train_labels = digits(n_train, seed)
    test, test_labels = digits(n_test, seed + 1)
    write_idx(raw / FILES["train_images"], train)
    write_idx(raw / FILES["train_labels"], train_labels)
    write_idx(raw / FILES["test_images"], test)
    write_idx(raw / FILES["test_labels"], test_labels)
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="torchvision's MNIST root (FFJORD's train_cnf.py uses ./data)")
    parser.add_argument("--train", type=int, default=60000, help="training images (60000 in MNIST)")
    parser.add_argument("--test", type=int, default=1000, help="test images (10000 in MNIST)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    raw = write_mnist(args.root, args.train, args.test, args.seed)
    print(f"wrote {args.train} + {args.test} images to {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
