"""Probe sets: the token sequences a scan feeds the model.

Data-oblivious by default: the model writes its own probes from its BOS token (``generated``),
or they are random token ids (``random``). Real text comes from built-in corpora (``wiki``,
``bbc``, ``sharegpt``) or from the user's ``.txt`` (one prompt per line) or ``.jsonl`` file
(field ``text`` or ``prompt``). Every scan saves the exact token ids it read as ``probes.json``, with a
fingerprint of the tokenizer, and takes that file back as a source, so that a scan can be rerun anywhere
on identical input.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..common.errors import CritlayerError
from ..data.corpora import CORPORA, corpus_texts
from ..data.prompts import read_prompt_file, tokenize
from ..models import LanguageModel
from .sampler import BATCH_SIZE as WRITING_BATCH
from .sampler import bos_token, write_probes

SOURCES = ("generated", "random", *CORPORA)
PROBE_FILE = "probes.json"


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
    if Path(source).suffix == ".json":
        return Probes(source, read_probe_file(lm, source)[:n])
    if source == "random":
        return Probes(source, random_probes(lm, n, max_tokens, seed))
    if source in CORPORA:
        texts = list(corpus_texts(source))
        texts = [texts[i] for i in np.random.default_rng(seed).permutation(len(texts))[:n]]  # n more extend them
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
    bos = bos_token(lm)
    body = max_tokens - (bos is not None)
    return [([bos] if bos is not None else []) + allowed[rng.integers(0, len(allowed), body)].tolist()
            for _ in range(n)]


def generate_probes(lm: LanguageModel, n: int, max_tokens: int, seed: int, progress: bool = True) -> list[list[int]]:
    """Let the model write its own probes from its BOS token (see ``find.sampler``)."""
    sequences: list[list[int]] = []
    for begin in tqdm(range(0, n, WRITING_BATCH), desc="generating probes", unit="batch", disable=not progress):
        sequences += write_probes(lm, range(begin, min(n, begin + WRITING_BATCH)), max_tokens, seed)
    return sequences


def tokenizer_fingerprint(lm: LanguageModel) -> str | None:
    """A sha256 of the tokenizer's vocabulary (token -> id): probe ids mean the same tokens only where it matches."""
    if lm.tokenizer is None:
        return None
    vocab = sorted(lm.tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def write_probe_file(probes: Probes, fingerprint: str | None, path: Path) -> None:
    path.write_text(json.dumps({"source": probes.source, "tokenizer": fingerprint, "token_ids": probes.token_ids}))


def read_probe_file(lm: LanguageModel, path: str | Path) -> list[list[int]]:
    """The token ids of a probes.json, refused where the model's tokenizer is not the one they were made with."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        ids, fingerprint = data["token_ids"], data.get("tokenizer")
        if not all(isinstance(row, list) and all(isinstance(t, int) for t in row) for row in ids):
            raise TypeError("token_ids must be lists of integers")
    except FileNotFoundError:
        raise CritlayerError(f"no probe file at {path}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CritlayerError(f"{path} is not a critlayer probe file: {exc}") from None
    if fingerprint != tokenizer_fingerprint(lm):
        raise CritlayerError(f"{path} was written with another tokenizer than {lm.name}'s; its ids would mean "
                             "other tokens")
    vocab = lm.model.get_input_embeddings().num_embeddings
    if any(not 0 <= t < vocab for row in ids for t in row):
        raise CritlayerError(f"{path} holds token ids outside {lm.name}'s vocabulary of {vocab}")
    return ids
