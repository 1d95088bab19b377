"""Gradient: how strongly the language-modelling loss pulls on each block's weights.

The gradient of the mean next-token loss over all the text (accumulated over batches, so
it does not depend on batch size) is taken with respect to every block's parameters; a
block's score is its root mean square, ||grad|| / sqrt(#parameters), so blocks of different
sizes, and models, compare. High = critical. Only block parameters take gradients.
"""

from __future__ import annotations

import numpy as np
import torch

from ...models import LanguageModel
from ...models.loss import BATCH, batch_losses, require_causal, text_batches
from .base import TEXT, Inputs, Measure


def gradient_scores(lm: LanguageModel, sequences: list[list[int]], batch_size: int = BATCH) -> np.ndarray:
    """Per block, the RMS over its parameters of the gradient of the mean next-token loss."""
    require_causal(lm, "gradient")
    model = lm.model
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    lm.blocks.requires_grad_(True)
    for p in params:
        p.grad = None
    try:
        total = sum(len(s) - 1 for s in sequences)
        with torch.enable_grad():
            for _, batch in text_batches(sequences, batch_size, lm.device):
                (batch_losses(model, batch)[0].sum() / total).backward()
        scores = []
        for block in lm.blocks:
            squares = sum(float(p.grad.double().square().sum()) for p in block.parameters() if p.grad is not None)
            scores.append(np.sqrt(squares / sum(p.numel() for p in block.parameters())))
        return np.array(scores)
    finally:
        for p, (requires, grad) in zip(params, saved):
            p.requires_grad_(requires)
            p.grad = grad
        model.train(was_training)


class Gradient(Measure):
    """Held fixed in a bootstrap replicate: per-text gradients would each be as large as the model."""

    name = "gradient"
    description = "RMS of the language-modelling loss gradient over each block's parameters"
    cost = "one forward and backward over the text"
    scores = {"gradient": 1}
    reads = TEXT
    resampled = False

    def compute(self, inputs: Inputs) -> dict[str, np.ndarray]:
        return {"gradient": gradient_scores(inputs.lm, inputs.text)}
