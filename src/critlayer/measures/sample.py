"""A bounded, deterministic sample of captured rows for the measures that need whole matrices."""

from __future__ import annotations

import numpy as np
import torch

from ..capture import Batch


class RowSample:
    """Keep the ``max_rows`` rows with the smallest keys (a bottom-k sketch).

    Keys depend only on (seed, sample, position), so the rows kept, and their order, do not
    depend on batch size or batch order; it holds at most ``max_rows`` rows plus one batch.
    With no more rows than ``max_rows`` (the default ``last`` mode) every row is kept, with
    the probe sample each row comes from (``samples``, when the batches carry it).
    """

    def __init__(self, max_rows: int = 2048):
        if max_rows < 2:
            raise ValueError(f"max_rows must be at least 2, got {max_rows}")
        self.max_rows = max_rows
        self.reset()

    def reset(self) -> None:
        self.states: torch.Tensor | None = None
        self.keys = torch.empty(0, dtype=torch.float64)
        self.samples = np.empty(0, dtype=np.int64)

    def update(self, batch: Batch) -> None:
        states, keys = batch.states, batch.keys
        given = np.asarray(batch.samples if batch.samples is not None else np.full(len(keys), -1), dtype=np.int64)
        if self.keys.numel() >= self.max_rows:  # once full, only rows with smaller keys can get in
            fresh = keys < self.keys.max()
            states, keys, given = states[:, fresh.to(states.device)], keys[fresh], given[fresh.numpy()]
        states = states if self.states is None else torch.cat([self.states, states], dim=1)
        keys = torch.cat([self.keys, keys])
        samples = np.concatenate([self.samples, given])
        if keys.numel() > self.max_rows:
            keep = keys.topk(self.max_rows, largest=False).indices
            states, keys, samples = states[:, keep.to(states.device)], keys[keep], samples[keep.numpy()]
        self.states, self.keys, self.samples = states, keys, samples

    def order(self) -> torch.Tensor:
        return self.keys.argsort()

    def compute(self) -> torch.Tensor:
        """The kept rows ordered by key: float32 of shape ``(L + 1, rows, hidden)``."""
        if self.states is None:
            raise ValueError("no rows captured")
        return self.states[:, self.order().to(self.states.device)]

    def row_samples(self) -> np.ndarray:
        """The probe sample of each row of ``compute()``, in the same order."""
        return self.samples[self.order().numpy()]


def resample_rows(row_samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one bootstrap replicate: probe samples drawn with replacement, all rows of each."""
    samples, inverse = np.unique(row_samples, return_inverse=True)
    counts = np.bincount(rng.integers(0, len(samples), len(samples)), minlength=len(samples))
    return np.repeat(np.arange(len(row_samples)), counts[inverse])
