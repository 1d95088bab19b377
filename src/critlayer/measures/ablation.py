"""Ablation: how much the next-token loss rises when a block, or one of its sublayers, is skipped.

Skipping a block makes it the identity on the hidden states (SLEB, ShortGPT); skipping its
attention or MLP sublayer makes that sublayer output zeros, so the residual add passes its
input through (LLM-Drop). Blocks before the skipped one see the same input as in the
unablated pass, so their outputs are replayed from that pass instead of recomputed: one
ablation costs the blocks from the skipped one on, plus the head.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import CritlayerError
from ..models import LanguageModel
from .loss import batch_losses, require_causal, text_batches

PARTS = ("block", "attn", "mlp")
SCORE_NAMES = {"block": "ablation", "attn": "ablation_attn", "mlp": "ablation_mlp"}
_SUBLAYER_WORDS = {"attn": ("attn", "attention"), "mlp": ("mlp", "feed_forward", "ffn")}


def parse_parts(parts: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    names = [p.strip() for p in (parts.split(",") if isinstance(parts, str) else parts) if p.strip()]
    unknown = [p for p in names if p not in PARTS]
    if unknown or not names:
        raise CritlayerError(f"unknown ablation part {','.join(unknown) or '(none)'}; choose from {', '.join(PARTS)}")
    return tuple(dict.fromkeys(names))


def sublayer(block: torch.nn.Module, part: str) -> torch.nn.Module:
    """The block's attention or MLP child, found by name (norms and parameter-free children skipped)."""
    found = [module for name, module in block.named_children()
             if any(w in name.lower() for w in _SUBLAYER_WORDS[part]) and "norm" not in name.lower()
             and any(True for _ in module.parameters())]
    if len(found) != 1:
        children = ", ".join(name for name, _ in block.named_children())
        raise CritlayerError(f"cannot find one {part} sublayer in {type(block).__name__} (children: {children})")
    return found[0]


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(output, hidden: torch.Tensor):
    """``output`` (a tensor or a tuple led by one) with its hidden states replaced."""
    return (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden


@contextmanager
def _replaced_forward(module: torch.nn.Module, forward):
    saved = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


@contextmanager
def _recorded(blocks: torch.nn.ModuleList, outputs: list):
    """Record every block's output object during one forward."""
    def hook(module, args, output):
        outputs.append(output)
    handles = [block.register_forward_hook(hook) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def skipped(lm: LanguageModel, index: int, part: str, replay: list):
    """Skip ``part`` of block ``index``; earlier blocks return their ``replay`` (unablated) outputs."""
    with ExitStack() as stack:
        for j in range(index):
            stack.enter_context(_replaced_forward(lm.blocks[j], lambda *a, _out=replay[j], **k: _out))
        block = lm.blocks[index]
        if part == "block":
            stack.enter_context(_replaced_forward(block, lambda *a, **k: _with_hidden(replay[index], _hidden(a, k))))
        else:
            def zero(module, args, output):
                first = output[0] if isinstance(output, (tuple, list)) else output
                return _with_hidden(output, torch.zeros_like(first))
            stack.callback(sublayer(block, part).register_forward_hook(zero).remove)
        yield


class Ablation:
    """Per-text loss with nothing skipped and with each (block, part) skipped.

    ``compute()`` gives, per part, the rise of the mean next-token loss per token when each block's
    part is skipped (high = critical); ``resample(rng)`` the same over texts drawn with replacement.
    """

    def __init__(self, lm: LanguageModel, sequences: list[list[int]], parts: tuple[str, ...] = ("block",),
                 batch_size: int = 8, progress: bool = True):
        require_causal(lm, "ablation")
        for part in parts:
            if part != "block":
                sublayer(lm.blocks[0], part)  # fail early, in one line
        self.parts = parse_parts(parts)
        n, layers = len(sequences), lm.num_layers
        self.base, self.tokens = np.zeros(n), np.zeros(n)
        self.skipped = {part: np.zeros((layers, n)) for part in self.parts}
        bar = tqdm(total=layers * len(self.parts) * len(sequences), desc="ablating", unit="text",
                   disable=not progress)
        was_training = lm.model.training
        lm.model.eval()
        try:
            with torch.inference_mode(), bar:
                for chosen, batch in text_batches(lm, sequences, batch_size):
                    outputs: list = []
                    with _recorded(lm.blocks, outputs):
                        loss, tokens = batch_losses(lm.model, batch)
                    self.base[chosen], self.tokens[chosen] = loss.cpu().numpy(), tokens.cpu().numpy()
                    for part in self.parts:
                        for index in range(layers):
                            with skipped(lm, index, part, replay=outputs):
                                self.skipped[part][index, chosen] = batch_losses(lm.model, batch)[0].cpu().numpy()
                            bar.update(len(chosen))
        finally:
            lm.model.train(was_training)

    def compute(self, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
        w = np.ones_like(self.base) if weights is None else weights
        return {SCORE_NAMES[part]: (rise @ w) / (self.tokens @ w)
                for part, rise in ((p, self.skipped[p] - self.base) for p in self.parts)}

    def resample(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        n = len(self.base)
        return self.compute(np.bincount(rng.integers(0, n, n), minlength=n).astype(float))
