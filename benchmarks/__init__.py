"""Overhead benchmarks: what watching a training loop costs, next to the alternatives.

``python -m benchmarks`` times a training step and an evaluation forward of a few
workloads under each instrumentation (none, ``modeguard.watch``, the automatic mode of
``modeguard run``, a naive per-module design, torcheck), interleaved in one process so
that machine drift hits every column alike. See ``python -m benchmarks --help``.
"""
