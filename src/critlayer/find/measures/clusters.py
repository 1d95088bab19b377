"""Token-cluster drift: how far each block moves tokens away from the groups they formed at the embeddings.

At every layer the sampled rows (unit-normalised, so direction counts, not norm) are clustered
with seeded k-means; ``token_nmi`` is the normalised mutual information between a block's
clusters and the embedding layer's (1 = the same grouping, 0 = unrelated). It falls with depth
as tokens leave their lexical groups; ``token_nmi_drop``, the fall across the block itself
(NMI before the block minus after, the embeddings counting as 1), is the score that marks
critical blocks: high = the block reorganises the tokens most.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import CAPTURE, Inputs, Measure
from .rows import StoredRows

CLUSTERS = 16


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iterations: int = 50) -> torch.Tensor:
    """Cluster labels of the rows of ``x`` by Lloyd's k-means from a seeded k-means++ start, on the CPU whatever
    device the rows come from: its seeded generator is the CPU's, and the labels are then the same on any device."""
    x = x.double().cpu()
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):
        distance = torch.cdist(x, centres).min(1).values.square()
        if distance.sum() <= 0:
            break
        centres = torch.cat([centres, x[torch.multinomial(distance / distance.sum(), 1, generator=g)]])
    labels = torch.cdist(x, centres).argmin(1)
    for _ in range(iterations):
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=len(centres)).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        new = torch.cdist(x, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information of two labelings, I(a; b) / mean(H(a), H(b)); 1 if both are constant."""
    _, a = np.unique(np.asarray(a), return_inverse=True)
    _, b = np.unique(np.asarray(b), return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    entropy = lambda p: -np.sum(p[p > 0] * np.log(p[p > 0]))  # noqa: E731
    ha, hb = entropy(pa), entropy(pb)
    if ha + hb == 0:
        return 1.0
    nz = joint > 0
    mutual = np.sum(joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz]))
    return float(max(0.0, mutual) / ((ha + hb) / 2))


class TokenClusters:
    """k-means labels of the sampled rows at every layer (index 0: the embeddings), fitted once.

    ``scores(rows)`` gives the NMI scores over the given rows (all of them by default); a bootstrap
    passes resampled row indices and keeps the labels.
    """

    def __init__(self, states: torch.Tensor | StoredRows, k: int = CLUSTERS, seed: int = 0):
        k = max(2, min(k, states.shape[1] // 4))
        self.k = k
        self.labels = np.stack([kmeans(torch.nn.functional.normalize(layer.double(), dim=-1), k, seed).cpu().numpy()
                                for layer in states])  # a layer at a time: one layer's copy of the rows

    def scores(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        labels = self.labels if rows is None else self.labels[:, rows]
        with_embeddings = np.array([nmi(layer, labels[0]) for layer in labels])  # index 0: 1 by definition
        return {"token_nmi": with_embeddings[1:], "token_nmi_drop": with_embeddings[:-1] - with_embeddings[1:]}


class Clusters(Measure):
    name = "clusters"
    description = "NMI of k-means token clusters at each block with those at the embeddings, and its drop across the block"
    cost = "shares one forward pass of the probes through the blocks (no logits); k-means per block"
    scores = {"token_nmi_drop": 1}
    extra = {"token_nmi": -1}
    reads = CAPTURE

    def compute(self, inputs: Inputs) -> dict[str, np.ndarray]:
        self.clusters = TokenClusters(inputs.sample, seed=self.config.seed)
        self.details["clusters_k"] = self.clusters.k
        return self.clusters.scores()

    def resample(self, draw) -> dict[str, np.ndarray]:
        return self.clusters.scores(draw.rows.numpy())
