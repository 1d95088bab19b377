"""``critlayer tune``: fine-tune chosen blocks, or compare layer choices from the same start.

Every run starts from a fresh copy of the pre-trained weights and sees the same data in the
same order for a given seed; ``--seeds N`` repeats a comparison so that differences between
layer choices can be judged against the seed-to-seed spread.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .data import TextData
from .errors import CritlayerError
from .layers import lora_config, parse_layers
from .models import LanguageModel
from .outputs import check_output_folder, staged_folder
from .result import ScanResult
from .train import TrainConfig, TrainRun, finetune

TUNE_FILE, COMPARE_FILE = "tune.json", "compare.json"


def needs_ranking(spec: str) -> bool:
    return spec.strip().startswith(("critical:", "noncritical:"))


def check_specs(lm: LanguageModel, specs: list[str]) -> None:
    """Reject a bad spec (syntax, K, block index) before any scan or training is spent on it."""
    for spec in specs:
        parse_layers(spec, lm.num_layers, ranking=list(range(lm.num_layers)))


def resolve_layers(lm: LanguageModel, spec: str, scan_result: ScanResult | None, seed: int) -> list[int]:
    if not needs_ranking(spec):
        return parse_layers(spec, lm.num_layers, seed=seed)
    if scan_result is None:
        raise CritlayerError(f"{spec} needs a scan")
    scan_result.require_layers(lm.num_layers)
    return scan_result.blocks(spec, seed=seed)


def _settings(lm: LanguageModel, data: TextData, config: TrainConfig, scan_result: ScanResult | None) -> dict:
    return {"model": lm.describe(), "data": data.describe(), "train": {**asdict(config), "lr": config.learning_rate},
            "scan_critical": None if scan_result is None else scan_result.critical}


@dataclass
class TuneResult:
    """One fine-tuning run, with the model it produced (not reloaded from tune.json)."""

    spec: str
    settings: dict
    run: TrainRun
    model: object = None

    def to_json(self) -> dict:
        return {"spec": self.spec, **self.settings, "run": self.run.as_dict()}

    def save(self, folder: str | Path, *, force: bool = False, tokenizer=None) -> Path:
        folder = Path(folder)
        check_output_folder(folder, TUNE_FILE, force)
        with staged_folder(folder) as tmp:
            (tmp / TUNE_FILE).write_text(json.dumps(self.to_json(), indent=1))
            from .report.training import plot_curves
            plot_curves({self.spec: [self.run]}, tmp / "loss.png", title=f"{self.settings['model']['name']}: {self.spec}")
            if self.model is not None:
                lora = self.settings["train"]["lora"]
                target = tmp / ("adapter" if lora else "model")
                self.model.save_pretrained(target)
                if tokenizer is not None and not lora:
                    tokenizer.save_pretrained(target)
        return folder


def tune(lm: LanguageModel, data: TextData, spec: str, config: TrainConfig, *,
         scan_result: ScanResult | None = None, progress: bool = True) -> TuneResult:
    """Fine-tune the blocks ``spec`` names on ``data`` from the pre-trained weights."""
    layers = resolve_layers(lm, spec, scan_result, config.seed)
    if not layers:
        raise CritlayerError(f"{spec} names no block to train")
    model, run = finetune(lm, copy.deepcopy(lm.model), layers, data, config, progress=progress, label=spec)
    return TuneResult(spec, _settings(lm, data, config, scan_result), run, model)


@dataclass
class TuneComparison:
    specs: list[str]
    seeds: list[int]
    settings: dict
    runs: dict[str, list[TrainRun]]  # spec -> one run per seed

    def summary(self) -> dict[str, dict]:
        out = {}
        for spec, runs in self.runs.items():
            after = np.array([r.loss_after for r in runs])
            gain = np.array([r.loss_before - r.loss_after for r in runs])
            out[spec] = {"layers": [r.layers for r in runs], "heldout_loss_after_mean": float(after.mean()),
                         "heldout_loss_after_std": float(after.std(ddof=1)) if len(after) > 1 else None,
                         "loss_drop_mean": float(gain.mean()),
                         "seconds_per_step": float(np.mean([r.seconds_per_step for r in runs])),
                         "peak_memory_mb": float(np.mean([r.peak_memory_mb for r in runs])),
                         "trainable_parameters": runs[0].trainable_parameters}
        return out

    def verdicts(self) -> list[str]:
        """Is each pairwise difference in final held-out loss larger than the seed-to-seed spread?

        Runs with the same seed share the data order, so the differences are paired by seed:
        a difference counts when its mean exceeds two standard errors of the per-seed differences.
        """
        if len(self.seeds) < 2:
            return ["one seed only: the seed-to-seed spread is unknown, so no difference can be called real "
                    "(use --seeds 3 or more)"]
        lines = []
        for i, a in enumerate(self.specs):
            for b in self.specs[i + 1:]:
                diffs = np.array([ra.loss_after - rb.loss_after for ra, rb in zip(self.runs[a], self.runs[b])])
                mean, noise = diffs.mean(), 2 * diffs.std(ddof=1) / np.sqrt(len(diffs))
                better, worse = (a, b) if mean < 0 else (b, a)
                verdict = "larger than" if abs(mean) > noise else "within"
                lines.append(f"{better} beats {worse} by {abs(mean):.4f} held-out loss, {verdict} the seed spread "
                             f"(2 standard errors of the paired differences = {noise:.4f})")
        return lines

    def table(self) -> str:
        summary = self.summary()
        width = max(len(s) for s in self.specs)
        lines = [f"{'spec':<{width}}  {'loss after':>18}  {'drop':>7}  {'s/step':>7}  {'peak MB':>8}  {'params':>10}  layers (seed {self.seeds[0]})"]
        for spec in self.specs:
            s = summary[spec]
            spread = f" ± {s['heldout_loss_after_std']:.4f}" if s["heldout_loss_after_std"] is not None else ""
            lines.append(f"{spec:<{width}}  {s['heldout_loss_after_mean']:>10.4f}{spread:<8}  {s['loss_drop_mean']:>7.4f}  "
                         f"{s['seconds_per_step']:>7.2f}  {s['peak_memory_mb']:>8.0f}  {s['trainable_parameters']:>10,}  "
                         f"{s['layers'][0]}")
        before = self.runs[self.specs[0]][0].loss_before
        return "\n".join([f"held-out loss before tuning: {before:.4f}", *lines, "", *self.verdicts()])

    def to_json(self) -> dict:
        return {"specs": self.specs, "seeds": self.seeds, **self.settings, "summary": self.summary(),
                "verdicts": self.verdicts(), "runs": {s: [r.as_dict() for r in runs] for s, runs in self.runs.items()}}

    def save(self, folder: str | Path, *, force: bool = False) -> Path:
        folder = Path(folder)
        check_output_folder(folder, COMPARE_FILE, force)
        with staged_folder(folder) as tmp:
            (tmp / COMPARE_FILE).write_text(json.dumps(self.to_json(), indent=1))
            (tmp / "compare.txt").write_text(self.table() + "\n")
            from .report.training import plot_curves
            plot_curves(self.runs, tmp / "compare.png", title=f"{self.settings['model']['name']}: held-out loss by layer choice")
        return folder


def tune_compare(lm: LanguageModel, data: TextData, specs: list[str], config: TrainConfig, *, seeds: int = 1,
                 scan_result: ScanResult | None = None, progress: bool = True) -> TuneComparison:
    """Run every spec from the same pre-trained weights, with the same data order, for each seed."""
    if seeds < 1:
        raise CritlayerError(f"--seeds must be at least 1, got {seeds}")
    if not specs or len(set(specs)) != len(specs):
        raise CritlayerError(f"--compare needs distinct layer specs, got {','.join(specs) or 'none'}")
    seed_list = [config.seed + i for i in range(seeds)]
    for spec in specs:  # check every spec (and seed) before any training
        for seed in seed_list:
            layers = resolve_layers(lm, spec, scan_result, seed)
            if not layers:
                raise CritlayerError(f"{spec} names no block to train")
            if config.lora:
                lora_config(lm, layers)
    runs: dict[str, list[TrainRun]] = {spec: [] for spec in specs}
    for seed in seed_list:
        for spec in specs:
            run_config = TrainConfig(**{**asdict(config), "seed": seed})
            layers = resolve_layers(lm, spec, scan_result, seed)
            model, run = finetune(lm, copy.deepcopy(lm.model), layers, data, run_config, progress=progress,
                                  label=f"{spec} seed {seed}")
            del model
            runs[spec].append(run)
    return TuneComparison(specs, seed_list, _settings(lm, data, config, scan_result), runs)
