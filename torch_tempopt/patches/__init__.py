r"""Optional patches that run upstream CNF codebases, unchanged on disk, with a learnable end time.

Each patch module names the upstream repository and the commit it was checked against, and holds
the patch's specification (an :class:`Upstream`), ``patched(checkout, ...)`` (a :class:`Patch`,
a context manager that undoes everything on exit) and ``main``, the command line that
``examples/NAME_patch.py`` runs:

* :mod:`torch_tempopt.patches.ffjord`: rtqichen/ffjord's ``train_toy.py``, ``train_cnf.py`` and
  ``train_tabular.py``.
* :mod:`torch_tempopt.patches.rnode`: cfinlay/ffjord-rnode's ``train.py``.
* :mod:`torch_tempopt.patches.otflow`: EmoryMLIP/OT-Flow's training and evaluation scripts.
* :mod:`torch_tempopt.patches.enf`: vgsatorras/en_flows's ``main_dw4_lj13.py``.

:mod:`torch_tempopt.patches.runner` is the machinery they share (:class:`Patch`, ``tempopt.csv``,
the command line); :mod:`torch_tempopt.patches.torchvision_cpu` gives FFJORD's ``train_cnf.py``
the parts of torchvision it uses where torchvision cannot be imported.

``import torch_tempopt`` does not import this package; importing it imports no upstream code and
no plotting library (a patch imports the checkout's modules, and matplotlib where its shims need
it, on entering).
"""

from .runner import CSV_COLUMNS, Patch, PatchError, Upstream

__all__ = ["CSV_COLUMNS", "Patch", "PatchError", "Upstream"]
