"""A bounded, deterministic sample of captured rows for the measures that need whole matrices."""

from __future__ import annotations

import numpy as np
import torch

from ..capture import Batch


class RowSample:
    """The rows a capture keeps whole, in key order, for the measures that need whole matrices.

    A capture fixes before its pass which rows these are (``Capture.sample_keys``: the ``max_rows``
    smallest keys, which depend only on seed, sample and position). The sample is allocated once and
    each row written into its slot, so it never holds more than it returns and its content and order
    do not depend on batching. Massive-activation rows among the planned ones never arrive; their
    slots are closed in place.
    """

    def __init__(self, keys: torch.Tensor):
        self.keys = keys
        self.states: torch.Tensor | None = None
        self.filled = torch.zeros(len(keys), dtype=torch.bool)
        self.samples = np.full(len(keys), -1, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.filled.sum())

    def update(self, batch: Batch) -> None:
        if not batch.keys.numel():
            return
        slots = torch.searchsorted(self.keys, batch.keys).clamp(max=len(self.keys) - 1)
        if not torch.equal(self.keys[slots], batch.keys):
            raise ValueError("a row that is not in the planned sample")
        if self.states is None:
            shape = (batch.states.shape[0], len(self.keys), batch.states.shape[2])
            with torch.inference_mode(False):  # a normal tensor, so that it can be compacted after the pass
                self.states = torch.empty(shape, dtype=torch.float32, device=batch.states.device)
        self.states[:, slots.to(self.states.device)] = batch.states
        self.filled[slots] = True
        if batch.samples is not None:
            self.samples[slots.numpy()] = batch.samples

    def compute(self) -> torch.Tensor:
        """The kept rows ordered by key: float32 of shape ``(L + 1, rows, hidden)``, a view of the sample."""
        if self.states is None:
            raise ValueError("no rows captured")
        if not self.filled.all():
            present = self.filled.nonzero().squeeze(1)
            for layer in self.states:  # one layer's rows at a time: no second copy of the sample
                layer[:len(present)] = layer[present.to(layer.device)]
            self.states = self.states[:, :len(present)]
            self.keys, self.samples = self.keys[present], self.samples[present.numpy()]
            self.filled = torch.ones(len(present), dtype=torch.bool)
        return self.states

    def row_samples(self) -> np.ndarray:
        """The probe sample of each row of ``compute()``, in the same order."""
        self.compute()
        return self.samples


def pick_rows(layer: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``layer`` itself, or the given rows of it (a bootstrap replicate's indices, repeats allowed)."""
    return layer if rows is None else layer[rows.to(layer.device)]


def resample_rows(row_samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one bootstrap replicate: probe samples drawn with replacement, all rows of each."""
    samples, inverse = np.unique(row_samples, return_inverse=True)
    counts = np.bincount(rng.integers(0, len(samples), len(samples)), minlength=len(samples))
    return np.repeat(np.arange(len(row_samples)), counts[inverse])
