"""Choose the critical layers from a per-layer score.

Automatic rule (``band``): split the score profile of the eligible blocks into
piecewise-constant segments by optimal change-point detection (least squares with a BIC
penalty, solved exactly by dynamic programming); the critical layers are the segment whose
mean is most critical (lowest delta). With ``k`` the rule is ``top-k``: the k most critical
eligible blocks, contiguous or not.

Edge blocks (the first and last ``window``) have clipped windows and sit next to the
embeddings or the head, so delta is low there for other reasons; like the paper, the rule
skips them unless ``edges=True``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import CritlayerError


@dataclass
class Selection:
    """The critical blocks, the rule that chose them and why."""

    critical: list[int]
    rule: str
    score: str
    params: dict
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def eligible_blocks(num_layers: int, window: int, edges: bool) -> list[int]:
    if edges or num_layers <= 2 * window + 1:
        return list(range(num_layers))
    return list(range(window, num_layers - window))


def rank_blocks(criticality: np.ndarray, eligible: list[int]) -> list[int]:
    """Eligible blocks from most to least critical, then the others (ties by index)."""
    rest = [i for i in range(len(criticality)) if i not in set(eligible)]
    by = lambda blocks: sorted(blocks, key=lambda i: (-criticality[i], i))  # noqa: E731
    return by(eligible) + by(rest)


def select_critical(score: np.ndarray, *, direction: int = -1, score_name: str = "delta", k: int | None = None,
                    window: int = 2, edges: bool = False) -> Selection:
    """Pick the critical blocks; ``direction`` is -1 when a low score marks a critical block."""
    score = np.asarray(score, dtype=float)
    n = len(score)
    criticality = direction * score
    eligible = eligible_blocks(n, window, edges)
    params = {"window": window, "edges": edges, "eligible": eligible}
    if k is not None:
        if not 1 <= k <= n:
            raise CritlayerError(f"--k {k} is outside 1..{n}, the number of layers")
        chosen = sorted(rank_blocks(criticality, eligible)[:k])
        return Selection(chosen, "top-k", score_name, {**params, "k": k},
                         f"the {k} blocks with the most critical {score_name}"
                         + ("" if k <= len(eligible) else " (more than the eligible blocks: edges added)"))
    values = criticality[eligible]
    segments = segment_profile(values)
    best = max(segments, key=lambda seg: (values[seg[0]:seg[1]].mean(), -seg[0]))
    chosen = eligible[best[0]:best[1]]
    reason = (f"change-point segmentation of {score_name} over blocks {eligible[0]}-{eligible[-1]} found "
              f"{len(segments)} segment(s); blocks {chosen[0]}-{chosen[-1]} form the most critical one")
    return Selection(chosen, "band", score_name, {**params, "segments": [[eligible[a], eligible[b - 1]] for a, b in segments]},
                     reason)


def segment_profile(values: np.ndarray, penalty: float | None = None) -> list[tuple[int, int]]:
    """Optimal piecewise-constant segmentation of ``values`` as half-open (start, end) pairs.

    Minimises the within-segment squared error plus ``penalty`` per segment. The default
    penalty is BIC-like, 2 sigma^2 log n, with the noise sigma estimated robustly from the
    median absolute difference of neighbouring values.
    """
    n = len(values)
    if n < 3:
        return [(0, n)]
    if penalty is None:
        sigma = np.median(np.abs(np.diff(values))) / (0.6745 * np.sqrt(2)) + 1e-12
        penalty = 2.0 * sigma ** 2 * np.log(n)
    csum, csq = np.concatenate([[0], np.cumsum(values)]), np.concatenate([[0], np.cumsum(values ** 2)])

    def cost(a: int, b: int) -> float:
        return csq[b] - csq[a] - (csum[b] - csum[a]) ** 2 / (b - a)

    best = np.full(n + 1, np.inf)
    best[0], back = -penalty, np.zeros(n + 1, dtype=int)
    for end in range(1, n + 1):
        options = [best[s] + cost(s, end) + penalty for s in range(end)]
        back[end] = int(np.argmin(options))
        best[end] = options[back[end]]
    bounds, end = [], n
    while end > 0:
        bounds.append((back[end], end))
        end = back[end]
    return bounds[::-1]
