"""Layer sampling while fine-tuning (LISA): K blocks trainable at a time, re-drawn every N steps.

The draws are made up front from the seed, so a run's schedule is fixed before its first step: uniformly over the
blocks, as LISA draws them, or with weights from a lens's ranking. The optimizer is built over every block a run
may draw, so a block frozen at the start still learns when it is drawn (the defect of LISA ports whose optimizer
only saw the blocks trainable when it was built), yet it holds Adam's moments for the active blocks alone: a block
that leaves drops its state, and starts from fresh moments when it is drawn again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class LayerSchedule:
    """Which blocks train when: ``draws[j]`` over steps ``j * every + 1`` to ``(j + 1) * every``."""

    draws: list[list[int]]
    every: int

    @classmethod
    def drawn(cls, weights: np.ndarray, k: int, every: int, steps: int, seed: int) -> "LayerSchedule":
        """K distinct blocks per draw, each draw with probabilities ``weights`` (one per block), enough draws for
        ``steps``."""
        rng = np.random.default_rng(seed)
        count = -(-steps // every)
        return cls([sorted(rng.choice(len(weights), size=k, replace=False, p=weights).tolist()) for _ in range(count)],
                   every)

    @property
    def blocks(self) -> list[int]:
        """Every block some draw trains."""
        return sorted(set().union(*self.draws))

    def active(self, step: int) -> list[int]:
        """The blocks trained at ``step`` (counted from 1)."""
        return self.draws[(step - 1) // self.every]

    def redraws_at(self, step: int) -> bool:
        """Does a new draw start at ``step`` (after the first)?"""
        return step > 1 and (step - 1) % self.every == 0


def draw_weights(num_layers: int, toward: str, lens=None) -> np.ndarray:
    """Each block's probability of being drawn: alike for ``uniform``; else falling linearly with the rank of
    ``lens`` (a ``Lens``: its ranking, most critical first, eligible blocks leading): toward ``critical`` the most
    critical block weighs N and the last 1, toward ``noncritical`` the order of ``noncritical:K`` (the eligible
    blocks reversed, then the rest)."""
    if toward == "uniform":
        return np.full(num_layers, 1 / num_layers)
    ranking, eligible = lens.ranking, lens.eligible or len(lens.ranking)
    order = ranking if toward == "critical" else ranking[:eligible][::-1] + ranking[eligible:]
    weights = np.zeros(num_layers)
    weights[order] = np.arange(num_layers, 0, -1)
    return weights / weights.sum()


def switch_blocks(optimizer: torch.optim.Optimizer, groups: dict[int, list[nn.Parameter]], active: list[int]) -> None:
    """Make the blocks ``active`` trainable and every other block of ``groups`` (block -> its parameters) frozen,
    dropping the optimizer state of those that leave."""
    for block, params in groups.items():
        for param in params:
            param.requires_grad_(block in active)
            if block not in active:
                param.grad = None
                optimizer.state.pop(param, None)
