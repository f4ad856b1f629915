"""Stand-in for OT-Flow's ``datasets`` package: like upstream, importing it needs pandas and h5py."""

import h5py  # noqa: F401
import pandas  # noqa: F401
