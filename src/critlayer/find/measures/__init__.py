"""Measures of layer importance, one file each; this registry lists them (a new measure is a file and a line here).

Each measure (``base.Measure``) owns its scores and their directions, what it reads and what it costs,
how it is built from a scan's config, and how a bootstrap replicate recomputes it.
"""

from ...common.errors import CritlayerError
from .ablation import Ablation
from .base import CAPTURE, TEXT, WEIGHTS, Draw, Inputs, Measure
from .cka import Cka, cka_matrix, delta_scores, linear_cka
from .clusters import Clusters
from .gradient import Gradient
from .rows import RowSample, half_weights, resample_rows
from .similarity import BlockSimilarity, Influence, similarity_scores
from .spectral import KS, Spectral, spectral_scores
from .weights import Weights

MEASURES: dict[str, type[Measure]] = {m.name: m for m in (Cka, Influence, Spectral, Clusters, Ablation, Gradient,
                                                           Weights)}
DEFAULT_MEASURES = ("cka", "influence", "spectral")  # data-oblivious and cheap: one pass, no logits

# +1: a high value marks a critical block; -1: a low one does. The consensus and P(critical) are high = critical.
DIRECTION = {**{score: sign for m in MEASURES.values() for score, sign in {**m.scores, **m.extra}.items()},
             "consensus": 1, "p_critical": 1}


def parse_measures(measures: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``default`` is the data-oblivious, one-pass trio; ``all`` every measure."""
    names = [m.strip() for m in (measures.split(",") if isinstance(measures, str) else measures) if m.strip()]
    if names == ["all"]:
        return tuple(MEASURES)
    if names == ["default"]:
        return DEFAULT_MEASURES
    unknown = [m for m in names if m not in MEASURES]
    if unknown or not names:
        raise CritlayerError(f"unknown measure {','.join(unknown) or '(none)'}; "
                             f"choose from {', '.join(MEASURES)}, default or all")
    return tuple(dict.fromkeys(names))


__all__ = ["CAPTURE", "DEFAULT_MEASURES", "DIRECTION", "KS", "MEASURES", "TEXT", "WEIGHTS", "BlockSimilarity", "Draw",
           "Inputs", "Measure", "RowSample", "cka_matrix", "delta_scores", "linear_cka", "parse_measures",
           "half_weights", "resample_rows", "similarity_scores", "spectral_scores"]
