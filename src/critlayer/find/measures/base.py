"""What every measure is: a lens on layer importance with its scores, what it reads, and how it is resampled.

A measure is built for one scan from its config. Capture measures see every probe batch of the one
shared pass (``update``), then compute on the bounded row sample of it; text measures run the model
on text with real next tokens; weight measures read only the weights. A bootstrap replicate redraws
the probes (rows of the sample) and texts, and each measure recomputes on them, or says it cannot
(``resampled = False``: held fixed in the replicate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ...models import LanguageModel
from .rows import StoredRows

CAPTURE, TEXT, WEIGHTS = "capture", "text", "weights"


@dataclass
class Inputs:
    """What the measures read: the model, the row sample of the probes' pass (``(L + 1, rows, hidden)``, index 0
    the embeddings) and the token sequences with a next-token loss."""

    lm: LanguageModel
    sample: StoredRows | torch.Tensor | None = None
    text: list[list[int]] | None = None
    progress: bool = True


@dataclass
class Draw:
    """One bootstrap replicate: rows of the sample (every row of each probe drawn, with replacement) and a weight
    per text (how often it was drawn)."""

    rows: torch.Tensor | None = None
    text_weights: np.ndarray | None = None


class Measure:
    """One lens. ``scores`` maps each score to its direction: +1 when a high value marks a critical block, -1
    when a low one does; ``extra`` scores are reported but stay out of the consensus."""

    name: ClassVar[str]
    description: ClassVar[str]
    cost: ClassVar[str]
    scores: ClassVar[dict[str, int]]
    extra: ClassVar[dict[str, int]] = {}
    reads: ClassVar[str]
    resampled: ClassVar[bool] = True

    def __init__(self, config):
        self.config = config
        self.matrix: np.ndarray | None = None  # an L x L matrix beside the scores (CKA's)
        self.details: dict = {}  # what the scan records of how it ran

    def update(self, batch) -> None:
        """A capture measure sees each probe batch as it goes by (most need only the row sample)."""

    def compute(self, inputs: Inputs) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def resample(self, draw: Draw) -> dict[str, np.ndarray]:
        """The scores on a bootstrap replicate (only where ``resampled``)."""
        raise NotImplementedError
