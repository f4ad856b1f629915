r"""What a ``torch_tempopt`` user copies: the quickstart, recipes and the upstream patches.

``examples.quickstart``
    A CNF on a budget, end to end, in one file.
``examples.ddp_train``
    Multi-process training (DDP) of the benchmarks' reference CNF with a learned end time.
``examples.ffjord_patch``, ``examples.rnode_patch``, ``examples.otflow_patch``
    Run upstream FFJORD, RNODE and OT-Flow checkouts unchanged with temporal optimization.
"""

from __future__ import annotations

__all__: list[str] = []
