"""The image benchmark's ``fm`` run: upstream's single-scale model trained by flow matching.

Upstream's ``--multiscale False`` model (its logit transform and one CNF block of the same ODEnet)
is trained with Meta's ``flow_matching`` library, no ODE solved: one network evaluation per
iteration. FFJORD's block has the data at t = 0 and the noise at T = 1, so the path is drawn with
x_0 the logit-transformed data and x_1 the noise, and its velocity x_1 - x_0 is the block's field.
The weights are saved at the CPU marks, the last of which ends the run. ``benchmarks.images_train``
starts it in the checkout::

    python -m benchmarks.images_fm --checkout DIR --out DIR --seed 0 --marks 600 1200 -- FLAGS
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy
import torch

from benchmarks.images import split_argv, upstream_model

__all__ = ["main", "train"]


def _save(upstream: SimpleNamespace, patch: Any, path: str, iteration: int, used: float) -> None:
    state = {
        "weights": [p.detach().clone() for p in upstream.weights],
        "horizons": [h.state_dict() for h in patch.horizons],
        "iteration": iteration,
        "cpu_seconds": used,
        "guard_nfe": 0,
        "guard_events": [],
        "nfe": iteration,
    }
    torch.save(state, path)


def train(upstream: SimpleNamespace, patch: Any, out: Path, marks: list[float]) -> None:
    """Flow matching with upstream's optimizer settings and warm-up until the last CPU mark."""
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler

    args, model, marks = upstream.args, upstream.model, list(marks)
    logit, cnf = model.chain[0], model.chain[1]
    net, T = cnf.odefunc.diffeq, float(cnf.sqrt_end_time.item() ** 2)
    optimizer = torch.optim.Adam(upstream.weights, lr=args.lr, weight_decay=args.weight_decay)
    path = AffineProbPath(scheduler=CondOTScheduler())
    loader = torch.utils.data.DataLoader(
        upstream.train_set, batch_size=args.batch_size, shuffle=True, drop_last=True
    )
    used, saving, iteration, start = 0.0, 0.0, 0, time.process_time()
    while marks:
        for x, _ in loader:
            y = logit(x)
            t = torch.rand(y.shape[0])
            sample = path.sample(t=t, x_0=y, x_1=torch.randn_like(y))
            v = net(T * t.view(-1, 1, 1, 1), sample.x_t)
            loss = (v - sample.dx_t / T).pow(2).flatten(1).sum(1).mean()
            for group in optimizer.param_groups:  # upstream's warm-up (update_lr)
                group["lr"] = args.lr * min((iteration + 1) / max(args.warmup_iters, 1), 1.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            iteration += 1
            used = time.process_time() - start - saving
            while marks and used >= marks[0]:
                t0 = time.process_time()
                _save(upstream, patch, f"{out}/ckpt-{marks.pop(0):g}.pt", iteration, used)
                saving += time.process_time() - t0
                print(f"iteration {iteration} CPU {used:.0f} s loss {loss.item():.2f}", flush=True)
            if not marks:
                break


def main(argv: list[str] | None = None) -> int:
    own, flags = split_argv(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkout", type=Path, required=True, help="the prepared FFJORD checkout"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--marks", type=float, nargs="+", required=True, help="CPU seconds")
    args = parser.parse_args(own)
    if not flags:
        parser.error("give upstream's train_cnf.py flags after --")
    from torch_tempopt.patches import ffjord as ffjord_patch

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    numpy.random.seed(args.seed)
    with ffjord_patch.patched(args.checkout, script="train_cnf.py", off=True) as patch:
        upstream = upstream_model(patch, [*flags, "--save", str(args.out)])
        train(upstream, patch, args.out, args.marks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
