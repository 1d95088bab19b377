"""Block influence and angular distance: how far each block turns its input (ShortGPT; Gromov et al.)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .rows import Batch
from .base import CAPTURE, Inputs, Measure
from .rows import StoredRows, pick_rows


def block_cosines(states: torch.Tensor | StoredRows, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the cosine between every block's input and output, from rows shaped ``(L + 1, rows, hidden)``.

    Layers are read once each, in order, so only two are held at a time.
    """
    layers = iter(states)
    before, cosines = pick_rows(next(layers), rows), []
    for layer in layers:
        after = pick_rows(layer, rows)
        cosines.append(torch.nn.functional.cosine_similarity(before, after, dim=-1))
        before = after
    return torch.stack(cosines)


def _angles(cos: torch.Tensor) -> torch.Tensor:
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def similarity_scores(states: torch.Tensor | StoredRows, rows: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Both scores at once from whole rows (the bootstrap's form), optionally only ``rows`` of them."""
    cos = block_cosines(states, rows).double()
    return {"block_influence": (1.0 - cos.mean(1)).cpu().numpy(), "angular_distance": _angles(cos).mean(1).cpu().numpy()}


class BlockSimilarity:
    """Streaming mean cosine between every block's input and output over every captured row.

    ``block_influence`` is 1 - mean cosine; ``angular_distance`` is the mean of arccos(cosine)/pi.
    Both are high for blocks that change the residual stream most. It reads the cosines a capture
    computes inside the forward (``Batch.cosines``), not the rows.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.cos_sum = self.angle_sum = None
        self.count = 0

    def update(self, batch: Batch) -> None:
        cos = batch.cosines.double()
        cos_sum, angle_sum = cos.sum(1).cpu(), _angles(cos).sum(1).cpu()
        self.cos_sum = cos_sum if self.cos_sum is None else self.cos_sum + cos_sum
        self.angle_sum = angle_sum if self.angle_sum is None else self.angle_sum + angle_sum
        self.count += cos.shape[1]

    def compute(self) -> dict[str, np.ndarray]:
        if not self.count:
            raise ValueError("no rows captured")
        return {"block_influence": (1.0 - self.cos_sum / self.count).numpy(),
                "angular_distance": (self.angle_sum / self.count).numpy()}


class Influence(Measure):
    """Scored on every captured row (their cosines are summed during the pass); a replicate uses the sample."""

    name = "influence"
    description = "block influence (1 - cosine of block input and output) and angular distance"
    cost = "shares one forward pass of the probes through the blocks (no logits)"
    scores = {"block_influence": 1, "angular_distance": 1}
    reads = CAPTURE

    def __init__(self, config):
        super().__init__(config)
        self.similarity = BlockSimilarity()

    def update(self, batch: Batch) -> None:
        self.similarity.update(batch)

    def compute(self, inputs: Inputs) -> dict[str, np.ndarray]:
        self.sample = inputs.sample
        return self.similarity.compute()

    def resample(self, draw) -> dict[str, np.ndarray]:
        return similarity_scores(self.sample, draw.rows)
