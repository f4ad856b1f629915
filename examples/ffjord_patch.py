"""Run FFJORD's scripts (rtqichen/ffjord), unchanged on disk, with a learnable end time per block.

Usage::

    python examples/ffjord_patch.py --ffjord PATH [--tempopt-lr 1e-2] [--tempopt-alpha 0.1]
        [--tempopt-eps 0.1] [--tempopt-budget N] [--tempopt-off] [--tempopt-learn-T]
        [--tempopt-skip-trajectory] -- train_toy.py <its arguments>

(likewise ``train_cnf.py`` and ``train_tabular.py``). The script runs in the checkout, so give it
an absolute ``--save``; ``tempopt.csv`` goes there. What is patched, and the commit it was checked
against: :mod:`torch_tempopt.patches.ffjord`.
"""

import sys

from torch_tempopt.patches.ffjord import main

if __name__ == "__main__":
    sys.exit(main())
