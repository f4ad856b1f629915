"""Run E-NF's DW-4/LJ-13 script (vgsatorras/en_flows), unchanged on disk, through a horizon.

Usage::

    python examples/enf_patch.py --enf PATH [--tempopt-seed S] [--tempopt-budget N | --tempopt-off]
        [--tempopt-*] -- main_dw4_lj13.py --data dw4 --model egnn_dynamics ... [--save DIR]

The script runs in the checkout; ``tempopt.csv`` goes into ``--save`` (default ``outputs/tempopt``
in the checkout). A checkout without ``dw4_experiment/data/dw4-dataidx.npy`` gets DW-4 data from
``python -m benchmarks.enf_dw4 PATH/dw4_experiment/data`` (in this project's source tree). What is
patched, and the commit it was checked against: :mod:`torch_tempopt.patches.enf`.
"""

import sys

from torch_tempopt.patches.enf import main

if __name__ == "__main__":
    sys.exit(main())
