"""A loaded language model: the model, its tokenizer and its stack of transformer blocks, and what it is."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from .blocks import find_blocks


@dataclass
class LanguageModel:
    """A loaded model with its tokenizer and its stack of transformer blocks."""

    name: str
    model: nn.Module
    tokenizer: object
    blocks: nn.ModuleList
    blocks_path: str
    weights: object = None  # a SafetensorsWeights when the blocks stay on disk (block-by-block mode)
    spec: str | None = None  # what ``load`` was given: a built-in name, folder, .gguf file or hub id

    @property
    def streamed(self) -> bool:
        return self.weights is not None

    @classmethod
    def wrap(cls, model: nn.Module, tokenizer: object = None, name: str | None = None) -> "LanguageModel":
        """Wrap a model already in memory (for example one built from a config)."""
        path, blocks = find_blocks(model)
        return cls(name or type(model).__name__, model.eval(), tokenizer, blocks, path)

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.dtype if self.streamed else next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embeddings' device (the first of several under a device map)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def is_causal(self) -> bool:
        """Whether the model generates text (what generated probes and the loss measures need)."""
        return hasattr(self.model, "generate") and self.model.can_generate()

    @cached_property
    def attends_causally(self) -> bool:
        """Whether every attention in the blocks is causal: then no real token sees a pad after it, and a
        right-padded batch needs no attention mask. (Asked every batch, so walked once.)"""
        flags = [m.is_causal for m in self.blocks.modules() if isinstance(getattr(m, "is_causal", None), bool)]
        return bool(flags) and all(flags)

    @property
    def block_linears(self) -> list[str]:
        """Names of the linear layers inside a block (what LoRA adapts), e.g. ``self_attn.q_proj``."""
        return [name for name, module in self.blocks[0].named_modules() if isinstance(module, linear_types())]

    def describe(self) -> dict:
        return {"name": self.name, "architecture": self.architecture, "num_layers": self.num_layers,
                "hidden_size": self.hidden_size, "dtype": str(self.dtype).removeprefix("torch."),
                "blocks": self.blocks_path, "block_linears": self.block_linears}


def shape_difference(described: dict, other: dict) -> str | None:
    """How the model one result describes (``describe()``'s dict) differs from another's in architecture or shape,
    or None when it does not."""
    keys = ("architecture", "num_layers", "hidden_size")
    if all(described.get(k) == other.get(k) for k in keys):
        return None
    return ", ".join(f"{k} {described.get(k)}" for k in keys)


def linear_types() -> tuple[type, ...]:
    """nn.Linear, and GPT-2's Conv1D where transformers has it."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return (nn.Linear,)
    return (nn.Linear, Conv1D)
