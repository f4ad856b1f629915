"""Run OT-Flow's scripts (EmoryMLIP/OT-Flow), unchanged on disk, with a learnable end time.

Usage::

    python examples/otflow_patch.py --otflow PATH [--tempopt-lr 1e-2] [--tempopt-alpha 0.1]
        [--tempopt-eps 0.1] [--tempopt-budget N] [--tempopt-off]
        -- trainToyOTflow.py <its arguments>

(likewise ``trainLargeOTflow.py`` and ``trainMnistOTflow.py``; the ``evaluate*`` scripts evaluate a
patched checkpoint at its T). ``tempopt.csv`` goes into the script's ``--save`` directory. What is
patched, and the commit it was checked against: :mod:`torch_tempopt.patches.otflow`.
"""

import sys

from torch_tempopt.patches.otflow import main

if __name__ == "__main__":
    sys.exit(main())
