"""Counter-based uniform numbers: the same (seed, stream, i, j) gives the same number on any machine, in any
batch and in any order, which a shared random generator cannot promise."""

from __future__ import annotations

import numpy as np
import torch

TOKENS, ROWS = 1, 2  # the streams: the tokens probes are written with, and the keys of captured rows


def uniform(seed: int, stream: int, major: np.ndarray, minor: np.ndarray | int) -> torch.Tensor:
    """A splitmix64 hash of (seed, stream, major, minor) mapped to [0, 1), in float64; ``major`` below 2**40,
    ``minor`` below 2**24."""
    with np.errstate(over="ignore"):
        x = (np.asarray(major).astype(np.uint64) << np.uint64(24)) ^ np.asarray(minor).astype(np.uint64)
        x = x + (np.uint64(seed) * np.uint64(4) + np.uint64(stream)) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return torch.from_numpy(np.atleast_1d(x >> np.uint64(11)).astype(np.float64) / float(1 << 53))
