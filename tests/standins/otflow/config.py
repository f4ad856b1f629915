"""Stand-in for OT-Flow's ``config.py``."""


class ConfigOT:
    gpu = True
    os = "linux"


def getconfig():
    return ConfigOT()
