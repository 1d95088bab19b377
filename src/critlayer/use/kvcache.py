"""A KV cache whose every attention layer keeps its keys and values at widths of its own: what ``critlayer kv`` plans
and evaluates, and what ``generate`` runs with (``kv_cache``).

The cache is transformers' own (``Cache``, one layer object per decoder layer) with quanto's quantizer (optimum-quanto,
the backend transformers' quantized cache uses; measured more accurate here than HQQ at 2 and 4 bits, and HQQ's
3 bits fail on these layouts). A layer of full precision is transformers' plain layer (sliding where the model's
layer slides). A quantized layer is transformers' quanto layer with KIVI's layout: keys per channel over groups of
``group`` tokens, values per token in groups of ``group`` elements, 2- and 4-bit with a scale and a shift per
group, 8-bit symmetric with a scale per group. The newest ``residual`` tokens (and fewer than ``group`` more) stay
in full precision; older ones are quantized once, a whole number of groups at a time, and never again. A sliding
layer (Gemma 3's) drops quantized chunks that have left its window.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, QuantoQuantizedLayer

from ..common.errors import CritlayerError

BITS = (2, 4, 8, 16)  # 16: kept as computed (full precision)
FULL = 16
SCALE_BITS = 16  # a group's scale and shift are kept in the cache's 16-bit dtype
DEFAULT_PAIRS = "KV2,K4V2,KV4,K8V4,KV8,KV16"  # KVTuner's candidates and full precision


@dataclass(frozen=True, order=True)
class Pair:
    """A layer's key and value widths, in bits."""

    key: int
    value: int

    @property
    def name(self) -> str:
        return f"KV{self.key}" if self.key == self.value else f"K{self.key}V{self.value}"

    def bits(self, group: int) -> float:
        """Bits per cached element (keys and values alike many), a group's scale and shift counted."""
        return (element_bits(self.key, group) + element_bits(self.value, group)) / 2


def element_bits(bits: int, group: int) -> float:
    """Bits one key or value takes at ``bits``: 2 and 4 bits with a scale and a shift per ``group``, 8 with a scale
    per group, full precision as the 16-bit cache holds it."""
    return float(bits) + {2: 2, 4: 2, 8: 1, 16: 0}[bits] * SCALE_BITS / group


def parse_pair(name: str) -> Pair:
    """``KV4`` (keys and values at 4 bits) or ``K4V2`` into a pair; anything else refused in one line."""
    match = re.fullmatch(r"KV(\d+)|K(\d+)V(\d+)", name.strip().upper())
    if not match:
        raise CritlayerError(f"unknown KV width {name!r}: write KV4 (keys and values at 4 bits) or K4V2")
    key, value = (int(match[1]),) * 2 if match[1] else (int(match[2]), int(match[3]))
    for bits in (key, value):
        if bits not in BITS:
            raise CritlayerError(f"{name}: quanto keeps a cache at {', '.join(map(str, BITS[:-1]))} bits or full "
                                 f"precision (16), not {bits}")
    return Pair(key, value)


def parse_pairs(text: str | None) -> list[Pair]:
    """The candidate pairs of a comma list (default KVTuner's and full precision), fewest bits first."""
    pairs = sorted({parse_pair(name) for name in (text or DEFAULT_PAIRS).split(",") if name.strip()},
                   key=lambda p: (p.key + p.value, p.key))
    if len(pairs) < 2:
        raise CritlayerError("give at least two KV widths to choose between")
    return pairs


def attention_layers(config) -> list[int | None]:
    """Every decoder layer's sliding window (None: full attention), from the model's config; a layer of any other
    kind (linear attention, recurrent state, a cache shared with another layer) refused in one line."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n = text.num_hidden_layers
    kinds = getattr(text, "layer_types", None) or (
        ["sliding_attention"] * n if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
        else ["full_attention"] * n)
    other = sorted(set(kinds) - {"full_attention", "sliding_attention"})
    if other:
        raise CritlayerError(f"{text.model_type} has {', '.join(other)} layers; critlayer kv plans a cache of full "
                             "and sliding attention layers only")
    if getattr(text, "num_kv_shared_layers", 0):
        raise CritlayerError(f"{text.model_type} shares its KV cache between layers; critlayer kv plans one per layer")
    return [text.sliding_window if kind == "sliding_attention" else None for kind in kinds]


def _quanto():
    """optimum-quanto, under the transformers whose cache layers this one extends (5 and later)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise CritlayerError(f"critlayer kv builds on the cache layers of transformers 5 and later; this is "
                             f"{transformers.__version__}")
    try:
        from optimum import quanto
    except ImportError:
        raise CritlayerError("a quantized KV cache needs optimum-quanto: pip install optimum-quanto") from None
    return quanto


def _quantize(tensor: torch.Tensor, bits: int, axis: int, group: int):
    """``tensor`` quantized by quanto in groups of ``group`` along ``axis`` (-1: per channel over tokens, 0: per
    token), or kept as it is at full precision."""
    if bits == FULL:
        return tensor
    quanto = _quanto()
    from optimum.quanto.tensor.grouped import group as grouped

    if bits == 8:  # quanto's 8 bits take one scale per row: give it a row per group
        rows = grouped(tensor, axis, group)
        scale = quanto.absmax_scale(rows, quanto.qint8, axis)
        return quanto.quantize_weight(rows, quanto.qint8, axis, scale), axis, tensor.shape
    qtype = quanto.qint2 if bits == 2 else quanto.qint4
    scale, shift = quanto.MaxOptimizer()(tensor, qtype, axis, group)
    return quanto.quantize_weight(tensor, qtype, axis, scale, shift, group)


def _dequantize(stored) -> torch.Tensor:
    if isinstance(stored, tuple):  # 8 bits: rows per group, put back
        from optimum.quanto.tensor.grouped import ungroup

        rows, axis, shape = stored
        return ungroup(rows.dequantize(), axis, shape)
    return stored if type(stored) is torch.Tensor else stored.dequantize()


def stored_bytes(value) -> int:
    """The bytes a cached tensor takes: a quantized one's packed data, scales and shifts."""
    if isinstance(value, tuple):
        return stored_bytes(value[0])
    if hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return sum(stored_bytes(getattr(value, name)) for name in names)
    return value.numel() * value.element_size()


class _Chunk:
    """Keys and values of ``tokens`` consecutive tokens, quantized once."""

    def __init__(self, keys, values, tokens: int):
        self.keys, self.values, self.tokens = keys, values, tokens


class QuantizedKVLayer(QuantoQuantizedLayer):
    """A transformers cache layer holding keys and values at ``pair``'s widths (see the module)."""

    def __init__(self, pair: Pair, *, group: int, residual: int, sliding_window: int | None):
        _quanto()
        super().__init__(nbits=4, axis_key=-1, axis_value=0, q_group_size=group, residual_length=residual)
        self.pair, self.sliding_window, self.chunks = pair, sliding_window, []
        self.is_sliding = sliding_window is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        visible = self.visible() + key_states.shape[-2]
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([*(_dequantize(c.keys) for c in self.chunks), self.keys, key_states], dim=-2)
        values = torch.cat([*(_dequantize(c.values) for c in self.chunks), self.values, value_states], dim=-2)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.sliding_window is not None:
            self._forget()
        group = self.q_group_size
        ready = (self.keys.shape[-2] - self.residual_length) // group * group
        if ready > 0:
            self.chunks.append(_Chunk(_quantize(self.keys[..., :ready, :].contiguous(), self.pair.key, -1, group),
                                      _quantize(self.values[..., :ready, :].contiguous(), self.pair.value, 0, group),
                                      ready))
            self.keys, self.values = self.keys[..., ready:, :].contiguous(), self.values[..., ready:, :].contiguous()
        return keys[..., -visible:, :], values[..., -visible:, :]

    def _forget(self) -> None:
        """Drop what a sliding layer never reads again (the tokens before its last ``sliding_window - 1``): whole
        quantized chunks, then, with none left, the oldest full-precision tokens, before they are quantized."""
        while self.chunks and self.held() - self.chunks[0].tokens >= self.sliding_window - 1:
            self.chunks.pop(0)
        excess = self.held() - (self.sliding_window - 1)
        if not self.chunks and excess > 0:
            self.keys, self.values = self.keys[..., excess:, :], self.values[..., excess:, :]

    def visible(self) -> int:
        """Tokens held that the next tokens attend to: a sliding layer's last ``sliding_window - 1``, as transformers'
        own sliding layer keeps them (attention then runs over the same shapes as in full precision)."""
        return self.held() if self.sliding_window is None else min(self.held(), self.sliding_window - 1)

    def held(self) -> int:
        """Tokens this layer holds, quantized and in full precision."""
        recent = self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0
        return sum(c.tokens for c in self.chunks) + recent

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers before 5.10 passes the cache positions
            query_length = query_length.shape[0]
        visible = self.visible()
        return visible + query_length, self.cumulative_length - visible

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def reset(self) -> None:
        super().reset()
        self.chunks = []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise CritlayerError("a critlayer KV cache does not reorder beams: generate without beam search")

    def nbytes(self) -> int:
        """What this layer holds now, in bytes."""
        recent = stored_bytes(self.keys) + stored_bytes(self.values) if self.is_initialized else 0
        return sum(stored_bytes(c.keys) + stored_bytes(c.values) for c in self.chunks) + recent


def build_cache(config, plan: list[Pair], *, group: int = 64, residual: int = 128):
    """A fresh cache for a model of ``config`` with ``plan``'s pair at every decoder layer."""
    windows = attention_layers(config)
    if len(plan) != len(windows):
        raise CritlayerError(f"the plan gives {len(plan)} layers widths; the model has {len(windows)}")
    layers = []
    for pair, window in zip(plan, windows):
        if pair == Pair(FULL, FULL):
            layers.append(DynamicLayer() if window is None else DynamicSlidingWindowLayer(sliding_window=window))
        else:
            layers.append(QuantizedKVLayer(pair, group=group, residual=residual, sliding_window=window))
    return Cache(layers=layers)


def cache_keyword(model: torch.nn.Module) -> str:
    """What the model's forward calls its cache: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_bytes(cache) -> int:
    """What a cache holds now, in bytes (quantized layers by their packed data, scales and shifts)."""
    return sum(layer.nbytes() if hasattr(layer, "nbytes") else
               stored_bytes(layer.keys) + stored_bytes(layer.values) for layer in cache.layers if layer.is_initialized)
