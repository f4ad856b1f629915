r"""Run RNODE's ``train.py`` (cfinlay/ffjord-rnode), unchanged on disk, with a learnable end time.

Usage (``train.py`` needs a GPU and a process group, see below)::

    torchrun --nproc_per_node=1 examples/rnode_patch.py --rnode PATH [--tempopt-lr 1e-2]
        [--tempopt-alpha 0.1] [--tempopt-eps 0.1] [--tempopt-budget N] [--tempopt-off]
        -- train.py --distributed <its arguments>

RNODE is FFJORD with kinetic-energy and Jacobian regularisers integrated as extra per-sample
states; its MNIST recipe trains on rk4 with step 0.25 and tests with dopri5. Checked against
cfinlay/ffjord-rnode@02c6e2ceb218d4ecae163c96bf72221c133932de, read through a source index and run
against our stand-ins (``tests/standins/rnode``) only. The patch is FFJORD's
(:mod:`torch_tempopt.patches.ffjord`) for RNODE's ``CNF.forward(z, logpz, reg_states,
integration_times, reverse)``: ``lib.layers.cnf.CNF.__init__`` gives each block a horizon and
mirrors T into ``sqrt_end_time``, ``lib.layers.cnf.odeint`` routes the block's solve over ``[0,
T]`` to it, so the regularisers' integrands at T enter dL/dT, and ``torch.optim.Adam`` /
``torch.optim.SGD`` (``--optimizer``) return the stepper. Under DDP the stepper averages dL/dT over
the ranks (T is outside the DDP module) and rank 0 writes ``tempopt.csv``.

Where RNODE's ``train.py`` stops on this stack (not patched):

* it hard-codes CUDA (``.cuda()`` for the model and metrics, ``storage.cuda(args.local_rank)`` on
  resume);
* it calls ``dist_utils.sum_tensor`` (an all-reduce) every iteration, ``--distributed`` or not: run
  it under ``torchrun ... --distributed`` (``torch.distributed.launch`` passes ``--local-rank``,
  which it does not know);
* its ``__main__`` catches every exception and prints the traceback to stdout with exit code 0, so
  the patch checks afterwards that the script stepped the blocks, and says so otherwise.
"""

from __future__ import annotations

import functools

from .ffjord import install_cnf
from .runner import Patch, Upstream
from .runner import main as _main

__all__ = ["COMMIT", "RNODE", "main", "patched"]

COMMIT = "02c6e2ceb218d4ecae163c96bf72221c133932de"

#: The specification: ``train.py`` builds ``optim.Adam`` or ``optim.SGD`` (``--optimizer``).
RNODE = Upstream(
    name="rnode",
    repo="cfinlay/ffjord-rnode",
    commit=COMMIT,
    marker="lib/layers/cnf.py",
    install=functools.partial(
        install_cnf, forward="self, z, logpz, reg_states, integration_times, reverse"
    ),
    scripts={"train.py": ("experiments/cnf", ("torch.optim.Adam", "torch.optim.SGD"))},
)
patched = functools.partial(Patch, RNODE)
main = functools.partial(_main, RNODE)
