"""Weight spectra: how much of each block's weights stands above the Marchenko-Pastur noise bound.

For an m x n matrix (m >= n) of i.i.d. noise with variance sigma^2, the eigenvalues of
W^T W / m follow the Marchenko-Pastur law with ratio beta = n / m, so the singular values
stay below sigma (sqrt(m) + sqrt(n)). sigma is estimated robustly from the median singular
value (the median of the law, as in Gavish and Donoho), and a matrix's signal-to-noise is the
energy of its singular values above the bound over the energy of those below: near 0 for
noise, large for a strong low-rank signal (the idea of Spectrum, Hartford et al. 2024). A
block's score is the mean over its weight matrices. High = critical (Spectrum trains those).

With ``--stream`` the weights are read block by block from the model's safetensors files,
never the whole model at once; otherwise the loaded parameters are scored.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache

import numpy as np
import torch

from ...models import LanguageModel
from .base import WEIGHTS, Inputs, Measure


@lru_cache(maxsize=64)
def mp_median(beta: float, steps: int = 4096) -> float:
    """Median of the Marchenko-Pastur law with ratio ``beta`` in (0, 1] and unit variance."""
    lo, hi = (1 - np.sqrt(beta)) ** 2, (1 + np.sqrt(beta)) ** 2
    # x = lo + (hi - lo)(1 - cos theta)/2 turns the density's edge singularities into a smooth integrand
    x_of = lambda theta: lo + (hi - lo) * (1 - np.cos(theta)) / 2  # noqa: E731
    edges = np.linspace(0.0, np.pi, steps + 1)
    mids = (edges[1:] + edges[:-1]) / 2
    mass = ((hi - lo) / 2 * np.sin(mids)) ** 2 / (2 * np.pi * beta * x_of(mids)) * (np.pi / steps)
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    return float(np.interp(0.5 * cdf[-1], cdf, x_of(edges)))


def matrix_snr(matrix: torch.Tensor) -> float:
    """Energy above the Marchenko-Pastur bound over energy below it, sigma from the median singular value."""
    s = torch.linalg.svdvals(matrix.detach().double().cpu()).numpy()
    m, n = max(matrix.shape), min(matrix.shape)
    sigma = np.median(s) / np.sqrt(m * mp_median(n / m))
    bound = sigma * (np.sqrt(m) + np.sqrt(n))
    energy = s ** 2
    noise = energy[s <= bound].sum()
    return float(energy[s > bound].sum() / noise) if noise > 0 else float("inf")


def _is_matrix(tensor_shape) -> bool:
    return len(tensor_shape) == 2 and min(tensor_shape) > 1


def weight_snr(lm: LanguageModel) -> tuple[np.ndarray, str]:
    """Per block, the mean signal-to-noise of its weight matrices; and where the weights were read.

    A model loaded whole is scored on the weights in memory (what a user may have changed); in
    block-by-block mode each block is read from its safetensors files and released in turn.
    """
    scores = []
    for index, block in enumerate(lm.blocks):
        with lm.weights.loaded(block, f"{lm.blocks_path}.{index}.") if lm.streamed else nullcontext():
            matrices = [p for p in block.parameters() if _is_matrix(p.shape)]
            scores.append(np.mean([matrix_snr(m) for m in matrices]) if matrices else np.nan)
    return np.array(scores), "safetensors, block by block" if lm.streamed else "loaded parameters"


class Weights(Measure):
    name = "weights"
    description = "signal-to-noise of each block's weight matrices against the Marchenko-Pastur bound"
    cost = "one SVD per weight matrix (read block by block with --stream); no forward"
    scores = {"weight_snr": 1}
    reads = WEIGHTS
    resampled = False

    def compute(self, inputs: Inputs) -> dict[str, np.ndarray]:
        scores, self.details["weights_read_from"] = weight_snr(inputs.lm)
        return {"weight_snr": scores}
