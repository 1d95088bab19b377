"""Next-token loss of a causal model over token sequences, in small batches so the logits stay small."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..common.errors import CritlayerError
from .language_model import LanguageModel

BATCH = 8  # texts per forward with logits: keeps a 49k- or 262k-word vocabulary affordable


def require_causal(lm: LanguageModel, what: str) -> None:
    if not lm.is_causal:
        raise CritlayerError(f"{what} needs a causal language model's loss; {lm.architecture} has no LM head")


def collate(sequences: list[list[int]], device, starts: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels for a causal-LM loss.

    Labels are -100 on padding and, where ``starts`` is given, before each sequence's start.
    """
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        start = starts[row] if starts is not None else 0
        labels[row, start:len(seq)] = ids[row, start:len(seq)]
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def text_batches(sequences: list[list[int]], batch_size: int, device) -> Iterator[tuple[list[int], dict]]:
    """(indices, collated batch) over the sequences, longest first to spend little on padding."""
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        yield chosen, collate([sequences[i] for i in chosen], device)


def batch_losses(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss (float32) and the number of predicted tokens, per sequence."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                             ignore_index=-100, reduction="none").view_as(targets)
    return loss.sum(1), (targets != -100).sum(1)


@torch.no_grad()
def sequence_losses(model: torch.nn.Module, sequences: list[list[int]], starts: list[int] | None = None,
                    batch_size: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Each sequence's summed next-token loss and number of predicted tokens, in small batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums, counts = [], []
    for first in range(0, len(sequences), batch_size):
        batch = collate(sequences[first:first + batch_size], device,
                        None if starts is None else starts[first:first + batch_size])
        loss, tokens = batch_losses(model, batch)
        sums.append(loss.double().cpu())
        counts.append(tokens.cpu())
    model.train(was_training)
    return torch.cat(sums).numpy(), torch.cat(counts).numpy()


def heldout_loss(model: torch.nn.Module, sequences: list[list[int]], batch_size: int = BATCH,
                 starts: list[int] | None = None) -> float:
    """Mean next-token loss per predicted token."""
    sums, counts = sequence_losses(model, sequences, starts, batch_size)
    return float(sums.sum() / counts.sum())
