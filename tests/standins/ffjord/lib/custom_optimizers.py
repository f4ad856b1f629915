"""Stand-in for FFJORD's ``lib/custom_optimizers.py``: an ``Adam`` of its own (same constructor)."""

import torch

__all__ = ["Adam"]


class Adam(torch.optim.Adam):
    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False
    ):
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad
        )
