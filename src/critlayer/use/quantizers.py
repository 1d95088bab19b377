"""The widths a block's weights can take, and the quantizers that make them: llama.cpp's formats through ``gguf``
(bit-exact with llama.cpp, and exportable as a GGUF file) and 2-8-bit integer groups through torchao (PyTorch's own
quantization library; a plan of them exports as a torchao per-module configuration), their scales chosen by
round-to-nearest over each group's range, with the ``-hqq`` suffix by HQQ's optimiser (torchao's scale-only HQQ),
or with the ``-imatrix`` suffix to the least error weighted by each input's mean square on calibration text
(llama.cpp's importance matrix, ``imatrix``): the same storage, less error at 2 and 3 bits.

A width's size counts everything a group of weights is stored with: the values, the scale and the zero-point (gguf's
own block sizes; torchao's groups keep a bfloat16 scale and a zero-point of the width's bits). Quantizing and
dequantizing a weight gives the values the quantized model computes with: what the evaluation swaps in.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from ..common.errors import CritlayerError

FAMILIES = ("gguf", "int")
GGUF_WIDTHS = ("MXFP4", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
INT_WIDTHS = ("int2", "int3", "int4", "int5", "int6", "int8")
DEFAULT_WIDTHS = {"gguf": ("MXFP4", "Q4_0", "Q4_1", "Q5_0", "Q8_0"), "int": ("int2", "int3", "int4", "int6")}
SCALE_BITS = 16  # torchao's scale, kept in bfloat16
HQQ = "-hqq"  # the suffix of an int width whose scales HQQ chooses
IMATRIX = "-imatrix"  # the suffix of an int width whose scales an importance matrix weights
QPARAMS = {"": "affine", HQQ: "hqq_scale_only", IMATRIX: "importance"}


@dataclass(frozen=True)
class Width:
    """One way to store a block's weights: ``group`` weights take ``group_bits`` bits, everything counted."""

    name: str
    family: str
    group: int
    group_bits: int
    qparams: str = "affine"  # how an int width chooses its scales: affine (round-to-nearest), hqq_scale_only or
    # importance (weighted by an importance matrix)

    @property
    def bits(self) -> Fraction:
        """Bits per weight, exactly."""
        return Fraction(self.group_bits, self.group)

    def check_rows(self, tensor: str, row: int) -> None:
        """Refuse a tensor whose rows do not split into whole groups (llama.cpp would fall back to another type)."""
        if row % self.group:
            raise CritlayerError(f"{tensor} has rows of {row} weights; {self.name} stores groups of {self.group}: "
                                 f"choose widths whose group divides {row}")

    @property
    def integer_bits(self) -> int:
        """An int width's bits per stored integer."""
        return int(self.name[3])

    @property
    def needs_importance(self) -> bool:
        """Whether quantizing takes an importance per input channel (``imatrix.input_importance``)."""
        return self.qparams == "importance"

    def roundtrip(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` (rows of input weights) quantized and dequantized, in float32; ``importance`` (one weight per
        input channel) is what an importance-weighted width minimises the error under."""
        if self.needs_importance:
            from .imatrix import weighted_groups

            if importance is None:
                raise CritlayerError(f"{self.name} weights its scales by an importance matrix: measure one first")
            return weighted_groups(weight, importance, self.integer_bits, self.group)
        if self.family == "gguf":
            import gguf

            kind = gguf.GGMLQuantizationType[self.name]
            rows = weight.detach().float().cpu().numpy()
            return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(gguf.quants.quantize(rows, kind), kind)))
        layer = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
        layer[0].weight = torch.nn.Parameter(weight.detach().float().cpu(), requires_grad=False)
        torchao().quantize_(layer, self.torchao_config())
        return layer[0].weight.dequantize().float()

    def torchao_config(self):
        """The torchao configuration that quantizes a linear layer to this width (none holds scales chosen from
        calibration data)."""
        if self.needs_importance:
            raise CritlayerError(f"{self.name}'s scales come from calibration data; a torchao configuration cannot "
                                 "carry them")
        ao = torchao()
        from torchao.quantization.granularity import PerGroup

        from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
            IntxChooseQParamsAlgorithm)

        return ao.IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{self.integer_bits}"),
                                       granularity=PerGroup(self.group),
                                       mapping_type=ao.MappingType.ASYMMETRIC, scale_dtype=torch.bfloat16,
                                       intx_choose_qparams_algorithm=IntxChooseQParamsAlgorithm(self.qparams))


def torchao():
    """``torchao.quantization`` (the package quiets its import warnings)."""
    try:
        import torchao.quantization as quantization
    except ImportError:
        raise CritlayerError("2-8-bit integer widths need torchao: pip install torchao") from None
    return quantization


def width(name: str, group: int = 64) -> Width:
    """The width called ``name``: a llama.cpp type (``Q4_0``, ``MXFP4``...), ``intB`` in groups of ``group``, or
    ``intBgG`` in groups of G (widths between the whole bits: int3g128 is 3.15 bits, int3g32 3.59); an int width
    ending in ``-hqq`` chooses its scales by HQQ (``int2-hqq``, ``int3g32-hqq``), one ending in ``-imatrix`` by an
    importance matrix (``int2-imatrix``)."""
    if name in GGUF_WIDTHS:
        import gguf

        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        return Width(name, "gguf", block, 8 * type_size)
    suffix = next((s for s in (HQQ, IMATRIX) if name.endswith(s)), "")
    bits, _, own_group = name.removesuffix(suffix).partition("g")
    if bits in INT_WIDTHS and (not own_group or own_group.isdigit() and int(own_group) > 0):
        b, group = int(bits[3:]), int(own_group or group)
        return Width(name, "int", group, b * group + SCALE_BITS + b, QPARAMS[suffix])
    raise CritlayerError(f"unknown width {name!r}; choose llama.cpp types {', '.join(GGUF_WIDTHS)} or torchao's "
                         f"{', '.join(INT_WIDTHS)} (optionally in groups of G: int3g128; scales by HQQ: int2-hqq; "
                         "by an importance matrix: int2-imatrix)")


def parse_widths(names: str | None, family: str, group: int = 64) -> list[Width]:
    """The candidate widths (a comma list, default the family's), from fewest bits to most, all of one family."""
    listed = [n.strip() for n in names.split(",") if n.strip()] if names else list(DEFAULT_WIDTHS[family])
    widths = sorted({w.name: w for w in (width(n, group) for n in listed)}.values(), key=lambda w: w.bits)
    wrong = [w.name for w in widths if w.family != family]
    if wrong:
        raise CritlayerError(f"width {', '.join(wrong)} is not a {family} format; {family} takes "
                             f"{', '.join(GGUF_WIDTHS if family == 'gguf' else INT_WIDTHS)}")
    if len(widths) < 2:
        raise CritlayerError(f"a plan needs at least two candidate widths, got {', '.join(listed) or 'none'}")
    return widths
