"""Which parameters a fine-tune of chosen blocks touches: a freeze mask, a PEFT ``LoraConfig`` targeting only those
blocks, or an axolotl ``unfrozen_parameters`` list. The last two need only the model's description, so a saved scan
is enough."""

from __future__ import annotations

import re

from torch import nn

from ..common.errors import CritlayerError
from ..models import LanguageModel

LORA_R, LORA_ALPHA = 8, 16  # the LoRA rank and scale every command starts from


def _describe(lm: LanguageModel | dict) -> dict:
    """A loaded model's description, or one read from a scan (``ScanResult.model``)."""
    return lm.describe() if isinstance(lm, LanguageModel) else lm


def block_prefixes(lm: LanguageModel | dict, blocks: list[int]) -> list[str]:
    """Parameter-name prefixes of the given blocks, e.g. ``model.layers.3.``."""
    return [f"{_describe(lm)['blocks']}.{i}." for i in blocks]


def freeze_except(model: nn.Module, lm: LanguageModel, blocks: list[int], *, outside: bool = False) -> list[str]:
    """Make only the given blocks trainable, and with ``outside`` all that lies outside the blocks too (embeddings,
    final norm, output head); returns the names of the trainable parameters."""
    prefixes = tuple(block_prefixes(lm, blocks))
    any_block = f"{lm.blocks_path}."
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes) or (outside and not name.startswith(any_block)))
        if param.requires_grad:
            trainable.append(name)
    return trainable


def block_parameters(model: nn.Module, lm: LanguageModel, blocks: list[int]) -> dict[int, list[nn.Parameter]]:
    """Each given block's parameters."""
    named = list(model.named_parameters())
    return {block: [p for name, p in named if name.startswith(prefix)]
            for block, prefix in zip(blocks, block_prefixes(lm, blocks))}


def lora_targets(lm: LanguageModel | dict, blocks: list[int]) -> list[str]:
    """Full names of the linear layers inside the given blocks (what LoRA adapts)."""
    linears = _describe(lm).get("block_linears")
    if linears is None:
        raise CritlayerError("this scan predates the record of each block's linear layers; scan the model again")
    return [prefix + name for prefix in block_prefixes(lm, blocks) for name in linears]


def lora_config(lm: LanguageModel | dict, blocks: list[int], *, r: int = LORA_R, alpha: int = LORA_ALPHA,
                dropout: float = 0.0):
    """A PEFT ``LoraConfig`` that adapts the linear layers of the given blocks only."""
    from peft import LoraConfig

    targets = lora_targets(lm, blocks)
    if not targets:
        raise CritlayerError(f"no linear layers found in blocks {blocks}")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                      task_type="CAUSAL_LM")


def unfrozen_parameters(lm: LanguageModel | dict, blocks: list[int]) -> list[str]:
    """An axolotl ``unfrozen_parameters`` list (regular expressions) for the given blocks."""
    return [f"^{re.escape(prefix)}.*" for prefix in block_prefixes(lm, blocks)]
