"""Importance-weighted integer groups: llama.cpp's importance matrix, in critlayer's integer widths.

A linear layer's output error from quantizing its weights is, summed over calibration text, the squared weight error
of each input channel times that channel's mean squared input. ``input_importance`` measures those means (llama.cpp's
imatrix: its diagonal) by one pass over calibration text; ``weighted_groups`` chooses each group's scale and
zero-point to minimise the importance-weighted squared error instead of covering the group's range. The stored
format is torchao's asymmetric groups, unchanged: integers in ``[0, 2**bits)``, a bfloat16 scale and an integer
zero-point per group, dequantized as ``(q - zero) * scale``.
"""

from __future__ import annotations

import torch

from ..common.errors import CritlayerError
from ..models import LanguageModel, running
from ..models.loss import BATCH, text_batches

STEPS = 24  # scales tried per group, from the range's own to a third narrower


def input_importance(lm: LanguageModel, sequences: list[list[int]],
                     modules: list[torch.nn.Module]) -> dict[torch.nn.Module, torch.Tensor]:
    """Each of ``modules``' (linear layers of the blocks) mean squared input per input channel (float32, on the CPU)
    over every real token of ``sequences``; a layer no token reached (an expert never routed to) is left out."""
    if not any(len(s) for s in sequences):
        raise CritlayerError("an importance matrix needs calibration text: there is none")
    sums: dict[torch.nn.Module, torch.Tensor] = {}
    mask: list[torch.Tensor] = []

    def hook(module, args):
        x = args[0].detach().float()
        x = x[mask[0].to(x.device)] if x.shape[:2] == mask[0].shape else x.flatten(0, -2)
        sums[module] = sums.get(module, 0) + x.square().sum(0)

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    tokens = 0
    try:
        with torch.inference_mode():
            for _, batch in text_batches(sequences, BATCH, lm.device):
                mask[:] = [batch["attention_mask"].bool()]
                running.forward_blocks(lm, batch["input_ids"], batch["attention_mask"])
                tokens += int(mask[0].sum())
    finally:
        for h in handles:
            h.remove()
    return {m: (s / tokens).cpu() for m, s in sums.items()}


def weighted_groups(rows: torch.Tensor, importance: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """``rows`` (output rows over input channels) quantized in groups of ``group`` inputs to ``bits`` and
    dequantized, in float32: per group the scale, from a grid between the range's own and a third narrower, whose
    integers, with the zero-point and scale refitted by weighted least squares and then stored (an integer
    zero-point, a bfloat16 scale), leave the least error weighted by ``importance`` (one weight per input channel)."""
    top = 2 ** bits - 1
    w = rows.detach().float().reshape(rows.shape[0], -1, group)
    importance = importance.to(w.device, torch.float32)
    a = importance.reshape(1, -1, group).expand_as(w) + 1e-8 * importance.mean() + 1e-30
    lo, hi = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
    span = (hi - lo).clamp(min=1e-12)
    best, best_error = w, torch.full_like(span, float("inf"))
    for t in torch.linspace(0, top / 2, STEPS):
        scale = span / (top + t)
        zero = (top / 2 - (lo + hi) / 2 / scale).round().clamp(0, top)  # a narrower grid centred on the range
        values = _stored(w, a, scale, zero, top)
        error = (a * (values - w).square()).sum(-1, keepdim=True)
        better = error < best_error
        best, best_error = torch.where(better, values, best), torch.where(better, error, best_error)
    return best.reshape(rows.shape)


def _stored(w: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, top: int) -> torch.Tensor:
    """Integers for ``scale`` and ``zero``, then the zero-point and scale refitted to them by weighted least squares,
    rounded to what is stored, and the integers again: the group's dequantized values."""
    q = (w / scale + zero).round().clamp(0, top)
    s, sq, sqq = a.sum(-1, keepdim=True), (a * q).sum(-1, keepdim=True), (a * q * q).sum(-1, keepdim=True)
    sw, sqw = (a * w).sum(-1, keepdim=True), (a * q * w).sum(-1, keepdim=True)
    det = s * sqq - sq * sq
    fitted = det > 1e-12 * s * sqq
    d = torch.where(fitted, (s * sqw - sq * sw) / torch.where(fitted, det, 1), scale)
    m = torch.where(fitted, (sqq * sw - sq * sqw) / torch.where(fitted, det, 1), -zero * scale)
    d = torch.where(d > 0, d, scale)
    zero = (-m / d).round().clamp(0, top)
    d = d.to(torch.bfloat16).float()
    q = (w / d + zero).round().clamp(0, top)
    return (q - zero) * d
