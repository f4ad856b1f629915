"""benchmarks.harness.data: toy sets, the digits split, the image pipeline (no torch_tempopt)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.harness.data import (
    TOY_DATASETS,
    bits_per_dim,
    dequantize,
    load_digits_split,
    logit_inverse,
    logit_transform,
    toy_sample,
)

# ----------------------------------------------------------------------------- toy data


def test_toy_names_match_ffjord() -> None:
    assert set(TOY_DATASETS) == {
        "swissroll",
        "8gaussians",
        "pinwheel",
        "circles",
        "moons",
        "2spirals",
        "checkerboard",
        "rings",
    }


@pytest.mark.parametrize("name", TOY_DATASETS)
@pytest.mark.parametrize("n", [1, 7, 501])
def test_toy_shape_dtype_and_exact_count(name: str, n: int) -> None:
    x = toy_sample(name, n, 3)
    assert x.shape == (n, 2)
    assert x.dtype == np.float32
    assert np.isfinite(x).all()


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_seeded(name: str) -> None:
    a = toy_sample(name, 256, 123)
    np.testing.assert_array_equal(a, toy_sample(name, 256, 123))
    np.testing.assert_array_equal(a, toy_sample(name, 256, np.random.default_rng(123)))
    assert not np.array_equal(a, toy_sample(name, 256, 124))
    # A Generator is advanced in place: two draws differ, and the pair is reproducible.
    rng = np.random.default_rng(5)
    first, second = toy_sample(name, 64, rng), toy_sample(name, 64, rng)
    assert not np.array_equal(first, second)
    rng = np.random.default_rng(5)
    np.testing.assert_array_equal(first, toy_sample(name, 64, rng))
    np.testing.assert_array_equal(second, toy_sample(name, 64, rng))
    # A legacy RandomState (FFJORD's convention) is also deterministic.
    np.testing.assert_array_equal(
        toy_sample(name, 32, np.random.RandomState(9)),
        toy_sample(name, 32, np.random.RandomState(9)),
    )


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_scale_like_ffjord(name: str) -> None:
    x = toy_sample(name, 4000, 0)
    # FFJORD's toy sets live in roughly [-4, 4]^2 (its plots use that box).
    assert np.mean(np.abs(x) <= 4.0) > 0.99
    assert np.abs(x).max() < 6.0
    assert 0.5 < x.std() < 3.5


def test_toy_structure_spot_checks() -> None:
    # 8gaussians: modes at radius 4 / 1.414; checkerboard: uniform on half the squares of [-4,
    # 4]^2.
    g = toy_sample("8gaussians", 4000, 0)
    assert abs(np.median(np.linalg.norm(g, axis=1)) - 4.0 / 1.414) < 0.1
    c = toy_sample("checkerboard", 4000, 0)
    assert np.abs(c).max() <= 4.0
    square_parity = (np.floor(c[:, 0] / 2) + np.floor(c[:, 1] / 2)) % 2
    assert np.all(square_parity == square_parity[0])
    # rings: four radii 3, 2.25, 1.5, 0.75 with equal shares.
    r = np.linalg.norm(toy_sample("rings", 4000, 0), axis=1)
    nearest = np.argmin(np.abs(r[:, None] - np.array([3.0, 2.25, 1.5, 0.75])), axis=1)
    np.testing.assert_array_equal(np.bincount(nearest), [1000, 1000, 1000, 1000])


def test_toy_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="name"):
        toy_sample("spiral", 10, 0)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="n must be positive"):
            toy_sample("moons", bad, 0)
    with pytest.raises(TypeError, match="n must be an int"):
        toy_sample("moons", 10.0, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rng_or_seed"):
        toy_sample("moons", 10, "seed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rng_or_seed"):
        toy_sample("moons", 10, -1)


# ----------------------------------------------------------------------------- digits


def test_digits_split_shapes_levels_and_determinism() -> None:
    from sklearn.datasets import load_digits

    train, test = load_digits_split()
    assert train.shape == (1437, 1, 8, 8) and test.shape == (360, 1, 8, 8)
    assert train.dtype == torch.uint8 and test.dtype == torch.uint8
    # 17 levels v in 0..16 map to round_half_up(255 v / 16).
    expected = sorted({math.floor(255 * v / 16 + 0.5) for v in range(17)})
    assert torch.cat([train, test]).unique().tolist() == expected
    assert expected[:3] == [0, 16, 32] and expected[8] == 128 and expected[-1] == 255
    # The split is a partition of the whole data set (compared as a multiset of images).
    raw = load_digits().images.astype(np.int64)
    mapped = ((255 * raw + 8) // 16).reshape(len(raw), -1)
    both = torch.cat([train, test]).reshape(len(raw), -1).numpy().astype(np.int64)
    np.testing.assert_array_equal(both[np.lexsort(both.T)], mapped[np.lexsort(mapped.T)])
    # Fixed for a seed, different for another.
    again_train, again_test = load_digits_split(seed=0)
    assert torch.equal(train, again_train) and torch.equal(test, again_test)
    other_train, _ = load_digits_split(seed=1)
    assert not torch.equal(train, other_train)
    small_train, small_test = load_digits_split(test_fraction=0.5)
    assert small_test.shape[0] == 899 and small_train.shape[0] == 898


def test_digits_split_rejects_bad_fraction() -> None:
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="test_fraction"):
            load_digits_split(test_fraction=bad)


# ----------------------------------------------------------------------------- pipeline


def test_dequantize_range_seed_and_dtype() -> None:
    levels = torch.arange(256, dtype=torch.uint8).repeat(4)
    x = dequantize(levels, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float64  # the default dtype (float64 in these tests)
    lower = levels.double() / 256
    assert bool(((lower <= x) & (x < lower + 1 / 256)).all())
    assert torch.equal(x, dequantize(levels, torch.Generator().manual_seed(0)))
    assert not torch.equal(x, dequantize(levels, torch.Generator().manual_seed(1)))
    assert dequantize(levels, dtype=torch.float32).dtype == torch.float32
    assert dequantize(levels.float()).dtype == torch.float32
    # The noise is uniform on [0, 1): mean 1/2 in level units.
    noise = (
        dequantize(torch.zeros(20000, dtype=torch.uint8), torch.Generator().manual_seed(0)) * 256
    )
    assert abs(noise.mean().item() - 0.5) < 0.01


def test_dequantize_rejects_non_levels() -> None:
    for bad in (torch.tensor([256.0]), torch.tensor([-1]), torch.tensor([0.5])):
        with pytest.raises(ValueError, match="0..255"):
            dequantize(bad)


def test_logit_logdet_matches_autograd_jacobian() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 2, generator=gen, dtype=torch.float64)
    for alpha in (1e-6, 0.05):
        y, logdet = logit_transform(x, alpha)
        assert y.shape == x.shape and logdet.shape == (3,)
        for i in range(3):
            jac = torch.autograd.functional.jacobian(
                lambda xi, a=alpha: logit_transform(xi[None], a)[0][0], x[i]
            )
            sign, logabs = torch.linalg.slogdet(jac.reshape(4, 4))
            assert sign.item() == 1.0
            torch.testing.assert_close(logdet[i], logabs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logit_inverse(y, alpha), x, rtol=1e-10, atol=1e-12)


def test_logit_by_hand() -> None:
    # At x = 1/2 with alpha = 0: y = 0 and dy/dx = 1 / (s (1 - s)) = 4 per dimension.
    y, logdet = logit_transform(torch.full((2, 5), 0.5, dtype=torch.float64), alpha=0.0)
    assert torch.equal(y, torch.zeros(2, 5, dtype=torch.float64))
    torch.testing.assert_close(logdet, torch.full((2,), 5 * math.log(4.0), dtype=torch.float64))
    # alpha squeezes 0 to logit(alpha), finite.
    y0, _ = logit_transform(torch.zeros(1, 1, dtype=torch.float64), alpha=1e-6)
    torch.testing.assert_close(
        y0, torch.tensor([[math.log(1e-6 / (1 - 1e-6))]], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="alpha"):
        logit_transform(torch.zeros(1, 1), alpha=0.5)


def test_bits_per_dim_known_densities() -> None:
    # Uniform on [0, 1)^d: log p = 0, i.e. uniform over the 256^d grey-level cells: exactly 8 bits.
    assert bits_per_dim(0.0, 64) == 8.0
    # Uniform on [0, 1/2)^d: log p = d log 2, one bit fewer per dimension.
    assert bits_per_dim(64 * math.log(2.0), 64) == pytest.approx(7.0, abs=1e-12)
    # Per-sample values, by hand: bpd = -(log p / d - log 256) / log 2.
    log_px = torch.tensor([-100.0, -50.0], dtype=torch.float64)
    expected = torch.tensor(
        [(100 / 784 + math.log(256)) / math.log(2), (50 / 784 + math.log(256)) / math.log(2)]
    )
    torch.testing.assert_close(bits_per_dim(log_px, 784), expected)
    with pytest.raises(ValueError, match="dim"):
        bits_per_dim(0.0, 0)


def test_pipeline_uniform_model_gives_eight_bits() -> None:
    # The logistic density on logit space (alpha = 0) pushes forward to the uniform density on
    # [0, 1): log p_Y(y) + logdet = 0, so bits per dimension is 8 whatever the data.
    levels = torch.randint(
        0, 256, (6, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    x = dequantize(levels, torch.Generator().manual_seed(1), dtype=torch.float64)
    y, logdet = logit_transform(x, alpha=0.0)
    log_logistic = (-y - 2 * torch.nn.functional.softplus(-y)).reshape(6, -1).sum(1)
    bpd = bits_per_dim(log_logistic + logdet, 64)
    torch.testing.assert_close(bpd, torch.full((6,), 8.0, dtype=torch.float64), rtol=0, atol=1e-9)
