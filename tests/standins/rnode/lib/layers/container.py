"""Stand-in for RNODE's ``lib/layers/container.py``: ``SequentialFlow`` passing ``reg_states`` along."""

from torch import nn

__all__ = ["SequentialFlow"]


class SequentialFlow(nn.Module):
    def __init__(self, layersList):
        super().__init__()
        self.chain = nn.ModuleList(layersList)

    def forward(self, x, logpx=None, reg_states=tuple(), reverse=False, inds=None):  # noqa: B008
        if inds is None:
            inds = range(len(self.chain) - 1, -1, -1) if reverse else range(len(self.chain))
        for i in inds:
            x, logpx, reg_states = self.chain[i](x, logpx, reg_states, reverse=reverse)
        return x, logpx, reg_states
