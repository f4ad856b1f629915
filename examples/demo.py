"""``make demo``: FFJORD (fixed T) against TO-FLOW (learned T) on a toy set, on the CPU.

Trains the same 2-D CNF twice from the same initialisation and data stream, once with the end
time fixed at T0 = 0.5 and once with :class:`torch_tempopt.LearnableHorizon` and
:class:`torch_tempopt.CoordinateDescentStepper` (the paper's defaults: Adam lr 1e-2 on T,
alpha = 0.1, eps = 0.1), then prints T, the NFE and the test NLL of both::

    python -m examples.demo --data 8gaussians --iters 300 --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from examples.cnf import build_toy_model, end_times, network_parameters, nfe, nll_and_reg
from examples.data import toy_sample
from torch_tempopt import CoordinateDescentStepper

__all__ = ["main", "train"]


def train(method: str, data: str, iters: int, batch: int, seed: int, hidden: int) -> dict[str, Any]:
    """Trains one model and returns its curve and totals."""
    torch.manual_seed(seed)
    model = build_toy_model(hidden=(hidden,) * 3, time_mode="learn" if method == "toflow" else "fixed", count=True)
    adam = torch.optim.Adam(network_parameters(model), lr=1e-3)
    opt = CoordinateDescentStepper(adam, model) if method == "toflow" else adam
    test = torch.as_tensor(toy_sample(data, 2000, seed + 1))
    log: list[dict[str, Any]] = []
    cpu = 0.0
    totals = {"forward": 0, "backward": 0}
    for it in range(1, iters + 1):
        x = torch.as_tensor(toy_sample(data, batch, 10_000 * seed + it))
        t = time.process_time()
        opt.zero_grad()
        loss, _ = nll_and_reg(model, x)
        loss.backward()
        opt.step()
        cpu += time.process_time() - t
        counts = nfe(model, reset=True)
        totals = {k: totals[k] + counts[k] for k in totals}
        row: dict[str, Any] = {"iter": it, "loss": loss.item(), "T": end_times(model), "nfe": counts, "cpu": cpu}
        if it % max(1, iters // 5) == 0 or it == iters:
            with torch.no_grad():
                row["test_nll"] = nll_and_reg(model.eval(), test)[0].item()
            model.train()
            nfe(model, reset=True)
            print(f"  {method:7s} iter {it:5d}  loss {row['loss']:.3f}  test {row['test_nll']:.3f}  "
                  f"T {', '.join(f'{T:.3f}' for T in row['T'])}  NFE {counts['forward']}+{counts['backward']}")
        log.append(row)
    return {"method": method, "log": log, "nfe_forward_total": totals["forward"],
            "nfe_backward_total": totals["backward"], "cpu_seconds": cpu,
            "test_nll": log[-1]["test_nll"], "T": end_times(model)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the demo and prints the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="8gaussians")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for method in ("ffjord", "toflow"):
        print(f"{method}: {args.iters} iterations on {args.data}")
        results[method] = train(method, args.data, args.iters, args.batch, args.seed, args.hidden)
    lines = ["| method | test NLL (nats) | final T | NFE fwd | NFE bwd | CPU s |", "|---|---|---|---|---|---|"]
    for m, r in results.items():
        lines.append(f"| {m} | {r['test_nll']:.4f} | {', '.join(f'{T:.3f}' for T in r['T'])} | "
                     f"{r['nfe_forward_total']} | {r['nfe_backward_total']} | {r['cpu_seconds']:.1f} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps(results, indent=1))
    (args.out / "demo.md").write_text(table + "\n")
    print(f"wrote {args.out / 'demo.json'} and {args.out / 'demo.md'}")
    return results


if __name__ == "__main__":
    main()
