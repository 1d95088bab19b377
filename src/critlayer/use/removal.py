"""Which blocks each pruning method removes, for every count from one to the most asked for.

A method's choice for N blocks is a sorted list of block indices, all drawn from the same eligible
blocks: by default every block but the first and the last, which sit next to the embeddings and
the head. Methods:

- a scan score (or the consensus): the N least critical blocks by that score;
- ``last``: the N eligible blocks just before the final one (what users try first);
- ``random``: seeded uniform draws;
- ``angular`` (Gromov et al.): the run of N consecutive blocks across which the hidden state turns
  least, arccos of the cosine between the run's input and its output over pi, averaged over tokens;
- ``sleb`` (Song et al.): greedy; each step removes the block whose removal raises the calibration
  text's loss least, given the blocks already removed;
- a score checked by the loss (critlayer's default): the same greedy steps, each trying only a few
  candidates: the least critical remaining blocks by the score and, taking turns with them, the blocks next to one
  already removed (a removed block's neighbours are often the next to lose their use, and a score of each block in
  the whole model cannot see that).

Only the greedy searches and ``angular`` read text (calibration text, never the held-out text); a
greedy search costs a pass over it per candidate block and step, which it records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import chain, zip_longest

import numpy as np
import torch

from ..common.errors import CritlayerError
from ..find.measures.ablation import SkipLosses
from ..models import LanguageModel, running, surgery
from ..models.loss import BATCH, text_batches

BASELINES = ("last", "random", "block_influence", "angular", "sleb")


def last_blocks(eligible: list[int], n: int) -> list[int]:
    return sorted(eligible[-n:])


def random_blocks(eligible: list[int], n: int, draw: int, seed: int = 0) -> list[int]:
    """Draw ``draw`` of N blocks: reproducible from (seed, N, draw) alone."""
    rng = np.random.default_rng([seed, n, draw])
    return sorted(int(i) for i in rng.choice(eligible, size=n, replace=False))


def run_distances(lm: LanguageModel, sequences: list[list[int]], longest: int,
                  batch_size: int = BATCH) -> np.ndarray:
    """``d[n - 1, l]``: mean angular distance between block ``l``'s input and block ``l + n - 1``'s output over every
    token of ``sequences``, for runs of ``n`` = 1..``longest`` blocks (NaN where a run would pass the last block)."""
    layers = lm.num_layers
    sums, tokens = np.zeros((longest, layers)), 0
    with torch.inference_mode():
        for _, batch in text_batches(sequences, batch_size, lm.device):
            states: list[torch.Tensor] = []
            with running.watching(lm, states.append):
                running.forward_blocks(lm, batch["input_ids"], batch["attention_mask"])
            real = batch["attention_mask"].bool()
            unit = torch.nn.functional.normalize(torch.stack([s.to(real.device)[real].float() for s in states]), dim=-1)
            for n in range(1, longest + 1):
                cos = (unit[:-n] * unit[n:]).sum(-1).clamp(-1.0, 1.0)
                sums[n - 1, :layers + 1 - n] += (torch.arccos(cos) / torch.pi).sum(-1).double().cpu().numpy()
            tokens += int(real.sum())
    distances = sums / tokens
    for n in range(1, longest + 1):
        distances[n - 1, layers + 1 - n:] = np.nan
    return distances


def angular_run(distances: np.ndarray, eligible: list[int], n: int) -> list[int]:
    """The run of ``n`` consecutive eligible blocks with the least angular distance across it."""
    allowed = set(eligible)
    starts = [s for s in range(distances.shape[1]) if all(b in allowed for b in range(s, s + n))]
    if not starts:
        raise CritlayerError(f"no run of {n} consecutive eligible blocks")
    best = min(starts, key=lambda s: (distances[n - 1, s], s))
    return list(range(best, best + n))


@dataclass
class GreedySearch:
    """SLEB's removal order with what each step cost; ``first_rise`` is every block's loss rise removed alone."""

    order: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # cumulative, after each step
    forward_tokens: list[int] = field(default_factory=list)  # cumulative
    first_rise: np.ndarray | None = None

    def removed(self, n: int) -> list[int]:
        return sorted(self.order[:n])

    def cost(self, n: int) -> dict:
        return {"seconds": round(self.seconds[n - 1], 3), "forward_tokens": self.forward_tokens[n - 1]}


def greedy_passes(num_layers: int, eligible: int, steps: int, candidates: int = 0) -> int:
    """Passes over the calibration text ``steps`` greedy steps take (each: the text whole, then with each candidate
    taken out): SLEB's first step tries every block, later ones every remaining eligible one; a ranked search tries at
    most ``candidates``."""
    tried = [min(candidates, eligible - s) if candidates else (num_layers if s == 0 else eligible - s)
             for s in range(steps)]
    return sum(n + 1 for n in tried)


def checked_candidates(ranking: list[int], removed: list[int], count: int, neighbours: bool = False) -> list[int]:
    """The ``count`` blocks a loss-checked step tries: the least critical remaining blocks of ``ranking`` (least
    critical first) and, with ``neighbours``, taking turns with them, the remaining blocks next to a removed one (in
    ``ranking``'s order)."""
    remaining = [b for b in ranking if b not in removed]
    near = [b for b in remaining if b - 1 in removed or b + 1 in removed] if neighbours else []
    turns = chain.from_iterable(zip_longest(remaining, near))
    return list(dict.fromkeys(b for b in turns if b is not None))[:count]


def greedy(lm: LanguageModel, sequences: list[list[int]], eligible: list[int], steps: int, part: str = "block", *,
           ranking: list[int] | None = None, candidates: int = 0, neighbours: bool = False,
           progress: bool = True) -> GreedySearch:
    """Greedy removal on calibration text: each step skips (or drops ``part`` of) each candidate in turn and removes
    the one whose absence raises the loss least. Without ``ranking`` every remaining eligible block is a candidate
    (SLEB), and the first step measures every block, edges too, as ``first_rise``; with it, the ``candidates`` that
    ``checked_candidates`` gives (``neighbours`` too) are."""
    search = GreedySearch()
    start, tokens = time.perf_counter(), 0
    per_pass = sum(len(s) for s in sequences)
    for step in range(steps):
        if ranking is None:
            remaining = [b for b in eligible if b not in search.order]
        else:
            remaining = checked_candidates(ranking, search.order, candidates, neighbours)
        tried = range(lm.num_layers) if step == 0 and ranking is None else remaining
        with surgery.taken_out(lm.blocks, search.order, part):
            losses = SkipLosses(lm, sequences, (part,), progress=progress, blocks=list(tried))
        rise = next(iter(losses.compute().values()))
        if step == 0 and ranking is None:
            search.first_rise = rise
        search.order.append(min(remaining, key=lambda b: (rise[b], b)))
        tokens += per_pass * (len(tried) + 1)
        search.seconds.append(time.perf_counter() - start)
        search.forward_tokens.append(tokens)
    return search
