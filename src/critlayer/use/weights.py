"""A model's block weights under a bit plan: their sizes at every candidate width, and a context in which some units
compute with their weights quantized and dequantized to a width (made on entry, dropped on exit: a plan is applied
one block at a time, ``blockwise``).

A unit is what a plan gives one width: a whole block, or with ``per_kind`` its attention and its MLP apart."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ..common.errors import CritlayerError
from ..models import LanguageModel
from ..models.language_model import linear_types
from ..models.surgery import sublayer
from .quantizers import Width


class BlockWeights:
    """The linear layers of every block of ``lm`` in units (norms, biases, the embedding and the head stay as loaded):
    ``labels[u]`` names unit ``u`` (``3``, or ``3.attn`` and ``3.mlp``), ``blocks[u]`` is its block, ``linears[u]``
    its (name in the block, module) pairs. ``importance`` (per linear layer, its inputs' mean squares) is what
    importance-weighted widths quantize by: ``measure_importance`` fills it where a width needs it."""

    def __init__(self, lm: LanguageModel, widths: list[Width], *, per_kind: bool = False):
        self.lm = lm
        self.importance: dict[torch.nn.Module, torch.Tensor] = {}
        self.labels, self.blocks, self.linears = [], [], []
        for i, block in enumerate(lm.blocks):
            layers = [(name, module) for name, module in block.named_modules() if isinstance(module, linear_types())]
            for name, module in layers:
                for w in widths:
                    w.check_rows(f"block {i} {name}", self.row(module))
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
        costs = np.array([[sum(self._bits(m, w) for _, m in layers) for w in widths] for layers in self.linears],
                         dtype=np.int64)
        order = np.argsort(costs.sum(0), kind="stable")  # a width with a fallback is as wide as this model makes it
        self.widths, self.costs = [widths[k] for k in order], costs[:, order]
        for u, unit in enumerate(self.costs):  # plans move units one width up or down: the order must hold in each
            if (np.diff(unit) < 0).any():
                k = int(np.argmax(np.diff(unit) < 0))
                raise CritlayerError(f"{self.widths[k + 1].name} is narrower than {self.widths[k].name} in unit "
                                     f"{self.labels[u]} and wider over the model: choose widths of one order in "
                                     "every unit")

    @property
    def needs_importance(self) -> bool:
        return any(w.needs_importance for w in self.widths)

    def measure_importance(self, sequences: list[list[int]]) -> None:
        """Every linear layer's importance on ``sequences`` (calibration text), one pass of the loaded model."""
        from .imatrix import input_importance

        modules = [m for layers in self.linears for _, m in layers]
        measured = input_importance(self.lm, sequences, modules)
        # a layer no calibration token reached (an expert never routed to) weighs every input alike
        self.importance = {m: measured[m] if m in measured else torch.ones(self.row(m)) for m in modules}

    @property
    def weights(self) -> int:
        return int(self.sizes.sum())

    def width_bits(self, k: int) -> float:
        """Width ``k``'s bits per block weight on this model, every unit at it."""
        return float(self.costs[:, k].sum() / self.weights)

    def held_as(self, k: int) -> dict[str, int]:
        """What width ``k`` stores this model's block tensors as: each width's name and its count of tensors (more
        than one name where rows send some to the fallback)."""
        held = [self.widths[k].for_row(self.row(m)).name for layers in self.linears for _, m in layers]
        return dict(Counter(held))

    def bits_per_weight(self, plan: list[int]) -> float:
        return float(sum(self.costs[i][k] for i, k in enumerate(plan)) / self.weights)

    def budget(self, bits: float) -> int:
        """A budget of ``bits`` per block weight, in whole bits."""
        total = bits * self.weights
        return int(np.floor(total + max(1e-6, 1e-12 * total)))  # a width's own point, however the float rounded

    def units_of(self, blocks: list[int]) -> list[int]:
        """The units of ``blocks``, in that order."""
        return [u for b in blocks for u, block in enumerate(self.blocks) if block == b]

    def per_block(self, values: np.ndarray) -> np.ndarray:
        """Per-unit values summed over each block's units."""
        return np.bincount(self.blocks, weights=values, minlength=self.lm.num_layers)

    def quantized(self, unit: int, k: int) -> list[torch.Tensor]:
        """Unit ``unit``'s linear weights at width ``k``, as the model holds them (dtype, device, layout)."""
        return [self._back(m, self.widths[k].roundtrip(self._rows(m), self.importance.get(m)))
                for _, m in self.linears[unit]]

    @contextmanager
    def at(self, widths: dict[int, int]) -> Iterator[None]:
        """Units ``widths`` names compute with their weights quantized (now) to their width; every weight as loaded
        comes back after. Autocast's cache of cast weights is cleared on the way in and out: it would keep the old
        ones."""
        own = {u: [m.weight.data for _, m in self.linears[u]] for u in widths}
        torch.clear_autocast_cache()
        try:
            for u, k in widths.items():
                for (_, module), weight in zip(self.linears[u], self.quantized(u, k)):
                    module.weight.data = weight
            yield
        finally:
            for u, weights in own.items():
                for (_, module), weight in zip(self.linears[u], weights):
                    module.weight.data = weight
            torch.clear_autocast_cache()

    @classmethod
    def _bits(cls, module: torch.nn.Module, width: Width) -> int:
        """The bits ``module``'s weight takes at ``width`` (its fallback's where its rows ask for it)."""
        held = width.for_row(cls.row(module))
        return module.weight.numel() // held.group * held.group_bits

    @classmethod
    def row(cls, module: torch.nn.Module) -> int:
        """How many weights a row of ``module``'s weight holds (its inputs): what a width's groups must divide."""
        return cls._rows(module).shape[1]

    @staticmethod
    def _rows(module: torch.nn.Module) -> torch.Tensor:
        """The weight as rows over the layer's inputs (GPT-2's Conv1D stores it transposed)."""
        return module.weight.T if not isinstance(module, torch.nn.Linear) else module.weight

    @staticmethod
    def _back(module: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        rows = rows if isinstance(module, torch.nn.Linear) else rows.T
        return rows.to(dtype=module.weight.dtype, device=module.weight.device).contiguous()
