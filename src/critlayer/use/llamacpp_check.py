"""A written GGUF checked in llama.cpp: the file run by llama.cpp itself on the held-out texts, beside transformers
on the same weights (the blocks kept, or the plan's quantized weights), so that what critlayer measured is what the
engine users deploy with computes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from ..common.errors import CritlayerError
from ..models import LanguageModel, running
from ..models.llamacpp import LlamaCppModel, version
from ..models.loss import text_batches
from .evaluation import Reference, TextScores, Variant, logits_batch, next_token_log_probs


def check_in_llamacpp(lm: LanguageModel, sequences: list[list[int]], path: Path, same_weights: Variant | None = None,
                      compute: Callable[[], AbstractContextManager] = nullcontext) -> dict:
    """``path`` run by llama.cpp on ``sequences`` against transformers on the same weights (``same_weights``, an
    evaluation variant; the loaded model without one): both perplexities, the paired 95% interval of their ratio
    over texts, and per token the KL divergence from transformers' next-token distribution and top-1 agreement; or,
    where llama.cpp cannot run the file, why."""
    start = time.perf_counter()
    vocabulary = lm.model.get_output_embeddings().weight.shape[0]
    try:
        engine = LlamaCppModel(path, max(map(len, sequences)), vocabulary)
    except CritlayerError as exc:  # the run's results stand; the file's failure in llama.cpp is one of them
        return {"engine": version(), "file": path.name, "why": str(exc)}
    n = len(sequences)
    transformers, llamacpp = TextScores.empty(n), TextScores.empty(n)
    try:
        with torch.inference_mode(), running.evaluating(lm), (same_weights or nullcontext)() as model:
            for chosen, batch in text_batches(sequences, logits_batch(lm, sequences), lm.device):
                with compute():
                    reference = Reference(next_token_log_probs(model or lm.model, batch), batch)
                reference.record(transformers, chosen, reference.log_probs)
                reference.record(llamacpp, chosen, next_token_log_probs(engine, batch))
    finally:
        engine.close()
    tokens = llamacpp.tokens.sum()
    low, high = llamacpp.perplexity_ratio_interval(transformers)
    return {"engine": version(), "file": path.name, "texts": n, "tokens": int(tokens),
            "perplexity": round(llamacpp.perplexity, 4), "transformers_perplexity": round(transformers.perplexity, 4),
            "ratio_95": [round(low, 4), round(high, 4)], "kl": round(float(llamacpp.kl.sum() / tokens), 5),
            "top1": round(float(llamacpp.agree.sum() / tokens), 5), "seconds": round(time.perf_counter() - start, 1)}
