"""The scan: load, probe, measure, combine, select, each phase timed; and ``scan_of``, the one way every other
command gets a scan of the model it works on."""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..common.distributed import is_main, on_main
from ..common.cost import Plan
from ..common.errors import CritlayerError
from ..data.text import sample_texts
from ..models import DEFAULT_MODEL, LanguageModel, load
from ..models.loading import resolve_dtype
from .config import ScanConfig
from .consensus import Consensus, agreement, bootstrap_critical, consensus
from .firmness import REPLICATES, ROUND, SETTLED_ROUNDS, Firmness, Round, Rounds, probabilities, should_stop
from .measures import CAPTURE, DIRECTION, MEASURES, TEXT
from .measures.suite import run_measures, timed
from .probes import Probes, make_probes, tokenizer_fingerprint
from .result import ScanResult
from .select import select_critical, widest_window


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


def scan_of(lm: LanguageModel, scan: ScanResult | str | Path | None = None, *, config: ScanConfig | None = None,
            dtype: str | None = None, progress: bool = True) -> ScanResult:
    """The one way every command gets a scan of the model it works on: ``scan`` (a result, or its folder or
    scan.json), else a scan (``config``, default the default scan) run now, once (by the main process, handed to
    the others); either way checked to fit ``lm`` (architecture, shape, tokenizer).

    ``dtype`` None scans ``lm`` as loaded; a dtype scans the model as ``critlayer scan --dtype`` would, loading it
    anew where ``lm`` holds wider weights (float32, for a checkpoint or training) than that dtype computes in.
    """
    if scan is None:
        if progress and is_main():
            print("critlayer: scanning for critical layers first (pass a scan to reuse one)", file=sys.stderr,
                  flush=True)
        config = config or ScanConfig(window=min(ScanConfig.window, max(1, widest_window(lm.num_layers))))
        if dtype is not None and lm.spec is not None and resolve_dtype(dtype, str(lm.device)) != lm.dtype:
            scan = on_main(lambda: _scan_anew(lm, config, dtype, progress))
        else:
            scan = on_main(lambda: scan_model(lm, config, progress=progress))
    result = scan if isinstance(scan, ScanResult) else ScanResult.load(scan)
    result.require_model(lm)
    return result


def _scan_anew(lm: LanguageModel, config: ScanConfig, dtype: str, progress: bool) -> ScanResult:
    """The scan of ``lm``'s model loaded anew in ``dtype``, on ``lm``'s device."""
    return scan(lm.spec, config, dtype=dtype, device=str(lm.device), progress=progress)


def scan_model(lm: LanguageModel, config: ScanConfig, *, progress: bool = True) -> ScanResult:
    """The scan of a loaded model."""
    timing: dict = {}
    start = time.perf_counter()
    if lm.streamed:
        _check_streamable(config)
    if config.k is not None and config.k > lm.num_layers:
        raise CritlayerError(f"--k {config.k} is larger than the {lm.num_layers} layers of {lm.name}")
    if config.window > widest_window(lm.num_layers):
        raise CritlayerError(f"--window {config.window} does not fit the {lm.num_layers} blocks of {lm.name}: at most "
                             f"{widest_window(lm.num_layers)}, where the middle block's window spans the whole model")
    probes = config.probes if isinstance(config.probes, Probes) else None
    if config.needs_probes and probes is None and not _written_as_captured(lm, config):
        with timed(timing, "probes"):
            probes = make_probes(lm, config.probes, n=config.probe_count, max_tokens=config.max_tokens,
                                 seed=config.seed, chat_template=config.chat_template, progress=progress)
    text, text_source = _loss_texts(lm, probes, config) if config.needs_text else (None, None)

    def select(name: str, values: np.ndarray):
        return select_critical(values, direction=DIRECTION[name], score_name=name, k=config.k,
                               window=config.window, edges=config.edges)

    rounds = Rounds(lambda delta: select("delta", delta).critical, config.window, config.seed, lm.num_layers,
                    config.adaptive, report=_print_round if progress and config.adaptive else None)
    total = config.probe_count
    if probes is not None:
        total = len(probes) if config.n is None and not config.adaptive else min(len(probes), total)
    _plan(lm, config, probes, total, text).announce(progress)
    stops = list(range(ROUND, total, ROUND)) + [total] if config.adaptive else [total]
    measured = run_measures(lm, config, probes=probes, text=text, rounds=stops,
                            settle=rounds.settle if config.selects_by_delta else None, progress=progress)
    timing.update(measured.timing)
    if probes is None and measured.probes is not None:
        timing["probes"] = 0.0  # written during the capture: its time is the capture's
    scores, groups = measured.scores, measured.groups()

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
    firmness = _firmness(config, select_by, scores, rounds, resampled)
    ranked = [s for names in groups.values() for s in names]
    read = measured.probes or probes
    probe_info = {} if read is None else {
        **read.describe(), "max_tokens": config.max_tokens if not isinstance(config.probes, Probes) else None,
        "token_mode": config.token_mode, "seed": config.seed,
        "chat_template": config.chat_template if not isinstance(config.probes, Probes) else None,
        "batch_size": config.batch_size, "sink_ratio": config.sink_ratio,
        "one_pass": probes is None and measured.probes is not None, "tokenizer": tokenizer_fingerprint(lm)}
    text_info = None if text is None else {"source": text_source, "n": len(text), "tokens": sum(map(len, text)),
                                           "ablate": list(config.ablate)}
    return ScanResult(
        model=lm.describe(), probes=probe_info, layers=list(range(lm.num_layers)), cka=measured.cka, scores=scores,
        selection=select(select_by, scores[select_by]), measures=list(config.measures),
        consensus=Consensus(groups, ranked, np.round(agreement(scores, ranked), 6).tolist(),
                            config.bootstrap if resampled else 0,
                            measured.fixed if resampled else list(config.measures), text_info, measured.details),
        firmness=firmness, probe_ids=read, capture=measured.capture,
        timing={**timing, "total": round(time.perf_counter() - start, 3)}, versions=_versions())


def _plan(lm: LanguageModel, config: ScanConfig, probes: Probes | None, total: int,
          text: list[list[int]] | None) -> Plan:
    """The forward tokens a scan plans: one pass over its probes (written as they are captured where the model
    writes them: each at most ``max_tokens``; an adaptive scan may stop before the last), and the loss measures'
    passes over their text (ablation: the text whole and with each block's part skipped)."""
    plan = Plan(f"scan of {lm.name}")
    if any(MEASURES[m].reads == CAPTURE for m in config.measures):
        tokens = total * config.max_tokens if probes is None else sum(map(len, probes.token_ids[:total]))
        plan.add("capture", 1, tokens, at_most=probes is None or config.adaptive)
    for name in config.needs_text:
        passes = 1 + lm.num_layers * len(config.ablate) if name == "ablation" else 1
        plan.add(name, passes, sum(map(len, text)))
    return plan


def _written_as_captured(lm: LanguageModel, config: ScanConfig) -> bool:
    """Whether the model writes its probes during the capture (one pass) rather than before it: generated probes,
    read only by the capture measures."""
    return config.probes == "generated" and not lm.streamed and not (config.needs_text and config.data is None)


def _firmness(config: ScanConfig, select_by: str, scores: dict, rounds: Rounds, resampled: bool) -> Firmness | None:
    """How firm the answer is: from the halves of the last round when the selection is by delta, else from the
    replicates behind P(critical); None when neither was measured."""
    if select_by == "delta" and rounds.picks is not None:
        history, picks, layers = rounds.history, rounds.picks, rounds.layers
        if not config.adaptive:
            stopped = f"read the {history[-1].probes} probes asked for"
        elif should_stop(history):
            stopped = f"settled: the same firm blocks and none tentative in {SETTLED_ROUNDS} rounds running"
        else:
            stopped = f"read {history[-1].probes} probes (at most --max-n {config.max_n}) without settling"
        return Firmness("delta", probabilities(picks.halves, layers), REPLICATES, stopped, history,
                        replication=probabilities(picks.replicas, layers))
    if resampled and select_by in ("consensus", "p_critical"):
        return Firmness("consensus", scores["p_critical"].tolist(), config.bootstrap,
                        f"read the {config.probe_count} probes asked for")
    return None


def _print_round(round_: Round) -> None:
    firm = ", ".join(map(str, round_.firm)) or "none"
    undecided = ", ".join(map(str, round_.undecided)) or "none"
    print(f"critlayer: {round_.probes} probes: firm {firm}; undecided {undecided}", file=sys.stderr, flush=True)


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
