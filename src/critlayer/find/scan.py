"""The scan: load, probe, measure, combine, select. One function, each phase timed."""

from __future__ import annotations

import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..common.errors import CritlayerError
from ..data.text import sample_texts
from ..models import DEFAULT_MODEL, LanguageModel, load
from .config import ScanConfig
from .consensus import Consensus, agreement, bootstrap_critical, consensus
from .measures import DIRECTION, MEASURES, TEXT
from .measures.suite import run_measures, timed
from .probes import Probes, make_probes
from .result import ScanResult
from .select import select_critical


def scan(model: LanguageModel | str = DEFAULT_MODEL, config: ScanConfig | None = None, *,
         out: str | Path | None = None, force: bool = False, progress: bool = True, dtype: str = "auto",
         device: str | None = None, device_map: str | None = None, stream: bool = False,
         trust_remote_code: bool = False, **options) -> ScanResult:
    """Find the critical layers of a model: every chosen measure, their consensus and its bootstrap.

    ``model`` is a built-in name, a model folder, a ``.gguf`` file, a hub id or a loaded ``LanguageModel``
    (loaded with ``dtype``, ``device``, ``device_map`` or ``stream``, as ``critlayer.load``); ``config`` a
    ``ScanConfig``, its fields also taken as keywords (``probes="wiki"``, ``measures="all"``, ``k=4``, ...).
    With ``out`` the result is saved there (scan.json, layers.csv, plots, report.html).

    >>> result = critlayer.scan(model_folder, probes="random", n=16, max_tokens=12, progress=False)
    >>> len(result.scores["delta"]), all(0 <= block < 6 for block in result.critical)
    (6, True)
    """
    config = replace(config, **options) if config is not None else ScanConfig(**options)
    if out is not None:
        from ..common.folders import check_output_folder

        check_output_folder(Path(out), ScanResult.FILE, force)
    start, timing = time.perf_counter(), {}
    if not isinstance(model, LanguageModel):
        with timed(timing, "load"):
            model = load(model, dtype=dtype, device=device, device_map=device_map, stream=stream,
                         trust_remote_code=trust_remote_code)
    result = scan_model(model, config, progress=progress)
    result.timing = {**timing, **result.timing, "total": round(time.perf_counter() - start, 3)}
    if out is not None:
        result.save(out, force=force)
    return result


def scan_model(lm: LanguageModel, config: ScanConfig, *, progress: bool = True) -> ScanResult:
    """The scan of a loaded model."""
    timing: dict = {}
    if lm.streamed:
        _check_streamable(config)
    if config.k is not None and config.k > lm.num_layers:
        raise CritlayerError(f"--k {config.k} is larger than the {lm.num_layers} layers of {lm.name}")
    probes, built_here = None, isinstance(config.probes, str)
    if config.needs_probes:
        probes = config.probes
        if built_here:
            with timed(timing, "probes"):
                probes = make_probes(lm, config.probes, n=config.n, max_tokens=config.max_tokens, seed=config.seed,
                                     chat_template=config.chat_template, progress=progress)
    text, text_source = _loss_texts(lm, probes, config) if config.needs_text else (None, None)
    measured = run_measures(lm, config, probes=probes, text=text, progress=progress)
    timing.update(measured.timing)
    scores, groups = measured.scores, measured.groups()

    def select(name: str, values: np.ndarray):
        return select_critical(values, direction=DIRECTION[name], score_name=name, k=config.k,
                               window=config.window, edges=config.edges)

    select_by = config.score or ("delta" if "delta" in scores else "consensus")
    basis = "consensus" if select_by == "p_critical" else select_by  # the score each replicate selects by
    with timed(timing, "consensus"):
        scores["consensus"] = consensus(scores, groups)
        resampled = config.bootstrap > 0 and any(m.resampled for m in measured.measures) and basis in scores
        if resampled:
            scores["p_critical"] = bootstrap_critical(measured.replicate, groups,
                                                      lambda s: select(basis, s[basis]).critical, lm.num_layers,
                                                      replicates=config.bootstrap, seed=config.seed)
    if select_by not in scores:
        raise CritlayerError(f"cannot select by {select_by!r}; the scan computed {', '.join(scores)}")
    ranked = [s for names in groups.values() for s in names]
    probe_info = {} if probes is None else {
        **probes.describe(), "max_tokens": config.max_tokens if built_here else None,
        "token_mode": config.token_mode, "seed": config.seed,
        "chat_template": config.chat_template if built_here else None, "batch_size": config.batch_size,
        "sink_ratio": config.sink_ratio}
    text_info = None if text is None else {"source": text_source, "n": len(text), "tokens": sum(map(len, text)),
                                           "ablate": list(config.ablate)}
    return ScanResult(
        model=lm.describe(), probes=probe_info, layers=list(range(lm.num_layers)), cka=measured.cka, scores=scores,
        selection=select(select_by, scores[select_by]), measures=list(config.measures),
        consensus=Consensus(groups, ranked, np.round(agreement(scores, ranked), 6).tolist(),
                            config.bootstrap if resampled else 0,
                            measured.fixed if resampled else list(config.measures), text_info, measured.details),
        capture=measured.capture, timing=timing, versions=_versions())


def _check_streamable(config: ScanConfig) -> None:
    """Block-by-block mode runs blocks, never the whole model: no generation, no loss."""
    whole = [m for m in config.measures if MEASURES[m].reads == TEXT]
    if whole:
        raise CritlayerError(f"{', '.join(whole)} need the whole model in memory; drop --stream for them")
    if config.probes == "generated" and config.needs_probes:
        raise CritlayerError("generated probes need the whole model to write them; with --stream use "
                             "--probes random, a corpus or a file")


def _loss_texts(lm: LanguageModel, probes: Probes | None, config: ScanConfig) -> tuple[list[list[int]], str]:
    """The token sequences the loss measures run on (``text_n`` of --data, else the first probes)."""
    if config.data is not None:
        sequences, source = sample_texts(lm, config.data, config.text_n, config.max_tokens, config.seed), config.data
    else:
        sequences, source = probes.token_ids[:config.text_n], probes.source
    sequences = [ids for ids in sequences if len(ids) >= 2]
    if len(sequences) < 2:
        raise CritlayerError(f"the loss measures need at least 2 texts of 2 tokens or more from {source!r}")
    return sequences, source


def _versions() -> dict:
    import transformers

    from ..version import __version__

    return {"critlayer": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": platform.python_version()}
