"""Held-out scoring as a server runs: prefill a prompt, then score its continuation chunk by chunk, every chunk
reading the cache the earlier ones wrote. A single teacher-forced pass never reads the cache it writes, so a quantized
cache would change nothing in it.

The prompt's keys and values are the same whatever a cache keeps (a prefill attends to its own states as computed),
so the prefill runs once per batch of documents and each plan's cache starts from its states (every layer's
``update`` called with them, as the prefill calls it); only the continuation runs per plan. The unchanged model is
the plan of full precision everywhere, read the same way: every plan is scored against its next-token distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicLayer

from ..models import LanguageModel, running
from .evaluation import Reference, TextScores
from .kvcache import FULL, Pair, build_cache, cache_bytes, cache_keyword

FULL_PRECISION = "full precision"
LOGITS_BUDGET = 1 << 30  # bytes of one batch's unchanged next-token distributions, held while every plan runs


@dataclass(frozen=True)
class Reading:
    """How documents are read: the first ``prefill`` tokens as the prompt, the rest ``chunk`` tokens per forward,
    into caches of quantized groups of ``group`` that keep the newest ``residual`` tokens in full precision."""

    prefill: int
    chunk: int
    group: int
    residual: int

    def cache(self, config, plan: list[Pair]) -> Cache:
        return build_cache(config, plan, group=self.group, residual=self.residual)

    def describe(self, context: int) -> str:
        return (f"the first {self.prefill} of {context} tokens prefilled, the other {context - self.prefill} scored "
                f"{self.chunk} per forward, each reading the cache; the newest {self.residual} tokens (and up to "
                f"{self.group - 1} more) kept in full precision")


def evaluate_caches(lm: LanguageModel, documents: list[list[int]], plans: dict[str, list[Pair]], reading: Reading, *,
                    compute: Callable[[], AbstractContextManager] = nullcontext, progress: bool = True,
                    desc: str = "evaluating") -> tuple[TextScores, dict[str, TextScores], dict[str, float]]:
    """The full-precision cache's scores and every plan's on the continuations of ``documents`` (all of one length),
    and every plan's cache in bytes per document read to its end (measured on the first batch)."""
    n, length = len(documents), len(documents[0])
    plans = {FULL_PRECISION: [Pair(FULL, FULL)] * lm.num_layers, **plans}
    scores = {name: TextScores.empty(n) for name in plans}
    nbytes: dict[str, float] = {}
    batch = continuation_batch(lm, length - reading.prefill)
    bar = tqdm(total=n * len(plans), desc=desc, unit="doc", disable=not progress)
    with torch.inference_mode(), running.evaluating(lm), compute(), bar:
        for start in range(0, n, batch):
            rows = list(range(start, min(start + batch, n)))
            ids = torch.tensor([documents[i] for i in rows], device=lm.device)
            prompt = prompt_states(lm, ids[:, :reading.prefill])
            references: list[Reference] = []
            for name, plan in plans.items():
                cache = reading.cache(lm.model.config, plan)
                for layer, (keys, values) in zip(cache.layers, prompt):
                    layer.update(keys, values)
                for c, (log_probs, labels) in enumerate(_continuation(lm, ids, reading, cache)):
                    if name == FULL_PRECISION:  # the first plan: what every plan is scored against
                        references.append(Reference(log_probs, {"labels": labels}))
                    references[c].record(scores[name], rows, log_probs)
                nbytes.setdefault(name, cache_bytes(cache) / len(rows))
                bar.update(len(rows))
    reference = scores.pop(FULL_PRECISION)
    return reference, scores, nbytes


def prompt_states(lm: LanguageModel, prompt: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's keys and values of the prompt, as its prefill computes them (every token kept)."""
    cache = Cache(layers=[DynamicLayer() for _ in lm.blocks])
    lm.model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{cache_keyword(lm.model): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def _continuation(lm: LanguageModel, ids: torch.Tensor, reading: Reading,
                  cache: Cache) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(next-token log-probabilities, labels) of each chunk of the continuation in turn, read through ``cache``: a
    chunk's log-probabilities predict its labels' tokens after the first."""
    length = ids.shape[1]
    for start in range(reading.prefill, length - 1, reading.chunk):
        stop = min(start + reading.chunk, length - 1)
        logits = lm.model(input_ids=ids[:, start:stop], use_cache=True, **{cache_keyword(lm.model): cache}).logits
        yield torch.log_softmax(logits.float(), dim=-1), ids[:, start:stop + 1]


def continuation_batch(lm: LanguageModel, scored: int) -> int:
    """Documents per batch that keep the unchanged model's distributions over ``scored`` positions (log-probabilities
    and probabilities in float32) within ``LOGITS_BUDGET``, at most 8."""
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    return max(1, min(8, LOGITS_BUDGET // (8 * vocab * scored)))
