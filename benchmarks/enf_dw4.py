"""DW-4 data for E-NF (vgsatorras/en_flows) from this project's DW-4 reference, in E-NF's format.

E-NF's ``main_dw4_lj13.py --data dw4`` reads ``dw4_experiment/data/dw4-dataidx.npy`` relative to
the checkout: a pickled object array ``[data, idx]``, ``data`` a float32 torch tensor of shape (N,
8) (4 particles x 2-D), ``idx`` = ``arange(N)`` (E-NF ignores it). It trains on the first
``--n_data`` rows and validates and tests on the last 1,000 + 1,000, so N >= 2,000 + ``--n_data``.
The file is in upstream's git tree, but a snapshot or archive may lack it; this writes one (never
overwriting) from :meth:`benchmarks.harness.energies.DW4.reference` (parallel-tempering Metropolis;
its harmonic centre-of-mass term is discarded by E-NF's mean removal). ``examples/enf_patch.py``
then runs E-NF::

    python -m benchmarks.enf_dw4 ../en_flows/dw4_experiment/data [--samples 12000] [--seed 0]

(about 70 CPU seconds for the default 12,000 samples)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness.energies import DW4

__all__ = ["DW4_FILE", "main", "write_dw4"]

# in dw4_experiment/data/, read relative to the working directory (the checkout)
DW4_FILE = "dw4-dataidx.npy"


def write_dw4(directory: str | Path, n: int = 12_000, seed: int = 0, **mcmc: Any) -> Path:
    """Writes ``n`` DW-4 samples of :meth:`benchmarks.harness.energies.DW4.reference` as E-NF's
    ``directory/dw4-dataidx.npy`` (``mcmc``: its ``chains``, ``steps``); n >= 2000 + E-NF's
    ``--n_data``. Never overwrites."""
    path = Path(directory) / DW4_FILE
    if path.exists():
        raise FileExistsError(
            f"{path} exists (a full clone of E-NF has upstream's own data there); remove it first."
        )
    data = DW4().reference(n, seed=seed, **mcmc).to(torch.float32).reshape(n, 8)
    # upstream's loader: data, idx = np.load(..., allow_pickle=True)
    pair = np.empty(2, dtype=object)
    pair[0], pair[1] = data, np.arange(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, pair, allow_pickle=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.enf_dw4", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "directory",
        type=Path,
        help=f"where {DW4_FILE} goes (E-NF reads CHECKOUT/dw4_experiment/data/)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=12_000,
        metavar="N",
        help="how many (>= 2000 + --n_data; default 12000)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="the sampler's seed (0)")
    args = parser.parse_args(argv)
    try:
        path = write_dw4(args.directory, args.samples, args.seed)
    except (FileExistsError, ValueError) as e:
        raise SystemExit(f"enf_dw4: {e}") from None
    print(f"enf_dw4: wrote {args.samples} DW-4 samples to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
