"""DistributedDataParallel: dL/dT is all-reduced like any gradient, T stays equal across ranks
(gloo, 2 CPU processes).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_worker as w
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    env = {"GLOO_SOCKET_IFNAME": "lo"} if sys.platform.startswith("linux") else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.start_processes(
            w.worker, args=(free_port(), str(out)), nprocs=w.WORLD, join=True, start_method="spawn"
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(w.WORLD)]


def reference(guard: dict | None, budget: dict | None) -> dict:
    """One process, the concatenated batch, rank 0's initialisation."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        inner = w.build(seed=0, budget=budget)
        return w.train(inner, inner, guard, w.batches())
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("scenario", list(w.SCENARIOS))
def test_ranks_stay_bitwise_equal_and_match_one_process(ranks: list[dict], scenario: str) -> None:
    a, b = (r[scenario] for r in ranks)
    # The ranks saw different halves of each batch...
    assert not torch.equal(a["losses"], b["losses"])
    # ...yet DDP averaged dL/dT and dL/dt0 like the weights' gradients, so every step was the same.
    assert torch.equal(a["t_grads"], b["t_grads"])
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert (
        a["stats"] == b["stats"]
        and a["stats"]["steps"] == w.STEPS
        and a["state"]["horizon.T"] != 0.5
    )
    _, _, budget, guard = (scenario, *w.SCENARIOS[scenario])
    if (
        scenario == "growth"
    ):  # grown in place, the same on every rank; each rank measured its own half
        grown = [e["budget"] for e in a["guard"]["events"]]
        assert grown[0][0] == 1 and grown[-1][1] == int(a["state"]["horizon.budget.n_steps"]) > 1
        assert grown == [e["budget"] for e in b["guard"]["events"]]
        assert a["guard"]["errors"] != b["guard"]["errors"]
        # the placement was fitted on rank 0's half batch: one process on the whole batch differs
        return
    if budget is not None:
        assert a["guard"]["checks"] == w.STEPS and a["guard"]["events"] == []
    ref = reference(guard, budget)
    for key in a["state"]:
        torch.testing.assert_close(
            a["state"][key], ref["state"][key], rtol=1e-9, atol=1e-12, msg=key
        )
    # The mean of the ranks' losses is the loss of the whole batch.
    torch.testing.assert_close(
        (a["losses"] + b["losses"]) / 2, ref["losses"], rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(a["t_grads"], ref["t_grads"], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_ddp_example_runs_with_torchrun(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }  # this tree's torch_tempopt
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(ROOT / "examples" / "ddp_train.py"),
        "--iters", "2", "--hidden", "8,8", "--batch-size", "32", "--solver", "rk4",
        "--step-size", "0.25",
        "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["iters"] == 2 and metrics["backend"] == "gloo"
    assert metrics["T_equal_across_ranks"] and metrics["weights_equal_across_ranks"]
    assert len(metrics["loss"]) == 2 and all(map(torch.isfinite, torch.tensor(metrics["loss"])))
    assert metrics["T"][0] != 0.5
