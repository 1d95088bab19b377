"""Name a set of blocks (a layer spec) and turn it into a training setup.

Specs: ``all``, ``none``, ``critical:K`` and ``noncritical:K`` (ranked by a ``Lens``: a scan's score, the
one it selects with or another, or the lens a validation found best), ``random:K`` (seeded), or explicit
indices such as ``3,7-9``. A ranked spec without a scan or validation scans the model first, once. The
blocks then become a freeze mask, a PEFT ``LoraConfig`` targeting only them, or an axolotl
``unfrozen_parameters`` list; the last two need only the model's description, so a saved scan is enough.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ..common.distributed import is_main, on_main
from ..common.errors import CritlayerError
from ..find.config import ScanConfig
from ..find.result import ScanResult
from ..find.scan import scan as run_scan
from ..find.scan import scan_model
from ..models import LanguageModel

_RANKED = re.compile(r"^(critical|noncritical|random):(-?\d+)$")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


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


def needs_ranking(spec: str) -> bool:
    return spec.strip().startswith(("critical:", "noncritical:"))


def ranking_scan(lm: LanguageModel, specs: list[str], scan: ScanResult | str | Path | None = None, *,
                 progress: bool = True) -> ScanResult | None:
    """The scan that ranks the blocks for the specs (see ``the_scan``), or None when no spec is ranked and no scan
    is given.

    Every spec is checked first, so a bad one costs no scan.
    """
    for spec in specs:
        parse_layers(spec, lm.num_layers, ranking=list(range(lm.num_layers)))
    if scan is None and not any(needs_ranking(spec) for spec in specs):
        return None
    return the_scan(lm, scan, progress=progress)


def the_scan(lm: LanguageModel, scan: ScanResult | str | Path | None = None, *, config: ScanConfig | None = None,
             progress: bool = True) -> ScanResult:
    """``scan`` (a result, or its folder or scan.json), checked against the model; else a scan (``config``, default
    the default scan) of the model run now, once (by the main process, handed to the others)."""
    if scan is not None:
        result = scan if isinstance(scan, ScanResult) else ScanResult.load(scan)
        result.require_layers(lm.num_layers)
        return result
    if progress and is_main():
        print("critlayer: scanning for critical layers first (pass a scan to reuse one)", file=sys.stderr, flush=True)
    return on_main(lambda: scan_model(lm, config or ScanConfig(), progress=progress))


def scan_with_cost(lm: LanguageModel, scan: ScanResult | str | Path | None, dtype: str,
                   progress: bool = True) -> tuple[ScanResult, dict]:
    """The scan given (checked against the model), or the default scan of the model as ``critlayer scan`` runs it,
    in ``dtype`` (the model here may hold float32 weights, for a checkpoint or training); and what it cost."""
    start = time.perf_counter()
    if scan is not None or lm.spec is None:
        result = the_scan(lm, scan, progress=progress)
    else:
        if progress:
            print("critlayer: scanning for critical layers first (pass a scan to reuse one)", file=sys.stderr,
                  flush=True)
        result = run_scan(lm.spec, dtype=dtype, device=str(lm.device), progress=progress)
    result.require_model(lm)
    seconds = result.timing.get("total", time.perf_counter() - start)
    tokens = int(round(result.probes.get("n", 0) * result.probes.get("mean_tokens", 0)))  # generated: one at a time
    return result, {"seconds": round(seconds, 3), "forward_tokens": tokens}


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


def choose_lens(scan: ScanResult | None, validation=None, score: str | None = None) -> Lens | None:
    """The lens a ranked spec uses: with a ``validation`` (a ``Validation``) the one it found best beyond depth, or
    the scan's selection score where it found none; else ``score`` of ``scan`` (default: the score the scan selects
    by, firm blocks first). None without either."""
    if validation is not None:
        if score is not None:
            raise CritlayerError("give --score or --from-validation, not both: the validation picks the score")
        best = validation.best_lens
        lens = best or validation.settings["scan"].get("score", "delta")
        reason = (f"the validation's best predictor of fine-tuning importance beyond depth (partial Spearman "
                  f"{validation.correlations['importance'][best]['partial']:+.2f})" if best else
                  f"the validation found no lens that predicts importance beyond depth; ranked by {lens}, "
                  "the scan's selection score")
        return Lens(lens, validation.ranking(lens), len(validation.interior), reason)
    if scan is None:
        return None
    lens = score or scan.selection.score
    return Lens(lens, scan.ranking(lens), len(scan.selection.eligible),
                "chosen with --score" if score else "the score the scan selects by, firm blocks first")


def resolve_layers(num_layers: int, spec: str, lens: Lens | None, *, seed: int = 0) -> list[int]:
    """The blocks a spec names; ``critical:K`` and ``noncritical:K`` rank by ``lens``, ``noncritical:K`` among the
    eligible blocks only, like the paper's comparison."""
    if not needs_ranking(spec):
        return parse_layers(spec, num_layers, seed=seed)
    if lens is None:
        raise CritlayerError(f"{spec} needs a scan or a validation")
    return parse_layers(spec, num_layers, ranking=lens.ranking, eligible=lens.eligible, seed=seed)


def _describe(lm: LanguageModel | dict) -> dict:
    """A loaded model's description, or one read from a scan (``ScanResult.model``)."""
    return lm.describe() if isinstance(lm, LanguageModel) else lm


def block_prefixes(lm: LanguageModel | dict, blocks: list[int]) -> list[str]:
    """Parameter-name prefixes of the given blocks, e.g. ``model.layers.3.``."""
    return [f"{_describe(lm)['blocks']}.{i}." for i in blocks]


def freeze_except(model: nn.Module, lm: LanguageModel, blocks: list[int]) -> list[str]:
    """Make only the given blocks trainable; returns the names of the trainable parameters."""
    prefixes = tuple(block_prefixes(lm, blocks))
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
        if param.requires_grad:
            trainable.append(name)
    return trainable


def lora_targets(lm: LanguageModel | dict, blocks: list[int]) -> list[str]:
    """Full names of the linear layers inside the given blocks (what LoRA adapts)."""
    linears = _describe(lm).get("block_linears")
    if linears is None:
        raise CritlayerError("this scan predates the record of each block's linear layers; scan the model again")
    return [prefix + name for prefix in block_prefixes(lm, blocks) for name in linears]


def lora_config(lm: LanguageModel | dict, blocks: list[int], *, r: int = 8, alpha: int = 16, dropout: float = 0.0):
    """A PEFT ``LoraConfig`` that adapts the linear layers of the given blocks only."""
    from peft import LoraConfig

    targets = lora_targets(lm, blocks)
    if not targets:
        raise CritlayerError(f"no linear layers found in blocks {blocks}")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                      task_type="CAUSAL_LM")


def unfrozen_parameters(lm: LanguageModel | dict, blocks: list[int]) -> list[str]:
    """An axolotl ``unfrozen_parameters`` list (regular expressions) for the given blocks."""
    return [f"^{re.escape(prefix)}.*" for prefix in block_prefixes(lm, blocks)]
