"""``critlayer prune``: remove the blocks that matter least, write a checkpoint that reloads anywhere, and show on
held-out text how the choice compares with what users would otherwise do.

The blocks to remove come from a score (any scan score, the consensus, or ``sleb``), by default each
removal checked on the calibration loss among the score's few least critical remaining blocks; the
baselines (``removal.BASELINES``) choose from the same eligible blocks. Every method's choice is evaluated for
every count from one block to a third of the model (a curve), and at the count asked for in full:
perplexity, KL divergence to the unpruned model, top-1 agreement, the compute the choice cost, and
for the chosen blocks parameters and tokens/s before and after. Each scan score is also correlated
with the loss rise of removing each block alone, so a user learns which lens predicts pruning damage.
Sleb and the angular baseline read calibration text; the evaluation reads held-out texts neither saw.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..common.cost import Plan
from ..common.errors import CritlayerError
from ..common.options import option
from ..common.stats import lens_correlations
from ..find.result import ScanResult
from ..find.select import eligible_blocks
from ..models import DEFAULT_MODEL, LanguageModel
from ..models.checkpoint import save_checkpoint, without_blocks, without_sublayers
from ..models.gguf import PATTERN_MOVES, keeps_layer_pattern, read_back_text, write_pruned_gguf
from ..models.loading import gguf_file, model_folder
from ..models.mergekit import PASSTHROUGH_USE, passthrough
from ..models.surgery import sublayer, taken_out
from ..models.loss import BATCH
from ..report.engines import llamacpp_text
from ..train.finetune import TrainConfig, finetune, plan_finetune
from .change import (Bench, ChangeConfig, ChangeResult, evaluate_elsewhere, gguf_check, open_bench, open_model,
                     plan_elsewhere, score_option, unsaved)
from .evaluation import Method, evaluate, evaluate_methods, parameter_count, tokens_per_second
from .removal import BASELINES, angular_run, greedy, greedy_passes, last_blocks, random_blocks, run_distances

CURVE_FRACTION = 1 / 3  # the curve runs from no block removed to a third of the model


@dataclass
class PruneConfig(ChangeConfig):
    """How to prune (each field is the CLI flag of that name), beside what every change shares (``ChangeConfig``).

    ``remove``: a number of blocks, or a fraction of all blocks (rounded to the nearest count, halves up).
    ``score`` ranks the blocks; with ``candidates`` (K blocks, or that fraction of the eligible ones) each removal
    tries K blocks on the calibration loss and takes the cheapest: the score's least critical remaining blocks and,
    with ``neighbours``, taking turns with them, the blocks next to one already removed (0: the score's order alone).
    ``parts``: what is removed from each chosen block (``block``, or its ``attn`` or ``mlp`` sublayer). ``edges``
    lets the first and last block go. ``heal`` fine-tunes the pruned model that many steps (LoRA with
    ``heal_lora``, merged before saving).
    """

    MEASURED: ClassVar[str] = "sleb"

    score: str | None = score_option("sleb", "block_influence")

    remove: float = option(0.25, "blocks to remove: a count, or a fraction of all blocks rounded to the nearest "
                                 "count", positive=True)
    candidates: float = option(0.25, "check each removal on the calibration loss among K candidates: a count, or a "
                                    "fraction of the eligible blocks rounded half up, at least 2 (0: the score's "
                                    "order alone)", minimum=0)
    neighbours: bool = option(True, "draw candidates only from the score's order, not also from the blocks next to "
                                    "removed ones", flag="--no-neighbours")
    parts: str = option("block", "remove whole blocks, or the attention or MLP sublayer of each",
                        choices=("block", "attn", "mlp"))
    edges: bool = option(False, "let the first and last block be removed")
    heal: int = option(0, "fine-tune the pruned model this many steps", minimum=0)
    heal_lora: bool = option(False, "heal with LoRA adapters, merged before saving")

    def __post_init__(self):
        super().__post_init__()
        if self.candidates >= 1 and self.candidates != int(self.candidates):
            raise CritlayerError(f"--candidates takes a whole number or a fraction below 1, got {self.candidates:g}")
        if self.heal and self.parts != "block":
            raise CritlayerError("--heal trains whole blocks; a dropped sublayer's zeroed projection would be "
                                 "trained back")
        if self.llamacpp and (self.heal or self.parts != "block"):
            raise CritlayerError("--llamacpp runs the pruned model.gguf, written only where whole blocks go without "
                                 "healing")

    def checked(self, eligible: int) -> int:
        """Candidates per loss-checked step: ``candidates`` itself, or that fraction of the eligible blocks rounded
        half up (at least two: one alone would only follow the score)."""
        return int(self.candidates) if self.candidates >= 1 or not self.candidates else \
            max(2, math.floor(self.candidates * eligible + 0.5))

    def method(self, eligible: int) -> str:
        """The chosen method's name in results: the score, and how many candidates the loss checked."""
        if self.score == "sleb" or not self.candidates:
            return self.score
        return f"{self.score}, loss-checked among {self.checked(eligible)}{' with neighbours' * self.neighbours}"

    def count(self, num_layers: int, eligible: int) -> int:
        """Blocks to remove: ``remove`` itself, or that fraction of all blocks rounded half up."""
        n = int(self.remove) if self.remove >= 1 else math.floor(self.remove * num_layers + 0.5)
        if self.remove >= 1 and self.remove != int(self.remove):
            raise CritlayerError(f"--remove takes a whole number of blocks or a fraction below 1, got {self.remove:g}")
        if not 1 <= n < eligible:
            raise CritlayerError(f"--remove {self.remove:g} means {n} block(s); it must leave at least one of the "
                                 f"{eligible} eligible blocks (of {num_layers})")
        return n


@dataclass
class PruneResult(ChangeResult, file="prune.json", kind="pruning", reference="unpruned"):
    """The chosen blocks, every method's evaluation, the pruned (and healed) model and how it was made."""

    removed: list[int]
    kept: list[int]
    count: int
    speed: dict
    healing: dict | None
    gguf: dict
    mergekit: dict = field(default_factory=dict)  # the kept blocks as a mergekit passthrough, or why not
    model: object = unsaved()  # the pruned model: its folder holds it as a checkpoint
    tokenizer: object = unsaved()
    gguf_source: Path | None = unsaved()
    gguf_check: Callable[[Path], dict] | None = unsaved()  # with --llamacpp: runs the written GGUF in llama.cpp

    @property
    def point(self) -> int:
        return self.count

    def rows(self) -> list[tuple[str, list[int] | str, float, str, dict]]:
        """(method, blocks, perplexity, spread, cost) at the count asked for; random as median and range."""
        n = self.count
        return [(name, m.choices[n][0] if len(m.perplexity[n]) == 1 else f"{len(m.perplexity[n])} draws", ppl,
                 spread, m.cost.get(n, {})) for name, m, ppl, spread in self.point_rows()]

    def table(self) -> str:
        s, speed = self.settings, self.speed
        lines = [f"pruned {self.count} of {s['model']['num_layers']} blocks ({s['parts']}) of {s['model']['name']} by "
                 f"{s['method']}: removed {self.removed}; parameters {speed['parameters_unpruned']:,} -> "
                 f"{speed['parameters_pruned']:,}"]
        if not self.reference:
            return "\n".join([*lines, f"not evaluated ({s['evaluation']})"])
        lines.append(self.heading(2))
        rows = self.rows()
        width = max(len(name) for name, *_ in rows)
        for name, blocks, ppl, spread, cost in rows:
            where = f"{cost.get('seconds', 0):.1f} s, {cost.get('forward_tokens', 0):,} forward tokens"
            lines.append(f"  {name:<{width}} {ppl:12.2f} {spread:>17}  {str(blocks):<28} {where}")
        lines += self.elsewhere_lines(2)
        lines.append(f"tokens/s {speed['unpruned']:.0f} -> {speed['pruned']:.0f}")
        if self.healing:
            lines.append(f"healed {self.healing['steps']} steps: perplexity {self.healing['before']['perplexity']:.2f}"
                         f" -> {self.healing['after']['perplexity']:.2f}")
        lines.append(f"GGUF: {self.gguf.get('file') or self.gguf.get('why')}{read_back_text(self.gguf)}")
        if self.mergekit:
            lines.append(f"mergekit: {self.mergekit.get('file') or self.mergekit.get('why')}")
        if "llamacpp" in self.gguf:
            lines.append(llamacpp_text(self.gguf["llamacpp"]))
        return "\n".join(lines)

    def write_files(self, folder: Path) -> None:
        from ..report.pruning import write_prune_report

        if self.model is not None:
            save_checkpoint(self.model, self.tokenizer, folder)
        if self.mergekit.get("file"):
            (folder / self.mergekit["file"]).write_text(passthrough(self.mergekit["source"], self.kept,
                                                                    self.mergekit["dtype"]))
        if self.gguf.get("file") and self.gguf_source is not None:
            self.gguf |= write_pruned_gguf(self.gguf_source, folder / self.gguf["file"], self.kept,
                                           self.gguf.get("layer_types"))
            if self.gguf_check is not None:
                self.gguf["llamacpp"] = self.gguf_check(folder / self.gguf["file"])
        write_prune_report(self, folder)


def prune(model: LanguageModel | str = DEFAULT_MODEL, config: PruneConfig | None = None, *,
          scan: ScanResult | str | Path | None = None, out: str | Path | None = None, force: bool = False,
          progress: bool = True, device: str | None = None, **options) -> PruneResult:
    """Remove ``config.remove`` blocks (or sublayers) of ``model`` chosen by ``config.score`` and evaluate the choice
    against the baselines on held-out text; with ``out``, write the pruned checkpoint, prune.json and a report there.

    ``scan`` (a result or its folder) supplies the scores; without one the model is scanned first. ``config`` is a
    ``PruneConfig``, its fields also taken as keywords.

    >>> scanned = critlayer.scan(model_folder, probes=text_file, n=16, max_tokens=12, progress=False)
    >>> result = critlayer.prune(model_folder, remove=2, data=text_file, n_eval=4, calibration=4, draws=2,
    ...                          scan=scanned, progress=False)
    >>> result.count, len(result.kept)
    (2, 4)
    """
    config = replace(config, **options) if config is not None else PruneConfig(**options)
    lm = open_model(model, config, out=out, force=force, device=device)
    eligible = eligible_blocks(lm.num_layers, 0 if config.edges else 1)
    count = config.count(lm.num_layers, len(eligible))
    if config.parts != "block":
        sublayer(lm.blocks[0], config.parts)  # a block without that sublayer ends here, in one line
    bench = open_bench(lm, config, scan, progress=progress)
    if bench.text is None:
        return _finish(_prune_encoder(bench, eligible, count), out, force)
    longest = min(max(count, int(lm.num_layers * CURVE_FRACTION)), len(eligible) - 1)
    _plan(bench, len(eligible), longest).announce(progress)
    with bench.compute():
        methods, single_rise = choose(bench, eligible, longest, progress)
    run_on = lambda texts: lambda choices: evaluate(  # noqa: E731
        lm, texts, {name: _removing(lm, blocks, config.parts) for name, blocks in choices.items()},
        compute=bench.compute, progress=progress)
    reference = evaluate_methods(methods, run_on(bench.text.heldout))
    elsewhere = evaluate_elsewhere(bench, methods, count, run_on)
    chosen = next(iter(methods.values()))
    removed = chosen.choices[count][0]
    pruned, kept, speed = _pruned_model(lm, removed, config.parts, bench.text.heldout, bench.compute)
    healing = None
    if config.heal:
        pruned, healing = _heal(bench, pruned, chosen.summary[count][0], progress)
    settings = {**bench.settings(), "method": config.method(len(eligible)), "parts": config.parts,
                "remove": config.remove,
                "count_rule": "a whole number is a count; a fraction of all blocks is rounded to the nearest count, "
                              "halves up", "eligible": eligible,
                "single_block_rise": single_rise, "baselines": list(BASELINES) if config.baselines else []}
    if elsewhere is not None:
        settings["also_heldout"] = elsewhere
    correlations = {} if single_rise is None else lens_correlations(
        bench.scan.scores, {"pruning_damage": np.array(single_rise["values"])}, eligible)
    source = gguf_file(lm.spec) if config.parts == "block" and not config.heal else None
    return _finish(PruneResult(settings, methods, reference.summary(), correlations, removed, kept, count, speed,
                               healing, _gguf_plan(lm, source, kept, config), _mergekit_plan(lm, config), pruned,
                               lm.tokenizer, source, gguf_check(bench, _removing(lm, removed, config.parts))), out,
                   force)


def _plan(bench: Bench, eligible: int, longest: int) -> Plan:
    """The forward tokens a pruning plans once its scan is there: the greedy searches and the angular distances on
    calibration text, then every distinct choice (at most one per method, count and draw) and the unpruned model on
    held-out text, the speed check, and healing."""
    lm, config = bench.lm, bench.config
    calibration, heldout = sum(map(len, bench.calibration)), sum(map(len, bench.text.heldout))
    plan = Plan(f"prune of {lm.name}")
    if config.score != "sleb" and config.candidates:
        plan.add(config.method(eligible), greedy_passes(lm.num_layers, eligible, longest, config.checked(eligible)),
                 calibration)
    runs = methods_run(config, bench.scan, eligible)
    if "sleb" in runs:
        plan.add("sleb", greedy_passes(lm.num_layers, eligible, longest), calibration)
    if "angular" in runs:
        plan.add("angular", 1, calibration)
    plan.add("evaluation", 1 + sum(runs.values()) * longest, heldout, at_most=True)
    plan_elsewhere(plan, bench, sum(runs.values()))
    warm_up = sum(sorted(map(len, bench.text.heldout), reverse=True)[:BATCH])  # tokens_per_second's first batch
    plan.add_tokens("speed", 4, 2 * (2 * heldout + warm_up))  # unpruned and pruned: a warm-up, two timed passes
    if config.heal:
        plan_finetune(plan, bench.text, _healing_config(config))
        plan.add("held-out loss", 2, heldout)  # the unpruned model and the healed one, after
    return plan


def methods_run(config: PruneConfig, scan: ScanResult, eligible: int) -> dict[str, int]:
    """The methods a pruning runs, the chosen one first, and how many choices each makes per count: with
    ``baselines``, also sleb, last, random's draws, the scan's block influence and angular runs (whole blocks)."""
    runs = {config.method(eligible): 1}
    if config.baselines:
        runs |= {"sleb": 1, "last": 1, "random": config.draws}
        if "block_influence" not in runs and "block_influence" in scan.scores:
            runs["block_influence"] = 1
        if config.parts == "block":
            runs["angular"] = 1
    return runs


def choose(bench: Bench, eligible: list[int], longest: int, progress: bool) -> tuple[dict[str, Method], dict | None]:
    """Every method's choice for 1..``longest`` blocks, the chosen one's first; and, where sleb ran, each block's
    calibration loss rise when removed alone (its first step), which the lenses are correlated with."""
    lm, config, calibration, scan_cost = bench.lm, bench.config, bench.calibration, bench.scan.cost
    counts = range(1, longest + 1)
    methods: dict[str, Method] = {}
    if config.score != "sleb":
        order, name = bench.scan.least_critical(config.score, eligible), config.method(len(eligible))
        if config.candidates:
            checked = greedy(lm, calibration, eligible, longest, config.parts, ranking=order,
                             candidates=config.checked(len(eligible)), neighbours=config.neighbours,
                             progress=progress)
            methods[name] = Method(name, {n: [checked.removed(n)] for n in counts},
                                   {n: _plus(scan_cost, checked.cost(n)) for n in counts})
        else:
            methods[name] = Method(name, {n: [sorted(order[:n])] for n in counts}, {n: scan_cost for n in counts})
    single_rise = None
    if "sleb" in methods_run(config, bench.scan, len(eligible)):
        search = greedy(lm, calibration, eligible, longest, config.parts, progress=progress)
        methods["sleb"] = Method("sleb", {n: [search.removed(n)] for n in counts}, {n: search.cost(n) for n in counts})
        single_rise = {"values": [round(float(v), 6) for v in search.first_rise], "cost": search.cost(1),
                       "text": "calibration"}
    if config.baselines:
        methods |= baseline_methods(bench, eligible, longest)
    return methods, single_rise


def _plus(a: dict, b: dict) -> dict:
    return {"seconds": round(a["seconds"] + b["seconds"], 3), "forward_tokens": a["forward_tokens"] + b["forward_tokens"]}


def _prune_encoder(bench: Bench, eligible: list[int], count: int) -> PruneResult:
    """An encoder has no next-token loss to evaluate or to search with: its blocks go by a scan score alone."""
    lm, config = bench.lm, bench.config
    if config.score == "sleb" or config.parts != "block":
        raise CritlayerError(f"{lm.architecture} has no LM head: sleb needs a next-token loss and a dropped sublayer "
                             "cannot be written for it; prune whole blocks by a scan score")
    removed = sorted(bench.scan.least_critical(config.score, eligible)[:count])
    pruned, kept = without_blocks(lm.model, removed)
    settings = {**bench.settings(), "method": config.score, "parts": "block", "remove": config.remove,
                "eligible": eligible}
    speed = {"parameters_unpruned": parameter_count(lm.model), "parameters_pruned": parameter_count(pruned)}
    method = Method(config.score, {count: [removed]})
    return PruneResult(settings, {config.score: method}, {}, {}, removed, kept, count, speed, None,
                       {"file": None, "why": "encoders are written as safetensors only"},
                       {"file": None, "why": "mergekit merges decoder language models"}, pruned, lm.tokenizer)


def _finish(result: PruneResult, out, force: bool) -> PruneResult:
    if out is not None:
        result.save(out, force=force)
    return result


def baseline_methods(bench: Bench, eligible: list[int], longest: int) -> dict[str, Method]:
    """last, random, Block Influence (the scan's) and angular runs (on calibration text; whole blocks only)."""
    lm, config, scan, calibration = bench.lm, bench.config, bench.scan, bench.calibration
    runs, counts = methods_run(config, scan, len(eligible)), range(1, longest + 1)
    free = {n: {"seconds": 0.0, "forward_tokens": 0} for n in counts}
    methods = {"last": Method("last", {n: [last_blocks(eligible, n)] for n in counts}, free),
               "random": Method("random", {n: [random_blocks(eligible, n, d, config.seed) for d in range(config.draws)]
                                           for n in counts}, free)}
    if "block_influence" in runs:
        order = scan.least_critical("block_influence", eligible)
        methods["block_influence"] = Method("block_influence", {n: [sorted(order[:n])] for n in counts},
                                            {n: scan.cost for n in counts})
    if "angular" in runs:
        start = time.perf_counter()
        distances = run_distances(lm, calibration, longest)
        cost = {"seconds": round(time.perf_counter() - start, 3), "forward_tokens": sum(map(len, calibration))}
        choices = {}
        for n in counts:
            try:
                choices[n] = [angular_run(distances, eligible, n)]
            except CritlayerError:
                break
        methods["angular"] = Method("angular", choices, {n: cost for n in choices})
    return methods


def _removing(lm: LanguageModel, blocks: list[int], part: str):
    """An evaluation variant: the blocks (or their part) taken out, the loaded model run."""
    return partial(taken_out, lm.blocks, blocks, part)


def _pruned_model(lm: LanguageModel, removed: list[int], part: str, heldout: list[list[int]], compute):
    """The model to save, the kept blocks, and parameters and tokens/s before and after."""
    if part == "block":
        pruned, kept = without_blocks(lm.model, removed)
    else:
        pruned, kept = without_sublayers(lm, removed, part, heldout[0]), list(range(lm.num_layers))
    speed = {"unpruned": round(tokens_per_second(lm.model, heldout, compute=compute), 1),
             "pruned": round(tokens_per_second(pruned, heldout, compute=compute), 1),
             "parameters_unpruned": parameter_count(lm.model), "parameters_pruned": parameter_count(pruned),
             "note": "forward with logits over the held-out texts, best of two passes"
                     + ("" if part == "block" else "; a zeroed sublayer still computes: no time is saved")}
    return pruned, kept, speed


def _heal(bench: Bench, pruned, before: dict, progress: bool):
    """Fine-tune every kept block (or LoRA on them, merged) on the training texts; evaluate after (``before`` is the
    pruned model's evaluation). Training changes weights in place, so it trains a copy of its own in float32 (the
    unpruned model stays what the evaluation compares with), returned in the loaded model's dtype."""
    lm, config, text = bench.lm, bench.config, bench.text
    pruned_lm = LanguageModel.wrap(copy.deepcopy(pruned).float(), lm.tokenizer, lm.name)
    healed, run = finetune(pruned_lm, pruned_lm.model, list(range(pruned_lm.num_layers)), text,
                           _healing_config(config), progress=progress, label="healing")
    healed = (healed.merge_and_unload() if config.heal_lora else healed).to(lm.dtype)
    after = evaluate(lm, text.heldout, {"healed": lambda: nullcontext(healed)}, compute=bench.compute,
                     progress=False)[1]["healed"].summary()
    return healed, {"steps": config.heal, "lora": config.heal_lora, "before": before, "after": after,
                    "run": run.as_dict()}


def _healing_config(config: PruneConfig) -> TrainConfig:
    """How healing fine-tunes: ``heal`` steps (LoRA with ``heal_lora``), the held-out loss five times along."""
    return TrainConfig(steps=config.heal, lora=config.heal_lora, seed=config.seed, dtype=config.dtype,
                       max_tokens=config.max_tokens, n_eval=config.n_eval, eval_every=max(1, config.heal // 5))


def _mergekit_plan(lm: LanguageModel, config: PruneConfig) -> dict:
    """Where the kept blocks go as a mergekit passthrough (whole blocks of a model loaded by name, unhealed), or why
    not."""
    if config.parts != "block" or config.heal:
        return {"file": None, "why": "a passthrough merge keeps whole blocks of the source as they are"}
    if lm.spec is None:
        return {"file": None, "why": "the model was handed over in memory: mergekit needs its folder"}
    return {"file": "mergekit.yml", "source": str(model_folder(lm.spec)[1]),
            "dtype": str(lm.dtype).removeprefix("torch."), "use": PASSTHROUGH_USE}


def _gguf_plan(lm: LanguageModel, source: Path | None, kept: list[int], config: PruneConfig) -> dict:
    if source is None:
        why = ("the model was not loaded from a GGUF file" if config.parts == "block" and not config.heal else
               "healed weights or zeroed sublayers would need requantising")
        return {"file": None, "why": why}
    layer_types = getattr(lm.config, "layer_types", None)
    if not keeps_layer_pattern(layer_types, kept):
        return {"file": None, "why": PATTERN_MOVES}
    return {"file": "model.gguf", "source": str(source), "layer_types": layer_types}
