"""Cutting blocks: skip one, drop its attention or MLP, swap in another checkpoint's weights, or delete it.

The first three are contexts that undo themselves (ablation and validation measure a model with a
part taken out); ``delete_blocks`` is for good (pruning): it removes the blocks and repairs every
per-layer index in the blocks that remain and every per-layer entry of the config, so the model
saves and reloads with plain transformers. Skipping a block makes it the identity on the hidden
states (SLEB, ShortGPT); dropping a sublayer makes it output zeros, so the residual add passes its
input through (LLM-Drop).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..common.errors import CritlayerError
from .blocks import find_blocks
from .running import hidden_of

PARTS = ("block", "attn", "mlp")
_SUBLAYER_WORDS = {"attn": ("attn", "attention"), "mlp": ("mlp", "feed_forward", "ffn")}
# Attributes by which a block's modules know their own position (the KV cache is indexed by it).
_INDEX_ATTRIBUTES = ("layer_idx", "layer_id", "layer_index")


def parse_parts(parts: str | Iterable[str]) -> tuple[str, ...]:
    """``block``, ``attn`` and ``mlp`` from a comma list or a sequence, in order, each once."""
    names = [p.strip() for p in (parts.split(",") if isinstance(parts, str) else parts) if p.strip()]
    unknown = [p for p in names if p not in PARTS]
    if unknown or not names:
        raise CritlayerError(f"unknown part {','.join(unknown) or '(none)'}; choose from {', '.join(PARTS)}")
    return tuple(dict.fromkeys(names))


def sublayer(block: nn.Module, part: str) -> nn.Module:
    """The block's attention or MLP child, found by name (norms and parameter-free children skipped)."""
    found = [module for name, module in block.named_children()
             if any(w in name.lower() for w in _SUBLAYER_WORDS[part]) and "norm" not in name.lower()
             and any(True for _ in module.parameters())]
    if len(found) != 1:
        children = ", ".join(name for name, _ in block.named_children())
        raise CritlayerError(f"cannot find one {part} sublayer in {type(block).__name__} (children: {children})")
    return found[0]


@contextmanager
def _forward_replaced(module: nn.Module, forward) -> Iterator[None]:
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
def skipped(blocks: nn.ModuleList, indices: Iterable[int]) -> Iterator[None]:
    """The given blocks return their input unchanged (they compute nothing)."""
    with ExitStack() as stack:
        for i in indices:
            stack.enter_context(_forward_replaced(blocks[i], lambda *args, **kwargs: hidden_of(args, kwargs)))
        yield


@contextmanager
def returning(block: nn.Module, output: torch.Tensor) -> Iterator[None]:
    """The block returns ``output`` whatever it is called with (replaying an earlier pass)."""
    with _forward_replaced(block, lambda *args, **kwargs: output):
        yield


@contextmanager
def dropped(blocks: nn.ModuleList, indices: Iterable[int], part: str) -> Iterator[None]:
    """The attention (``attn``) or MLP (``mlp``) sublayer of the given blocks outputs zeros."""
    def zero(module, args, output):
        first = output[0] if isinstance(output, (tuple, list)) else output
        zeros = torch.zeros_like(first)
        return (zeros, *output[1:]) if isinstance(output, (tuple, list)) else zeros

    with ExitStack() as stack:
        for i in indices:
            stack.callback(sublayer(blocks[i], part).register_forward_hook(zero).remove)
        yield


def taken_out(blocks: nn.ModuleList, indices: Iterable[int], part: str = "block"):
    """Skip the given blocks (``part`` block) or drop their attention or MLP sublayer: what pruning removes."""
    return skipped(blocks, indices) if part == "block" else dropped(blocks, indices, part)


@contextmanager
def swapped(blocks: nn.ModuleList, source: nn.ModuleList, indices: Iterable[int]) -> Iterator[None]:
    """The given blocks hold ``source``'s weights (another checkpoint of the same model), then their own again.

    The weights are copied into the same tensors, so autocast's cache of their lower-precision casts is cleared on
    the way in and out: inside one autocast it would keep computing with the weights that were there before."""
    indices = list(indices)
    own = {i: copy.deepcopy(blocks[i].state_dict()) for i in indices}
    try:
        for i in indices:
            blocks[i].load_state_dict(source[i].state_dict())
        torch.clear_autocast_cache()
        yield
    finally:
        for i in indices:
            blocks[i].load_state_dict(own[i])
        torch.clear_autocast_cache()


def delete_blocks(model: nn.Module, indices: Iterable[int]) -> list[int]:
    """Remove the given blocks for good; returns the original indices of the blocks kept.

    Every module of a kept block that knows its position (``layer_idx`` and the like, by which the KV
    cache is indexed) gets its new one; the config's layer count and every per-layer list (Gemma 3's
    ``layer_types``) keep the kept blocks' entries, and Qwen2's ``max_window_layers`` still splits the
    kept blocks where it split them before.
    """
    _, blocks = find_blocks(model)
    total, removed = len(blocks), sorted(set(indices))
    if not removed or removed[0] < 0 or removed[-1] >= total:
        raise CritlayerError(f"blocks to delete must lie in 0-{total - 1}, got {removed}")
    if len(removed) == total:
        raise CritlayerError("cannot delete every block")
    kept = [i for i in range(total) if i not in set(removed)]
    for i in reversed(removed):
        del blocks[i]
    for new, block in enumerate(blocks):
        for module in block.modules():
            for name in _INDEX_ATTRIBUTES:
                if isinstance(getattr(module, name, None), int) and not isinstance(getattr(module, name), bool):
                    setattr(module, name, new)
    _shorten_config(model.config, total, kept)
    return kept


def _shorten_config(config, total: int, kept: list[int]) -> None:
    for name, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == total and "layer" in name:
            setattr(config, name, [value[i] for i in kept])
    threshold = getattr(config, "max_window_layers", None)
    if isinstance(threshold, int):
        config.max_window_layers = sum(1 for i in kept if i < threshold)
    config.num_hidden_layers = len(kept)
