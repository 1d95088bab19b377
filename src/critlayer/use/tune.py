"""``critlayer tune``: fine-tune chosen blocks, or compare layer choices from the same start.

Every run starts from a fresh copy of the pre-trained weights and sees the same data in the
same order for a given seed; ``seeds`` repeats a comparison so that differences between
layer choices can be judged against the seed-to-seed spread.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..common.cost import Plan
from ..common.errors import CritlayerError
from ..common.folders import SavedResult, check_output_folder
from ..data.text import TextData, check_source, load_data
from ..find.result import ScanResult
from ..models import DEFAULT_MODEL, LanguageModel
from ..models.loading import float32_model
from ..train.finetune import TrainConfig, TrainRun, finetune, plan_finetune
from ..train.sampling import LayerSchedule, draw_weights
from ..train.targets import lora_config
from .layers import Lens, SAMPLE_WAYS, check_tune_spec, lora_spec, needs_ranking, ranked_by, resolve_layers, sampled

DEFAULT_COMPARE = "critical:4,noncritical:4,random:4"


@dataclass
class TuneResult(SavedResult, file="tune.json", kind="fine-tune"):
    """One fine-tuning run, with the model it produced (saved as model/ or adapter/, not reloaded from tune.json)."""

    spec: str
    settings: dict
    run: TrainRun
    model: object = None
    tokenizer: object = None

    @property
    def warnings(self) -> list[str]:
        return _warnings({self.spec: [self.run]}, [self.settings["train"]["seed"]])

    def to_json(self) -> dict:
        return {"spec": self.spec, **self.settings, "warnings": self.warnings, "run": self.run.as_dict()}

    @classmethod
    def from_json(cls, data: dict) -> "TuneResult":
        """The run as saved (the tuned weights stay in the folder's model/ or adapter/)."""
        settings = {k: v for k, v in data.items() if k not in ("spec", "warnings", "run")}
        return cls(data["spec"], settings, TrainRun.from_dict(data["run"]))

    def table(self) -> str:
        run, lens = self.run, self.settings["lens"]
        trained = (f"tuned blocks {run.layers} ({run.trainable_parameters:,} parameters)" if run.draws is None else
                   f"tuned {len(run.draws)} draws of blocks, one every {self.settings['train']['every']} steps, "
                   f"{run.layers} in all (at most {run.trainable_parameters:,} parameters at once)")
        lines = [f"{trained}: held-out loss {run.loss_before:.4f} -> {run.loss_after:.4f}; "
                 f"{run.seconds_per_step:.2f} s/step; peak {run.peak_memory_mb:.0f} MB above the loaded model"]
        if lens and needs_ranking(self.spec):
            lines.append(f"blocks ranked by {lens['score']}: {lens['reason']}")
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])

    def write_files(self, folder: Path) -> None:
        from ..report.training import plot_curves

        plot_curves({self.spec: [self.run]}, folder / "loss.png", title=f"{self.settings['model']['name']}: {self.spec}")
        if self.model is not None:
            lora = self.settings["train"]["lora"]
            target = folder / ("adapter" if lora else "model")
            self.model.save_pretrained(target)
            if self.tokenizer is not None and not lora:
                self.tokenizer.save_pretrained(target)


@dataclass
class TuneComparison(SavedResult, file="compare.json", kind="fine-tuning comparison"):
    """Layer choices fine-tuned side by side from the same weights, one run per spec and seed."""

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
        lens = self.settings["lens"]
        ranked = [f"ranked specs use {lens['score']}: {lens['reason']}"] if lens else []
        return "\n".join([f"held-out loss before tuning: {before:.4f}", *lines, "", *ranked, *self.verdicts(),
                          *(f"warning: {w}" for w in self.warnings)])

    @property
    def warnings(self) -> list[str]:
        return _warnings(self.runs, self.seeds)

    def to_json(self) -> dict:
        return {"specs": self.specs, "seeds": self.seeds, **self.settings, "summary": self.summary(),
                "verdicts": self.verdicts(), "warnings": self.warnings,
                "runs": {s: [r.as_dict() for r in runs] for s, runs in self.runs.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "TuneComparison":
        derived = ("specs", "seeds", "summary", "verdicts", "warnings", "runs")
        return cls(data["specs"], data["seeds"], {k: v for k, v in data.items() if k not in derived},
                   {s: [TrainRun.from_dict(r) for r in runs] for s, runs in data["runs"].items()})

    def write_files(self, folder: Path) -> None:
        from ..report.training import plot_curves

        (folder / "compare.txt").write_text(self.table() + "\n")
        plot_curves(self.runs, folder / "compare.png",
                    title=f"{self.settings['model']['name']}: held-out loss by layer choice")


def _warnings(runs: dict[str, list[TrainRun]], seeds: list[int]) -> list[str]:
    """One line per run (a spec and seed) whose held-out loss did not fall beyond its noise."""
    return [f"{spec} (seed {seed}): {problem}; try a lower --lr, more --steps or more data"
            for spec, spec_runs in runs.items() for seed, run in zip(seeds, spec_runs)
            if (problem := run.did_not_help())]


def tune(model: LanguageModel | str = DEFAULT_MODEL, data: str = "bbc", layers: str | None = None, *,
         sample: int | None = None, by: str = "uniform", compare: str | list[str] | bool | None = None,
         seeds: int = 1, scan: ScanResult | str | Path | None = None, score: str | None = None, validation=None,
         config: TrainConfig | None = None, out: str | Path | None = None,
         force: bool = False, progress: bool = True, device: str | None = None,
         **options) -> TuneResult | TuneComparison:
    """Fine-tune only the blocks ``layers`` names, or with ``compare`` (specs, a comma list, or True for
    ``DEFAULT_COMPARE``) each choice from the same pre-trained weights on the same data order, over ``seeds``
    seeds.

    ``model`` and ``data`` (wiki, bbc, sharegpt or a .txt/.jsonl file) as for the CLI; ``layers``: a layer
    spec (``critical:K``, the default ``critical:4``, ``noncritical:K``, ``random:K``, ``all``, ``3,7-9``;
    ``sample:K`` trains K blocks at a time, re-drawn every ``every`` steps, uniformly like LISA, ``sample:K:critical``
    weighted toward the critical blocks, ``sample:K:noncritical`` toward the others, as ``sample=K`` with ``by``
    uniform, critical, noncritical or a scan score (toward its critical blocks) also says; ``lora:SPEC`` trains LoRA
    on SPEC's blocks, for a comparison beside full fine-tunes), ranked by ``score`` of
    ``scan`` (a result or its folder) or of a default scan run now, or with ``validation`` (a ``Validation`` or its
    folder) by the lens it found best. ``config`` is a ``TrainConfig``, its fields also taken as keywords
    (``steps=20``, ``lora=True``, ...). A run that does not lower the held-out loss beyond its noise is flagged in
    its ``warnings``. With ``out`` the result is saved.

    >>> result = critlayer.tune(model_folder, data=text_file, layers="1,4", steps=2, n_eval=4, progress=False)
    >>> result.run.layers, [step for step, loss in result.run.heldout_loss]
    ([1, 4], [0, 2])
    """
    config = replace(config, **options) if config is not None else TrainConfig(**options)
    compare = DEFAULT_COMPARE if compare is True else compare
    specs = [s.strip() for s in compare.split(",") if s.strip()] if isinstance(compare, str) else compare
    layers, score = _one_spec(layers, sample, by, score, specs)
    if seeds < 1:
        raise CritlayerError(f"--seeds must be at least 1, got {seeds}")
    if seeds > 1 and not specs:
        raise CritlayerError("--seeds repeats a --compare; give --compare SPEC,SPEC,...")
    if specs is not None and (not specs or len(set(specs)) != len(specs)):
        raise CritlayerError(f"--compare needs distinct layer specs, got {','.join(specs or []) or 'none'}")
    if out is not None:
        check_output_folder(out, (TuneResult if specs is None else TuneComparison).FILE, force)
    check_source(data, config.n_eval + 1)  # a missing or unreadable file ends here, before the model loads
    lm = float32_model(model, device)
    text = load_data(lm, data, n_eval=config.n_eval, n_train=config.n_train, max_tokens=config.max_tokens)
    scan_result, lens = ranked_by(lm, specs or [layers], scan=scan, validation=validation, score=score,
                                  progress=progress, check=check_tune_spec)
    plan = Plan(f"tune of {lm.name}")
    for run_config in [replace(config, seed=config.seed + i) for i in range(seeds)] * len(specs or [layers]):
        plan_finetune(plan, text, run_config)
    plan.announce(progress)
    if specs is None:  # one run trains a model tune loaded itself in place: no second copy of the weights
        trained = copy.deepcopy(lm.model) if isinstance(model, LanguageModel) else lm.model
        result = _tune_one(lm, trained, text, layers, config, scan_result, lens, progress)
    else:
        result = _tune_compare(lm, text, specs, config, seeds, scan_result, lens, progress)
    if out is not None:
        result.save(out, force=force)
    return result


def _one_spec(layers: str | None, sample: int | None, by: str, score: str | None,
              specs: list[str] | None) -> tuple[str, str | None]:
    """The spec of a single run, from ``layers`` or from ``sample`` and ``by``, and the score that ranks: ``by`` a
    scan score is ``sample:K:critical`` ranked by that score. Both ways at once are refused, and ``sample`` beside a
    comparison."""
    if sample is None:
        if by != "uniform":
            raise CritlayerError("--by says how --sample draws: give --sample K too")
        return layers or "critical:4", score
    if specs is not None:
        raise CritlayerError("--sample makes one run; in --compare write sample:K or sample:K:critical")
    if layers is not None:
        raise CritlayerError("give --layers or --sample, not both")
    if by in SAMPLE_WAYS:
        return f"sample:{sample}:{by}", score
    if score is not None and score != by:
        raise CritlayerError(f"--by {by} ranks by a score: give it or --score, not both")
    return f"sample:{sample}:critical", by


def _settings(lm: LanguageModel, data: TextData, config: TrainConfig, scan_result: ScanResult | None,
              lens: Lens | None) -> dict:
    return {"model": lm.describe(), "data": data.describe(), "train": config.describe(),
            "scan_critical": None if scan_result is None else scan_result.critical,
            "lens": None if lens is None else lens.to_json()}


def _trained_layers(lm: LanguageModel, spec: str, lens: Lens | None,
                    config: TrainConfig) -> tuple[list[int] | LayerSchedule, TrainConfig]:
    """The blocks a spec trains (for ``sample:K``, its draws) and the config it trains with (``lora:SPEC`` is SPEC
    with LoRA), refusing in one line what cannot train."""
    if (inner := lora_spec(spec)) is not None:
        spec, config = inner, replace(config, lora=True)
    if config.lora and config.embeddings:
        raise CritlayerError("--embeddings trains whole weights: it does not go with LoRA")
    if (drawn := sampled(spec, lm.num_layers)) is not None:
        k, toward = drawn
        if config.lora:
            raise CritlayerError(f"{spec} switches whole blocks as it trains: it does not go with LoRA")
        if toward != "uniform" and lens is None:
            raise CritlayerError(f"{spec} needs a scan or a validation")
        weights = draw_weights(lm.num_layers, toward, lens)
        return LayerSchedule.drawn(weights, k, config.every, config.steps, config.seed), config
    layers = resolve_layers(lm.num_layers, spec, lens, seed=config.seed)
    if not layers:
        raise CritlayerError(f"{spec} names no block to train")
    if config.lora:
        lora_config(lm, layers)  # fails early, in one line, where a block has no linear layer
    return layers, config


def _tune_one(lm: LanguageModel, trained: torch.nn.Module, data: TextData, spec: str, config: TrainConfig,
              scan_result: ScanResult | None, lens: Lens | None, progress: bool) -> TuneResult:
    layers, config = _trained_layers(lm, spec, lens, config)
    settings = _settings(lm, data, config, scan_result, lens)  # before training: LoRA changes the model it wraps
    model, run = finetune(lm, trained, layers, data, config, progress=progress, label=spec)
    return TuneResult(spec, settings, run, model, lm.tokenizer)


def _tune_compare(lm: LanguageModel, data: TextData, specs: list[str], config: TrainConfig, seeds: int,
                  scan_result: ScanResult | None, lens: Lens | None, progress: bool) -> TuneComparison:
    seed_list = [config.seed + i for i in range(seeds)]
    for spec in specs:  # check every spec (and seed) before any training
        for seed in seed_list:
            _trained_layers(lm, spec, lens, replace(config, seed=seed))
    runs: dict[str, list[TrainRun]] = {spec: [] for spec in specs}
    for seed in seed_list:
        for spec in specs:
            layers, run_config = _trained_layers(lm, spec, lens, replace(config, seed=seed))
            model, run = finetune(lm, copy.deepcopy(lm.model), layers, data, run_config, progress=progress,
                                  label=f"{spec} seed {seed}")
            del model
            runs[spec].append(run)
    settings = _settings(lm, data, config, scan_result, lens)
    trained_otherwise = {spec: _trained_layers(lm, spec, lens, config)[1].describe() for spec in specs}
    settings["train_by_spec"] = {spec: train for spec, train in trained_otherwise.items()
                                 if train != settings["train"]}  # lora:SPEC: LoRA, at its own rate
    return TuneComparison(specs, seed_list, settings, runs)
