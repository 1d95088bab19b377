"""The model writes its own probes: ancestral sampling with a KV cache, one random stream per probe.

Each token is drawn by inverse-CDF sampling from the model's full next-token distribution (temperature
1, no top-k or top-p) with a uniform number that hashes (seed, probe, position). Probe ``i`` is therefore
the same whatever batch it is written in and however many probes are asked for (the first ``n`` of a
longer run are exactly a run of ``n``), and a token that rounds differently on another CPU changes that
probe alone, not every later one.

``on_step`` sees the block outputs of every token as it goes through the model, so a scan can capture
its probes while they are written instead of running them through the model a second time. The last
token of a probe that reaches ``max_tokens`` is fed once more than sampling needs, so that its states
exist too; rows that have ended keep being fed (their states are flagged as not live and discarded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..common.errors import CritlayerError
from ..common.hashing import TOKENS, uniform
from ..models import LanguageModel, running

BATCH_SIZE = 64  # probes written at once: each step of the loop runs the model once over the batch
CHUNK = 1024  # tokens of the vocabulary per chunk of the two-step inverse-CDF search

# (position, live rows, L + 1 hidden states of shape (batch, hidden): block 0's input, then each block's output)
StepStates = Callable[[int, torch.Tensor, list[torch.Tensor]], None]


def draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row: the first whose cumulative probability exceeds ``u`` (inverse-CDF sampling).

    The search runs in two steps, over the (float32) sums of chunks of ``CHUNK`` tokens and then within the chunk
    found, so that only one chunk per row is accumulated in float64: a float64 cumulative sum over all of Gemma
    3's 262k tokens took 130 ms a step for 64 probes, about half the time the model took to write them, and
    this 60 ms. Where ``u`` falls within a chunk sum's rounding of a token's edge, the token may be its
    neighbour (it did in 2 of 50 batches of 64 draws over that vocabulary).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    rows, vocab = probs.shape
    chunks = -(-vocab // CHUNK)
    if chunks * CHUNK != vocab:
        probs = torch.nn.functional.pad(probs, (0, chunks * CHUNK - vocab))
    probs = probs.view(rows, chunks, CHUNK)
    sums = probs.sum(-1).double()
    cdf = sums.cumsum(-1)
    target = (u.to(cdf.device).double() * cdf[:, -1]).unsqueeze(1)
    chunk = torch.searchsorted(cdf, target, right=True).clamp(max=chunks - 1)
    within = probs[torch.arange(rows, device=probs.device), chunk.squeeze(1)].double().cumsum(-1)
    within += cdf.gather(1, chunk) - sums.gather(1, chunk)  # what the chunks before it hold
    token = chunk * CHUNK + torch.searchsorted(within, target, right=True).clamp(max=CHUNK - 1)
    return token.squeeze(1).clamp(max=vocab - 1)


def bos_token(lm: LanguageModel) -> int | None:
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(lm.config, "bos_token_id", None)
    return bos if isinstance(bos, int) else None


def start_token(lm: LanguageModel) -> int:
    """What every probe starts from: the BOS token, else the EOS token."""
    if not lm.is_causal:
        raise CritlayerError(f"{lm.architecture} cannot generate text; use --probes random or a corpus")
    for start in (bos_token(lm), lm.config.eos_token_id):
        if isinstance(start, int):
            return start
    raise CritlayerError(f"{lm.name} has neither a BOS nor an EOS token to generate from")


def end_tokens(lm: LanguageModel) -> set[int]:
    eos = getattr(lm.config, "eos_token_id", None)
    if eos is None and lm.tokenizer is not None:
        eos = lm.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())


@torch.inference_mode()
def write_probes(lm: LanguageModel, probes: Sequence[int], max_tokens: int, seed: int,
                 on_step: StepStates | None = None) -> list[list[int]]:
    """The token ids of ``probes`` (their indices), each at most ``max_tokens`` long and at least 2 (an end token
    is not drawn first), ending before the model's end token; ``on_step`` watches their block outputs."""
    start, ends = start_token(lm), end_tokens(lm)
    ids = np.asarray(probes)
    rows = len(ids)
    tokens = torch.full((rows, max_tokens), start, dtype=torch.long)
    lengths = torch.full((rows,), max_tokens, dtype=torch.long)
    live = torch.ones(rows, dtype=torch.bool)
    ending = torch.tensor(sorted(ends), dtype=torch.long, device=lm.device)
    states: list[torch.Tensor] = []
    cache = None
    watch = running.watching(lm, lambda hidden: states.append(hidden[:, -1]), stop=False) if on_step else None
    with watch or running.evaluating(lm):
        for position in range(max_tokens):
            states.clear()
            last = position == max_tokens - 1
            if last and on_step is None:
                break  # the last token's states are not wanted: no need to feed it
            out = lm.model(input_ids=tokens[:, position:position + 1].to(lm.device), cache=cache,
                           use_cache=not last)
            if on_step is not None:
                on_step(position, live.clone(), states)
            if last:
                break
            cache = out.cache
            logits = out.logits[:, -1]
            if position == 0 and len(ending):
                logits = logits.index_fill(1, ending, float("-inf"))  # every probe has a token after the start
            chosen = draw(logits, uniform(seed, TOKENS, ids, position + 1)).cpu()
            ended = live & torch.isin(chosen, ending.cpu())
            lengths[ended] = position + 1
            live &= ~ended
            tokens[:, position + 1] = torch.where(live, chosen, tokens[:, position])
            if not live.any():
                break
    return [row[:length].tolist() for row, length in zip(tokens, lengths.tolist())]
