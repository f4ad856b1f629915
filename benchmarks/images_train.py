"""Trains the image benchmark's configurations, each for the same CPU seconds in a fresh process.

Each run is upstream's ``train_cnf.py`` through the patch (``child``, in this module), with its
weights saved at equal CPU marks (``ckpt-<seconds>.pt``) and a stop at the last; flow matching
trains in ``benchmarks.images_fm``. A run that already reached its CPU seconds is skipped::

    python -m benchmarks.images_train --ffjord .upstream/ffjord --configs ffjord b2 b4
    python -m benchmarks.images_train --ffjord .upstream/ffjord --configs rnode rnode-b2 fm \\
        --cpu-seconds 1200 --checkpoints 12

See ``benchmarks.images`` for the configurations.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy
import torch

from benchmarks.images import (
    CONFIGS,
    RNODE_PENALTIES,
    RUNS,
    child,
    prepare,
    split_argv,
    train_argv,
)

__all__ = ["launch", "main", "train"]


def launch(
    checkout: Path,
    out: Path,
    config: str,
    argv: list[str],
    seed: int,
    *,
    cpu_seconds: float = math.inf,
    iters: int = 0,
    marks: list[float] | None = None,
) -> int:
    """One training run in a fresh process, its output in ``out/stdout.txt``; its exit code."""
    marks = [repr(float(m)) for m in marks or []]
    common = ["--checkout", str(checkout), "--out", str(out), "--seed", str(seed)]
    common += ["--marks", *marks]
    if config == "fm":
        module, args = "images_fm", [*common, "--", *argv]
    else:
        options = ["--cpu-seconds", repr(float(cpu_seconds)), "--max-iters", str(iters)]
        options += ["--patch", json.dumps(CONFIGS[config][0])]
        options += ["--rnode"] if config in RNODE_PENALTIES else []
        module, args = "images_train", ["child", *common, *options, "--", *argv]
    with open(out / "stdout.txt", "w") as log:
        done = child(module, checkout, args, stdout=log, stderr=subprocess.STDOUT)
    return done.returncode


def train(
    ffjord: Path,
    runs: Path,
    configs: list[str],
    seed: int,
    imagesize: int,
    cpu_seconds: float,
    checkpoints: int,
) -> None:
    """Trains every configuration not yet done into ``runs/<config>-s<seed>``."""
    checkout = prepare(ffjord.resolve(), runs.resolve())
    marks = [cpu_seconds * k / checkpoints for k in range(1, checkpoints)] + [cpu_seconds]
    for config in configs:
        out = (runs / f"{config}-s{seed}").resolve()
        meta = out / "run.json"
        if meta.is_file() and json.loads(meta.read_text()).get("done"):
            print(f"{config}: done already in {out}", flush=True)
            continue
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        argv = train_argv(config, imagesize)
        penalties = (
            "RNODE's under --l2int/--JFrobint" if config in RNODE_PENALTIES else "upstream's"
        )
        info = {
            "config": config,
            "seed": seed,
            "cpu_seconds": cpu_seconds,
            "marks": marks,
            "imagesize": imagesize,
            "patch_kwargs": CONFIGS[config][0],
            "argv": argv,
            "done": False,
            "penalties": penalties,
        }
        meta.write_text(json.dumps(info, indent=1) + "\n")
        print(f"{config}: training for {cpu_seconds:g} CPU seconds into {out}", flush=True)
        code = launch(checkout, out, config, argv, seed, cpu_seconds=cpu_seconds, marks=marks)
        if code != 0:
            raise SystemExit(f"{config} failed (exit {code}); see {out / 'stdout.txt'}")
        meta.write_text(json.dumps({**info, "done": True}, indent=1) + "\n")


# --------------------------------------------------------------------------- the child process


class _Done(Exception):
    pass


def kinetic(x: Any, logp: Any, dx: torch.Tensor, dlogp: Any, context: Any) -> torch.Tensor:
    """RNODE's kinetic energy, 0.5 ||f||^2 / D (under upstream's ``--l2int``)."""
    return 0.5 * dx.pow(2).flatten(1).mean(1).mean()


def jacobian(
    x: torch.Tensor, logp: Any, dx: torch.Tensor, dlogp: Any, context: Any
) -> torch.Tensor:
    """RNODE's ||e^T df/dx||^2 / D with its own Rademacher probe e (under ``--JFrobint``)."""
    e = torch.randint(0, 2, dx.shape, dtype=dx.dtype) * 2 - 1
    return torch.autograd.grad(dx, x, e, create_graph=True)[0].pow(2).flatten(1).mean(1).mean()


def _checkpoint(patch: Any, out: Path, mark: float, used: float) -> None:
    guard = patch.stepper.guard
    state = {
        "weights": [p.detach().clone() for g in patch.stepper.param_groups for p in g["params"]],
        "horizons": [h.state_dict() for h in patch.horizons],
        "iteration": patch.iterations,
        "cpu_seconds": used,
        "guard_nfe": 0 if guard is None else guard.stats["nfe"],
        "guard_events": [] if guard is None else guard.stats["events"],
    }
    torch.save(state, f"{out}/ckpt-{mark:g}.pt")


def run_child(args: argparse.Namespace, argv: list[str]) -> None:
    """Upstream's script through the patch, checkpoints at the CPU marks, a stop at the last."""
    from torch_tempopt.patches import ffjord as ffjord_patch

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    numpy.random.seed(args.seed)
    marks, saving, start = list(args.marks), [0.0], time.process_time()
    kwargs = json.loads(args.patch)
    with ffjord_patch.patched(args.checkout, script="train_cnf.py", **kwargs) as patch:
        if args.rnode:
            import train_misc

            train_misc.REGULARIZATION_FNS.update(l2int=kinetic, JFrobint=jacobian)
            train_misc.INV_REGULARIZATION_FNS.update({kinetic: "kinetic", jacobian: "jacobian"})

        def mark() -> None:
            used = time.process_time() - start - saving[0]
            while marks and used >= marks[0]:
                t0 = time.process_time()
                _checkpoint(patch, args.out, marks.pop(0), used)
                saving[0] += time.process_time() - t0
            if used >= args.cpu_seconds or (args.max_iters and patch.iterations >= args.max_iters):
                raise _Done()

        patch.after_step.append(mark)
        try:
            patch.run([*argv, "--save", str(args.out)])
        except _Done:
            pass


def main(argv: list[str] | None = None) -> int:
    own, upstream = split_argv(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ffjord", type=Path, help="an rtqichen/ffjord checkout (994864ad)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--imagesize", type=int, default=14)
    parser.add_argument("--cpu-seconds", type=float, default=1200.0, help="CPU seconds per run")
    parser.add_argument(
        "--checkpoints", type=int, default=6, help="checkpoints at equal CPU marks"
    )
    parser.add_argument("--runs", type=Path, default=RUNS)
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("child", help="one run in this process: CHILD OPTIONS -- TRAIN_CNF FLAGS")
    one.add_argument("--checkout", type=Path, required=True)
    one.add_argument("--out", type=Path, required=True)
    one.add_argument("--seed", type=int, required=True)
    one.add_argument(
        "--marks", type=float, nargs="*", default=[], help="CPU seconds of the checkpoints"
    )
    one.add_argument(
        "--cpu-seconds", type=float, default=math.inf, help="stop at these CPU seconds"
    )
    one.add_argument(
        "--max-iters", type=int, default=0, help="stop after these iterations (0: no limit)"
    )
    one.add_argument("--patch", default="{}", help="the patch's keyword arguments, as JSON")
    one.add_argument(
        "--rnode", action="store_true", help="RNODE's penalties under upstream's flags"
    )
    args = parser.parse_args(own)
    if args.command == "child":
        run_child(args, upstream)
    elif args.ffjord is None:
        parser.error("--ffjord PATH is required")
    else:
        train(
            args.ffjord,
            args.runs,
            args.configs,
            args.seed,
            args.imagesize,
            args.cpu_seconds,
            args.checkpoints,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
