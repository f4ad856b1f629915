"""The benchmarks and their harness (``benchmarks.harness``); not part of the library's import path."""
