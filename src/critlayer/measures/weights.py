"""Weight spectra: how much of each block's weights stands above the Marchenko-Pastur noise bound.

For an m x n matrix (m >= n) of i.i.d. noise with variance sigma^2, the eigenvalues of
W^T W / m follow the Marchenko-Pastur law with ratio beta = n / m, so the singular values
stay below sigma (sqrt(m) + sqrt(n)). sigma is estimated robustly from the median singular
value (the median of the law, as in Gavish and Donoho), and a matrix's signal-to-noise is the
energy of its singular values above the bound over the energy of those below: near 0 for
noise, large for a strong low-rank signal (the idea of Spectrum, Hartford et al. 2024). A
block's score is the mean over its weight matrices. High = critical (Spectrum trains those).

Weights are read block by block from the model's safetensors files (``safe_open``), never
the whole model at once; a model without such files uses its loaded parameters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..models import LanguageModel


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


def safetensors_blocks(folder: str | Path, blocks_path: str, num_layers: int) -> Iterator[list[torch.Tensor]]:
    """Each block's weight matrices, read from the folder's safetensors files one block at a time."""
    from safetensors import safe_open

    where: dict[int, list[tuple[Path, str]]] = defaultdict(list)
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                head, _, rest = key.removeprefix(f"{blocks_path}.").partition(".")
                if key.startswith(f"{blocks_path}.") and head.isdigit() and _is_matrix(f.get_slice(key).get_shape()):
                    where[int(head)].append((file, key))
    for index in range(num_layers):
        tensors = []
        for file, key in where[index]:
            with safe_open(file, framework="pt") as f:
                tensors.append(f.get_tensor(key))
        yield tensors


def model_folder(lm: LanguageModel) -> Path | None:
    """The local folder the model was loaded from, when it holds safetensors files with its blocks."""
    folder = Path(getattr(lm.model.config, "_name_or_path", "") or "")
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return None
    return folder


def weight_snr(lm: LanguageModel) -> tuple[np.ndarray, str]:
    """Per block, the mean signal-to-noise of its weight matrices; and where the weights were read."""
    folder = model_folder(lm)
    blocks = safetensors_blocks(folder, lm.blocks_path, lm.num_layers) if folder else None
    source = f"safetensors in {folder}" if folder else "loaded parameters"
    scores = []
    for index, block in enumerate(lm.blocks):
        matrices = next(blocks) if blocks else []
        if not matrices:  # no file, or the file names the block otherwise
            matrices, source = [p for p in block.parameters() if _is_matrix(p.shape)], "loaded parameters"
        scores.append(np.mean([matrix_snr(m) for m in matrices]) if matrices else np.nan)
    return np.array(scores), source
