"""The paper's spectral view: do a block's top principal components match its neighbours'?

For each block, centre its features and keep the top-K principal-component scores; run CCA
between those of block l and of each neighbour l +- 1, l +- 2; average the canonical
correlations. PC scores U_K S_K span the same space as the left singular vectors U_K, so
the canonical correlations are the singular values of U_K(l)^T U_K(j). U_K comes from the top
eigenvectors of the smaller of X X^T and X^T X, found by block Krylov iteration until they
converge (no full SVD of the tall feature matrix, no full eigendecomposition).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import CAPTURE, Inputs, Measure
from .cka import centred
from .rows import StoredRows, pick_rows

KS = (1, 3, 10)
# A Ritz pair has converged when ||C v - theta v|| is below this times the top eigenvalue: in float32 the scores
# then agree with a float64 eigendecomposition's to rounding (docs/performance.md, tuned constants).
RESIDUAL = {torch.float32: 1e-6, torch.float64: 1e-10}
# Below this many blocks' worth of dimension a full eigendecomposition is cheaper than block Lanczos.
LANCZOS_BLOCKS = 32


def spectral_scores(states: torch.Tensor | StoredRows, ks: tuple[int, ...] = KS, reach: int = 2,
                    rows: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """``spectral_k{K}``: mean canonical correlation with neighbours, per block (low = critical).

    Layers are decomposed one at a time (optionally only ``rows`` of them, repeats allowed), so
    the only copy of the rows is one layer's. Their vectors go into one tensor allocated up front:
    small tensors kept between large temporaries would pin the C allocator's heap.
    """
    n, stored, hidden = states.shape
    used = stored if rows is None else len(rows)
    u = torch.empty(n, used, min(max(ks), used, hidden), dtype=torch.float64, device=states.device)
    for i, layer in enumerate(states):
        u[i] = top_left_singular_vectors(centred(pick_rows(layer, rows)), max(ks))
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

    From the smaller Gram, in ``x``'s precision: the rows' own (a small one) decomposed in float64,
    or the features' and then ``U = X V`` normalised.
    """
    rows, hidden = x.shape
    k = min(k, rows, hidden)
    if rows <= hidden:
        return top_eigenvectors((x @ x.T).double(), k)
    u = (x @ top_eigenvectors(x.T @ x, k)).double()
    return u / u.norm(dim=0, keepdim=True).clamp(min=1e-300)


def top_eigenvectors(c: torch.Tensor, k: int, check_every: int = 3) -> torch.Tensor:
    """The eigenvectors of the ``k`` largest eigenvalues of a symmetric PSD matrix, largest first.

    Block Lanczos from a seeded random block, fully reorthogonalised, in ``c``'s dtype: the Krylov
    space grows a block at a time, and every ``check_every`` blocks its top ``k`` Ritz pairs are done
    if their residuals are below ``RESIDUAL`` times the largest Ritz value. A full eigendecomposition
    takes over if the space would grow past half the dimension or stops growing, and outright for
    small matrices.
    """
    size = c.shape[0]
    if size < LANCZOS_BLOCKS * k:
        return torch.linalg.eigh(c).eigenvectors[:, -k:].flip(-1)
    generator = torch.Generator(device=c.device).manual_seed(0)
    basis, images = c.new_empty(size // 2, size), c.new_empty(size // 2, size)  # row i: vector i, and c times it
    basis[:k] = torch.linalg.qr(torch.randn(size, k, generator=generator, dtype=c.dtype, device=c.device)).Q.T
    scale, tolerance = c.diagonal().sum(), RESIDUAL[c.dtype]
    for end in range(k, size // 2 + 1, k):
        q, new = basis[:end], slice(end - k, end)
        torch.mm(basis[new], c, out=images[new])  # c is symmetric
        if (end // k) % check_every == 0:
            theta, w = torch.linalg.eigh(q @ images[:end].T)
            theta, w = theta[-k:], w[:, -k:]
            v = q.T @ w
            if (images[:end].T @ w - v * theta).norm(dim=0).max() <= tolerance * theta[-1].abs():
                return v.flip(-1)
        if end + k > size // 2:
            break
        fresh = images[new].T - q.T @ (q @ images[new].T)
        fresh -= q.T @ (q @ fresh)  # twice is enough (Kahan)
        block, r = torch.linalg.qr(fresh)
        if r.diagonal().abs().min() <= tolerance * scale:
            break  # the space is (nearly) invariant
        basis[end:end + k] = block.T
    return torch.linalg.eigh(c).eigenvectors[:, -k:].flip(-1)


class Spectral(Measure):
    name = "spectral"
    description = ("mean canonical correlation of top-K principal components with blocks l+-1, l+-2 "
                   "(K = 1, 3, 10)")
    cost = "shares one forward pass of the probes through the blocks (no logits); one small eigendecomposition per block"
    scores = {f"spectral_k{k}": -1 for k in KS}
    reads = CAPTURE

    def compute(self, inputs: Inputs) -> dict[str, np.ndarray]:
        self.outputs = inputs.sample[1:]
        return spectral_scores(self.outputs)

    def resample(self, draw) -> dict[str, np.ndarray]:
        return spectral_scores(self.outputs, rows=draw.rows)
