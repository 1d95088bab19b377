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
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import TextData
from .errors import CritlayerError
from .measures import DIRECTION
from .models import LanguageModel, find_blocks
from .outputs import check_output_folder, staged_folder
from .result import ScanResult
from .stats import partial_spearman, permutation_pvalue, spearman
from .train import TrainConfig, finetune, heldout_loss

VALIDATE_FILE = "validate.json"
TARGETS = ("importance", "weight_change")


@dataclass
class Validation:
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

    def save(self, folder: str | Path, *, force: bool = False) -> Path:
        folder = Path(folder)
        check_output_folder(folder, VALIDATE_FILE, force)
        with staged_folder(folder) as tmp:
            (tmp / VALIDATE_FILE).write_text(json.dumps(self.to_json(), indent=1))
            from .report.validation import write_validation_report
            write_validation_report(self, tmp)
        return folder


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


def restore_windows(lm: LanguageModel, tuned: torch.nn.Module, tuned_blocks: torch.nn.ModuleList,
                    data: TextData, window: int, batch_size: int, progress: bool = True) -> list[float]:
    """Held-out loss with blocks s..s+W-1 set back to their pre-trained weights, for every s."""
    losses = []
    for start in tqdm(range(lm.num_layers - window + 1), desc="restoring windows", disable=not progress):
        span = range(start, start + window)
        kept = {i: copy.deepcopy(tuned_blocks[i].state_dict()) for i in span}
        for i in span:
            tuned_blocks[i].load_state_dict(lm.blocks[i].state_dict())
        losses.append(heldout_loss(tuned, data.heldout, batch_size))
        for i in span:
            tuned_blocks[i].load_state_dict(kept[i])
    return losses


def correlate(scores: dict[str, np.ndarray], targets: dict[str, np.ndarray], interior: list[int],
              permutations: int = 5000) -> dict:
    """Spearman of every score (and depth baselines) with every target: all, interior, depth-partialled."""
    n = len(next(iter(targets.values())))
    depth = np.arange(n) / max(1, n - 1)
    predictors = {**scores, "depth": depth, "depth_u_shape": np.abs(depth - 0.5)}
    covariates = np.column_stack([depth, (depth - 0.5) ** 2])
    inner = np.array(interior)

    def pvalue(a, b, partial=False):
        return permutation_pvalue(a, b, covariates if partial else None, n=permutations)

    out = {}
    for target_name, target in targets.items():
        rows = {}
        for name, values in predictors.items():
            values = np.asarray(values, dtype=float)
            rows[name] = {
                "all": spearman(values, target), "all_p": pvalue(values, target),
                "interior": spearman(values[inner], target[inner]),
                "interior_p": pvalue(values[inner], target[inner]),
                "partial": np.nan if name.startswith("depth") else partial_spearman(values, target, covariates),
                "partial_p": np.nan if name.startswith("depth") else pvalue(values, target, partial=True),
            }
        out[target_name] = {k: {m: round(float(v), 4) for m, v in r.items()} for k, r in rows.items()}
    return out


def validate(lm: LanguageModel, data: TextData, scan_result: ScanResult, config: TrainConfig, *,
             tuned: torch.nn.Module | None = None, window: int = 3, edge: int = 2, permutations: int = 5000,
             progress: bool = True) -> Validation:
    """Measure fine-tuning importance per block and correlate the scan's scores with it."""
    if not 1 <= window <= lm.num_layers:
        raise CritlayerError(f"--window must be between 1 and the {lm.num_layers} blocks, got {window}")
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
    tuned_blocks = find_blocks(tuned)[1]
    loss_pretrained = heldout_loss(lm.model, data.heldout, config.eval_batch_size)
    loss_tuned = heldout_loss(tuned, data.heldout, config.eval_batch_size)
    restored = restore_windows(lm, tuned, tuned_blocks, data, window, config.eval_batch_size, progress)
    rise = np.array(restored) - loss_tuned
    importance = np.array([rise[max(0, i - window + 1):i + 1].mean() for i in range(lm.num_layers)])
    change = block_weight_change(lm, tuned_blocks)
    interior = list(range(edge, lm.num_layers - edge))
    correlations = correlate(scan_result.scores, {"importance": importance, "weight_change": change}, interior,
                             permutations)
    train = ({"tuned": "given checkpoint"} if given else
             {"tuned": "all blocks fine-tuned", "steps": config.steps, "lr": config.learning_rate,
              "batch_size": config.batch_size, "seed": config.seed})
    settings = {"model": lm.describe(), "data": data.describe(), "train": train, "permutations": permutations,
                "scan": {"probes": scan_result.probes, "critical": scan_result.critical}}
    return Validation(settings, loss_pretrained, loss_tuned, window, rise.tolist(), importance, change,
                      dict(scan_result.scores), interior, correlations)
