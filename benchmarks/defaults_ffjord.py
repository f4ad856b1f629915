"""Upstream FFJORD's ``train_toy.py`` for ``benchmarks.defaults``: one training or one scoring.

Run by ``benchmarks.defaults`` in a fresh process, in the checkout: ``train`` runs upstream's
script unchanged (``plain``) or through ``torch_tempopt.patches.ffjord``; ``score`` loads its final
checkpoint and prints the held-out NLL by the model's test solve
(:func:`benchmarks.scoring.upstream_toy_nll`)::

    python -m benchmarks.defaults_ffjord train --checkout DIR --config plain --T0 1 --save DIR \
        --seed 0 -- TRAIN_TOY FLAGS
    python -m benchmarks.defaults_ffjord score --checkout DIR --save DIR --test points.npy
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import types
from pathlib import Path

import numpy
import torch

from benchmarks.scoring import upstream_toy_nll

__all__ = ["FLAGS", "main", "score", "train"]

#: configuration -> the patch's keyword arguments (``plain``: no patch)
FLAGS = {"defaults": {}, "paper": {"alpha": 0.1}, "budget2": {"budget": 2}}


def train(checkout: Path, config: str, argv: list[str]) -> None:
    """Upstream's ``train_toy.py`` with ``argv``, as it is (``plain``) or through the patch."""
    if config != "plain":
        from torch_tempopt.patches import ffjord as ffjord_patch

        flags = FLAGS[config]
        with ffjord_patch.patched(
            str(checkout), script="train_toy.py", skip_trajectory=True, **flags
        ) as patch:
            patch.run(argv)
        return
    # six is not installed here: a stub (train_misc imports it)
    six = sys.modules.setdefault("six", types.ModuleType("six"))
    six.iteritems = lambda d, **kw: iter(d.items(**kw))
    import diagnostics.viz_toy as viz  # the 101-frame trajectory plot is skipped, as when patched

    viz.save_trajectory = viz.trajectory_to_video = lambda *a, **k: None
    sys.argv = ["train_toy.py", *argv]
    runpy.run_path(str(checkout / "train_toy.py"), run_name="__main__")


def score(checkout: Path, save: Path, test: Path) -> dict[str, float]:
    """The final model's held-out NLL (its end time's reference solve) and its T."""
    from torch_tempopt.patches import ffjord as ffjord_patch

    with ffjord_patch.patched(str(checkout)) as patch:
        import train_misc
        from lib.layers.odefunc import ODEfunc  # noqa: F401

        ckpt = torch.load(save / "checkpt.pth", weights_only=False)
        args = ckpt["args"]
        model = train_misc.build_model_tabular(args, 2, [])
        train_misc.set_cnf_options(args, model)
        state = {k: v for k, v in ckpt["state_dict"].items() if ".tempopt_" not in k}
        model.load_state_dict(state)  # without the budget's buffers: scored adaptively
        x = torch.from_numpy(numpy.load(test)).float()
        return {"test_nll": upstream_toy_nll(model, x), "T": patch.horizons[0].T.item()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train_toy.py, its flags after --")
    tr.add_argument("--config", choices=["plain", *FLAGS], required=True)
    tr.add_argument("--T0", required=True, help="upstream's --time_length")
    tr.add_argument("--save", required=True)
    tr.add_argument("--seed", type=int, required=True)
    sc = sub.add_parser("score", help="print the final model's held-out NLL as JSON")
    sc.add_argument("--save", type=Path, required=True)
    sc.add_argument("--test", type=Path, required=True, help="the held-out points (.npy)")
    for s in (tr, sc):
        s.add_argument("--checkout", type=Path, required=True)
    own = argv[: argv.index("--")] if "--" in argv else argv
    args = parser.parse_args(own)
    if args.command == "score":
        print(json.dumps(score(args.checkout, args.save, args.test)))
        return 0
    numpy.random.seed(args.seed)
    torch.manual_seed(args.seed)
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    train(args.checkout, args.config, ["--data", "8gaussians", "--time_length", args.T0,
                                       "--save", args.save, *flags])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
