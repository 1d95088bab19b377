"""How firm a scan's answer is, and when a scan has read enough probes to say.

Firmness is stability selection (Meinshausen and Buehlmann, 2010): the selection rule is run on many random
halves of the probes, drawn without replacement, and a block's probability is the share of halves in which
the rule picks it; from the same halves comes each block's replication (below). A block whose replication is
at least ``FIRM`` is firm, at least ``TENTATIVE`` tentative. Halves rather than bootstrap draws, because a
bootstrap draw repeats probes and the unbiased CKA estimator would read a repeated probe as perfect agreement;
a half has fewer probes than the whole, so its probabilities understate firmness rather than overstate it,
and the replicas, farther out still, are more cautious than the halves.

A scan reads probes in rounds and stops once the answer is settled: at least ``MIN_PROBES`` read and, in
``SETTLED_ROUNDS`` rounds running, the same firm blocks and none tentative; an answer of no firm block at all
settles only if, in those rounds, no block has a replication above ``ABSENT`` either (nothing is on its way to
firm). Demanding the answer twice over is the hysteresis that keeps a scan from stopping on a lucky round
(optional stopping); demanding no tentative block keeps it from stopping with a block just under the bar. A
round is as many probes as the model writes at once: smaller rounds cost more time per probe
(docs/method/firmness.md). ``REPLICATES`` halves put the Monte Carlo error of a probability near 0.9 at about 0.02.

The halves are drawn from the rows the answer itself is computed from (up to ``GRAM_ROWS``). Drawn from a
quarter of them instead, halves read the rule as noisier than it is (docs/method/firmness.md).

A block firm over halves of one scan's probes need not be picked by another scan: a half's profile lies about as far
from the whole's as the whole's lies from the truth, so another scan of as many probes lands about
``REPLICA_SPREAD`` (sqrt 2) times as far from this one as a half does. The rule run on the whole profile plus that
much of each half's deviation from it estimates how often another scan would pick each block (its ``replication``),
and where it is measured (delta) it is what firm, tentative and undecided are read from: a firm block is one that
another scan of as many probes would pick in at least ``FIRM`` of cases. Over halves alone a block sitting at a
band's edge came out firm in some seeds and not in others: by the normal approximation a block at the rule's cut is
picked by 0.9 of one scan's halves in about 10% of scans, by 0.9 of its replicas in about 3.5%. Checked against
other scans of the same model, the replication foretold what another scan picks better than the halves' own
probabilities did (docs/method/firmness.md). The halves' probabilities stay in the result beside it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .measures.rows import RowSample, half_weights
from .sampler import BATCH_SIZE as WRITING_BATCH

FIRM, TENTATIVE, ABSENT = 0.9, 0.5, 0.1
THRESHOLDS = {"firm": FIRM, "tentative": TENTATIVE, "absent": ABSENT}
REPLICATES = 200
ROUND = WRITING_BATCH  # probes per round of an adaptive scan
MIN_PROBES = 64
SETTLED_ROUNDS = 2
MAX_PROBES = 512  # where an adaptive scan stops if the answer never settles
# At most this many rows of the sample (smallest keys first: a random draw over every probe read) are resampled:
# every half comes from their Grams, of which those of window + 1 blocks are held at a time (n^2 floats each, 50 MB
# at window 2); what a round of halves costs: docs/method/firmness.md.
GRAM_ROWS = 2048
REPLICA_SPREAD = math.sqrt(2)  # another scan's distance from this one, in units of a half's distance from it
STOPPING_RULE = (f"rounds of {ROUND} probes; stop once at least {MIN_PROBES} are read and, in {SETTLED_ROUNDS} rounds "
                 f"running, the firm blocks (those another scan would pick in at least {FIRM:.0%} of cases) are the "
                 f"same and no block is tentative ({TENTATIVE:.0%}-{FIRM:.0%}); when none is firm, no block may be "
                 f"picked in more than {ABSENT:.0%} of cases in them either")


@dataclass
class Round:
    """What the halves and the replicas said after one round (blocks classed by the replicas where measured)."""

    probes: int
    firm: list[int]
    tentative: list[int]
    undecided: list[int]  # picked in more than ABSENT but fewer than FIRM of cases
    probability: list[float] = field(default_factory=list)  # each block's, over this round's halves
    replication: list[float] = field(default_factory=list)  # each block's, over this round's replicas

    @property
    def settled(self) -> bool:
        """Every block firm or all but never picked."""
        return not self.undecided


@dataclass
class Firmness:
    """Each block's probability of being picked over halves of the probes (or bootstrap replicates) and, where
    measured, its ``replication``: how often another scan of as many probes would pick it; the firm, tentative and
    undecided blocks (by replication where measured), and the rounds the scan read (``stopped`` says why it
    stopped)."""

    score: str
    probability: list[float]
    replicates: int
    stopped: str
    rounds: list[Round] = field(default_factory=list)
    thresholds: dict = field(default_factory=lambda: dict(THRESHOLDS))
    rule: str = STOPPING_RULE
    replication: list[float] = field(default_factory=list)
    classed_by: str = ""  # "replication" or "probability"; left empty, replication where it is measured

    def __post_init__(self):
        self.classed_by = self.classed_by or ("replication" if self.replication else "probability")

    @property
    def by_replication(self) -> bool:
        return self.classed_by == "replication"

    @property
    def chance(self) -> list[float]:
        """What the blocks are classed by: the replication, or the probability."""
        return self.replication if self.by_replication else self.probability

    def _summary(self) -> Round:
        return summarise(0, self.probability, self.replication if self.by_replication else (), self.thresholds)

    @property
    def firm(self) -> list[int]:
        return self._summary().firm

    @property
    def tentative(self) -> list[int]:
        return self._summary().tentative

    @property
    def undecided(self) -> list[int]:
        """Blocks neither firm nor all but never picked: the tentative ones and those picked in ABSENT-TENTATIVE."""
        return self._summary().undecided

    def to_json(self) -> dict:
        return {"score": self.score, "firm": self.firm, "tentative": self.tentative, "undecided": self.undecided,
                "probability": [round(p, 4) for p in self.probability], "replicates": self.replicates,
                "halves": "half the probes, drawn without replacement", "thresholds": self.thresholds,
                "rule": self.rule, "stopped": self.stopped, "rounds": [asdict(r) for r in self.rounds],
                "replication": [round(p, 4) for p in self.replication],
                "replication_means": "how often the rule picks each block on the whole profile plus sqrt(2) times "
                                     "each half's deviation from it: another scan of as many probes",
                "classed_by": self.classed_by}

    @classmethod
    def from_json(cls, data: dict) -> "Firmness":
        return cls(data["score"], data["probability"], data["replicates"], data["stopped"],
                   [Round(**r) for r in data.get("rounds", [])], data["thresholds"], data.get("rule", ""),
                   data.get("replication", []), data.get("classed_by", "probability"))  # older scans: by halves


def probabilities(picks: list[list[int]], layers: int) -> list[float]:
    counts = np.zeros(layers)
    for chosen in picks:
        counts[chosen] += 1
    return (counts / max(1, len(picks))).tolist()


def summarise(probes: int, probability: list[float], replication: list[float] = (),
              thresholds: dict = THRESHOLDS) -> Round:
    """The firm, tentative and undecided blocks of a round that read ``probes``: by ``replication`` where
    measured, else by ``probability``."""
    firm, tentative, absent = thresholds["firm"], thresholds["tentative"], thresholds["absent"]
    chance = list(replication) or probability
    return Round(probes, [b for b, p in enumerate(chance) if p >= firm],
                 [b for b, p in enumerate(chance) if tentative <= p < firm],
                 [b for b, p in enumerate(chance) if absent < p < firm], [round(p, 4) for p in probability],
                 [round(p, 4) for p in replication])


def should_stop(rounds: list[Round]) -> bool:
    """The same firm blocks and none tentative in the last ``SETTLED_ROUNDS`` rounds, after at least ``MIN_PROBES``
    probes (and, when none is firm, none undecided either)."""
    last = rounds[-SETTLED_ROUNDS:]
    if len(last) < SETTLED_ROUNDS or last[-1].probes < MIN_PROBES:
        return False
    if any(r.firm != last[-1].firm or r.tentative for r in last):
        return False
    return bool(last[-1].firm) or all(r.settled for r in last)


class Rounds:
    """The rounds of a scan selecting by delta: after each, ``settle`` runs the rule over halves and replicas of
    the probes read so far, records how firm each block is (``history``; the last round's picks in ``picks``) and
    says whether the scan may stop (only an ``adaptive`` scan stops early)."""

    def __init__(self, select: Callable[[np.ndarray], list[int]], window: int, seed: int, layers: int,
                 adaptive: bool, report: Callable[[Round], None] | None = None):
        self.select, self.window, self.seed, self.layers = select, window, seed, layers
        self.adaptive, self.report = adaptive, report
        self.history: list[Round] = []
        self.picks: Picks | None = None

    def settle(self, sample: RowSample, read: int) -> bool:
        self.picks = delta_picks(sample, self.select, self.window, self.seed)
        self.history.append(summarise(read, probabilities(self.picks.halves, self.layers),
                                      probabilities(self.picks.replicas, self.layers)))
        if self.report is not None:
            self.report(self.history[-1])
        return self.adaptive and should_stop(self.history)


@dataclass
class Picks:
    """What the rule picks on each half of the probes, and on each replica: another scan of as many probes, as the
    whole profile plus ``REPLICA_SPREAD`` times a half's deviation from it."""

    halves: list[list[int]]
    replicas: list[list[int]]


def delta_picks(sample: RowSample, select: Callable[[np.ndarray], list[int]], window: int, seed: int,
                replicates: int = REPLICATES) -> Picks:
    """The blocks ``select`` picks from delta (unbiased CKA of the block outputs) on each of ``replicates`` halves
    of the probes behind the rows of ``sample`` (at most ``GRAM_ROWS`` of them: those with the smallest keys, a
    random draw over every probe read), and on as many replicas."""
    keep = torch.from_numpy(np.sort(sample.row_keys().argsort()[:GRAM_ROWS].numpy()))
    probes, row_probe = np.unique(sample.row_samples()[keep.numpy()], return_inverse=True)
    rng = np.random.default_rng(seed)
    halves = np.stack([np.ones(len(probes))] + [half_weights(len(probes), rng) for _ in range(replicates)], axis=1)
    device = sample.device  # where the rows are read to
    whole, *parts = half_deltas((layer[keep] for layer in sample.compute()[1:]), torch.from_numpy(row_probe).to(device),
                                torch.from_numpy(halves).to(device, torch.float32), window)

    def pick(delta: np.ndarray) -> list[int]:
        return select(delta) if np.isfinite(delta).all() else []  # < 4 rows: no estimate

    return Picks([pick(part) for part in parts], [pick(whole + REPLICA_SPREAD * (part - whole)) for part in parts])


def half_deltas(layers: Iterable[torch.Tensor], row_probe: torch.Tensor, halves: torch.Tensor,
                window: int) -> np.ndarray:
    """delta on every half at once: ``layers`` yields each block's ``(n, hidden)`` output rows in turn, ``row_probe``
    the probe (0 .. p - 1) each row comes from, ``halves`` is a ``(p, R)`` 0/1 matrix of the probes each of R
    halves keeps, and the result is ``(R, L)``.

    The unbiased HSIC of Grams K, L over the rows a 0/1 vector w keeps needs three quadratic forms in w (with K~
    the Gram with its diagonal zeroed): w'(K~ o L~)w, w'K~w and sum_i w_i (K~w)_i (L~w)_i. A half keeps whole
    probes, w = P h with P the rows' probe indicator, so w'Mw = h'(P'MP)h: each n x n matrix is folded into its
    p x p probe sums once, and all halves come from products of those with the mask matrix, only for the pairs
    within ``window`` of each other (all delta reads): the Grams of the last ``window + 1`` blocks are all that is
    ever held. The unbiased estimator needs no re-centring on each half, and has no value on fewer than 4 rows
    (such a half's delta is NaN). The products run in float32, what they combine into in float64.
    """
    count, device = len(halves), halves.device
    rows_kept = halves[row_probe]  # (n, R): w of every half
    m = rows_kept.sum(0).double()

    def per_probe(matrix: torch.Tensor, dim: int) -> torch.Tensor:
        """``matrix`` with its rows (dim 0: ``P' matrix``) or columns (dim 1: ``matrix P``) summed per probe."""
        shape = list(matrix.shape)
        shape[dim] = count
        return torch.zeros(shape, device=device).index_add_(dim, row_probe, matrix)

    recent: deque = deque(maxlen=window + 1)  # (K~, K~ w, w'K~w) of the latest blocks, the newest first
    hsic: list[torch.Tensor] = []  # per block b, HSIC(b - offset, b) for offset 0 .. window, over the halves
    for rows in layers:
        x = rows.double()
        x = (x - x.mean(0)).float()
        gram = x @ x.T
        gram.diagonal().zero_()
        through = per_probe(gram, 0).T @ halves  # (n, R); the Gram is symmetric, and summing rows is the fast way
        sums = (through * rows_kept).sum(0).double()
        recent.appendleft((gram, through, sums))
        values = torch.full((window + 1, halves.shape[1]), float("nan"), dtype=torch.float64, device=device)
        for offset, (other, other_through, other_sums) in enumerate(recent):
            off = ((per_probe(per_probe(other * gram, 0), 1) @ halves) * halves).sum(0).double()
            cross = (other_through * through * rows_kept).sum(0).double()
            values[offset] = off + other_sums * sums / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * cross
        hsic.append(values)
    hsic = torch.stack(hsic)  # (L, window + 1, R)
    blocks = len(hsic)
    norms = hsic[:, 0].clamp(min=0).sqrt()
    total = torch.zeros(blocks, halves.shape[1], dtype=torch.float64, device=device)
    weight = torch.zeros(blocks, 1, dtype=torch.float64, device=device)
    for block in range(blocks):  # delta_l: mean CKA over |j - l| <= window, self term (1) included
        for offset in range(1, min(window, block) + 1):
            cka = (hsic[block, offset] / (norms[block] * norms[block - offset])).clamp(0.0, 1.0)
            total[block] += cka
            total[block - offset] += cka
            weight[block] += 1
            weight[block - offset] += 1
    return ((total + 1) / (weight + 1)).T.cpu().numpy()
