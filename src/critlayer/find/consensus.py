"""One ranking from many measures, how far they agree, and how sure the ranking is.

Each score is turned into a criticality rank normalised to [0, 1] (1 = the most critical block,
by the score's direction; ties share their rank); a measure's rank is the mean over its scores,
and the consensus is the mean over measures, so every measure weighs the same however many
scores it reports. P(critical) is the share of bootstrap replicates (probe samples drawn with
replacement, every measure recomputed on them) in which the selection rule picks each block
from the replicate's score the scan selects by (its consensus, or one measure's score).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..common.stats import ranks, spearman
from .measures import DIRECTION


@dataclass
class Consensus:
    """How a scan combined its scores: those of each measure (``groups``), their pairwise ``agreement`` (signed
    Spearman, in the order of ``scores``), the bootstrap replicates behind P(critical) and the measures held fixed
    in them, the text the loss measures read, and what measures report of how they ran (``details``)."""

    groups: dict[str, list[str]]
    scores: list[str]
    agreement: list[list[float]]
    bootstrap: int = 0
    held_fixed: list[str] = field(default_factory=list)
    text: dict | None = None
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"groups": self.groups, "scores": self.scores, "agreement": self.agreement,
                "bootstrap": self.bootstrap, "held_fixed": self.held_fixed, "text": self.text, **self.details}

    @classmethod
    def from_json(cls, data: dict) -> "Consensus":
        known = ("groups", "scores", "agreement", "bootstrap", "held_fixed", "text")
        return cls(data.get("groups", {}), data.get("scores", []), data.get("agreement", []),
                   data.get("bootstrap", 0), data.get("held_fixed", []), data.get("text"),
                   {k: v for k, v in data.items() if k not in known})


def criticality_rank(values: np.ndarray, direction: int) -> np.ndarray:
    """Ranks of ``direction * values`` scaled to [0, 1]: 1 for the most critical block."""
    r = ranks(direction * np.asarray(values, dtype=float))
    return (r - 1) / max(1, len(r) - 1)


def measure_ranks(scores: dict[str, np.ndarray], groups: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Each measure's (``groups``: measure -> its score names) mean criticality rank over its scores."""
    return {measure: np.mean([criticality_rank(scores[s], DIRECTION[s]) for s in names], axis=0)
            for measure, names in groups.items() if names}


def consensus(scores: dict[str, np.ndarray], groups: dict[str, list[str]]) -> np.ndarray:
    """Mean over measures of their criticality ranks: every measure weighs the same."""
    return np.mean(list(measure_ranks(scores, groups).values()), axis=0)


def agreement(scores: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """Spearman correlation of every pair of scores, signed so that +1 means the same criticality ranking."""
    crit = [DIRECTION[n] * np.asarray(scores[n], dtype=float) for n in names]
    return np.array([[spearman(a, b) for b in crit] for a in crit])


def bootstrap_critical(replicate: Callable[[np.random.Generator], dict[str, np.ndarray]],
                       groups: dict[str, list[str]], select: Callable[[dict[str, np.ndarray]], list[int]],
                       num_layers: int, replicates: int = 100, seed: int = 0) -> np.ndarray:
    """P(critical) per block: how often ``select`` picks it from a bootstrap replicate's scores (its consensus included)."""
    rng = np.random.default_rng(seed)
    hits = np.zeros(num_layers)
    for _ in range(replicates):
        scores = replicate(rng)
        hits[select({**scores, "consensus": consensus(scores, groups)})] += 1
    return hits / replicates
