"""Stand-in for the parts of torchvision that FFJORD's ``train_cnf.py`` uses with ``--data mnist``, for CPU tests
where torchvision is not installed: ``datasets.MNIST`` reading the IDX files of ``benchmarks/mnist_idx.py``,
``transforms`` (``Compose``, ``Resize`` to the same size, ``ToTensor``) and ``utils.save_image``. Never a
replacement for torchvision; put this folder on ``sys.path`` only when ``import torchvision`` fails."""

from . import datasets, transforms, utils

__all__ = ["datasets", "transforms", "utils"]
__version__ = "0.0-standin"
