"""Linear CKA between layers, and the paper's per-layer score delta.

CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with columns centred. For all
layer pairs at once we use the equivalent Gram form, HSIC(l, k) = <K_l, K_k> with
K = Xc Xc^T, as one matrix product over the stacked Grams: no loop over pairs.
"""

from __future__ import annotations

import numpy as np
import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature matrices with the same rows, in float64 (the reference form)."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).square().sum()
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


def cka_matrix(states: torch.Tensor, budget: int = 1 << 24) -> np.ndarray:
    """The L x L linear CKA matrix of ``states`` shaped ``(L, rows, hidden)``.

    The Grams are built a slab of rows at a time (at most ``budget`` float32 entries), so memory
    stays bounded however many rows there are; their products accumulate in float64.
    """
    x = centred(states)
    layers, rows = x.shape[:2]
    slab = max(1, budget // (layers * rows))
    hsic = torch.zeros(layers, layers, dtype=torch.float64, device=x.device)
    for begin in range(0, rows, slab):
        part = torch.matmul(x[:, begin:begin + slab], x.transpose(1, 2)).flatten(1).double()  # rows of the Grams
        hsic += part @ part.T
    norms = hsic.diagonal().sqrt()
    return (hsic / (norms[:, None] * norms[None, :])).clamp(0.0, 1.0).cpu().numpy()


def centred(states: torch.Tensor) -> torch.Tensor:
    """Columns centred per layer, in float32, with means taken in float64 (no float64 copy of the rows)."""
    return states.float() - states.mean(1, keepdim=True, dtype=torch.float64).float()


def delta_scores(cka: np.ndarray, window: int = 2) -> np.ndarray:
    """delta_l: mean CKA(l, j) over |j - l| <= window, self term included, clipped at the ends."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    n = len(cka)
    return np.array([cka[l, max(0, l - window):min(n, l + window + 1)].mean() for l in range(n)])
