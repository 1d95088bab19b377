"""The paper's spectral view: do a block's top principal components match its neighbours'?

For each block, centre its features and keep the top-K principal-component scores; run CCA
between those of block l and of each neighbour l +- 1, l +- 2; average the canonical
correlations. PC scores U_K S_K span the same space as the left singular vectors U_K, so
the canonical correlations are the singular values of U_K(l)^T U_K(j). U_K comes from the
eigenvectors of the smaller of X X^T and X^T X (no full SVD of the tall feature matrix).
"""

from __future__ import annotations

import numpy as np
import torch

from .cka import centred
from .sample import StoredRows, pick_rows

KS = (1, 3, 10)


def spectral_scores(states: torch.Tensor | StoredRows, ks: tuple[int, ...] = KS, reach: int = 2,
                    rows: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """``spectral_k{K}``: mean canonical correlation with neighbours, per block (low = critical).

    Layers are decomposed one at a time (optionally only ``rows`` of them, repeats allowed), so
    the only copy of the rows is one layer's.
    """
    u = torch.stack([top_left_singular_vectors(centred(pick_rows(layer, rows)), max(ks)) for layer in states])
    n = len(u)
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


def top_left_singular_vectors(x: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` left singular vectors of a ``(rows, hidden)`` matrix, largest first.

    The smaller Gram is multiplied in ``x``'s precision and decomposed in float64.
    """
    rows, hidden = x.shape
    k = min(k, rows, hidden)
    if rows <= hidden:
        return torch.linalg.eigh((x @ x.T).double()).eigenvectors[:, -k:].flip(-1)
    v = torch.linalg.eigh((x.T @ x).double()).eigenvectors[:, -k:].flip(-1)
    u = (x @ v.to(x.dtype)).double()
    return u / u.norm(dim=0, keepdim=True).clamp(min=1e-300)
