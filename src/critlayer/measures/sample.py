"""A bounded, deterministic sample of captured rows for the measures that need whole matrices."""

from __future__ import annotations

import torch

from ..capture import Batch


class RowSample:
    """Keep the ``max_rows`` rows with the smallest keys (a bottom-k sketch).

    Keys depend only on (seed, sample, position), so the rows kept, and their order, do not
    depend on batch size or batch order; it holds at most ``max_rows`` rows plus one batch.
    With no more rows than ``max_rows`` (the default ``last`` mode) every row is kept.
    """

    def __init__(self, max_rows: int = 2048):
        if max_rows < 2:
            raise ValueError(f"max_rows must be at least 2, got {max_rows}")
        self.max_rows = max_rows
        self.reset()

    def reset(self) -> None:
        self.states: torch.Tensor | None = None
        self.keys = torch.empty(0, dtype=torch.float64)

    def update(self, batch: Batch) -> None:
        states, keys = batch.states, batch.keys
        if self.keys.numel() >= self.max_rows:  # once full, only rows with smaller keys can get in
            fresh = keys < self.keys.max()
            states, keys = states[:, fresh.to(states.device)], keys[fresh]
        states = states if self.states is None else torch.cat([self.states, states], dim=1)
        keys = torch.cat([self.keys, keys])
        if keys.numel() > self.max_rows:
            keep = keys.topk(self.max_rows, largest=False).indices
            states, keys = states[:, keep.to(states.device)], keys[keep]
        self.states, self.keys = states, keys

    def compute(self) -> torch.Tensor:
        """The kept rows ordered by key: float32 of shape ``(L + 1, rows, hidden)``."""
        if self.states is None:
            raise ValueError("no rows captured")
        order = self.keys.argsort()
        return self.states[:, order.to(self.states.device)]
