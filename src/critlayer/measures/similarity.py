"""Block influence and angular distance: how far each block turns its input (ShortGPT; Gromov et al.)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..capture import Batch


def _cosines_and_angles(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, cosine of every block's input and output and the angle between them over pi."""
    cos = torch.stack([torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1)  # one block at a
                       for i in range(len(states) - 1)]).double()  # time: no whole-stack temporaries
    return cos, torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def similarity_scores(states: torch.Tensor) -> dict[str, np.ndarray]:
    """Both scores at once from rows shaped ``(L + 1, rows, hidden)`` (the bootstrap's form)."""
    cos, angle = _cosines_and_angles(states)
    return {"block_influence": (1.0 - cos.mean(1)).cpu().numpy(), "angular_distance": angle.mean(1).cpu().numpy()}


class BlockSimilarity:
    """Streaming mean cosine between every block's input and output over the captured rows.

    ``block_influence`` is 1 - mean cosine; ``angular_distance`` is the mean of arccos(cosine)/pi.
    Both are high for blocks that change the residual stream most.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.cos_sum = self.angle_sum = None
        self.count = 0

    def update(self, batch: Batch) -> None:
        cos, angle = _cosines_and_angles(batch.states)
        cos_sum, angle_sum = cos.sum(1).cpu(), angle.sum(1).cpu()
        self.cos_sum = cos_sum if self.cos_sum is None else self.cos_sum + cos_sum
        self.angle_sum = angle_sum if self.angle_sum is None else self.angle_sum + angle_sum
        self.count += cos.shape[1]

    def compute(self) -> dict[str, np.ndarray]:
        if not self.count:
            raise ValueError("no rows captured")
        return {"block_influence": (1.0 - self.cos_sum / self.count).numpy(),
                "angular_distance": (self.angle_sum / self.count).numpy()}
