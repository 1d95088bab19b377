"""Text for fine-tuning and evaluation: a built-in corpus or a file, split once into train and held-out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common.errors import CritlayerError
from ..models import LanguageModel
from .corpora import CORPORA, corpus_texts
from .prompts import read_prompt_file, tokenize

SPLIT_SEED = 1234  # the held-out part never depends on a run's seed, so runs stay comparable


@dataclass
class TextData:
    """Tokenised train and held-out sequences (BOS included), with where they came from.

    ``*_starts`` (optional) give each sequence's first position that counts in the loss, so that
    instruction data trains on replies only; without them every token counts.
    """

    source: str
    train: list[list[int]]
    heldout: list[list[int]]
    train_starts: list[int] | None = None
    heldout_starts: list[int] | None = None

    def describe(self) -> dict:
        return {"source": self.source, "n_train": len(self.train), "n_heldout": len(self.heldout),
                "train_tokens": sum(map(len, self.train)), "heldout_tokens": sum(map(len, self.heldout))}


def load_texts(source: str) -> list[str]:
    """The distinct texts of a corpus or file (duplicates would leak into the held-out part)."""
    if source in CORPORA:
        texts = corpus_texts(source)
    elif Path(source).suffix in (".txt", ".jsonl") or Path(source).exists():
        texts = read_prompt_file(source)
    else:
        raise CritlayerError(f"unknown data source {source!r}; choose one of {', '.join(CORPORA)} or a .txt/.jsonl file")
    return list(dict.fromkeys(texts))


def check_source(source: str, needed: int = 2) -> None:
    """Refuse, in one line and before any model is loaded, a source that is neither a built-in corpus nor a readable
    UTF-8 .txt/.jsonl file holding at least ``needed`` distinct texts."""
    if source in CORPORA:
        return
    texts = load_texts(source)
    if len(texts) < needed:
        raise CritlayerError(f"{source} holds {len(texts)} distinct text(s); at least {needed} are needed")


def load_data(lm: LanguageModel, source: str, *, n_eval: int, max_tokens: int, n_train: int | None = None) -> TextData:
    """Shuffle ``source`` once (fixed seed) and split it: the first ``n_eval`` texts are held out."""
    texts = load_texts(source)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(texts))
    heldout = [texts[i] for i in order[:n_eval]]
    train = [texts[i] for i in order[n_eval:]][:n_train]
    if n_eval < 2 or len(heldout) < n_eval:
        raise CritlayerError(f"held-out data too small to evaluate: {len(heldout)} text(s) of {source!r}, "
                             f"need at least {max(2, n_eval)}")
    if not train:
        raise CritlayerError(f"data source {source!r} leaves no training text after holding out {n_eval}")
    data = TextData(source, tokenize(lm, train, max_tokens), tokenize(lm, heldout, max_tokens))
    data.train = [ids for ids in data.train if len(ids) >= 2]
    data.heldout = [ids for ids in data.heldout if len(ids) >= 2]
    if len(data.heldout) < 2 or not data.train:
        raise CritlayerError(f"data source {source!r} has too few texts of 2 tokens or more")
    return data


def sample_texts(lm: LanguageModel, source: str, n: int, max_tokens: int, seed: int = 0) -> list[list[int]]:
    """``n`` texts of ``source`` drawn with ``seed``, tokenised (for the measures that need a loss).

    They come from the back half of the fixed split order, while ``load_data`` holds out texts from
    its front, so a scan's loss measures never read the held-out texts ``validate`` scores.
    """
    texts = load_texts(source)
    pool = np.random.default_rng(SPLIT_SEED).permutation(len(texts))[len(texts) // 2:]
    chosen = sorted(np.random.default_rng(seed).choice(pool, size=min(n, len(pool)), replace=False))
    return tokenize(lm, [texts[i] for i in chosen], max_tokens)


def long_texts(lm: LanguageModel, source: str, n: int, length: int, *, heldout: bool, seed: int = 0) -> list[list[int]]:
    """``n`` documents of exactly ``length`` tokens, each ``source``'s texts joined by blank lines until long enough:
    what long-context evaluation reads. Held-out documents come from the front half of the fixed split order (as
    ``load_data``'s held-out texts do), the others from the back half drawn with ``seed`` (as ``sample_texts``), so
    the two never share a text."""
    texts = load_texts(source)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(texts))
    half = len(texts) // 2
    pool = order[:half] if heldout else np.random.default_rng(seed).permutation(order[half:])
    documents, joined = [], []
    for i in pool:
        joined.append(texts[i])
        if sum(map(len, joined)) < 2 * length:  # under two characters a token: too short to be worth tokenising
            continue
        ids = tokenize(lm, ["\n\n".join(joined)], length)[0]
        if len(ids) == length:
            documents.append(ids)
            joined = []
            if len(documents) == n:
                return documents
    raise CritlayerError(f"{source} holds {len(documents)} {'held-out' if heldout else 'calibration'} "
                         f"document(s) of {length} tokens; {n} are needed: give a shorter context or more text")
