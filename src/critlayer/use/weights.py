"""A model's block weights under a bit plan: their sizes at every candidate width, and a context in which every unit
computes with its weights quantized and dequantized to the plan's width (cached: plans share most of them).

A unit is what a plan gives one width: a whole block, or with ``per_kind`` its attention and its MLP apart."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models import LanguageModel
from ..models.language_model import linear_types
from ..models.surgery import sublayer
from .quantizers import Width


class BlockWeights:
    """The linear layers of every block of ``lm`` in units (norms, biases, the embedding and the head stay as loaded):
    ``labels[u]`` names unit ``u`` (``3``, or ``3.attn`` and ``3.mlp``), ``blocks[u]`` is its block, ``linears[u]``
    its (name in the block, module) pairs."""

    def __init__(self, lm: LanguageModel, widths: list[Width], *, per_kind: bool = False, progress: bool = True):
        self.lm, self.widths, self.progress = lm, widths, progress
        self.labels, self.blocks, self.linears = [], [], []
        for i, block in enumerate(lm.blocks):
            layers = [(name, module) for name, module in block.named_modules() if isinstance(module, linear_types())]
            for name, module in layers:
                for w in widths:
                    w.check_rows(f"block {i} {name}", self._rows(module).shape[1])
            if per_kind:
                attention = {id(m) for m in sublayer(block, "attn").modules()}
                kinds = {"attn": [x for x in layers if id(x[1]) in attention],
                         "mlp": [x for x in layers if id(x[1]) not in attention]}
            else:
                kinds = {"": layers}
            for kind, group in kinds.items():
                self.labels.append(f"{i}.{kind}" if kind else str(i))
                self.blocks.append(i)
                self.linears.append(group)
        self.sizes = np.array([sum(m.weight.numel() for _, m in layers) for layers in self.linears], dtype=np.int64)
        self.costs = np.array([[sum(_groups(m, w) * w.group_bits for _, m in layers) for w in widths]
                               for layers in self.linears], dtype=np.int64)
        self._cache: dict[tuple[int, int], list[torch.Tensor]] = {}

    @property
    def weights(self) -> int:
        return int(self.sizes.sum())

    def bits_per_weight(self, plan: list[int]) -> float:
        return float(sum(self.costs[i][k] for i, k in enumerate(plan)) / self.weights)

    def budget(self, bits: float) -> int:
        """A budget of ``bits`` per block weight, in whole bits."""
        return int(np.floor(bits * self.weights + 1e-6))

    def units_of(self, blocks: list[int]) -> list[int]:
        """The units of ``blocks``, in that order."""
        return [u for b in blocks for u, block in enumerate(self.blocks) if block == b]

    def per_block(self, values: np.ndarray) -> np.ndarray:
        """Per-unit values summed over each block's units."""
        return np.bincount(self.blocks, weights=values, minlength=self.lm.num_layers)

    def quantized(self, unit: int, k: int) -> list[torch.Tensor]:
        """Unit ``unit``'s linear weights at width ``k``, as the model holds them (dtype, device, layout)."""
        key = (unit, k)
        if key not in self._cache:
            self._cache[key] = [self._back(m, self.widths[k].roundtrip(self._rows(m))) for _, m in self.linears[unit]]
        return self._cache[key]

    def prepare(self, plans: list[list[int]]) -> None:
        """Quantize every (unit, width) the plans use, with a progress bar."""
        needed = sorted({(i, k) for plan in plans for i, k in enumerate(plan) if k is not None} - set(self._cache))
        for i, k in tqdm(needed, desc="quantizing", unit="unit", disable=not self.progress or not needed):
            self.quantized(i, k)

    @contextmanager
    def applied(self, plan: list[int | None]) -> Iterator[None]:
        """Every unit computes with its weights at the plan's width (None: as loaded); the loaded weights come back
        after. Autocast's cache of cast weights is cleared on the way in and out: it would keep the old ones."""
        own = [[m.weight.data for _, m in layers] for layers in self.linears]
        torch.clear_autocast_cache()
        try:
            for i, k in enumerate(plan):
                if k is None:
                    continue
                for (_, module), weight in zip(self.linears[i], self.quantized(i, k)):
                    module.weight.data = weight
            yield
        finally:
            for layers, weights in zip(self.linears, own):
                for (_, module), weight in zip(layers, weights):
                    module.weight.data = weight
            torch.clear_autocast_cache()

    @staticmethod
    def _rows(module: torch.nn.Module) -> torch.Tensor:
        """The weight as rows over the layer's inputs (GPT-2's Conv1D stores it transposed)."""
        return module.weight.T if not isinstance(module, torch.nn.Linear) else module.weight

    @staticmethod
    def _back(module: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        rows = rows if isinstance(module, torch.nn.Linear) else rows.T
        return rows.to(dtype=module.weight.dtype, device=module.weight.device).contiguous()


def _groups(module: torch.nn.Module, width: Width) -> int:
    return module.weight.numel() // width.group
