"""``critlayer validate``: are the layers a scan calls critical the ones fine-tuning changes?

Fine-tune every block (or take a tuned checkpoint); then, for every window of W consecutive
blocks, copy the pre-trained weights back into the tuned model and record how much the
held-out loss rises. A block's fine-tuning importance is the mean rise over the windows that
contain it; its relative weight change is ||tuned - pre-trained|| / ||pre-trained||.

Every scan score (every measure, the consensus and P(critical)) is then correlated (Spearman,
permutation p-value) with both, beside what a score must beat: depth alone (many per-layer
quantities are U-shaped in depth), the same correlation over interior blocks only, and the
partial correlation with depth regressed out. A useful score correlates with importance in
its own direction: negatively where a low score marks a critical block.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from ..common.distributed import is_main
from ..common.errors import CritlayerError
from ..common.folders import SavedResult, check_output_folder
from ..common.stats import lens_correlations
from ..data.text import TextData, load_data
from ..find.config import ScanConfig
from ..find.measures import DIRECTION
from ..find.result import ScanResult
from ..models import DEFAULT_MODEL, LanguageModel, find_blocks, load, surgery
from ..models.loading import resolve_dtype
from ..models.loss import heldout_loss
from ..use.layers import the_scan
from ..use.train import TrainConfig, computing_in, finetune, training_model

TARGETS = ("importance", "weight_change")


@dataclass
class Validation(SavedResult):
    """Fine-tuning importance per block, and how well every scan score predicts it."""

    FILE: ClassVar[str] = "validate.json"

    settings: dict
    loss_pretrained: float
    loss_tuned: float
    window: int
    window_rise: list[float]
    importance: np.ndarray
    weight_change: np.ndarray
    scores: dict[str, np.ndarray]
    interior: list[int]
    correlations: dict[str, dict[str, dict[str, float]]]

    def to_json(self) -> dict:
        return {**self.settings, "heldout_loss_pretrained": self.loss_pretrained, "heldout_loss_tuned": self.loss_tuned,
                "window": self.window, "window_rise": self.window_rise, "importance": self.importance.tolist(),
                "weight_change": self.weight_change.tolist(), "interior": self.interior,
                "scores": {k: v.tolist() for k, v in self.scores.items()}, "correlations": self.correlations}

    def table(self) -> str:
        lines = [f"held-out loss: pre-trained {self.loss_pretrained:.4f}, tuned {self.loss_tuned:.4f}", ""]
        for target in TARGETS:
            lines.append(f"Spearman with {target} (sign a useful score has): all blocks (p) | interior blocks (p) "
                         "| partial, depth removed (p)")
            for name, c in self.correlations[target].items():
                sign = {1: "+", -1: "-"}.get(DIRECTION.get(name), " ")
                lines.append(f"  {name:<18} {sign} {c['all']:+.2f} ({c['all_p']:.3f}) | {c['interior']:+.2f} "
                             f"({c['interior_p']:.3f}) | {c['partial']:+.2f} ({c['partial_p']:.3f})")
            lines.append("")
        best = best_predictors(self.correlations["importance"])
        lines.append("best predictors of importance, depth regressed out (correlation in the useful direction): "
                     + ", ".join(f"{name} {value:+.2f}" for name, value in best[:3]))
        return "\n".join(lines).rstrip()

    def write_files(self, folder: Path) -> None:
        from ..report.validation import write_validation_report

        write_validation_report(self, folder)


def best_predictors(rows: dict[str, dict[str, float]], key: str = "partial") -> list[tuple[str, float]]:
    """Scores ordered by their correlation with a target in their own useful direction (depth baselines left out)."""
    signed = [(name, DIRECTION[name] * r[key]) for name, r in rows.items()
              if name in DIRECTION and np.isfinite(r[key])]
    return sorted(signed, key=lambda item: -item[1])


def check_same_architecture(lm: LanguageModel, tuned: torch.nn.Module) -> None:
    mine = {k: tuple(v.shape) for k, v in lm.model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in tuned.state_dict().items()}
    if type(tuned).__name__ != lm.architecture or mine != theirs:
        raise CritlayerError(f"the --tuned checkpoint is a {type(tuned).__name__} with other weights than "
                             f"{lm.name} ({lm.architecture}); it must be a fine-tune of the same model")


def block_weight_change(lm: LanguageModel, tuned_blocks: torch.nn.ModuleList) -> np.ndarray:
    change = []
    for base, tuned in zip(lm.blocks, tuned_blocks):
        diff = sum(float((t.detach().double() - b.detach().double()).square().sum())
                   for b, t in zip(base.parameters(), tuned.parameters()))
        norm = sum(float(b.detach().double().square().sum()) for b in base.parameters())
        change.append(np.sqrt(diff / norm))
    return np.array(change)


def restore_windows(lm: LanguageModel, tuned: torch.nn.Module, data: TextData, window: int,
                    progress: bool = True) -> list[float]:
    """Held-out loss with blocks s..s+W-1 set back to their pre-trained weights, for every s."""
    tuned_blocks, losses = find_blocks(tuned)[1], []
    for start in tqdm(range(lm.num_layers - window + 1), desc="restoring windows",
                      disable=not (progress and is_main())):
        with surgery.swapped(tuned_blocks, lm.blocks, range(start, start + window)):
            losses.append(heldout_loss(tuned, data.heldout))
    return losses


def validate(model: LanguageModel | str = DEFAULT_MODEL, data: str = "bbc", *,
             scan: ScanResult | str | Path | None = None, tuned: torch.nn.Module | str | None = None,
             restore_window: int = 3, measures: str = "default", permutations: int = 5000,
             config: TrainConfig | None = None, out: str | Path | None = None, force: bool = False,
             progress: bool = True, device: str | None = None, **options) -> Validation:
    """Do the scan's scores predict what fine-tuning changes? Fine-tune every block (or take ``tuned``, a
    checkpoint folder or model of the same model), set back each window of ``restore_window`` blocks to its
    pre-trained weights, and correlate every score of ``scan`` (or of a scan with ``measures`` run now) with
    the held-out loss each block's windows cost, beside depth baselines.

    ``config`` is a ``TrainConfig``, its fields also taken as keywords. With ``out`` the result is saved.

    >>> v = critlayer.validate(model_folder, data=text_file, steps=2, n_eval=4, permutations=100, progress=False)
    >>> len(v.importance), "delta" in v.correlations["importance"]
    (6, True)
    """
    config = replace(config, **options) if config is not None else TrainConfig(**options)
    scan_config = ScanConfig(measures=measures)
    if out is not None:
        check_output_folder(out, Validation.FILE, force)
    lm = training_model(model, device)
    if not 1 <= restore_window <= lm.num_layers:
        raise CritlayerError(f"--restore-window must be between 1 and the {lm.num_layers} blocks, "
                             f"got {restore_window}")
    text = load_data(lm, data, n_eval=config.n_eval, n_train=config.n_train, max_tokens=config.max_tokens)
    if isinstance(tuned, (str, Path)):
        tuned = load(str(tuned), dtype="float32", device=str(lm.device)).model
    scan_result = the_scan(lm, scan, config=scan_config, progress=progress)
    result = validate_model(lm, text, scan_result, config, tuned=tuned, window=restore_window,
                            permutations=permutations, progress=progress)
    if out is not None:
        result.save(out, force=force)
    return result


def validate_model(lm: LanguageModel, data: TextData, scan_result: ScanResult, config: TrainConfig, *,
                   tuned: torch.nn.Module | None = None, window: int = 3, edge: int = 2, permutations: int = 5000,
                   progress: bool = True) -> Validation:
    """Measure fine-tuning importance per block and correlate the scan's scores with it."""
    if lm.num_layers < 2 * edge + 2:
        raise CritlayerError(f"validate needs at least {2 * edge + 2} blocks (interior ones to correlate), "
                             f"{lm.name} has {lm.num_layers}")
    scan_result.require_layers(lm.num_layers)
    given = tuned is not None
    if not given:
        tuned, _ = finetune(lm, copy.deepcopy(lm.model), list(range(lm.num_layers)), data, config,
                            progress=progress, label="all blocks")
    else:
        check_same_architecture(lm, tuned)
    with computing_in(lm.model, resolve_dtype(config.dtype, str(lm.device))):
        loss_pretrained = heldout_loss(lm.model, data.heldout)
        loss_tuned = heldout_loss(tuned, data.heldout)
        restored = restore_windows(lm, tuned, data, window, progress)
    rise = np.array(restored) - loss_tuned
    importance = np.array([rise[max(0, i - window + 1):i + 1].mean() for i in range(lm.num_layers)])
    change = block_weight_change(lm, find_blocks(tuned)[1])
    interior = list(range(edge, lm.num_layers - edge))
    correlations = lens_correlations(scan_result.scores, {"importance": importance, "weight_change": change}, interior,
                             permutations)
    train = ({"tuned": "given checkpoint"} if given else
             {"tuned": "all blocks fine-tuned", "steps": config.steps, "lr": config.learning_rate,
              "batch_size": config.batch_size, "seed": config.seed, "dtype": config.dtype})
    settings = {"model": lm.describe(), "data": data.describe(), "train": train, "permutations": permutations,
                "scan": {"probes": scan_result.probes, "critical": scan_result.critical}}
    return Validation(settings, loss_pretrained, loss_tuned, window, rise.tolist(), importance, change,
                      dict(scan_result.scores), interior, correlations)
