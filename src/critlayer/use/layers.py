"""Name a set of blocks (a layer spec) and the lens that ranks them.

Specs: ``all``, ``none``, ``critical:K`` and ``noncritical:K`` (ranked by a ``Lens``: a scan's score, the
one it selects with or another, or the lens a validation found best), ``random:K`` (seeded), or explicit
indices such as ``3,7-9``; for tune, ``sample:K`` (K blocks at a time, re-drawn as training goes: uniformly, or
``sample:K:critical`` / ``sample:K:noncritical`` weighted by the lens's ranking) and ``lora:SPEC`` (LoRA on SPEC's
blocks, beside full fine-tunes in one comparison). A ranked spec without a scan or validation scans the model
first, once. A validation is read from its saved JSON: using its lens needs none of the validation pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common.errors import CritlayerError
from ..common.folders import read_result_json
from ..find.result import ScanResult
from ..find.scan import scan_of
from ..find.select import ranking_by
from ..models import LanguageModel
from ..models.language_model import shape_difference

_RANKED = re.compile(r"^(critical|noncritical|random):(-?\d+)$")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_SAMPLED = re.compile(r"^sample:(-?\d+)(?::(uniform|critical|noncritical))?$")
SAMPLE_WAYS = ("uniform", "critical", "noncritical")


def parse_layers(spec: str, num_layers: int, *, ranking: list[int] | None = None, eligible: int | None = None,
                 seed: int = 0) -> list[int]:
    """The sorted block indices a spec names.

    ``ranking`` lists blocks from most to least critical, eligible ones first (see
    ``ScanResult.ranking``); ``eligible`` says how many of its first entries are eligible, so that
    ``noncritical:K`` takes the least critical *eligible* blocks, like the paper's comparison.
    """
    spec = spec.strip()
    if spec == "all":
        return list(range(num_layers))
    if spec == "none":
        return []
    ranked = _RANKED.match(spec)
    if ranked:
        kind, k = ranked.group(1), int(ranked.group(2))
        if not 1 <= k <= num_layers:
            raise CritlayerError(f"{spec}: K must be between 1 and the {num_layers} blocks")
        if kind == "random":
            return sorted(np.random.default_rng(seed).choice(num_layers, size=k, replace=False).tolist())
        if ranking is None:
            raise CritlayerError(f"{spec} needs a scan's ranking of the blocks")
        if kind == "critical":
            return sorted(ranking[:k])
        pool = ranking[:eligible or len(ranking)][::-1] + ranking[eligible or len(ranking):]
        return sorted(pool[:k])
    blocks: set[int] = set()
    for part in spec.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise CritlayerError(f"bad layer spec {spec!r}: use all, none, critical:K, noncritical:K, random:K or 3,7-9")
        start, end = int(match.group(1)), int(match.group(2) or match.group(1))
        if end < start:
            raise CritlayerError(f"bad layer range {part!r} in {spec!r}")
        blocks.update(range(start, end + 1))
    unknown = sorted(i for i in blocks if i >= num_layers)
    if unknown:
        raise CritlayerError(f"unknown block {unknown[0]} in {spec!r}: the model has blocks 0-{num_layers - 1}")
    return sorted(blocks)


def sampled(spec: str, num_layers: int) -> tuple[int, str] | None:
    """``(K, how)`` for a sampled spec (``sample:K``, ``sample:K:critical``, ...), None for any other."""
    match = _SAMPLED.match(spec.strip())
    if not match:
        if spec.strip().startswith("sample:"):
            raise CritlayerError(f"bad layer spec {spec!r}: use sample:K, sample:K:critical or sample:K:noncritical")
        return None
    k = int(match.group(1))
    if not 1 <= k <= num_layers:
        raise CritlayerError(f"{spec}: K must be between 1 and the {num_layers} blocks")
    return k, match.group(2) or "uniform"


def lora_spec(spec: str) -> str | None:
    """The blocks' spec of ``lora:SPEC``, None for a spec without that prefix."""
    return spec.strip()[len("lora:"):] if spec.strip().startswith("lora:") else None


def check_spec(spec: str, num_layers: int) -> None:
    """Refuse, in one line, a spec that names no set of blocks (a ranked one is checked against any order)."""
    parse_layers(spec, num_layers, ranking=list(range(num_layers)))


def check_tune_spec(spec: str, num_layers: int) -> None:
    """``check_spec``, also taking what only tune trains: ``sample:K...`` and ``lora:SPEC``."""
    spec = lora_spec(spec) or spec
    if sampled(spec, num_layers) is None:
        check_spec(spec, num_layers)


def needs_ranking(spec: str) -> bool:
    """Does the spec rank blocks by a lens (``critical:K``, ``noncritical:K``, ``sample:K:critical``, ...)?"""
    spec = lora_spec(spec) or spec.strip()
    if spec.startswith("sample:"):
        return spec.endswith((":critical", ":noncritical"))
    return spec.startswith(("critical:", "noncritical:"))


VALIDATION_FILE = "validate.json"


@dataclass
class Lens:
    """What ranks the blocks for ``critical:K`` and ``noncritical:K``: a score, as a scan or a validation measured
    it, its ranking (eligible blocks first) and why it was chosen."""

    score: str
    ranking: list[int]
    eligible: int
    reason: str

    def to_json(self) -> dict:
        return {"score": self.score, "reason": self.reason}


def choose_lens(scan: ScanResult | None, validation=None, score: str | None = None, *,
                model: dict | None = None) -> Lens | None:
    """The lens a ranked spec uses: with a ``validation`` (a ``Validation``, or its folder or validate.json, made on
    ``model``: a description) the one it found best beyond depth, or the scan's selection score where it found none;
    else ``score`` of ``scan`` (default: the score the scan selects by, firm blocks first). None without either."""
    if validation is not None:
        if score is not None:
            raise CritlayerError("give --score or --from-validation, not both: the validation picks the score")
        return validation_lens(validation, model)
    if scan is None:
        return None
    lens = score or scan.selection.score
    return Lens(lens, scan.ranking(lens), len(scan.selection.eligible),
                "chosen with --score" if score else "the score the scan selects by, firm blocks first")


def validation_lens(validation, model: dict | None) -> Lens:
    """The lens a validation found best, read from what it saves (a ``Validation`` gives the same through
    ``to_json``), after checking it was made on ``model``."""
    saved = validation.to_json() if hasattr(validation, "to_json") else read_result_json(
        validation, VALIDATION_FILE, "validation")
    try:
        shape = shape_difference(saved["model"], model) if model is not None else None
        best, interior, scores = saved["best_lens"], saved["interior"], saved["scores"]
        lens = best or saved["scan"].get("score", "delta")
        partial = saved["correlations"]["importance"][best]["partial"] if best else None
        ranking = ranking_by(scores, lens, interior)
    except (KeyError, TypeError, ValueError) as exc:
        raise CritlayerError(f"{validation} is not a critlayer validation: {exc!r}") from None
    if shape:
        raise CritlayerError(f"the validation was made on another model ({saved['model'].get('name')}: {shape}) "
                             f"than {model.get('name')}; validate this model or pass its own validation")
    reason = (f"the validation's best predictor of fine-tuning importance beyond depth (partial Spearman "
              f"{partial:+.2f})" if best else
              f"the validation found no lens that predicts importance beyond depth; ranked by {lens}, "
              "the scan's selection score")
    return Lens(lens, ranking, len(interior), reason)


def ranked_by(lm: LanguageModel, specs: list[str], *, scan: ScanResult | str | Path | None = None, validation=None,
              score: str | None = None, progress: bool = True,
              check: Callable[[str, int], None] = check_spec) -> tuple[ScanResult | None, Lens | None]:
    """The scan (None where no spec is ranked and none is given, or a validation ranks) and the lens that rank
    ``specs`` on ``lm``. Every spec is checked first (by ``check``), so a bad one costs no scan."""
    for spec in specs:
        check(spec, lm.num_layers)
    if validation is not None:
        return None, choose_lens(None, validation, score, model=lm.describe())
    wanted = scan is not None or any(needs_ranking(spec) for spec in specs)
    scan_result = scan_of(lm, scan, progress=progress) if wanted else None
    return scan_result, choose_lens(scan_result, score=score)


def resolve_layers(num_layers: int, spec: str, lens: Lens | None, *, seed: int = 0) -> list[int]:
    """The blocks a spec names; ``critical:K`` and ``noncritical:K`` rank by ``lens``, ``noncritical:K`` among the
    eligible blocks only, like the paper's comparison."""
    if not needs_ranking(spec):
        return parse_layers(spec, num_layers, seed=seed)
    if lens is None:
        raise CritlayerError(f"{spec} needs a scan or a validation")
    return parse_layers(spec, num_layers, ranking=lens.ranking, eligible=lens.eligible, seed=seed)
