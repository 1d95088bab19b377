"""Probe sets: the token sequences a scan feeds the model.

Data-oblivious by default: the model writes its own probes from its BOS token (``generated``),
or they are random token ids (``random``). Real text comes from built-in corpora (``wiki``,
``bbc``, ``sharegpt``) or from the user's ``.txt`` (one prompt per line) or ``.jsonl`` file
(field ``text`` or ``prompt``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..common.errors import CritlayerError
from ..data.corpora import CORPORA, corpus_texts
from ..data.prompts import read_prompt_file, tokenize
from ..models import LanguageModel

SOURCES = ("generated", "random", *CORPORA)


@dataclass
class Probes:
    """Token id sequences (BOS included where the model uses one) and where they came from."""

    source: str
    token_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.token_ids)

    def describe(self) -> dict:
        lengths = [len(ids) for ids in self.token_ids]
        return {"source": self.source, "n": len(self), "mean_tokens": float(np.mean(lengths)) if lengths else 0.0}


def make_probes(lm: LanguageModel, source: str = "generated", *, n: int = 256, max_tokens: int = 64,
                seed: int = 0, chat_template: bool = False, progress: bool = True) -> Probes:
    """Build ``n`` probe sequences of at most ``max_tokens`` tokens from ``source``: ``generated`` (the model writes
    them from its BOS token), ``random`` token ids, a built-in corpus (wiki, bbc, sharegpt) or a .txt/.jsonl file.

    >>> probes = critlayer.make_probes(critlayer.load(model_folder), "random", n=4, max_tokens=8)
    >>> len(probes), [len(ids) for ids in probes.token_ids]
    (4, [8, 8, 8, 8])
    """
    if n < 2:
        raise CritlayerError(f"need at least 2 probe samples, got n={n}")
    if max_tokens < 2:
        raise CritlayerError(f"need at least 2 tokens per probe, got max_tokens={max_tokens}")
    if source == "generated":
        return Probes(source, generate_probes(lm, n, max_tokens, seed, progress))
    if source == "random":
        return Probes(source, random_probes(lm, n, max_tokens, seed))
    if source in CORPORA:
        texts = list(corpus_texts(source))
        rng = np.random.default_rng(seed)
        texts = [texts[i] for i in sorted(rng.choice(len(texts), size=min(n, len(texts)), replace=False))]
    elif Path(source).suffix or Path(source).exists():
        texts = read_prompt_file(source)[:n]
    else:
        raise CritlayerError(f"unknown probe source {source!r}; choose one of {', '.join(SOURCES)} or a .txt/.jsonl file")
    if len(texts) < 2:
        raise CritlayerError(f"probe source {source!r} has {len(texts)} prompt(s); need at least 2")
    return Probes(source, tokenize(lm, texts, max_tokens, chat_template))


def random_probes(lm: LanguageModel, n: int, max_tokens: int, seed: int) -> list[list[int]]:
    """Uniformly random token ids, after the BOS token where the model has one."""
    vocab = lm.model.get_input_embeddings().num_embeddings
    special = set(getattr(lm.tokenizer, "all_special_ids", None) or [])
    allowed = np.array([i for i in range(vocab) if i not in special])
    rng = np.random.default_rng(seed)
    bos = _bos_id(lm)
    body = max_tokens - (bos is not None)
    return [([bos] if bos is not None else []) + allowed[rng.integers(0, len(allowed), body)].tolist()
            for _ in range(n)]


def generate_probes(lm: LanguageModel, n: int, max_tokens: int, seed: int, progress: bool = True,
                    batch_size: int = 64) -> list[list[int]]:
    """Let the model write its own probes: seeded ancestral sampling from the BOS token."""
    if not lm.is_causal:
        raise CritlayerError(f"{lm.architecture} cannot generate text; use --probes random or a corpus")
    start = _bos_id(lm)
    if start is None:
        start = lm.config.eos_token_id if isinstance(lm.config.eos_token_id, int) else None
    if start is None:
        raise CritlayerError(f"{lm.name} has neither a BOS nor an EOS token to generate from")
    eos = _eos_ids(lm)
    sequences: list[list[int]] = []
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        for begin in tqdm(range(0, n, batch_size), desc="generating probes", unit="batch", disable=not progress):
            size = min(batch_size, n - begin)
            ids = torch.full((size, 1), start, dtype=torch.long, device=lm.device)
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                    top_k=0, top_p=1.0, max_new_tokens=max_tokens - 1,
                                    min_new_tokens=1, pad_token_id=next(iter(eos), start))
            for row in out.tolist():
                end = next((i for i, t in enumerate(row[1:], 1) if t in eos), len(row))
                sequences.append(row[:end])
    return sequences


def _bos_id(lm: LanguageModel) -> int | None:
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(lm.config, "bos_token_id", None)
    return bos if isinstance(bos, int) else None


def _eos_ids(lm: LanguageModel) -> set[int]:
    eos = getattr(lm.config, "eos_token_id", None)
    if eos is None and lm.tokenizer is not None:
        eos = lm.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())
