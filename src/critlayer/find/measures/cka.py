"""Linear CKA between layers, and the paper's per-layer score delta.

CKA(X, Y) = HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y)) with linear kernels K = X X^T. The plain estimator,
<Kc, Lc> with K centred, is biased upward when there are fewer rows than features (it reads noise as
shared structure), and the bias shrinks as rows are added, so the same model would look different with
more probes. critlayer uses the unbiased HSIC estimator (Song et al., 2012) instead: its expectation does
not depend on the number of rows, so a scan of 64 probes and one of 512 estimate the same thing. For all
layer pairs at once the Gram products <K_l, K_k> come from one product of the stacked Grams, summed over
blocks of rows so that no Gram is ever whole.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import CAPTURE, Inputs, Measure
from .rows import StoredRows, read_rows

# float32 entries of every layer's rows read at once (8 MB): larger slabs hold more memory and are no faster, smaller
# ones are slower (docs/performance.md, tuned constants).
SLAB_ENTRIES = 1 << 21


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature matrices with the same rows (at least 4), in float64: the reference form."""
    grams = torch.stack([(m.double() - m.double().mean(0)) @ (m.double() - m.double().mean(0)).T for m in (x, y)])
    products = grams.flatten(1) @ grams.flatten(1).T
    return float(cka_from_hsic(hsic_matrix(products, grams.diagonal(dim1=1, dim2=2), grams.sum((1, 2)),
                                         grams.sum(2)))[0, 1])


def debiased_hsic(products: torch.Tensor, diagonals: torch.Tensor, sums: torch.Tensor, row_sums: torch.Tensor,
                  a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC estimator (up to the common factor 1 / (n (n - 3))) of the pairs of Grams ``(a[i], b[i])``
    over ``n`` rows, from their products ``<K_a, K_b>`` and each Gram's diagonal (L x n), sum ``1' K 1`` (L) and
    row sums ``K 1`` (L x n)."""
    n = diagonals.shape[1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 rows, got {n}")
    off = products - (diagonals[a] * diagonals[b]).sum(1)  # <K~_a, K~_b>, K~ the Gram with its diagonal zeroed
    sums = sums - diagonals.sum(1)
    row_sums = row_sums - diagonals
    return off + sums[a] * sums[b] / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (row_sums[a] * row_sums[b]).sum(1)


def hsic_matrix(products: torch.Tensor, diagonals: torch.Tensor, sums: torch.Tensor,
              row_sums: torch.Tensor) -> torch.Tensor:
    """``debiased_hsic`` of every pair of the L Grams, from their L x L products: an L x L matrix."""
    layers = len(products)
    a, b = (index.flatten() for index in torch.meshgrid(torch.arange(layers), torch.arange(layers), indexing="ij"))
    return debiased_hsic(products.flatten(), diagonals, sums, row_sums, a, b).view(layers, layers)


def cka_from_hsic(hsic: torch.Tensor) -> np.ndarray:
    """CKA from a symmetric matrix of HSIC estimates, clipped to [0, 1] (an unbiased estimate may stray past
    either end by its noise)."""
    hsic = (hsic + hsic.T) / 2
    norms = hsic.diagonal().clamp(min=0).sqrt()
    return (hsic / (norms[:, None] * norms[None, :])).clamp(0.0, 1.0).cpu().numpy()


def cka_matrix(states: torch.Tensor | StoredRows, rows: torch.Tensor | None = None,
               budget: int = SLAB_ENTRIES) -> np.ndarray:
    """The L x L linear CKA matrix of ``states`` shaped ``(L, rows, hidden)`` (or of its ``rows``, repeats allowed).

    The Grams are built block by block: slabs of at most ``budget`` float32 entries are read (in
    row order: CKA does not depend on it), centred and multiplied in pairs; each pair's block of
    every layer's Gram gives its share of every HSIC in one float32 product, and the shares are
    summed in float64. Only the upper blocks are built (the Grams are symmetric). Nothing the size
    of the rows is ever held, so memory stays the same however many rows there are.
    """
    layers, total, hidden = states.shape
    n = total if rows is None else len(rows)
    if rows is not None:
        rows = rows.sort().values  # sorted, each slab of a file-backed sample is one short read per layer
    step = min(max(1, budget // (layers * hidden)), max(n, 1))
    parts = [slice(begin, begin + step) for begin in range(0, n, step)]

    slabs = torch.empty(2, layers, step, hidden, device=states.device)  # the two in hand, reused: no heap churn

    def read(part: slice, slot: int = 0) -> torch.Tensor:
        out = slabs[slot, :, :len(range(n)[part])]
        return read_rows(states, part, out) if rows is None else out.copy_(states[:, rows[part].to(states.device)])

    mean = torch.zeros(layers, 1, hidden, dtype=torch.float64, device=states.device)
    for part in parts:
        mean += read(part).sum(1, keepdim=True)  # a slab's sum in float32 (a float64 one copies the slab), all in float64
    mean = (mean / n).float()
    hsic = torch.zeros(layers, layers, dtype=torch.float64, device=states.device)
    diagonals = torch.zeros(layers, n, dtype=torch.float64, device=states.device)
    for i, part in enumerate(parts):
        a = read(part, 0).sub_(mean)
        diagonals[:, part] = a.square().sum(-1).double()
        for j in range(i, len(parts)):
            b = a if j == i else read(parts[j], 1).sub_(mean)
            gram = torch.bmm(a, b.transpose(1, 2)).flatten(1)  # a block of every layer's Gram
            hsic.add_((gram @ gram.T).double(), alpha=1.0 if j == i else 2.0)  # off-diagonal blocks count twice
    zeros = torch.zeros_like(diagonals)
    return cka_from_hsic(hsic_matrix(hsic, diagonals, zeros[:, 0], zeros))


def centred(x: torch.Tensor) -> torch.Tensor:
    """Columns of a ``(rows, hidden)`` matrix centred, in float32, with means taken in float64."""
    return x.float() - x.mean(-2, keepdim=True, dtype=torch.float64).float()


def delta_scores(cka: np.ndarray, window: int = 2) -> np.ndarray:
    """delta_l: mean CKA(l, j) over |j - l| <= window, self term included, clipped at the ends."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    n = len(cka)
    return np.array([cka[l, max(0, l - window):min(n, l + window + 1)].mean() for l in range(n)])


class Cka(Measure):
    name = "cka"
    description = "linear CKA between block outputs (the L x L matrix) and delta, its mean over a window"
    cost = "shares one forward pass of the probes through the blocks (no logits)"
    scores = {"delta": -1}
    reads = CAPTURE

    def compute(self, inputs: Inputs) -> dict[str, np.ndarray]:
        self.outputs = inputs.sample[1:]
        self.matrix = cka_matrix(self.outputs)
        return {"delta": delta_scores(self.matrix, self.config.window)}

    def resample(self, draw) -> dict[str, np.ndarray]:
        return {"delta": delta_scores(cka_matrix(self.outputs, draw.rows), self.config.window)}
