"""Measures of layer importance: streaming accumulators and the scores computed from them."""

from .cka import cka_matrix, delta_scores, linear_cka
from .sample import RowSample
from .similarity import BlockSimilarity
from .spectral import KS, spectral_scores

MEASURES = {
    "cka": "linear CKA between block outputs (the L x L matrix) and delta, its mean over a window",
    "influence": "block influence (1 - cosine of block input and output) and angular distance",
    "spectral": "mean canonical correlation of top-K principal components with blocks l+-1, l+-2 (K = 1, 3, 10)",
}

# +1: a high score marks a critical block; -1: a low score does.
DIRECTION = {"delta": -1, "block_influence": 1, "angular_distance": 1, **{f"spectral_k{k}": -1 for k in KS}}

__all__ = ["DIRECTION", "KS", "MEASURES", "BlockSimilarity", "RowSample", "cka_matrix", "delta_scores",
           "linear_cka", "spectral_scores"]
