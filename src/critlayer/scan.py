"""The scan: load, probe, capture, measure, select. One function, each phase timed."""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager

import numpy as np
import torch

from . import __version__
from .capture import SINK_RATIO, Capture
from .errors import CritlayerError
from .measures import DIRECTION, MEASURES, BlockSimilarity, RowSample, cka_matrix, delta_scores, spectral_scores
from .models import DEFAULT_MODEL, LanguageModel, load
from .probes import Probes, make_probes
from .result import ScanResult
from .select import select_critical

DEFAULT_MEASURES = tuple(MEASURES)


@contextmanager
def _timed(timing: dict, phase: str):
    start = time.perf_counter()
    yield
    timing[phase] = round(time.perf_counter() - start, 3)


def parse_measures(measures: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    names = [m.strip() for m in (measures.split(",") if isinstance(measures, str) else measures) if m.strip()]
    if names == ["all"]:
        return DEFAULT_MEASURES
    unknown = [m for m in names if m not in MEASURES]
    if unknown or not names:
        raise CritlayerError(f"unknown measure {','.join(unknown) or '(none)'}; choose from {', '.join(MEASURES)} or all")
    return tuple(dict.fromkeys(names))


def scan(lm: LanguageModel | str = DEFAULT_MODEL, probes: Probes | str = "generated", *, n: int = 256,
         max_tokens: int = 64, seed: int = 0, chat_template: bool = False, token_mode: str = "last",
         window: int = 2, measures: str | tuple[str, ...] = DEFAULT_MEASURES, k: int | None = None,
         edges: bool = False, select_by: str | None = None, batch_size: int = 32, max_rows: int = 2048,
         sink_ratio: float = SINK_RATIO,
         dtype: str = "auto", device: str | None = None, progress: bool = True) -> ScanResult:
    """Find the critical layers of a model without task data.

    >>> lm = critlayer.load("smollm2-135m")                                  # doctest: +SKIP
    >>> result = critlayer.scan(lm, probes="generated", n=256, token_mode="last")
    >>> result.critical, result.scores["delta"][:3]
    """
    timing: dict[str, float] = {}
    measures = parse_measures(measures)
    if window < 1:
        raise CritlayerError(f"--window must be at least 1, got {window}")
    if max_rows < 2:
        raise CritlayerError(f"--max-rows must be at least 2, got {max_rows}")
    if isinstance(lm, str):
        with _timed(timing, "load"):
            lm = load(lm, dtype=dtype, device=device)
    if k is not None and not 1 <= k <= lm.num_layers:
        raise CritlayerError(f"--k {k} is larger than the {lm.num_layers} layers of {lm.name}" if k > 0
                             else f"--k must be at least 1, got {k}")
    built_here = isinstance(probes, str)
    if built_here:
        with _timed(timing, "probes"):
            probes = make_probes(lm, probes, n=n, max_tokens=max_tokens, seed=seed,
                                 chat_template=chat_template, progress=progress)
    capture = Capture(lm, probes, token_mode=token_mode, batch_size=batch_size, seed=seed, sink_ratio=sink_ratio,
                      progress=progress)
    sample = RowSample(max_rows) if {"cka", "spectral"} & set(measures) else None
    similarity = BlockSimilarity() if "influence" in measures else None
    with _timed(timing, "capture"):
        for batch in capture:
            for accumulator in (sample, similarity):
                if accumulator is not None:
                    accumulator.update(batch)
    if capture.stats.rows < 2:
        raise CritlayerError(f"only {capture.stats.rows} row(s) left after dropping massive activations; "
                             "raise --sink-ratio or use more probes")
    with _timed(timing, "measures"):
        scores, cka = {}, None
        outputs = sample.compute()[1:] if sample is not None else None  # block outputs only
        if "cka" in measures:
            cka = cka_matrix(outputs)
            scores["delta"] = delta_scores(cka, window)
        if similarity is not None:
            scores.update(similarity.compute())
        if "spectral" in measures:
            scores.update(spectral_scores(outputs))
    if not all(np.isfinite(v).all() for v in scores.values()):
        raise CritlayerError("the probes give identical hidden states (no variance across rows); use more varied probes")
    select_by = select_by or ("delta" if "delta" in scores else next(iter(scores)))
    if select_by not in scores:
        raise CritlayerError(f"cannot select by {select_by!r}; the scan computed {', '.join(scores)}")
    selection = select_critical(scores[select_by], direction=DIRECTION[select_by], score_name=select_by,
                                k=k, window=window, edges=edges)
    return ScanResult(
        model=lm.describe(),
        probes={**probes.describe(), "max_tokens": max_tokens if built_here else None, "token_mode": token_mode,
                "seed": seed, "chat_template": chat_template if built_here else None, "batch_size": batch_size,
                "sink_ratio": sink_ratio},
        layers=list(range(lm.num_layers)), cka=cka, scores=scores, critical=selection.critical,
        selection={**selection.as_dict(), "measures": list(measures)},
        timing=timing, versions=_versions(),
        capture={**capture.stats.as_dict(), "rows_for_cka": 0 if sample is None else int(sample.keys.numel()),
                 "max_rows": max_rows},
    )


def _versions() -> dict:
    import transformers

    return {"critlayer": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": platform.python_version()}
