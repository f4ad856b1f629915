"""Stand-in for OT-Flow's ``lib/toy_data.py``: ``inf_train_gen`` (8gaussians only), numpy batches."""

import numpy as np

__all__ = ["inf_train_gen"]


def inf_train_gen(data, rng=None, batch_size=200):
    rng = np.random.default_rng(0) if rng is None else rng
    angles = rng.integers(0, 8, size=batch_size) * (np.pi / 4)
    centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return (centers + 0.2 * rng.standard_normal((batch_size, 2))).astype(np.float32)
