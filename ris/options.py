"""The choices every stage and command shares, importable without loading Keras (fast --help)."""
from __future__ import annotations

DISTANCES: tuple[str, ...] = ("euclidean", "cosine")
MININGS: tuple[str, ...] = ("random", "batch-hard", "semi-hard", "batch-all")
ARCHS: tuple[str, ...] = ("residual", "mlp", "whiten")
