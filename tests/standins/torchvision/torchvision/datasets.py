"""Stand-in ``torchvision.datasets.MNIST``: reads ``root/MNIST/raw/*-ubyte`` (IDX); never downloads."""

import struct
from pathlib import Path

import numpy as np

__all__ = ["MNIST"]


def _read_idx(path):
    data = Path(path).read_bytes()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class MNIST:
    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        raw = Path(root) / "MNIST" / "raw"
        prefix = "train" if train else "t10k"
        images, labels = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
        if not images.exists():
            raise RuntimeError(f"Dataset not found in {raw} (the stand-in cannot download).")
        self.data, self.targets = _read_idx(images), _read_idx(labels)
        self.transform = transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        img = self.data[index]
        return (self.transform(img) if self.transform else img), int(self.targets[index])
