r"""The parts of torchvision that FFJORD's ``train_cnf.py --data mnist`` uses, for CPU-only torch.

PyPI's torchvision wheels pair with torch's CUDA build, so next to the CPU build of torch ``import
torchvision`` fails. ``train_cnf.py`` needs only ``datasets.MNIST``, ``transforms.Compose``,
``transforms.Resize``, ``transforms.ToTensor`` and ``utils.save_image``; this module provides
those, and :mod:`torch_tempopt.patches.ffjord` puts them in ``sys.modules`` as ``torchvision`` for
the run **only when torchvision cannot be imported** (upstream's log then says so). Where
torchvision imports, it is used.

* :class:`MNIST` reads MNIST's own IDX files from ``root/MNIST/raw`` (write them offline with
  ``python -m benchmarks.mnist_idx ROOT``); it never downloads.
* :class:`Resize` is area resampling: each output pixel is the mean of the input pixels it covers
  (``torch.nn.functional.interpolate(mode="area")``), rounded back to 0..255. torchvision's default
  on images is bilinear with antialiasing (PIL's triangle filter: at 28 -> 14 four taps of 1/8,
  3/8, 3/8, 1/8 per axis), which differs from it by up to a few tens of grey levels at stroke
  edges: runs with the real torchvision see slightly smoother images.
* :func:`save_image` writes a PNG of :func:`make_grid` (torchvision's layout: ``nrow`` images per
  row, 2 pixels of padding, grey images as RGB); asked for another format (upstream's
  ``figs/0001.jpg``), it writes the PNG beside it (``figs/0001.png``) and logs that it did.
"""

from __future__ import annotations

import importlib.machinery
import logging
import struct
import sys
import types
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MNIST", "Compose", "Resize", "ToTensor", "make_grid", "modules", "save_image"]

_FILES = {True: "train", False: "t10k"}


def _read_idx(path: Path) -> np.ndarray:
    data = path.read_bytes()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()}).")
    shape = struct.unpack(f">{data[3]}I", data[4 : 4 + 4 * data[3]])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * data[3]).reshape(shape)


class MNIST(torch.utils.data.Dataset):
    """``torchvision.datasets.MNIST`` over the IDX files in ``root/MNIST/raw``: (image, label)."""

    def __init__(
        self,
        root: str | Path,
        train: bool = True,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        download: bool = False,
    ) -> None:
        raw = Path(root) / "MNIST" / "raw"
        images, labels = (
            raw / f"{_FILES[bool(train)]}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")
        )
        if not images.is_file() or not labels.is_file():
            raise RuntimeError(
                f"MNIST's IDX files are not in {raw} and this stand-in cannot download them; "
                f"write them with `python -m benchmarks.mnist_idx {root}`."
            )
        self.data = torch.from_numpy(_read_idx(images).copy())
        self.targets = torch.from_numpy(_read_idx(labels).astype(np.int64))
        if len(self.data) != len(self.targets):
            raise ValueError(
                f"{images} holds {len(self.data)} images but {labels} {len(self.targets)} labels."
            )
        self.transform, self.target_transform = transform, target_transform
        logging.getLogger().info(
            "torchvision cannot be imported here: torch_tempopt.patches.torchvision_cpu reads "
            "%d %s images from %s (area-resampling Resize, PNG save_image).",
            len(self.data),
            "training" if train else "test",
            raw,
        )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img, target = self.data[index], int(self.targets[index])
        img = self.transform(img) if self.transform is not None else img
        return img, (
            self.target_transform(target) if self.target_transform is not None else target
        )


class Compose:
    """Applies ``transforms`` in order."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> Any:
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    """Area-resamples a uint8 image (H x W or C x H x W); an int ``size`` sets the shorter side."""

    def __init__(self, size: int | Sequence[int]) -> None:
        if isinstance(size, int) and size >= 1:
            self.size: int | tuple[int, int] = size
        elif (
            isinstance(size, (tuple, list))
            and len(size) == 2
            and all(isinstance(s, int) and s >= 1 for s in size)
        ):
            self.size = (size[0], size[1])
        else:
            raise ValueError(f"size must be a positive int or a pair of them, got {size!r}.")

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if (
            not isinstance(img, torch.Tensor)
            or img.dtype != torch.uint8
            or img.dim() not in (2, 3)
        ):
            raise TypeError(
                "img must be a uint8 tensor of shape (H, W) or (C, H, W), got "
                f"{type(img).__name__} {getattr(img, 'dtype', '')} "
                f"{tuple(getattr(img, 'shape', ()))}."
            )
        h, w = img.shape[-2:]
        if isinstance(self.size, int):
            short = min(h, w)
            out = (
                (self.size, int(self.size * w / h))
                if h == short
                else (int(self.size * h / w), self.size)
            )
        else:
            out = self.size
        x = img.reshape(1, -1, h, w).float()
        # enlarging: no area to average
        y = (
            F.interpolate(x, size=out, mode="area")
            if out[0] <= h and out[1] <= w
            else F.interpolate(x, size=out, mode="bilinear", align_corners=False)
        )
        return y.round().clamp(0, 255).to(torch.uint8).reshape(*img.shape[:-2], *out)


class ToTensor:
    """A uint8 image (H x W or C x H x W) as a float C x H x W tensor in [0, 1]."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = torch.as_tensor(img)
        img = img[None] if img.dim() == 2 else img
        return img.float().div(255) if img.dtype == torch.uint8 else img.float()


def make_grid(
    tensor: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0
) -> torch.Tensor:
    """The grid of torchvision for a batch ``(B, C, H, W)``: ``nrow`` images a row, grey as RGB."""
    if tensor.dim() != 4:
        raise ValueError(f"tensor must be a batch (B, C, H, W), got shape {tuple(tensor.shape)}.")
    tensor = tensor.detach().cpu().float()
    tensor = tensor.expand(-1, 3, -1, -1) if tensor.shape[1] == 1 else tensor
    if tensor.shape[0] == 1:  # as torchvision: one image, unpadded
        return tensor[0].clone()
    b, c, h, w = tensor.shape
    cols, rows = min(nrow, b), -(-b // min(nrow, b))
    grid = torch.full(
        (c, rows * (h + padding) + padding, cols * (w + padding) + padding), float(pad_value)
    )
    for k in range(b):
        r, q = divmod(k, cols)
        top, left = r * (h + padding) + padding, q * (w + padding) + padding
        grid[:, top : top + h, left : left + w] = tensor[k]
    return grid


def _png(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an (H, W, 3) uint8 array."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[r].tobytes() for r in range(height))  # filter type 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


def save_image(
    tensor: torch.Tensor,
    fp: str | Path,
    nrow: int = 8,
    padding: int = 2,
    pad_value: float = 0.0,
    **kwargs: Any,
) -> None:
    """Saves a batch in [0, 1] as a PNG grid, as torchvision's ``save_image`` (no normalize)."""
    if (
        kwargs.get("normalize")
        or kwargs.get("range") is not None
        or kwargs.get("value_range") is not None
    ):
        raise NotImplementedError(
            "save_image: normalize/value_range are not supported here; scale to [0, 1] first."
        )
    grid = make_grid(tensor, nrow=nrow, padding=padding, pad_value=pad_value)
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    path = Path(fp)
    # no JPEG encoder here: the PNG goes beside the name asked for
    if path.suffix.lower() != ".png":
        path = path.with_suffix(".png")
        logging.getLogger().info(
            "torchvision_cpu.save_image: wrote %s as a PNG (asked for %s).", path, fp
        )
    path.write_bytes(_png(np.ascontiguousarray(pixels)))


def modules() -> dict[str, types.ModuleType]:
    """``torchvision`` and its ``datasets``, ``transforms``, ``utils``, of this file's parts."""
    made = {
        name: types.ModuleType(name)
        for name in (
            "torchvision",
            "torchvision.datasets",
            "torchvision.transforms",
            "torchvision.utils",
        )
    }
    for name, module in made.items():
        # torch._dynamo calls find_spec on modules
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    here = sys.modules[__name__]
    vars(made["torchvision.datasets"]).update(MNIST=MNIST)
    vars(made["torchvision.transforms"]).update(Compose=Compose, Resize=Resize, ToTensor=ToTensor)
    vars(made["torchvision.utils"]).update(save_image=save_image, make_grid=make_grid)
    vars(made["torchvision"]).update(
        datasets=made["torchvision.datasets"],
        transforms=made["torchvision.transforms"],
        utils=made["torchvision.utils"],
        __version__="0+tempopt.cpu",
        __file__=here.__file__,
    )
    return made
