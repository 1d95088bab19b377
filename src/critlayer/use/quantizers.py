"""The widths a block's weights can take, and the quantizers that make them: llama.cpp's formats through ``gguf``
(bit-exact with llama.cpp, and exportable as a GGUF file) and 2-8-bit integer groups through torchao (PyTorch's own
quantization library; a plan of them exports as a torchao per-module configuration), their scales chosen by
round-to-nearest over each group's range, with the ``-hqq`` suffix by HQQ's optimiser (torchao's scale-only HQQ),
or with the ``-imatrix`` suffix to the least error weighted by each input's mean square on calibration text
(llama.cpp's importance matrix, ``imatrix``): the same storage, less error at 2 and 3 bits.

llama.cpp's K-quants and IQ types, and llama.cpp's types with the ``-imatrix`` suffix (weighted by the importance
matrix, as ``llama-quantize --imatrix`` does; Q8_0 and MXFP4 take none), are made by llama.cpp's own quantizer (the ``llamacpp`` extra). K-quants
and most IQ types store blocks of 256 weights, which rows of 576 or 640 cannot hold: ``Q2_K/MXFP4`` names the width
that stores a tensor as Q2_K where its rows allow and as MXFP4 where they do not, in the open, where llama.cpp would
fall back silently; its bits are counted tensor by tensor on the model (``BlockWeights``).

A width's size counts everything a group of weights is stored with: the values, the scale and the zero-point (gguf's
own block sizes; torchao's groups keep a bfloat16 scale and a zero-point of the width's bits). Quantizing and
dequantizing a weight gives the values the quantized model computes with: what the evaluation swaps in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import torch

from ..common.errors import CritlayerError
from ..models.llamacpp import NEEDS_IMATRIX

FAMILIES = ("gguf", "int")
GGUF_WIDTHS = ("MXFP4", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # the gguf package writes these itself
LLAMACPP_WIDTHS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS",
                   "IQ4_NL", "Q4_K", "Q5_K", "Q6_K")  # only llama.cpp's quantizer writes these
IGNORE_IMATRIX = ("MXFP4", "Q8_0")  # llama.cpp's quantizer does not weight these by an importance matrix
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
    qparams: str = "affine"  # how a width chooses its scales: affine (round-to-nearest; llama.cpp's own rule for
    # its types), hqq_scale_only or importance (weighted by an importance matrix)
    fallback: Width | None = None  # the width of a tensor whose rows cannot hold this one's groups

    @property
    def bits(self) -> Fraction:
        """Bits per weight, exactly, where rows hold the groups (a fallback's share depends on the model)."""
        return Fraction(self.group_bits, self.group)

    def for_row(self, row: int) -> Width:
        """The width a tensor with rows of ``row`` weights is stored at: this one (without a fallback), or its
        fallback."""
        if self.fallback is None:
            return self
        if row % self.group:
            return self.fallback
        return replace(self, name=self.name.partition("/")[0], fallback=None)

    def check_rows(self, tensor: str, row: int) -> None:
        """Refuse a tensor whose rows do not split into whole groups (llama.cpp would fall back to another type)."""
        held = self.for_row(row)
        if row % held.group:
            other = (f", or name one for such rows: {self.name}/MXFP4" if self.family == "gguf" and held is self
                     and row % 32 == 0 else "")
            raise CritlayerError(f"{tensor} has rows of {row} weights; {held.name} stores groups of {held.group}: "
                                 f"choose widths whose group divides {row}{other}")

    @property
    def llama_type(self) -> str:
        """A gguf width's llama.cpp type (its name without a suffix or a fallback)."""
        return self.name.partition("/")[0].removesuffix(IMATRIX)

    @property
    def needs_llamacpp(self) -> bool:
        """Whether only llama.cpp's quantizer makes this width (or its fallback)."""
        own = self.family == "gguf" and (self.llama_type in LLAMACPP_WIDTHS or self.qparams == "importance")
        return own or self.fallback is not None and self.fallback.needs_llamacpp

    @property
    def integer_bits(self) -> int:
        """An int width's bits per stored integer."""
        return int(self.name[3])

    @property
    def needs_importance(self) -> bool:
        """Whether quantizing takes an importance per input channel (``imatrix.input_importance``)."""
        return self.qparams == "importance" or self.fallback is not None and self.fallback.needs_importance

    def roundtrip(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` (rows of input weights) quantized and dequantized, in float32, at the width its rows take;
        ``importance`` (one weight per input channel) is what an importance-weighted width minimises the error
        under."""
        held = self.for_row(weight.shape[1])
        if held is not self:
            return held.roundtrip(weight, importance)
        if self.family == "gguf":
            import gguf

            kind = gguf.GGMLQuantizationType[self.llama_type]
            return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(self.encode(weight, importance), kind)))
        self._check_importance(importance)
        if self.needs_importance:
            from .imatrix import weighted_groups

            return weighted_groups(weight, importance, self.integer_bits, self.group)
        layer = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
        layer[0].weight = torch.nn.Parameter(weight.detach().float().cpu(), requires_grad=False)
        torchao().quantize_(layer, self.torchao_config())
        return layer[0].weight.dequantize().float()

    def encode(self, weight: torch.Tensor, importance: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
        """A gguf width's bytes for ``weight`` (rows of input weights) as a GGUF file holds them: by the gguf
        package where it writes the type bit-exactly as llama.cpp does, else by llama.cpp's own quantizer."""
        import gguf

        self._check_importance(importance)
        rows = weight.detach().float().cpu().numpy() if isinstance(weight, torch.Tensor) else weight
        if not self.needs_llamacpp:
            return gguf.quants.quantize(rows, gguf.GGMLQuantizationType[self.llama_type])
        from ..models.llamacpp import quantize_rows

        weights = importance.float().cpu().numpy() if isinstance(importance, torch.Tensor) else importance
        return quantize_rows(rows, self.llama_type, weights if self.needs_importance else None)

    def _check_importance(self, importance) -> None:
        if self.needs_importance and importance is None:
            raise CritlayerError(f"{self.name} weights its scales by an importance matrix: measure one first")

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
    """The width called ``name``: a llama.cpp type (``Q4_0``, ``MXFP4``, ``Q3_K``, ``IQ3_S``...; with ``-imatrix``
    weighted by an importance matrix), ``intB`` in groups of ``group``, or ``intBgG`` in groups of G (widths between
    the whole bits: int3g128 is 3.15 bits, int3g32 3.59); an int width ending in ``-hqq`` chooses its scales by HQQ
    (``int2-hqq``, ``int3g32-hqq``), one ending in ``-imatrix`` by an importance matrix (``int2-imatrix``).
    ``A/B`` is A where a tensor's rows hold A's groups, else B (``Q2_K/MXFP4``)."""
    if "/" in name:
        first, _, other = name.partition("/")
        primary, fallback = width(first, group), width(other, group)
        if fallback.fallback is not None or fallback.family != primary.family:
            raise CritlayerError(f"width {name!r}: the fallback after / must be one width of {first}'s family")
        return replace(primary, name=name, fallback=fallback)
    suffix = next((s for s in (HQQ, IMATRIX) if name.endswith(s)), "")
    base = name.removesuffix(suffix)
    if base in GGUF_WIDTHS + LLAMACPP_WIDTHS and suffix != HQQ:
        if base in NEEDS_IMATRIX and not suffix:
            raise CritlayerError(f"llama.cpp quantizes {base} only with an importance matrix: name it {base}{IMATRIX}")
        if base in IGNORE_IMATRIX and suffix:
            raise CritlayerError(f"llama.cpp's quantizer does not weight {base} by an importance matrix: name it {base}")
        import gguf

        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[base]]
        return Width(name, "gguf", block, 8 * type_size, QPARAMS[suffix])
    bits, _, own_group = base.partition("g")
    if bits in INT_WIDTHS and (not own_group or own_group.isdigit() and int(own_group) > 0):
        b, group = int(bits[3:]), int(own_group or group)
        return Width(name, "int", group, b * group + SCALE_BITS + b, QPARAMS[suffix])
    raise CritlayerError(f"unknown width {name!r}; choose llama.cpp types {', '.join(GGUF_WIDTHS + LLAMACPP_WIDTHS)} "
                         f"(by an importance matrix: Q3_K-imatrix; where rows do not hold 256: Q3_K/MXFP4) or "
                         f"torchao's {', '.join(INT_WIDTHS)} (optionally in groups of G: int3g128; scales by HQQ: "
                         "int2-hqq; by an importance matrix: int2-imatrix)")


def parse_widths(names: str | None, family: str, group: int = 64) -> list[Width]:
    """The candidate widths (a comma list, default the family's), from fewest bits to most, all of one family."""
    listed = [n.strip() for n in names.split(",") if n.strip()] if names else list(DEFAULT_WIDTHS[family])
    widths = sorted({w.name: w for w in (width(n, group) for n in listed)}.values(), key=lambda w: w.bits)
    wrong = [w.name for w in widths if w.family != family]
    if wrong:
        raise CritlayerError(f"width {', '.join(wrong)} is not a {family} format; {family} takes "
                             f"{', '.join(GGUF_WIDTHS + LLAMACPP_WIDTHS if family == 'gguf' else INT_WIDTHS)}")
    if len(widths) < 2:
        raise CritlayerError(f"a plan needs at least two candidate widths, got {', '.join(listed) or 'none'}")
    return widths
