"""Weight plans evaluated one block at a time: memory holds the model, one block's quantized weights and the texts'
hidden states, however many candidate widths there are, and each block is quantized at a width once per chunk of
texts (a chunk's hidden states, every plan's, stay within a quarter of the weights' bytes).

A chunk's texts go through the blocks in order, every plan's hidden states beside the others'. Plans that agree on
every block so far share one hidden state (a group); at each block a group splits by the widths its plans give the
block, and each width's quantized weights are made once and swapped in while every group that takes them passes. A
group whose plans change nothing after a block (a sensitivity measurement: one block quantized) runs on to the end
at once and is scored with the block's others, so it never waits for the later blocks. The model's own final norm
and head turn a group's last hidden states into next-token log-probabilities, scored text by text against the
unchanged model's as ``evaluation.evaluate`` scores a variant.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..models import LanguageModel, running
from ..models.loss import require_causal, text_batches
from ..models.stream import block_calls
from ..models.surgery import returning, skipped
from .evaluation import Reference, TextScores, logits_batch, next_token_log_probs
from .weights import BlockWeights

Plan = tuple[int | None, ...]  # a width index per unit; None: the unit as loaded
HIDDEN_BUDGET = 1 << 29  # bytes of hidden states a chunk of texts may hold for all its groups at least (512 MB)


@dataclass
class Step:
    """At ``block``: with ``widths`` (unit: width index) swapped in, each (parent, child) group passes the block;
    the ``finished`` children change nothing after it and run on to the end; the ``released`` parents pass no
    later step and are dropped."""

    block: int
    widths: dict[int, int]
    moves: list[tuple[int, int]] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)


@dataclass
class Schedule:
    """Every block's steps, and the plans of each group that finishes."""

    blocks: list[list[Step]]
    members: dict[int, list[Plan]]

    def passes(self) -> float:
        """Whole-model passes over the texts the schedule runs, counting blocks: the unchanged model's, every
        group's block, and the rest of the model after each early finish."""
        layers = len(self.blocks)
        runs = sum(len(s.moves) + len(s.finished) * (layers - 1 - s.block) for steps in self.blocks for s in steps)
        return 1 + runs / layers

    def peak(self) -> int:
        """The most groups whose hidden states are held at once, as ``evaluate_plans`` holds them: a block's parents
        until their last step, its children, and its finished children until they are scored at the block's end."""
        held = peak = 1
        for steps in self.blocks:
            for step in steps:
                held += len(step.moves)
                peak = max(peak, held)
                held -= len(step.released)
            held -= sum(len(step.finished) for step in steps)
        return peak


def schedule(plans: list[Plan], unit_blocks: list[int], num_layers: int) -> Schedule:
    """Group ``plans`` (distinct) block by block: ``unit_blocks[u]`` is the block unit ``u`` belongs to."""
    last_change = {p: max((unit_blocks[u] for u, w in enumerate(p) if w is not None), default=-1) for p in plans}
    members, live, blocks = {0: list(plans)}, [0], []
    for block in range(num_layers):
        units = [u for u, b in enumerate(unit_blocks) if b == block]
        by_widths: dict[tuple, list[tuple[int, list[Plan]]]] = {}
        for group in live:
            split: dict[tuple, list[Plan]] = {}
            for plan in members[group]:
                split.setdefault(tuple(plan[u] for u in units), []).append(plan)
            for widths, part in split.items():
                by_widths.setdefault(widths, []).append((group, part))
        steps, live = [], []
        for widths, parts in sorted(by_widths.items(), key=lambda item: [-1 if w is None else w for w in item[0]]):
            step = Step(block, {u: w for u, w in zip(units, widths) if w is not None})
            for parent, part in parts:
                child = len(members)
                members[child] = part
                step.moves.append((parent, child))
                (step.finished if all(last_change[p] <= block for p in part) else live).append(child)
            steps.append(step)
        last_step = {parent: step for step in steps for parent, _ in step.moves}
        for parent, step in last_step.items():
            step.released.append(parent)
        blocks.append(steps)
    return Schedule(blocks, {g: members[g] for steps in blocks for s in steps for g in s.finished})


def evaluate_plans(lm: LanguageModel, sequences: list[list[int]], plans: dict[str, list[int | None]],
                   weights: BlockWeights, *, compute: Callable[[], AbstractContextManager], progress: bool = True,
                   desc: str = "evaluating plans") -> tuple[TextScores, dict[str, TextScores], float]:
    """The unchanged model's scores and every plan's on ``sequences`` (whole texts), as ``evaluation.evaluate``
    gives them for variants, and the whole-model passes over the texts that took."""
    require_causal(lm, "evaluation")
    names: dict[Plan, list[str]] = {}
    for name, plan in plans.items():
        names.setdefault(tuple(plan), []).append(name)
    order = schedule(list(names), weights.blocks, lm.num_layers)
    n = len(sequences)
    reference, scores = TextScores.empty(n), {name: TextScores.empty(n) for name in plans}
    per_chunk = texts_per_chunk(lm, sequences, order.peak())
    chunks = [list(range(first, min(n, first + per_chunk))) for first in range(0, n, per_chunk)]
    bar = tqdm(total=len(chunks) * lm.num_layers, desc=desc, unit="block", disable=not progress)
    with torch.inference_mode(), running.evaluating(lm), compute(), bar:
        for rows in chunks:
            chunk = _Chunk(lm, sequences, rows)
            chunk.score_reference(reference)
            hidden = {0: chunk.inputs}
            for steps in order.blocks:
                done = {}
                for step in steps:
                    with weights.at(step.widths):
                        for parent, child in step.moves:
                            hidden[child] = chunk.through(step.block, step.block + 1, hidden[parent])
                    done |= {g: chunk.through(step.block + 1, lm.num_layers, hidden.pop(g)) for g in step.finished}
                    for parent in step.released:
                        del hidden[parent]
                chunk.score(done, lambda g: [scores[name] for plan in order.members[g] for name in names[plan]])
                bar.update()
    return reference, scores, order.passes()


def texts_per_chunk(lm: LanguageModel, sequences: list[list[int]], groups: int) -> int:
    """Texts whose hidden states, for ``groups`` at once and the unchanged model's inputs and outputs, stay within a
    quarter of the weights' bytes (at least ``HIDDEN_BUDGET``) in float32: at least one text, whatever it holds."""
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    per_text = (groups + 2) * max(map(len, sequences)) * lm.config.get_text_config().hidden_size * 4
    return max(1, max(HIDDEN_BUDGET, weights // 4) // per_text)


class _Chunk:
    """Some texts in batches, what each block is called with on each batch, and the unchanged model's last hidden
    states."""

    def __init__(self, lm: LanguageModel, sequences: list[list[int]], rows: list[int]):
        self.lm = lm
        texts = [sequences[i] for i in rows]
        self.batches = [([rows[i] for i in chosen], batch)
                        for chosen, batch in text_batches(texts, logits_batch(lm, texts), lm.device)]
        self.calls = [block_calls(lm, batch["input_ids"], batch["attention_mask"]) for _, batch in self.batches]
        self.inputs = [calls[0][0] for calls in self.calls]
        self.final = self.through(0, lm.num_layers, self.inputs)

    def through(self, start: int, stop: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every batch's hidden states after blocks ``start`` to ``stop - 1``, given those before ``start``."""
        out = []
        for calls, h in zip(self.calls, hidden):
            for i in range(start, stop):
                _, args, kwargs = calls[i]
                h = self.lm.blocks[i](h, *args, **kwargs)
                h = h[0] if isinstance(h, (tuple, list)) else h
            out.append(h)
        return out

    def log_probs(self, b: int, last: torch.Tensor) -> torch.Tensor:
        """Batch ``b``'s next-token log-probabilities from its last hidden states, by the model's own final norm and
        head (every block skipped, the last one returning them)."""
        blocks = self.lm.blocks
        with skipped(blocks, range(len(blocks) - 1)), returning(blocks[-1], last):
            return next_token_log_probs(self.lm.model, self.batches[b][1])

    def score_reference(self, into: TextScores) -> None:
        for b, (rows, batch) in enumerate(self.batches):
            base = Reference(self.log_probs(b, self.final[b]), batch)
            base.record(into, rows, base.log_probs)

    def score(self, done: dict[int, list[torch.Tensor]], into: Callable[[int], list[TextScores]]) -> None:
        """Record each finished group's figures into every score of ``into(group)``."""
        if not done:
            return
        for b, (rows, batch) in enumerate(self.batches):
            base = Reference(self.log_probs(b, self.final[b]), batch)
            for group, last in done.items():
                log_probs = self.log_probs(b, last[b])
                for target in into(group):
                    base.record(target, rows, log_probs)
