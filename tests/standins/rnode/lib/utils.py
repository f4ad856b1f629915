"""Stand-in for RNODE's ``lib/utils.py``: ``makedirs``, ``get_logger`` (root logger), ``RunningAverageMeter``."""

import logging
import os

__all__ = ["RunningAverageMeter", "get_logger", "makedirs"]


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


class RunningAverageMeter:
    def __init__(self, momentum=0.99):
        self.momentum, self.val, self.avg = momentum, None, 0

    def update(self, val):
        self.avg = (
            val if self.val is None else self.avg * self.momentum + val * (1 - self.momentum)
        )
        self.val = val
