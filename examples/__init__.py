r"""What a ``torch_tempopt`` user copies: the quickstart, recipes and the upstream patches.

``examples.quickstart``
    A CNF on a budget, end to end, in one file.
``examples.ddp_train``
    Multi-process training (DDP) of FFJORD's toy CNF with a learned end time.
``examples/ffjord_patch.py``, ``rnode_patch.py``, ``otflow_patch.py``, ``enf_patch.py``
    Run upstream FFJORD, RNODE, OT-Flow and E-NF checkouts unchanged with temporal optimization
    (the commands of :mod:`torch_tempopt.patches`).

Nothing here imports ``benchmarks`` (and the benchmarks import nothing from here).
"""

from __future__ import annotations

__all__: list[str] = []
