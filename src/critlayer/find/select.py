"""Choose the critical layers from a per-layer score.

Automatic rule (``band``): the critical layers are the band(s) around the most prominent
valleys of the score profile (for delta: the sharpest dips below the surrounding blocks).
A valley is a strict local minimum of the eligible profile; its prominence is how far it
lies below the lower of the two highest points that separate it from any deeper block;
its band is the contiguous run of blocks below half that prominence. Every valley with at
least half the largest prominence is kept. With no valley (a profile that only rises
or falls) no block is taken. With ``k`` the rule is ``top-k``: the k most critical eligible
blocks, contiguous or not.

Edge blocks (the first and last ``window``) have clipped windows and sit next to the
embeddings or the head, so delta is low there for other reasons; like the paper, the rule
skips them unless ``edges=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..common.errors import CritlayerError
from .measures import DIRECTION

# Valleys at least this share of the deepest one's prominence are kept. A lower cut can sit inside the spread of a
# shallow second valley's depth between probe sets, and the answer then moves with the probes
# (docs/method/scan.md, the band rule; CHANGELOG.md).
MIN_RELATIVE_PROMINENCE = 0.5


@dataclass
class Valley:
    """A valley of the criticality profile: its deepest block, its prominence and its band (first, last block)."""

    block: int
    prominence: float
    band: tuple[int, int]

    def to_json(self) -> dict:
        return {"block": self.block, "prominence": round(self.prominence, 6), "band": list(self.band)}


@dataclass
class Selection:
    """The critical blocks, the rule that chose them (``band`` or ``top-k``) on which score, and why.

    ``eligible`` are the blocks the rule may pick (all, or all but the ``window`` blocks at each edge).
    """

    critical: list[int]
    rule: str
    score: str
    reason: str
    window: int
    edges: bool
    eligible: list[int]
    k: int | None = None
    valleys: list[Valley] | None = None  # the band rule's, every one found
    min_relative_prominence: float = MIN_RELATIVE_PROMINENCE  # the band rule's, as it was when it chose

    def to_json(self) -> dict:
        params = {"window": self.window, "edges": self.edges, "eligible": self.eligible}
        if self.k is not None:
            params["k"] = self.k
        if self.valleys is not None:
            params |= {"min_relative_prominence": self.min_relative_prominence,
                       "valleys": [v.to_json() for v in self.valleys]}
        return {"critical": self.critical, "rule": self.rule, "score": self.score, "params": params,
                "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict, num_layers: int) -> "Selection":
        params = data.get("params", {})
        valleys = params.get("valleys")
        return cls(data["critical"], data["rule"], data["score"], data.get("reason", ""), params.get("window", 2),
                   params.get("edges", False), params.get("eligible", list(range(num_layers))), params.get("k"),
                   None if valleys is None else [Valley(v["block"], v["prominence"], tuple(v["band"]))
                                                 for v in valleys],
                   params.get("min_relative_prominence", MIN_RELATIVE_PROMINENCE))


def eligible_blocks(num_layers: int, edge: int) -> list[int]:
    """Every block but the ``edge`` blocks at each end (every block where that would leave at most one): what a
    selection (``edge`` the window) or a removal (``edge`` 1) may pick."""
    if num_layers <= 2 * edge + 1:
        return list(range(num_layers))
    return list(range(edge, num_layers - edge))


def widest_window(num_layers: int) -> int:
    """The widest delta window a model of ``num_layers`` blocks holds: the middle block's window then spans the
    whole model (wider, every block's delta would average the same pairs)."""
    return (num_layers - 1) // 2


def rank_blocks(criticality: np.ndarray, eligible: list[int]) -> list[int]:
    """Eligible blocks from most to least critical, then the others (ties by index)."""
    rest = [i for i in range(len(criticality)) if i not in set(eligible)]
    by = lambda blocks: sorted(blocks, key=lambda i: (-criticality[i], i))  # noqa: E731
    return by(eligible) + by(rest)


def ranking_by(scores: dict[str, np.ndarray], score: str, eligible: list[int]) -> list[int]:
    """Blocks from most to least critical by one of ``scores`` in its own direction, eligible ones first."""
    return rank_blocks(DIRECTION.get(score, -1) * np.asarray(scores[score]), eligible)


def select_critical(score: np.ndarray, *, direction: int = -1, score_name: str = "delta", k: int | None = None,
                    window: int = 2, edges: bool = False) -> Selection:
    """Pick the critical blocks; ``direction`` is -1 when a low score marks a critical block."""
    score = np.asarray(score, dtype=float)
    n = len(score)
    criticality = direction * score
    eligible = eligible_blocks(n, 0 if edges else window)
    settings = {"window": window, "edges": edges, "eligible": eligible}
    if k is not None:
        if not 1 <= k <= n:
            raise CritlayerError(f"--k {k} is outside 1..{n}, the number of layers")
        chosen = sorted(rank_blocks(criticality, eligible)[:k])
        return Selection(chosen, "top-k", score_name, f"the {k} blocks with the most critical {score_name}"
                         + ("" if k <= len(eligible) else " (more than the eligible blocks: edges added)"),
                         **settings, k=k)
    valleys = find_valleys(-criticality[eligible])  # valleys of the "low = critical" profile
    if not valleys:  # a profile that only rises or falls with depth singles out no band
        return Selection([], "band", score_name, f"the {score_name} profile has no valley among blocks "
                         f"{eligible[0]}-{eligible[-1]}: no band stands out", **settings, valleys=[])
    top = max(v["prominence"] for v in valleys)
    kept = [v for v in valleys if v["prominence"] >= MIN_RELATIVE_PROMINENCE * top]
    chosen = sorted({eligible[i] for v in kept for i in range(v["start"], v["end"])})
    bands = ", ".join(f"{eligible[v['start']]}-{eligible[v['end'] - 1]} (prominence {v['prominence']:.3f})" for v in kept)
    found = [Valley(eligible[v["index"]], v["prominence"], (eligible[v["start"]], eligible[v["end"] - 1]))
             for v in valleys]
    return Selection(chosen, "band", score_name, f"band(s) around the most prominent {score_name} valleys among "
                     f"blocks {eligible[0]}-{eligible[-1]}: {bands}", **settings, valleys=found)


def find_valleys(values: np.ndarray) -> list[dict]:
    """Strict local minima with their prominence and half-prominence band (half-open indices)."""
    values = np.asarray(values, dtype=float)
    n, found = len(values), []
    for i in range(1, n - 1):
        if not (values[i] < values[i - 1] and values[i] <= values[i + 1]):
            continue
        left = _highest_until_deeper(values, i, -1)
        right = _highest_until_deeper(values, i, 1)
        prominence = min(left, right) - values[i]
        if prominence <= 0:  # a flat stretch running to the end of the profile is no valley
            continue
        level = values[i] + prominence / 2
        start, end = i, i + 1
        while start > 0 and values[start - 1] < level:
            start -= 1
        while end < n and values[end] < level:
            end += 1
        found.append({"index": i, "prominence": float(prominence), "start": start, "end": end})
    return found


def _highest_until_deeper(values: np.ndarray, i: int, step: int) -> float:
    """The highest value met walking from ``i`` until a lower value or the end of the profile."""
    highest, j = values[i], i + step
    while 0 <= j < len(values) and values[j] >= values[i]:
        highest = max(highest, values[j])
        j += step
    return highest
