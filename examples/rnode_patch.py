"""Run RNODE's ``train.py`` (cfinlay/ffjord-rnode), unchanged on disk, with a learnable end time.

Usage (``train.py`` needs a GPU and a process group)::

    torchrun --nproc_per_node=1 examples/rnode_patch.py --rnode PATH [--tempopt-lr 1e-2]
        [--tempopt-alpha 0.1] [--tempopt-eps 0.1] [--tempopt-budget N] [--tempopt-off]
        -- train.py --distributed <its arguments>

``tempopt.csv`` goes into the script's ``--save`` (rank 0 writes it). What is patched, the commit
it was checked against, and where RNODE's script stops on today's stack:
:mod:`torch_tempopt.patches.rnode`.
"""

import sys

from torch_tempopt.patches.rnode import main

if __name__ == "__main__":
    sys.exit(main())
