r"""Data for the examples: seeded 2-D toy densities, 8x8 digits and the image pipeline.

The toy densities follow the eight 2-D benchmarks of FFJORD (Grathwohl et al., 2019)
at the same scales (samples lie roughly in :math:`[-4, 4]^2`), but every generator
here draws from one :class:`numpy.random.Generator`, so a seed fixes the whole batch,
and every generator returns exactly ``n`` points.

The image pipeline turns integer grey levels :math:`k \in \{0, \dots, 255\}` into
unconstrained reals in three steps, each with its log-density bookkeeping:

1. :func:`dequantize`: :math:`x = (k + u) / 256` with :math:`u \sim U[0, 1)^d`, so
   :math:`x \in [0, 1)^d`;
2. :func:`logit_transform`: :math:`y = \operatorname{logit}(\alpha + (1 - 2\alpha) x)`
   and its log-determinant, so :math:`\log p(x) = \log p_Y(y) + \log |\det \partial y / \partial
   x|`;
3. :func:`bits_per_dim`: the paper's eq. (18) on :math:`\log p(x)`.

References:
    | FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models
    | Grathwohl et al., 2019 (https://arxiv.org/abs/1810.01367)

    | TO-FLOW: Efficient Continuous Normalizing Flows with Temporal Optimization adjoint
      with Moving Speed, eq. (18)
    | Du et al., 2022 (https://arxiv.org/abs/2203.10335)
"""

from __future__ import annotations

__all__ = [
    "TOY_DATASETS",
    "bits_per_dim",
    "dequantize",
    "load_digits_split",
    "logit_inverse",
    "logit_transform",
    "toy_sample",
]

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

TOY_DATASETS: tuple[str, ...] = (
    "swissroll",
    "8gaussians",
    "pinwheel",
    "circles",
    "moons",
    "2spirals",
    "checkerboard",
    "rings",
)
"""Names accepted by :func:`toy_sample`, in FFJORD's order."""


# --------------------------------------------------------------------------- toy data


def _as_generator(
    rng_or_seed: int | np.random.Generator | np.random.RandomState | None,
) -> np.random.Generator:
    """Turns a seed or a random state into a :class:`numpy.random.Generator`."""
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, np.random.RandomState):
        # A legacy RandomState (FFJORD's convention) seeds a fresh Generator, so the
        # result is still a deterministic function of the state.
        return np.random.default_rng(int(rng_or_seed.randint(0, 2**31 - 1)))
    if rng_or_seed is None:
        return np.random.default_rng()
    if isinstance(rng_or_seed, bool) or not isinstance(rng_or_seed, (int, np.integer)):
        raise TypeError(
            "rng_or_seed must be an int seed, a numpy.random.Generator, a "
            f"numpy.random.RandomState or None, got {type(rng_or_seed).__name__}."
        )
    if rng_or_seed < 0:
        raise ValueError(f"rng_or_seed must be a non-negative seed, got {rng_or_seed}.")
    return np.random.default_rng(int(rng_or_seed))


def _swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    # The (x, z) plane of scikit-learn's swiss roll with unit noise, scaled by 1/5.
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
    roll = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    return (roll + rng.standard_normal((n, 2))) / 5.0


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    # Eight unit-direction modes at radius 4 with std 0.5, the whole picture scaled by 1/1.414.
    angles = np.pi / 4.0 * rng.integers(0, 8, size=n)
    centres = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return (centres + 0.5 * rng.standard_normal((n, 2))) / 1.414


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    # Five arms: a radial/tangential Gaussian blob, rotated by an angle that grows
    # exponentially with the radial coordinate, then scaled by 2.
    arms = 5
    radial_std, tangential_std, rate = 0.3, 0.1, 0.25
    arm = np.arange(n) % arms
    radial = 1.0 + radial_std * rng.standard_normal(n)
    tangential = tangential_std * rng.standard_normal(n)
    angle = 2.0 * np.pi * arm / arms + rate * np.exp(radial)
    cos, sin = np.cos(angle), np.sin(angle)
    points = np.stack([radial * cos + tangential * sin, tangential * cos - radial * sin], axis=1)
    return 2.0 * points[rng.permutation(n)]


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    # Two concentric circles (radii 1 and 0.5, as scikit-learn's make_circles with
    # factor 0.5 and noise 0.08), scaled by 3.
    n_outer = n // 2
    n_inner = n - n_outer
    outer = np.linspace(0.0, 2.0 * np.pi, n_outer, endpoint=False)
    inner = np.linspace(0.0, 2.0 * np.pi, n_inner, endpoint=False)
    points = np.concatenate(
        [
            np.stack([np.cos(outer), np.sin(outer)], axis=1),
            0.5 * np.stack([np.cos(inner), np.sin(inner)], axis=1),
        ]
    )
    points = points + 0.08 * rng.standard_normal((n, 2))
    return 3.0 * points[rng.permutation(n)]


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    # Two interleaved half circles (scikit-learn's make_moons with noise 0.1),
    # mapped by x -> 2x + (-1, -0.2).
    n_upper = n // 2
    n_lower = n - n_upper
    upper = np.linspace(0.0, np.pi, n_upper)
    lower = np.linspace(0.0, np.pi, n_lower)
    points = np.concatenate(
        [
            np.stack([np.cos(upper), np.sin(upper)], axis=1),
            np.stack([1.0 - np.cos(lower), 0.5 - np.sin(lower)], axis=1),
        ]
    )
    points = points + 0.1 * rng.standard_normal((n, 2))
    return 2.0 * points[rng.permutation(n)] + np.array([-1.0, -0.2])


def _two_spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    # Two point-symmetric spirals of 1.5 turns (angle sqrt(u) * 3 pi), with a
    # U[0, 0.5) jitter per coordinate, scaled by 1/3, plus N(0, 0.1^2) noise.
    angle = np.sqrt(rng.random(n)) * 3.0 * np.pi
    arm = np.stack([-np.cos(angle) * angle, np.sin(angle) * angle], axis=1)
    arm = arm + 0.5 * rng.random((n, 2))
    sign = np.where(np.arange(n) < n // 2, 1.0, -1.0)[:, None]
    points = sign * arm / 3.0 + 0.1 * rng.standard_normal((n, 2))
    return points[rng.permutation(n)]


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    # Uniform on the black squares of a 4x4 board of unit squares on [-2, 2]^2,
    # scaled by 2 to [-4, 4]^2.
    x1 = 4.0 * rng.random(n) - 2.0
    x2 = rng.random(n) - 2.0 * rng.integers(0, 2, size=n) + np.floor(x1) % 2
    return 2.0 * np.stack([x1, x2], axis=1)


def _rings(n: int, rng: np.random.Generator) -> np.ndarray:
    # Four concentric circles of radii 3, 2.25, 1.5 and 0.75 with N(0, 0.08^2) noise;
    # the innermost ring takes the remainder of n / 4.
    per_ring = n // 4
    counts = (per_ring, per_ring, per_ring, n - 3 * per_ring)
    radii = (1.0, 0.75, 0.5, 0.25)
    rings = []
    for count, radius in zip(counts, radii):
        angle = np.linspace(0.0, 2.0 * np.pi, count, endpoint=False)
        rings.append(radius * np.stack([np.cos(angle), np.sin(angle)], axis=1))
    points = 3.0 * np.concatenate(rings)[rng.permutation(n)]
    return points + 0.08 * rng.standard_normal((n, 2))


_TOY_GENERATORS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "swissroll": _swissroll,
    "8gaussians": _eight_gaussians,
    "pinwheel": _pinwheel,
    "circles": _circles,
    "moons": _moons,
    "2spirals": _two_spirals,
    "checkerboard": _checkerboard,
    "rings": _rings,
}


def toy_sample(
    name: str,
    n: int,
    rng_or_seed: int | np.random.Generator | np.random.RandomState | None,
) -> np.ndarray:
    r"""Draws ``n`` points from one of FFJORD's eight 2-D toy densities.

    The shapes and scales are those of FFJORD's ``toy_data.inf_train_gen`` (points
    lie roughly in :math:`[-4, 4]^2`), with two deliberate differences: all the
    randomness comes from ``rng_or_seed`` (FFJORD mixes in numpy's and
    scikit-learn's global states), and exactly ``n`` points are returned (FFJORD's
    pinwheel rounds ``n`` down to a multiple of 5). Points of structured sets are
    shuffled, so any prefix of the batch is an unbiased sample.

    Arguments:
        name: One of :data:`TOY_DATASETS`.
        n: The number of points, positive.
        rng_or_seed: An int seed, a :class:`numpy.random.Generator` (advanced in
            place), a legacy :class:`numpy.random.RandomState` (one draw from it seeds
            a fresh generator) or :py:`None` for fresh OS entropy.

    Returns:
        A float32 array of shape ``(n, 2)``.

    Raises:
        ValueError: If ``name`` is unknown, ``n <= 0`` or the seed is negative.
        TypeError: If ``n`` is not an int or ``rng_or_seed`` has an unsupported type.

    Example:
        >>> x = toy_sample("8gaussians", 5, 0)
        >>> x.shape, x.dtype
        ((5, 2), dtype('float32'))
        >>> bool((x == toy_sample("8gaussians", 5, 0)).all())
        True
    """
    if name not in _TOY_GENERATORS:
        raise ValueError(f"name must be one of {TOY_DATASETS}, got {name!r}.")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}.")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}.")
    rng = _as_generator(rng_or_seed)
    points = _TOY_GENERATORS[name](int(n), rng)
    return np.ascontiguousarray(points, dtype=np.float32)


# --------------------------------------------------------------------------- digits


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    r"""Loads scikit-learn's 8x8 digits as 256-level images and splits them.

    :func:`sklearn.datasets.load_digits` holds 1797 images whose pixels count the
    set pixels of a 4x4 block, :math:`v \in \{0, 1, \dots, 16\}` (17 grey levels).
    They are mapped onto the 0..255 range of 8-bit images by rounding
    :math:`255 v / 16` half up, computed exactly in integers:

    .. math:: k = \left\lfloor \frac{255 v + 8}{16} \right\rfloor ,

    so :math:`0 \mapsto 0`, :math:`1 \mapsto 16`, :math:`8 \mapsto 128`,
    :math:`16 \mapsto 255`; the 17 levels stay distinct and the usual 8-bit pipeline
    (:func:`dequantize`, :func:`bits_per_dim` with 256 levels) applies unchanged.

    The split is a fixed permutation of the 1797 images drawn from
    ``numpy.random.default_rng(seed)``: the first :math:`\lceil f N \rceil` indices
    form the test set, the rest the training set, each in permutation order.

    Arguments:
        seed: The seed of the permutation.
        test_fraction: The fraction :math:`f` of images held out, in :math:`(0, 1)`.

    Returns:
        ``(train, test)``, two :class:`torch.uint8` tensors of shape ``(N, 1, 8, 8)``
        with values in 0..255 (``N`` is 1437 and 360 for the defaults).

    Raises:
        ValueError: If ``test_fraction`` is not in :math:`(0, 1)` or leaves a split empty.
    """
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    values = load_digits().images.astype(np.int64)  # (1797, 8, 8), integers 0..16
    levels = ((255 * values + 8) // 16).astype(np.uint8)[:, None]
    count = levels.shape[0]
    n_test = math.ceil(test_fraction * count)
    if n_test >= count:
        raise ValueError(f"test_fraction={test_fraction} leaves no training images.")
    order = np.random.default_rng(seed).permutation(count)
    test = torch.from_numpy(np.ascontiguousarray(levels[order[:n_test]]))
    train = torch.from_numpy(np.ascontiguousarray(levels[order[n_test:]]))
    return train, test


# --------------------------------------------------------------------------- pipeline


def dequantize(
    x: Tensor,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Uniformly dequantizes integer grey levels into :math:`[0, 1)`.

    .. math:: x' = \frac{k + u}{256}, \qquad u \sim U[0, 1)^d .

    Fitting a density to :math:`x'` bounds the discrete model from below:
    :math:`\log P(k) \ge \mathbb{E}_u[\log p(x')] - d \log 256`, which is what
    :func:`bits_per_dim` reports.

    Arguments:
        x: Grey levels :math:`k` in 0..255, as a :class:`torch.uint8` tensor or any
            tensor holding integer values.
        generator: The generator of the uniform noise (torch's global one if
            :py:`None`).
        dtype: The floating dtype of the result; by default ``x``'s dtype if it is
            floating, else :func:`torch.get_default_dtype`.

    Returns:
        A floating tensor shaped like ``x`` with values in :math:`[0, 1)`.

    Raises:
        ValueError: If ``x`` holds values outside 0..255 or non-integers.

    Example:
        >>> k = torch.tensor([0, 255], dtype=torch.uint8)
        >>> x = dequantize(k, torch.Generator().manual_seed(0))
        >>> lower = k.float() / 256
        >>> bool(((lower <= x) & (x < lower + 1 / 256)).all())
        True
    """
    if dtype is None:
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    if x.dtype != torch.uint8 and x.numel() > 0:
        if x.is_complex() or bool((x < 0).any() | (x > 255).any() | (x != torch.round(x)).any()):
            raise ValueError(
                "x must hold integer grey levels in 0..255; scale [0, 1] images by 255 "
                "(or pass uint8 tensors) before dequantizing."
            )
    noise = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    return (x.to(dtype) + noise) / 256.0


def logit_transform(x: Tensor, alpha: float = 1e-6) -> tuple[Tensor, Tensor]:
    r"""Maps :math:`[0, 1)` data to logit space, with the log-determinant per sample.

    As FFJORD's ``LogitTransform``, the data are squeezed away from 0 and 1 first:

    .. math::
        s = \alpha + (1 - 2\alpha) x, \qquad y = \log s - \log(1 - s),

    which is elementwise, so

    .. math::
        \log \left| \det \frac{\partial y}{\partial x} \right|
        = \sum_{i=1}^{d} \left[ \log(1 - 2\alpha) - \log s_i - \log(1 - s_i) \right]

    and :math:`\log p(x) = \log p_Y(y) + \log |\det \partial y / \partial x|`.

    Arguments:
        x: Data in :math:`[0, 1)` (e.g. from :func:`dequantize`), with a leading
            batch dimension.
        alpha: The squeeze :math:`\alpha \in [0, 1/2)`; FFJORD uses 1e-6 for MNIST
            and 0.05 for CIFAR-10.

    Returns:
        ``(y, logdet)``: ``y`` shaped like ``x``, and ``logdet`` of shape
        ``(batch,)``, the sum over all non-batch dimensions.

    Raises:
        ValueError: If ``alpha`` is not in :math:`[0, 1/2)`.

    Example:
        >>> y, logdet = logit_transform(torch.full((1, 3), 0.5), alpha=0.0)
        >>> y.tolist(), round(logdet.item(), 6)
        ([[0.0, 0.0, 0.0]], 4.158883)
    """
    if not 0.0 <= alpha < 0.5:
        raise ValueError(f"alpha must be in [0, 0.5), got {alpha}.")
    s = alpha + (1.0 - 2.0 * alpha) * x
    log_s, log_1ms = torch.log(s), torch.log1p(-s)
    y = log_s - log_1ms
    elementwise = math.log1p(-2.0 * alpha) - log_s - log_1ms
    return y, elementwise.reshape(x.shape[0], -1).sum(dim=1)


def logit_inverse(y: Tensor, alpha: float = 1e-6) -> Tensor:
    r"""Inverts :func:`logit_transform`: :math:`x = (\sigma(y) - \alpha) / (1 - 2\alpha)`.

    Arguments:
        y: Points in logit space.
        alpha: The squeeze used by :func:`logit_transform`.

    Returns:
        ``x`` shaped like ``y``, in :math:`(-\alpha / (1 - 2\alpha), 1 + \alpha / (1 - 2\alpha))`.

    Raises:
        ValueError: If ``alpha`` is not in :math:`[0, 1/2)`.
    """
    if not 0.0 <= alpha < 0.5:
        raise ValueError(f"alpha must be in [0, 0.5), got {alpha}.")
    return (torch.sigmoid(y) - alpha) / (1.0 - 2.0 * alpha)


def bits_per_dim(log_px: Tensor | float, dim: int) -> Tensor | float:
    r"""Bits per dimension of 8-bit data from the log-density of its :math:`[0, 1)` scaling.

    The paper's eq. (18). Let :math:`x \in [0, 1)^d` be the dequantized data scaled
    by 1/256 and :math:`\tilde{x} = 256 x \in [0, 256)^d` the same data in grey-level
    units. Their densities differ by the Jacobian of the scaling,
    :math:`\tilde{p}(\tilde{x}) = 256^{-d} p(x)`, and bits per dimension is the
    negative :math:`\log_2`-density of :math:`\tilde{x}` per dimension:

    .. math::
        \mathrm{bpd}
        = -\frac{\log \tilde{p}(\tilde{x})}{d \log 2}
        = -\frac{\log p(x) / d - \log 256}{\log 2} .

    A uniform density on :math:`[0, 1)^d` (:math:`\log p = 0`) gives exactly 8 bits.

    Arguments:
        log_px: :math:`\log p(x)` in nats, of the :math:`[0, 1)`-scaled data, per
            sample or already averaged.
        dim: The data dimension :math:`d` (e.g. 64 for 8x8 grey images).

    Returns:
        The bits per dimension, of the same type and shape as ``log_px``.

    Raises:
        ValueError: If ``dim`` is not positive.

    Example:
        >>> bits_per_dim(0.0, 64)
        8.0
    """
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}.")
    return -(log_px / dim - math.log(256.0)) / math.log(2.0)
