"""How firm a scan's answer is, and when a scan has read enough probes to say.

Firmness is stability selection (Meinshausen and Buehlmann, 2010): the selection rule is run on many random
halves of the probes, drawn without replacement, and a block's probability is the share of halves in
which the rule picks it. A block picked in at least ``FIRM`` of them is firm, one picked in at least
``TENTATIVE`` tentative. Halves rather than bootstrap draws, because a bootstrap draw repeats probes and
the unbiased CKA estimator would read a repeated probe as perfect agreement; a half has fewer probes than
the whole, so its probabilities understate firmness rather than overstate it.

A scan reads probes in rounds and stops once the answer is settled: at least ``MIN_PROBES`` read and the
same firm blocks in ``SETTLED_ROUNDS`` rounds running; an answer of no firm block at all settles only if,
in those rounds, no block is picked in more than ``ABSENT`` of the halves either (nothing is on its way to
firm). Demanding the same answer three times over is the hysteresis that keeps a scan from stopping on a
lucky round (optional stopping): band edges hover near the firm line, and a single round that crosses it
is not enough. ``REPLICATES`` halves put the Monte Carlo error of a probability near 0.9 at about 0.02, a
fifth of the gap to the tentative blocks' usual 0.8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .measures.cka import cka_from_hsic, debiased_hsic, delta_scores
from .measures.sample import RowSample, resample_rows

FIRM, TENTATIVE, ABSENT = 0.9, 0.5, 0.1
THRESHOLDS = {"firm": FIRM, "tentative": TENTATIVE, "absent": ABSENT}
REPLICATES = 200  # 400 took 3.4 s a round on smollm2-135m here, most of what a round adds to writing its probes
ROUND = 32  # probes per round of an adaptive scan
MIN_PROBES = 64
SETTLED_ROUNDS = 3
MAX_PROBES = 512  # where an adaptive scan stops if the answer never settles
# Rows of the sample (smallest keys first: a random draw over every probe read) whose Grams the halves are drawn
# from. A half copies L (GRAM_ROWS / 2)^2 Gram entries and multiplies the (window + 1) L pairs delta reads: on
# smollm2-135m, 1,024 rows with every pair of layers took 100 ms a half, 512 rows with delta's pairs 8 ms.
GRAM_ROWS = 512
STOPPING_RULE = (f"rounds of {ROUND} probes; stop once at least {MIN_PROBES} are read and the firm blocks are the "
                 f"same in {SETTLED_ROUNDS} rounds running (when none is firm, no block may be picked in more than "
                 f"{ABSENT:.0%} of the halves in them either)")


@dataclass
class Round:
    """What the halves said after one round."""

    probes: int
    firm: list[int]
    tentative: list[int]
    undecided: list[int]  # picked in more than ABSENT but fewer than FIRM of the halves
    probability: list[float] = field(default_factory=list)  # each block's, over this round's halves

    @property
    def settled(self) -> bool:
        """Every block firm or all but never picked."""
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
    thresholds: dict = field(default_factory=lambda: dict(THRESHOLDS))
    rule: str = STOPPING_RULE

    @property
    def firm(self) -> list[int]:
        return summarise(0, self.probability, self.thresholds).firm

    @property
    def tentative(self) -> list[int]:
        return summarise(0, self.probability, self.thresholds).tentative

    def to_json(self) -> dict:
        return {"score": self.score, "firm": self.firm, "tentative": self.tentative,
                "probability": [round(p, 4) for p in self.probability], "replicates": self.replicates,
                "halves": "half the probes, drawn without replacement", "thresholds": self.thresholds,
                "rule": self.rule, "stopped": self.stopped, "rounds": [asdict(r) for r in self.rounds]}

    @classmethod
    def from_json(cls, data: dict) -> "Firmness":
        return cls(data["score"], data["probability"], data["replicates"], data["stopped"],
                   [Round(**r) for r in data.get("rounds", [])], data["thresholds"], data.get("rule", ""))


def probabilities(picks: list[list[int]], layers: int) -> list[float]:
    counts = np.zeros(layers)
    for chosen in picks:
        counts[chosen] += 1
    return (counts / max(1, len(picks))).tolist()


def summarise(probes: int, probability: list[float], thresholds: dict = THRESHOLDS) -> Round:
    """The firm, tentative and undecided blocks of a round that read ``probes``."""
    firm, tentative, absent = thresholds["firm"], thresholds["tentative"], thresholds["absent"]
    return Round(probes, [b for b, p in enumerate(probability) if p >= firm],
                 [b for b, p in enumerate(probability) if tentative <= p < firm],
                 [b for b, p in enumerate(probability) if absent < p < firm], [round(p, 4) for p in probability])


def should_stop(rounds: list[Round]) -> bool:
    """The same firm blocks in the last ``SETTLED_ROUNDS`` rounds, after at least ``MIN_PROBES`` probes (and, when
    none is firm, none undecided either)."""
    last = rounds[-SETTLED_ROUNDS:]
    if len(last) < SETTLED_ROUNDS or last[-1].probes < MIN_PROBES:
        return False
    if any(r.firm != last[-1].firm for r in last):
        return False
    return bool(last[-1].firm) or all(r.settled for r in last)


def delta_picks(sample: RowSample, select: Callable[[np.ndarray], list[int]], window: int, seed: int,
                replicates: int = REPLICATES) -> list[list[int]]:
    """The blocks ``select`` picks from delta (unbiased CKA of the block outputs) on each of ``replicates`` halves
    of the probes behind the rows of ``sample`` (at most ``GRAM_ROWS`` of them: those with the smallest keys, a
    random draw over every probe read)."""
    keep = np.sort(sample.row_keys().argsort()[:GRAM_ROWS].numpy())
    grams, row_probes = _grams(sample.compute()[1:], keep), sample.row_samples()[keep]
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(replicates):
        half = torch.from_numpy(resample_rows(row_probes, rng))
        picks.append(select(_delta_of(grams[:, half][:, :, half], window)))
    return picks


def _grams(rows, keep: np.ndarray) -> torch.Tensor:
    """Every layer's Gram of the kept rows, centred, in float32: ``(L, n, n)``."""
    index = torch.from_numpy(keep)
    grams = []
    for layer in rows:
        x = layer[index].double()
        x = (x - x.mean(0)).float()
        grams.append(x @ x.T)
    return torch.stack(grams)


def _delta_of(grams: torch.Tensor, window: int) -> np.ndarray:
    """delta from the Grams, with CKA computed only between blocks within ``window`` of each other (all that delta
    reads: about 2 * window * L pairs instead of L^2); the products in float32, what they combine into in
    float64."""
    layers = len(grams)
    flat = grams.flatten(1)
    diagonals = grams.diagonal(dim1=1, dim2=2).double()
    sums, row_sums = flat.sum(1).double(), grams.sum(2).double()
    pairs = [(block, block + offset) for offset in range(window + 1) for block in range(layers - offset)]
    a, b = (torch.tensor(side) for side in zip(*pairs))
    hsic = torch.zeros(layers, layers, dtype=torch.float64)
    products = torch.cat([torch.linalg.vecdot(flat[:layers - offset], flat[offset:])
                          for offset in range(window + 1)]).double()  # the pairs' order: by offset, then block
    hsic[a, b] = hsic[b, a] = debiased_hsic(products, diagonals, sums, row_sums, a, b)
    return delta_scores(cka_from_hsic(hsic), window)
