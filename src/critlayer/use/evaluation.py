"""Held-out evaluation of changed models against the unchanged one: what pruning and quantization report.

A variant is a context in which the model computes differently (blocks skipped, sublayers dropped,
weights swapped for quantized ones); it yields the model to run, or None for the loaded one. Each batch of held-out text runs once through the unchanged
model and once inside every variant; per text we keep the summed next-token loss, the number of
predicted tokens, the summed KL divergence from the unchanged model's next-token distribution and how
many top-1 predictions agree with it, so that two variants compare with paired intervals over texts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..common.stats import paired_difference_interval
from ..models import LanguageModel, running
from ..models.loss import BATCH, require_causal, text_batches

Variant = Callable[[], AbstractContextManager]
Choice = list[int]  # what a method chose at one point: blocks to remove, or a width per block


@dataclass
class TextScores:
    """Per held-out text: summed loss, predicted tokens, summed KL to the unchanged model, top-1 agreements."""

    loss: np.ndarray
    tokens: np.ndarray
    kl: np.ndarray
    agree: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "TextScores":
        return cls(*(np.zeros(n) for _ in range(4)))

    @property
    def mean_loss(self) -> float:
        return float(self.loss.sum() / self.tokens.sum())

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.mean_loss))

    def summary(self) -> dict:
        total = self.tokens.sum()
        return {"perplexity": round(self.perplexity, 4), "loss": round(self.mean_loss, 5),
                "kl": round(float(self.kl.sum() / total), 5), "top1": round(float(self.agree.sum() / total), 5)}

    def perplexity_ratio_interval(self, other: "TextScores", seed: int = 0) -> tuple[float, float]:
        """95% bootstrap interval over texts of this perplexity divided by ``other``'s (paired: the same texts)."""
        low, high = paired_difference_interval(self.loss, other.loss, self.tokens, seed=seed)
        return (float(np.exp(low)), float(np.exp(high)))


def evaluate(lm: LanguageModel, sequences: list[list[int]], variants: dict[str, Variant], *,
             batch_size: int | None = None, compute: Callable[[], AbstractContextManager] = nullcontext,
             progress: bool = True) -> tuple[TextScores, dict[str, TextScores]]:
    """The unchanged model's scores and every variant's on ``sequences`` (each a whole text: the context is its
    length), all inside ``compute`` (for example autocast)."""
    require_causal(lm, "evaluation")
    batch_size = batch_size or logits_batch(lm, sequences)
    n = len(sequences)
    reference, scores = TextScores.empty(n), {name: TextScores.empty(n) for name in variants}
    bar = tqdm(total=n * (len(variants) + 1), desc="evaluating", unit="text", disable=not progress)
    with torch.inference_mode(), running.evaluating(lm), compute(), bar:
        for chosen, batch in text_batches(sequences, batch_size, lm.device):
            base = Reference(next_token_log_probs(lm.model, batch), batch)
            base.record(reference, chosen, base.log_probs)
            bar.update(len(chosen))
            for name, variant in variants.items():
                with variant() as model:
                    base.record(scores[name], chosen, next_token_log_probs(model or lm.model, batch))
                bar.update(len(chosen))
    return reference, scores


@dataclass
class Method:
    """One way of choosing: its choice at every point of a curve (blocks removed, or a bit budget; several draws
    for random), what choosing cost, and, once evaluated, every choice's held-out figures."""

    name: str
    choices: dict[float, list[Choice]]
    cost: dict[float, dict] = field(default_factory=dict)
    perplexity: dict[float, list[float]] = field(default_factory=dict)
    summary: dict[float, list[dict]] = field(default_factory=dict)

    def median(self, point: float) -> float:
        return float(np.median(self.perplexity[point]))

    @classmethod
    def from_json(cls, name: str, data: dict) -> "Method":
        """A saved method, its points (JSON keys) read back as they were written: counts as int, budgets as float."""
        back = lambda values: {int(n) if n.isdigit() else float(n): v for n, v in values.items()}  # noqa: E731
        return cls(name, back(data["choices"]), back(data["cost"]), back(data["perplexity"]), back(data["evaluation"]))

    def to_json(self) -> dict:
        return {"choices": {str(n): c for n, c in self.choices.items()},
                "cost": {str(n): c for n, c in self.cost.items()},
                "perplexity": {str(n): p for n, p in self.perplexity.items()},
                "evaluation": {str(n): s for n, s in self.summary.items()}}


Run = Callable[[dict[str, Choice]], tuple[TextScores, dict[str, TextScores]]]


def evaluate_methods(methods: dict[str, Method], run: Run) -> TextScores:
    """Evaluate every distinct choice once (methods often agree) with ``run`` (named choices to the unchanged
    model's scores and each choice's) and fill in each method's figures; at every point, each single choice gets a
    paired 95% interval of its perplexity over the first (chosen) method's. Returns the unchanged model's scores."""
    keys: dict[tuple, str] = {}
    for m in methods.values():
        for choices in m.choices.values():
            for choice in choices:
                keys.setdefault(tuple(choice), f"choice {len(keys)}")
    reference, scores = run({name: list(choice) for choice, name in keys.items()})
    of = lambda choice: scores[keys[tuple(choice)]]  # noqa: E731
    for m in methods.values():
        for n, choices in m.choices.items():
            m.summary[n] = [of(c).summary() for c in choices]
            m.perplexity[n] = [s["perplexity"] for s in m.summary[n]]
    chosen = next(iter(methods.values()))
    for other in [m for m in methods.values() if m is not chosen]:  # paired over the same texts: beyond the noise?
        for n in chosen.choices:
            if len(other.choices.get(n, [])) == 1:
                low, high = of(other.choices[n][0]).perplexity_ratio_interval(of(chosen.choices[n][0]))
                other.summary[n][0]["perplexity_ratio_to_chosen_95"] = [round(low, 4), round(high, 4)]
    return reference


def logits_batch(lm: LanguageModel, sequences: list[list[int]], budget: int = 1 << 27) -> int:
    """Texts per forward that keep one batch's float32 logits within ``budget`` bytes (128 MB; the evaluation holds
    a few such tensors at once: over a vocabulary of 128k words, two texts of 128 tokens), at most ``BATCH``."""
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    return max(1, min(BATCH, budget // (4 * vocab * max(map(len, sequences)))))


def next_token_log_probs(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """A batch's next-token log-probabilities in float32, every position but the last."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


class Reference:
    """The unchanged model's next-token distribution on one batch: what every variant is scored against."""

    def __init__(self, log_probs: torch.Tensor, batch: dict):
        self.log_probs, self.probs, self.top = log_probs, log_probs.exp(), log_probs.argmax(-1)
        self.targets = batch["labels"][:, 1:].clamp(min=0).unsqueeze(-1)
        self.mask = batch["labels"][:, 1:] != -100

    def record(self, into: TextScores, rows: list[int], log_probs: torch.Tensor) -> None:
        """Add each row's figures of ``log_probs`` (this batch, or a run of its positions) to its text's in ``into``."""
        nll = -log_probs.gather(-1, self.targets).squeeze(-1)
        kl = (self.probs * (self.log_probs - log_probs)).sum(-1)
        agree = (log_probs.argmax(-1) == self.top).float()
        for array, values in ((into.loss, nll), (into.tokens, torch.ones_like(nll)), (into.kl, kl),
                              (into.agree, agree)):
            array[rows] += (values * self.mask).sum(1).double().cpu().numpy()


def tokens_per_second(model: torch.nn.Module, sequences: list[list[int]], *, batch_size: int = BATCH,
                      compute: Callable[[], AbstractContextManager] = nullcontext, repeats: int = 2) -> float:
    """Forward throughput with logits over ``sequences``: the best of ``repeats`` timed passes after a warm-up."""
    device = next(model.parameters()).device
    batches = [batch for _, batch in text_batches(sequences, batch_size, device)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    best = float("inf")
    with torch.inference_mode(), compute():
        model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"], use_cache=False)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the warm-up, or the last pass, has finished
            start = time.perf_counter()
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
    return tokens / best


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters, a tied embedding and head counted once."""
    return sum(p.numel() for p in model.parameters())
