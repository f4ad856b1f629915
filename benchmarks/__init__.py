"""The benchmarks, each a module run as ``python -m benchmarks.NAME``; not part of the library."""

__all__: list[str] = []
