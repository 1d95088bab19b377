"""The scan: load, probe, measure, combine, select. One function, each phase timed."""

from __future__ import annotations

import platform

import numpy as np
import torch

from . import __version__
from .capture import BATCH_SIZE, SINK_RATIO
from .consensus import agreement, bootstrap_critical, consensus
from .data import sample_texts
from .errors import CritlayerError
from .measures import DEFAULT_MEASURES, DIRECTION, MEASURES
from .measures.ablation import parse_parts
from .measures.suite import run_measures, timed
from .models import DEFAULT_MODEL, LanguageModel, load
from .probes import Probes, make_probes
from .result import ScanResult
from .select import select_critical

TEXT_N = 32  # texts the loss measures use: ablation runs about L/2 forwards over them per part
BOOTSTRAP = 100  # replicates; each recomputes the capture measures (mostly spectral's eigendecompositions) and ablation


def parse_measures(measures: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``default`` is the data-oblivious, one-pass trio; ``all`` every measure."""
    names = [m.strip() for m in (measures.split(",") if isinstance(measures, str) else measures) if m.strip()]
    if names == ["all"]:
        return tuple(MEASURES)
    if names == ["default"]:
        return DEFAULT_MEASURES
    unknown = [m for m in names if m not in MEASURES]
    if unknown or not names:
        raise CritlayerError(f"unknown measure {','.join(unknown) or '(none)'}; "
                             f"choose from {', '.join(MEASURES)}, default or all")
    return tuple(dict.fromkeys(names))


def check_text_source(measures: tuple[str, ...], probes: Probes | str, data: str | None) -> None:
    """Refuse, before any work, a loss measure without real text and --data that nothing reads."""
    needing = [m for m in measures if MEASURES[m].needs_text]
    if data is not None and not needing:
        readers = ", ".join(m for m in MEASURES if MEASURES[m].needs_text)
        raise CritlayerError(f"--data is only read by {readers}; none of them is in --measures")
    source = probes if isinstance(probes, str) else probes.source
    if needing and data is None and source == "random":
        raise CritlayerError(f"{', '.join(needing)} need text with real next tokens and random probes have none; "
                             "give --data (wiki, bbc, sharegpt or a file) or text probes")


def check_streamable(measures: tuple[str, ...], probes: Probes | str) -> None:
    """Block-by-block mode runs blocks, never the whole model: no generation, no loss."""
    whole = [m for m in measures if MEASURES[m].needs_text]
    if whole:
        raise CritlayerError(f"{', '.join(whole)} need the whole model in memory; drop --stream for them")
    if probes == "generated":
        raise CritlayerError("generated probes need the whole model to write them; with --stream use "
                             "--probes random, a corpus or a file")


def loss_texts(lm: LanguageModel, probes: Probes | None, data: str | None, *, n: int, max_tokens: int,
               seed: int) -> tuple[list[list[int]], str]:
    """The token sequences the loss measures run on (``n`` of --data, else the first ``n`` probes)."""
    if data is not None:
        sequences, source = sample_texts(lm, data, n, max_tokens, seed), data
    else:
        sequences, source = probes.token_ids[:n], probes.source
    sequences = [ids for ids in sequences if len(ids) >= 2]
    if len(sequences) < 2:
        raise CritlayerError(f"the loss measures need at least 2 texts of 2 tokens or more from {source!r}")
    return sequences, source


def scan(lm: LanguageModel | str = DEFAULT_MODEL, probes: Probes | str = "generated", *, n: int = 256,
         max_tokens: int = 64, seed: int = 0, chat_template: bool = False, token_mode: str = "last",
         window: int = 2, measures: str | tuple[str, ...] = DEFAULT_MEASURES, k: int | None = None,
         edges: bool = False, select_by: str | None = None, batch_size: int = BATCH_SIZE, max_rows: int = 2048,
         sink_ratio: float = SINK_RATIO, data: str | None = None, text_n: int = TEXT_N,
         ablate: str | tuple[str, ...] = ("block",), bootstrap: int | None = None,
         dtype: str = "auto", device: str | None = None, progress: bool = True) -> ScanResult:
    """Find the critical layers of a model: every chosen measure, their consensus and its bootstrap.

    >>> lm = critlayer.load("smollm2-135m")                                  # doctest: +SKIP
    >>> result = critlayer.scan(lm, probes="generated", n=256, token_mode="last")
    >>> result.critical, result.scores["delta"][:3], result.scores["consensus"][:3]
    >>> everything = critlayer.scan(lm, measures="all", data="bbc")       # ablation, gradient, ...

    ``bootstrap`` replicates give ``p_critical``; by default 100 when more than the default measures
    run and none otherwise, so the default scan costs what it did.
    """
    timing: dict = {}
    measures, ablate = parse_measures(measures), parse_parts(ablate)
    if bootstrap is None:
        bootstrap = 0 if set(measures) <= set(DEFAULT_MEASURES) else BOOTSTRAP
    check_text_source(measures, probes, data)
    for name, value, least in (("--window", window, 1), ("--max-rows", max_rows, 2), ("--text-n", text_n, 2),
                               ("--bootstrap", bootstrap, 0)):
        if value < least:
            raise CritlayerError(f"{name} must be at least {least}, got {value}")
    if isinstance(lm, str):
        with timed(timing, "load"):
            lm = load(lm, dtype=dtype, device=device)
    if lm.streamed:
        check_streamable(measures, probes)
    if k is not None and not 1 <= k <= lm.num_layers:
        raise CritlayerError(f"--k {k} is larger than the {lm.num_layers} layers of {lm.name}" if k > 0
                             else f"--k must be at least 1, got {k}")
    needs_probes = any(MEASURES[m].capture or (MEASURES[m].needs_text and data is None) for m in measures)
    built_here = isinstance(probes, str)
    if built_here and needs_probes:
        with timed(timing, "probes"):
            probes = make_probes(lm, probes, n=n, max_tokens=max_tokens, seed=seed,
                                 chat_template=chat_template, progress=progress)
    elif not needs_probes:
        probes = None
    text, text_source = (loss_texts(lm, probes, data, n=text_n, max_tokens=max_tokens, seed=seed)
                         if any(MEASURES[m].needs_text for m in measures) else (None, None))
    measured = run_measures(lm, measures, probes=probes, text=text, token_mode=token_mode, batch_size=batch_size,
                            seed=seed, sink_ratio=sink_ratio, max_rows=max_rows, window=window, ablate=ablate,
                            progress=progress)
    timing.update(measured.timing)
    scores, groups = measured.scores, measured.groups(measures)

    def select(name: str, values: np.ndarray):
        return select_critical(values, direction=DIRECTION[name], score_name=name, k=k, window=window, edges=edges)

    select_by = select_by or ("delta" if "delta" in scores else "consensus")
    basis = "consensus" if select_by == "p_critical" else select_by  # the score each replicate selects by
    with timed(timing, "consensus"):
        scores["consensus"] = consensus(scores, groups)
        resampled = bootstrap > 0 and bool(measured.resamplers) and basis in scores
        if resampled:
            scores["p_critical"] = bootstrap_critical(measured.replicate, groups,
                                                      lambda s: select(basis, s[basis]).critical, lm.num_layers,
                                                      replicates=bootstrap, seed=seed)
    if select_by not in scores:
        raise CritlayerError(f"cannot select by {select_by!r}; the scan computed {', '.join(scores)}")
    selection = select(select_by, scores[select_by])
    ranked = [s for names in groups.values() for s in names]
    probe_info = {} if probes is None else {
        **probes.describe(), "max_tokens": max_tokens if built_here else None, "token_mode": token_mode,
        "seed": seed, "chat_template": chat_template if built_here else None, "batch_size": batch_size,
        "sink_ratio": sink_ratio}
    return ScanResult(
        model=lm.describe(), probes=probe_info, layers=list(range(lm.num_layers)), cka=measured.cka, scores=scores,
        critical=selection.critical, selection={**selection.as_dict(), "measures": list(measures)},
        timing=timing, versions=_versions(), capture=measured.capture,
        consensus={"groups": groups, "scores": ranked, "agreement": np.round(agreement(scores, ranked), 6).tolist(),
                   "bootstrap": bootstrap if resampled else 0,
                   "held_fixed": measured.fixed if resampled else list(measures),
                   "text": None if text is None else {"source": text_source, "n": len(text),
                                                       "tokens": sum(map(len, text)), "ablate": list(ablate)},
                   **measured.details},
    )


def _versions() -> dict:
    import transformers

    return {"critlayer": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": platform.python_version()}
