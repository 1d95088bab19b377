"""Find the stack of transformer blocks in any model, by one general rule.

The stack is the ``nn.ModuleList`` whose children all share one class and which holds the
most parameters: ``model.layers`` (Llama, Gemma, Qwen2, Mistral, Phi-3), ``transformer.h``
(GPT-2), ``gpt_neox.layers``, ``encoder.layer`` (BERT), and so on, with no per-model branch.
"""

from __future__ import annotations

from torch import nn

from ..common.errors import CritlayerError


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the dotted path and the module list of the model's transformer blocks."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, path, module)
    if best is None:
        raise CritlayerError(f"found no stack of transformer blocks in {type(model).__name__}")
    return best[1], best[2]
