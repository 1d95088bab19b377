"""How firm a scan's answer is, and when a scan has read enough probes to say.

Firmness is stability selection (Meinshausen and Buehlmann, 2010): the selection rule is run on many random
halves of the probes, drawn without replacement, and a block's probability is the share of halves in
which the rule picks it. A block picked in at least ``FIRM`` of them is firm, one picked in at least
``TENTATIVE`` tentative. Halves rather than bootstrap draws, because a bootstrap draw repeats probes and
the unbiased CKA estimator would read a repeated probe as perfect agreement; a half has fewer probes than
the whole, so its probabilities understate firmness rather than overstate it.

A scan reads probes in rounds and stops once the answer is settled: at least ``MIN_PROBES`` read, every
block either firm or picked in at most ``ABSENT`` of the halves (nothing in between), and the same firm
blocks after two rounds in a row. Demanding it twice over, with no block in the band between, is the
hysteresis that keeps a scan from stopping on a lucky round (optional stopping); ``REPLICATES`` halves put
the Monte Carlo error of a probability near 0.9 at about 0.015.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .measures.cka import cka_from_hsic, debiased_hsic, delta_scores

FIRM, TENTATIVE, ABSENT = 0.9, 0.5, 0.1
REPLICATES = 400
ROUND = 32  # probes per round of an adaptive scan
MIN_PROBES = 64
MAX_PROBES = 512  # where an adaptive scan stops if the answer never settles
GRAM_ROWS = 1024  # rows (smallest keys first) whose Grams the halves are drawn from


@dataclass
class Round:
    """What the halves said after one round."""

    probes: int
    firm: list[int]
    tentative: list[int]
    undecided: list[int]  # picked in more than ABSENT but fewer than FIRM of the halves

    @property
    def settled(self) -> bool:
        return not self.undecided


@dataclass
class Firmness:
    """Each block's probability of being picked over halves of the probes, the firm and tentative blocks, and the
    rounds the scan read (``stopped`` says why it stopped)."""

    score: str
    probability: list[float]
    replicates: int
    stopped: str
    rounds: list[Round] = field(default_factory=list)
    thresholds: dict = field(default_factory=lambda: {"firm": FIRM, "tentative": TENTATIVE, "absent": ABSENT})

    @property
    def firm(self) -> list[int]:
        return [b for b, p in enumerate(self.probability) if p >= self.thresholds["firm"]]

    @property
    def tentative(self) -> list[int]:
        return [b for b, p in enumerate(self.probability)
                if self.thresholds["tentative"] <= p < self.thresholds["firm"]]

    def to_json(self) -> dict:
        return {"score": self.score, "firm": self.firm, "tentative": self.tentative,
                "probability": [round(p, 4) for p in self.probability], "replicates": self.replicates,
                "halves": "half the probes, drawn without replacement", "thresholds": self.thresholds,
                "stopped": self.stopped, "rounds": [asdict(r) for r in self.rounds]}

    @classmethod
    def from_json(cls, data: dict) -> "Firmness":
        return cls(data["score"], data["probability"], data["replicates"], data["stopped"],
                   [Round(**r) for r in data.get("rounds", [])], data["thresholds"])


def probabilities(picks: list[list[int]], layers: int) -> list[float]:
    counts = np.zeros(layers)
    for chosen in picks:
        counts[chosen] += 1
    return (counts / max(1, len(picks))).tolist()


def summarise(probes: int, probability: list[float]) -> Round:
    return Round(probes, [b for b, p in enumerate(probability) if p >= FIRM],
                 [b for b, p in enumerate(probability) if TENTATIVE <= p < FIRM],
                 [b for b, p in enumerate(probability) if ABSENT < p < FIRM])


def should_stop(rounds: list[Round]) -> bool:
    """Settled, with the same firm blocks, in the last two rounds, after at least ``MIN_PROBES`` probes."""
    if len(rounds) < 2 or rounds[-1].probes < MIN_PROBES:
        return False
    last, before = rounds[-1], rounds[-2]
    return last.settled and before.settled and last.firm == before.firm


def delta_picks(rows, row_probes: np.ndarray, select: Callable[[np.ndarray], list[int]], window: int,
                seed: int, replicates: int = REPLICATES) -> list[list[int]]:
    """The blocks ``select`` picks from delta (unbiased CKA of the block outputs) on each of ``replicates`` halves
    of the probes behind ``rows`` (block outputs, ``(L, rows, hidden)``)."""
    keep = _first_rows(row_probes)
    grams = _grams(rows, keep)
    probes_of_rows = row_probes[keep]
    probes, inverse = np.unique(probes_of_rows, return_inverse=True)
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(replicates):
        half = np.zeros(len(probes), dtype=bool)
        half[rng.choice(len(probes), size=len(probes) // 2, replace=False)] = True
        chosen = torch.from_numpy(np.flatnonzero(half[inverse]))
        cka = _cka_of(grams[:, chosen][:, :, chosen])
        picks.append(select(delta_scores(cka, window)))
    return picks


def _first_rows(row_probes: np.ndarray) -> np.ndarray:
    """The rows the halves are drawn from: all, or those of the first probes by index up to ``GRAM_ROWS`` rows."""
    if len(row_probes) <= GRAM_ROWS:
        return np.arange(len(row_probes))
    order = np.argsort(row_probes, kind="stable")
    return np.sort(order[:GRAM_ROWS])


def _grams(rows, keep: np.ndarray) -> torch.Tensor:
    """Every layer's Gram of the kept rows, centred, in float32: ``(L, n, n)``."""
    index = torch.from_numpy(keep)
    grams = []
    for layer in rows:
        x = layer[index].double()
        x = (x - x.mean(0)).float()
        grams.append(x @ x.T)
    return torch.stack(grams)


def _cka_of(grams: torch.Tensor) -> np.ndarray:
    flat = grams.flatten(1).double()
    diagonals = grams.diagonal(dim1=1, dim2=2).double()
    return cka_from_hsic(debiased_hsic(flat @ flat.T, diagonals, flat.sum(1), grams.sum(2).double()))
