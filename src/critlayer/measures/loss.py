"""Next-token loss per text, in small batches so the logits stay small (for ablation and gradients)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..data import collate
from ..errors import CritlayerError
from ..models import LanguageModel


def require_causal(lm: LanguageModel, measure: str) -> None:
    if not lm.is_causal:
        raise CritlayerError(f"the {measure} measure needs a causal language model's loss; {lm.architecture} has no LM head")


def text_batches(lm: LanguageModel, sequences: list[list[int]], batch_size: int) -> Iterator[tuple[list[int], dict]]:
    """(indices, collated batch) over the sequences, longest first to spend little on padding."""
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        yield chosen, collate([sequences[i] for i in chosen], lm.device)


def batch_losses(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss (float32) and the number of predicted tokens, per sequence."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                             ignore_index=-100, reduction="none").view_as(targets)
    return loss.sum(1), (targets != -100).sum(1)
