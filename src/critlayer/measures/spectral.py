"""The paper's spectral view: do a block's top principal components match its neighbours'?

For each block, centre its features and keep the top-K principal-component scores; run CCA
between those of block l and of each neighbour l +- 1, l +- 2; average the canonical
correlations. PC scores U_K S_K span the same space as the left singular vectors U_K, so
the canonical correlations are the singular values of U_K(l)^T U_K(j).
"""

from __future__ import annotations

import numpy as np
import torch

KS = (1, 3, 10)


def spectral_scores(states: torch.Tensor, ks: tuple[int, ...] = KS, reach: int = 2) -> dict[str, np.ndarray]:
    """``spectral_k{K}``: mean canonical correlation with neighbours, per block (low = critical)."""
    x = states.double()
    x = x - x.mean(1, keepdim=True)
    u = torch.linalg.svd(x, full_matrices=False).U  # (L, rows, min(rows, hidden))
    n = len(x)
    scores = {}
    for k in ks:
        top = u[:, :, :min(k, u.shape[2])]
        total, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for offset in range(1, min(reach, n - 1) + 1):
            corr = torch.linalg.svdvals(top[:-offset].transpose(1, 2) @ top[offset:]).mean(1).cpu()
            total[:-offset] += corr
            total[offset:] += corr
            count[:-offset] += 1
            count[offset:] += 1
        scores[f"spectral_k{k}"] = (total / count.clamp(min=1)).numpy()
    return scores
