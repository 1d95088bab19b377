"""Ablation: how much the next-token loss rises when a block, or one of its sublayers, is skipped.

Skipping a block makes it the identity; skipping its attention or MLP sublayer makes that
sublayer output zeros (``models.surgery``). Blocks before the skipped one see the same input
as in the unablated pass, so they replay their outputs from that pass instead of recomputing
them: one ablation costs the blocks from the skipped one on, plus the head.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

from ...models import LanguageModel, running, surgery
from ...models.loss import BATCH, batch_losses, require_causal, text_batches
from .base import TEXT, Inputs, Measure

SCORE_NAMES = {"block": "ablation", "attn": "ablation_attn", "mlp": "ablation_mlp"}


@contextmanager
def skipping(lm: LanguageModel, index: int, part: str, replay: list[torch.Tensor]):
    """Skip ``part`` of block ``index``; earlier blocks return their ``replay`` (unablated) outputs."""
    with ExitStack() as stack:
        for j in range(index):
            stack.enter_context(surgery.returning(lm.blocks[j], replay[j]))
        stack.enter_context(surgery.taken_out(lm.blocks, [index], part))
        yield


class SkipLosses:
    """Per-text loss with nothing skipped and with each (block, part) skipped.

    ``compute()`` gives, per part, the rise of the mean next-token loss per token when each block's
    part is skipped (high = critical); ``compute(weights)`` the same with texts weighted (a bootstrap).
    With ``blocks`` only those are skipped (the others' rise is NaN).
    """

    def __init__(self, lm: LanguageModel, sequences: list[list[int]], parts: tuple[str, ...] = ("block",),
                 batch_size: int = BATCH, progress: bool = True, blocks: list[int] | None = None):
        require_causal(lm, "ablation")
        self.parts = surgery.parse_parts(parts)
        for part in self.parts:
            if part != "block":
                surgery.sublayer(lm.blocks[0], part)  # fail early, in one line
        n, layers = len(sequences), lm.num_layers
        blocks = range(layers) if blocks is None else blocks
        self.base, self.tokens = np.zeros(n), np.zeros(n)
        self.skipped = {part: np.full((layers, n), np.nan) for part in self.parts}
        bar = tqdm(total=len(blocks) * len(self.parts) * n, desc="ablating", unit="text", disable=not progress)
        with torch.inference_mode(), running.evaluating(lm), bar:
            for chosen, batch in text_batches(sequences, batch_size, lm.device):
                outputs: list[torch.Tensor] = []
                with running.watching(lm, outputs.append, stop=False):
                    loss, tokens = batch_losses(lm.model, batch)
                self.base[chosen], self.tokens[chosen] = loss.cpu().numpy(), tokens.cpu().numpy()
                replay = outputs[1:]  # each block's output (index 0 is block 0's input)
                for part in self.parts:
                    for index in blocks:
                        with skipping(lm, index, part, replay):
                            self.skipped[part][index, chosen] = batch_losses(lm.model, batch)[0].cpu().numpy()
                        bar.update(len(chosen))

    def compute(self, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
        w = np.ones_like(self.base) if weights is None else weights
        return {SCORE_NAMES[part]: (rise @ w) / (self.tokens @ w)
                for part, rise in ((p, self.skipped[p] - self.base) for p in self.parts)}


class Ablation(Measure):
    name = "ablation"
    description = "rise of next-token loss when a block (or, with --ablate, its attention or MLP) is skipped"
    cost = "about L/2 forwards with logits over the text, per part skipped"
    scores = {name: 1 for name in SCORE_NAMES.values()}
    reads = TEXT

    def compute(self, inputs: Inputs) -> dict[str, np.ndarray]:
        self.losses = SkipLosses(inputs.lm, inputs.text, self.config.ablate, progress=inputs.progress)
        return self.losses.compute()

    def resample(self, draw) -> dict[str, np.ndarray]:
        return self.losses.compute(draw.text_weights)
