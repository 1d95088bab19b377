"""``critlayer validate``: are the layers a scan calls critical the ones fine-tuning changes?

Fine-tune every block (or take a tuned checkpoint); then, for every window of W consecutive
blocks, copy the pre-trained weights back into the tuned model and record how much the
held-out loss rises. A block's fine-tuning importance is the mean rise over the windows that
contain it; its relative weight change is ||tuned - pre-trained|| / ||pre-trained||. With
several seeds both are averaged over seeds. A fine-tune that did not lower the held-out loss
beyond its noise is refused: what a harmful fine-tune changed says nothing about what matters.

Every scan score (every measure, the consensus and P(critical)) is then correlated (Spearman,
permutation p-value) with both, beside what a score must beat: depth alone (many per-layer
quantities are U-shaped in depth), the same correlation over interior blocks only, and the
partial correlation with depth regressed out. A useful score correlates with importance in
its own direction: negatively where a low score marks a critical block. The lens that does so
best beyond depth is what ``--from-validation`` ranks ``critical:K`` by.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..common.distributed import is_main
from ..common.cost import Plan
from ..common.errors import CritlayerError
from ..common.folders import SavedResult, check_output_folder
from ..common.stats import lens_correlations, paired_difference_interval
from ..data.text import TextData, check_source, load_data
from ..find.config import ScanConfig
from ..find.measures import DIRECTION
from ..find.result import ScanResult
from ..find.scan import scan_of
from ..find.select import eligible_blocks, ranking_by
from ..models import DEFAULT_MODEL, LanguageModel, find_blocks, load, surgery
from ..models.loading import float32_model, resolve_dtype
from ..models.loss import heldout_loss, sequence_losses
from ..models.running import computing_in
from ..train.finetune import TrainConfig, finetune, plan_finetune, unhelpful
from ..use.layers import VALIDATION_FILE

TARGETS = ("importance", "weight_change")
VIEWS = ("all", "interior", "partial")
ALPHA = 0.05


@dataclass
class Validation(SavedResult, file=VALIDATION_FILE, kind="validation"):
    """Fine-tuning importance per block (the mean over seeds), and how well every scan score predicts it.

    ``correlations`` are on the seed-mean importance and weight change; ``seed_correlations`` hold the same
    table for each seed alone, for the spread.
    """

    settings: dict
    loss_pretrained: float
    loss_tuned: list[float]
    window: int
    window_rise: list[list[float]]
    importance: np.ndarray
    weight_change: np.ndarray
    scores: dict[str, np.ndarray]
    interior: list[int]
    correlations: dict[str, dict[str, dict[str, float]]]
    seed_correlations: list[dict[str, dict[str, dict[str, float]]]]
    importance_per_seed: list[list[float]]
    train_runs: list[dict]  # each seed's fine-tune (its loss curves), none for a given checkpoint

    def spread(self, target: str = "importance") -> dict[str, dict[str, float]]:
        """Each score's per-seed correlations with ``target``: their standard deviation over seeds, per view."""
        rows = self.correlations[target]
        return {name: {key: float(np.std([c[target][name][key] for c in self.seed_correlations],
                                         ddof=1)) if len(self.seed_correlations) > 1 else float("nan")
                       for key in VIEWS} for name in rows}

    def beyond_depth(self, target: str = "importance") -> dict[str, bool]:
        """Does each lens predict ``target`` beyond depth? Its partial correlation on the seed-mean target is in its
        useful direction with p < 0.05, and in that direction in every seed."""
        out = {}
        for name, row in self.correlations[target].items():
            if name not in DIRECTION:
                continue
            signs = [DIRECTION[name] * c[target][name]["partial"] for c in self.seed_correlations]
            out[name] = bool(DIRECTION[name] * row["partial"] > 0 and row["partial_p"] < ALPHA
                             and all(s > 0 for s in signs))
        return out

    @property
    def best_lens(self) -> str | None:
        """The lens that predicts fine-tuning importance best beyond depth, or None when none does."""
        passing = self.beyond_depth()
        ranked = [name for name, _ in best_predictors(self.correlations["importance"]) if passing.get(name)]
        return ranked[0] if ranked else None

    def ranking(self, lens: str) -> list[int]:
        """Blocks from most to least critical by ``lens`` as this validation measured it, interior blocks first."""
        if lens not in self.scores:
            raise CritlayerError(f"the validation has no score {lens!r}; it has {', '.join(self.scores)}")
        return ranking_by(self.scores, lens, self.interior)

    def to_json(self) -> dict:
        return {**self.settings, "heldout_loss_pretrained": self.loss_pretrained, "heldout_loss_tuned": self.loss_tuned,
                "window": self.window, "window_rise": self.window_rise, "importance": self.importance.tolist(),
                "importance_per_seed": self.importance_per_seed, "weight_change": self.weight_change.tolist(),
                "interior": self.interior, "scores": {k: v.tolist() for k, v in self.scores.items()},
                "correlations": self.correlations, "spread_over_seeds": {t: self.spread(t) for t in TARGETS},
                "seed_correlations": self.seed_correlations, "beyond_depth": self.beyond_depth(),
                "best_lens": self.best_lens, "train_runs": self.train_runs}

    @classmethod
    def from_json(cls, d: dict) -> "Validation":
        settings = {k: d[k] for k in ("model", "data", "train", "permutations", "scan")}
        return cls(settings, d["heldout_loss_pretrained"], d["heldout_loss_tuned"], d["window"], d["window_rise"],
                   np.array(d["importance"]), np.array(d["weight_change"]),
                   {k: np.array(v) for k, v in d["scores"].items()}, d["interior"], d["correlations"],
                   d["seed_correlations"], d["importance_per_seed"], d["train_runs"])

    def table(self) -> str:
        seeds = self.settings["train"].get("seeds", [None])
        tuned = ", ".join(f"{loss:.4f}" for loss in self.loss_tuned)
        lines = [f"held-out loss: pre-trained {self.loss_pretrained:.4f}, tuned {tuned}"
                 + (f" (seeds {seeds})" if len(seeds) > 1 else ""), ""]
        for target in TARGETS:
            spread = self.spread(target)
            lines.append(f"Spearman with {target}{' (seed-mean), ± its sd over seeds' if len(seeds) > 1 else ''} "
                         "(sign a useful score has): all blocks (p) | interior blocks (p) | partial, depth removed (p)")
            for name, c in self.correlations[target].items():
                sign = {1: "+", -1: "-"}.get(DIRECTION.get(name), " ")
                cells = [f"{c[key]:+.2f}" + (f" ±{spread[name][key]:.2f}" if len(seeds) > 1 else "")
                         + f" ({c[key + '_p']:.3f})" for key in VIEWS]
                lines.append(f"  {name:<18} {sign} " + " | ".join(cells))
            lines.append("")
        passing = self.beyond_depth()
        yes = [name for name, ok in passing.items() if ok]
        lines.append("predict importance beyond depth (partial p < 0.05 in the useful direction"
                     + (", and that direction in every seed): " if len(seeds) > 1 else "): ")
                     + (", ".join(yes) if yes else "none"))
        lines.append("do not: " + (", ".join(name for name, ok in passing.items() if not ok) or "none"))
        lines.append(f"best lens for fine-tuning: {self.best_lens or 'none (no lens predicts beyond depth)'}")
        return "\n".join(lines)

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
             seeds: int = 1, restore_window: int = 3, measures: str = "default", permutations: int = 5000,
             config: TrainConfig | None = None, out: str | Path | None = None, force: bool = False,
             progress: bool = True, device: str | None = None, **options) -> Validation:
    """Do the scan's scores predict what fine-tuning changes? Fine-tune every block (over ``seeds`` seeds, from
    ``config.seed`` on; or take ``tuned``, a checkpoint folder or model of the same model), set back each window of
    ``restore_window`` blocks to its pre-trained weights, and correlate every score of ``scan`` (or of a scan with
    ``measures`` run now) with the held-out loss each block's windows cost, beside depth baselines.

    A fine-tune that does not lower the held-out loss beyond its noise is refused (``CritlayerError``): what it
    changed says nothing about what matters. ``config`` is a ``TrainConfig``, its fields also taken as keywords.
    With ``out`` the result is saved.

    >>> v = critlayer.validate(model_folder, data=text_file, steps=20, lr=1e-2, n_eval=4, permutations=100,
    ...                        progress=False)
    >>> len(v.importance), "delta" in v.correlations["importance"]
    (6, True)
    """
    config = replace(config, **options) if config is not None else TrainConfig(**options)
    scan_config = ScanConfig(measures=measures)
    if seeds < 1:
        raise CritlayerError(f"--seeds must be at least 1, got {seeds}")
    if seeds > 1 and tuned is not None:
        raise CritlayerError("--seeds repeats the fine-tune; a given --tuned checkpoint is one fine-tune")
    if out is not None:
        check_output_folder(out, Validation.FILE, force)
    config.require_whole_blocks("validate fine-tunes whole blocks: their weight change is what it measures")
    if restore_window < 1:
        raise CritlayerError(f"--restore-window must be at least 1, got {restore_window}")
    if permutations < 10:
        raise CritlayerError(f"--permutations must be at least 10, got {permutations}")
    check_source(data, config.n_eval + 1)  # a missing or unreadable file ends here, before the model loads
    lm = float32_model(model, device)
    if restore_window > lm.num_layers:
        raise CritlayerError(f"--restore-window {restore_window} is more than the {lm.num_layers} blocks of {lm.name}")
    text = load_data(lm, data, n_eval=config.n_eval, n_train=config.n_train, max_tokens=config.max_tokens)
    if isinstance(tuned, (str, Path)):
        tuned = load(str(tuned), dtype="float32", device=str(lm.device)).model
    scan_result = scan_of(lm, scan, config=scan_config, progress=progress)
    result = validate_model(lm, text, scan_result, config, tuned=tuned, seeds=seeds, window=restore_window,
                            permutations=permutations, progress=progress)
    if out is not None:
        result.save(out, force=force)
    return result


def validate_model(lm: LanguageModel, data: TextData, scan_result: ScanResult, config: TrainConfig, *,
                   tuned: torch.nn.Module | None = None, seeds: int, window: int, edge: int = 2,
                   permutations: int, progress: bool = True) -> Validation:
    """Measure fine-tuning importance per block (per seed) and correlate the scan's scores with it."""
    if lm.num_layers < 2 * edge + 2:
        raise CritlayerError(f"validate needs at least {2 * edge + 2} blocks (interior ones to correlate), "
                             f"{lm.name} has {lm.num_layers}")
    scan_result.require_layers(lm.num_layers)
    given = tuned is not None
    if given:
        check_same_architecture(lm, tuned)
    dtype = resolve_dtype(config.dtype, str(lm.device))
    seed_list = [config.seed + i for i in range(seeds)]
    interior = eligible_blocks(lm.num_layers, edge)
    plan = Plan(f"validation of {lm.name}").add("held-out loss", 1, sum(map(len, data.heldout)))
    for seed in seed_list:
        if not given:
            plan_finetune(plan, data, replace(config, seed=seed))
        plan.add("held-out loss", 1 + lm.num_layers - window + 1, sum(map(len, data.heldout)))
    plan.announce(progress)
    with computing_in(lm.model, dtype):
        pretrained, counts = sequence_losses(lm.model, data.heldout)
    losses, rises, importances, changes, runs = [], [], [], [], []
    for seed in seed_list:
        if not given:
            tuned, run = finetune(lm, copy.deepcopy(lm.model), list(range(lm.num_layers)), data,
                                replace(config, seed=seed), progress=progress, label=f"all blocks, seed {seed}")
            runs.append(run.as_dict())
        with computing_in(lm.model, dtype):
            sums = sequence_losses(tuned, data.heldout)[0]
            _refuse_unhelpful(pretrained, sums, counts, config, given)
            restored = restore_windows(lm, tuned, data, window, progress)
        loss_tuned = float(sums.sum() / counts.sum())
        rise = np.array(restored) - loss_tuned
        losses.append(loss_tuned)
        rises.append(rise.tolist())
        importances.append(np.array([rise[max(0, i - window + 1):i + 1].mean() for i in range(lm.num_layers)]))
        changes.append(block_weight_change(lm, find_blocks(tuned)[1]))
    importance, change = np.mean(importances, axis=0), np.mean(changes, axis=0)

    def correlate(imp, chg):
        return lens_correlations(scan_result.scores, {"importance": imp, "weight_change": chg}, interior,
                                 permutations)

    per_seed = [correlate(i, c) for i, c in zip(importances, changes)] if seeds > 1 else []
    correlations = correlate(importance, change)
    train = ({"tuned": "given checkpoint"} if given else
             {"tuned": "all blocks fine-tuned", "steps": config.steps, "lr": config.learning_rate,
              "schedule": config.schedule, "warmup": config.warmup, "batch_size": config.batch_size,
              "seeds": seed_list, "dtype": config.dtype})
    settings = {"model": lm.describe(), "data": data.describe(), "train": train, "permutations": permutations,
                "scan": {"probes": scan_result.probes, "critical": scan_result.critical,
                         "score": scan_result.selection.score}}
    return Validation(settings, float(pretrained.sum() / counts.sum()), losses, window, rises, importance, change,
                      dict(scan_result.scores), interior, correlations, per_seed or [correlations],
                      [i.tolist() for i in importances], runs)


def _refuse_unhelpful(pretrained: np.ndarray, tuned: np.ndarray, counts: np.ndarray, config: TrainConfig,
                      given: bool) -> None:
    """Stop, in one line, where the fine-tune did not lower the held-out loss beyond its noise."""
    interval = paired_difference_interval(pretrained, tuned, counts, seed=config.seed)
    problem = unhelpful(float(pretrained.sum() / counts.sum()), float(tuned.sum() / counts.sum()), interval)
    if problem is None:
        return
    advice = ("fine-tune it further, or pass another checkpoint" if given else
              f"try a lower --lr (it was {config.learning_rate:g}), more --steps, or more training --data")
    raise CritlayerError(f"{problem}: what it changed cannot show which blocks matter; {advice}")
