"""Stand-in for OT-Flow's ``lib/utils.py``: ``makedirs``, ``get_logger`` (root logger), ``AverageMeter``,
``count_parameters``."""

import logging
import os

__all__ = ["AverageMeter", "count_parameters", "get_logger", "makedirs"]


def makedirs(dirname):
    os.makedirs(dirname, exist_ok=True)


def get_logger(logpath, filepath, displaying=True, saving=True):
    logger = logging.getLogger()
    logger.setLevel(logging.INFO)
    if saving:
        logger.addHandler(logging.FileHandler(logpath, mode="a"))
    if displaying:
        logger.addHandler(logging.StreamHandler())
    logger.info(filepath)
    return logger


class AverageMeter:
    def __init__(self):
        self.val = self.avg = self.sum = self.count = 0

    def update(self, val, n=1):
        self.val, self.sum, self.count = val, self.sum + val * n, self.count + n
        self.avg = self.sum / self.count


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
