"""``critlayer quantize``: give each block a width at a fixed average of bits, where the evidence says bits matter,
and show on held-out text what that buys against the plans users would otherwise pick.

A plan comes from a score: ``sensitivity`` (the default) measures how far the next-token distribution moves (KL
divergence, on calibration text) when one block alone is quantized to each candidate width, and minimises their sum
under the budget; any scan score (or the consensus) orders the blocks for the ranked rule of ``bitplan``. Against it, at the same size: uniform, the reversed order, random
orders, llama.cpp's built-in layer rule, the measured plan and the consensus, at the budget asked for and at the
candidate widths' uniform points (a curve). Each scan score is also correlated with the measured sensitivity, so a
user learns which lens predicts quantization damage. The plan exports to llama.cpp (``--tensor-type-file``, and a
mixed GGUF where the source is one) or to torchao (a per-module configuration).
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import InitVar, dataclass, replace
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..common.cost import Plan
from ..common.errors import CritlayerError
from ..common.options import option, override
from ..common.stats import lens_correlations
from ..find.result import ScanResult
from ..find.select import eligible_blocks
from ..models import DEFAULT_MODEL, LanguageModel
from ..models.gguf import gguf_tensor_name, read_back_text, write_requantized_gguf
from ..models.llamacpp import require as require_llamacpp
from ..models.loading import gguf_file
from ..report.engines import llamacpp_text
from .bitplan import UP_SHARE, cheapest_plan, llama_cpp_order, ranked_plan, uniform_width
from .blockwise import evaluate_plans, schedule
from .change import (Bench, ChangeConfig, ChangeResult, evaluate_elsewhere, gguf_check, open_bench, open_model,
                     plan_elsewhere, score_option, unsaved)
from .evaluation import Method, evaluate_methods
from .quantizers import FAMILIES, GGUF_WIDTHS, INT_WIDTHS, parse_widths, width
from .weights import BlockWeights

SENSITIVITY = "sensitivity"
MEASURED_PLAN = f"{SENSITIVITY} (measured)"  # the plan sensitivity makes, as results name it
SMALLEST_GGUF_BITS = 4.25  # MXFP4: below it, ``auto`` takes torchao's integer widths
FAMILY_CHOICES = ("auto", *FAMILIES)


@dataclass
class QuantizeConfig(ChangeConfig):
    """How to quantize (each field is the CLI flag of that name), beside what every change shares (``ChangeConfig``).

    ``bits``: the average bits per block weight, everything a group is stored with counted (the embedding and head
    are held as loaded and reported apart). ``family``: ``gguf`` (llama.cpp's types), ``int`` (torchao's groups of
    ``group_size``) or ``auto`` (the first listed width's; without a list gguf from 4.25 bits up). ``widths``: the
    candidate widths, a comma list (default the family's). ``score`` makes the plan. ``curve`` off evaluates at
    ``bits`` only. ``per_kind`` gives each block's attention and MLP a width apart.
    """

    MEASURED: ClassVar[str] = SENSITIVITY

    score: str | None = score_option(SENSITIVITY, SENSITIVITY)

    calibration: int = override(ChangeConfig, "calibration", 16)
    bits: float = option(4.5, "average bits per block weight, scales and zero-points counted", positive=True,
                         below=64)
    family: str = option("auto", "the widths' family: gguf (llama.cpp's types), int (torchao's integer groups), "
                                 "auto: the first listed width's, without a list gguf from 4.25 bits",
                         choices=FAMILY_CHOICES, old_flag="--format")
    widths: str | None = option(None, f"candidate widths, a comma list of {', '.join(GGUF_WIDTHS)}, llama.cpp's "
                                      "K- and IQ-types (Q3_K, IQ3_S...; the llamacpp extra) or "
                                      f"{', '.join(INT_WIDTHS)}, int ones in groups of G as int3g32, with HQQ "
                                      "scales as int2-hqq, importance-weighted as int2-imatrix or Q4_0-imatrix, "
                                      "A/B for A where a tensor's rows hold A's groups, else B: Q3_K/MXFP4 "
                                      "(default: the family's)")
    group_size: int = option(64, "weights per group of an int width", minimum=1)
    curve: bool = option(True, "evaluate at --bits only, not also at every inner width's uniform point",
                         flag="--no-curve")
    per_kind: bool = option(False, "give each block's attention and MLP a width apart")
    format: InitVar[str | None] = None  # the old name of ``family``, for one release

    def __post_init__(self, format: str | None = None):
        if format is not None:
            warnings.warn("QuantizeConfig's format is now family; the old name goes in the next release",
                          DeprecationWarning, stacklevel=3)
            self.family = format
        super().__post_init__()

    @property
    def widths_family(self) -> str:
        """The family the widths come from: ``family``, or for ``auto`` the first listed width's, without a list gguf
        from 4.25 bits up, else int."""
        if self.family != "auto":
            return self.family
        if self.widths and self.widths.strip(", "):
            return width(self.widths.strip(", ").split(",")[0].strip()).family
        return "gguf" if self.bits >= SMALLEST_GGUF_BITS else "int"


@dataclass
class QuantizeResult(ChangeResult, file="quantize.json", kind="quantization", reference="unquantized"):
    """The chosen plan, every method's evaluation along the curve, the lenses' correlations and the exports."""

    plan: dict[str, str]
    bits_per_weight: float
    sensitivity: dict | None
    held_fixed: dict
    exports: dict
    gguf_source: Path | None = unsaved()  # what the exports are written from
    gguf_types: dict | None = unsaved()
    torchao_config: dict | None = unsaved()
    gguf_check: Callable[[Path], dict] | None = unsaved()  # with --llamacpp: runs the written GGUF in llama.cpp
    gguf_encoders: dict | None = unsaved()  # the tensors llama.cpp's quantizer writes: GGUF name -> rows -> bytes

    @property
    def point(self) -> float:
        return self.settings["bits"]

    @property
    def bits(self) -> float:
        """Deprecated: ``bits_per_weight``."""
        return self.bits_per_weight

    def rows(self) -> list[tuple[str, float, float, str, float]]:
        """(method, bits per weight, perplexity, range, KL) at the budget asked for; random as its median and
        range."""
        budget = self.point
        return [(name, m.cost[budget]["bits_per_weight"], ppl, spread,
                 float(np.median([s["kl"] for s in m.summary[budget]]))) for name, m, ppl, spread in self.point_rows()]

    def table(self) -> str:
        s = self.settings
        widths = ", ".join(f"{w}: {n}" for w, n in Counter(self.plan.values()).items())
        lines = [f"quantized {s['model']['name']} at {self.bits_per_weight:.4f} bits per block weight (budget "
                 f"{s['bits']:g}) by {s['score']}: {widths}", f"embedding and head: {self.held_fixed['text']}"]
        stored = self.exports.get("tensor_types", {}).get("types")
        if stored and any("/" in w for w in self.plan.values()):
            lines.append("block tensors stored as " + ", ".join(f"{k} {n}" for k, n in stored.items())
                         + " (a width A/B stores B where a tensor's rows do not hold A's groups)")
        if not self.reference:
            return "\n".join([*lines, f"not evaluated ({s['evaluation']})"])
        lines.append(self.heading(3))
        rows = self.rows()
        width = max(len(r[0]) for r in rows)
        lines.append(f"  {'method':<{width}} {'bits':>7} {'perplexity':>11} {'range':>13} {'KL':>8}")
        for name, bits, ppl, spread, kl in rows:
            lines.append(f"  {name:<{width}} {bits:7.4f} {ppl:11.3f} {spread:>13} {kl:8.4f}")
        lines += self.elsewhere_lines(3)
        lines += [f"at {budget} bits: {why}" for budget, why in s.get("degenerate", {}).items()]
        if self.sensitivity:
            cost = self.sensitivity["cost"]
            lines.append(f"measured sensitivity cost {cost['seconds']:.1f} s, {cost['forward_tokens']:,} forward tokens")
        lines += [f"{kind}: {e.get('file') or e.get('why')}{read_back_text(e)}" for kind, e in self.exports.items()]
        if "llamacpp" in self.exports.get("gguf", {}):
            lines.append(llamacpp_text(self.exports["gguf"]["llamacpp"]))
        return "\n".join(lines)

    def write_files(self, folder: Path) -> None:
        from ..report.quantization import write_quantize_report

        if self.gguf_types:
            (folder / self.exports["tensor_types"]["file"]).write_text(tensor_type_lines(self.gguf_types))
        if self.exports.get("gguf", {}).get("file") and self.gguf_source is not None:
            self.exports["gguf"] |= write_requantized_gguf(self.gguf_source, folder / self.exports["gguf"]["file"],
                                                           self.gguf_types, self.gguf_encoders)
            if self.gguf_check is not None:
                self.exports["gguf"]["llamacpp"] = self.gguf_check(folder / self.exports["gguf"]["file"])
        if self.torchao_config is not None:
            (folder / self.exports["torchao"]["file"]).write_text(json.dumps(self.torchao_config, indent=1))
        write_quantize_report(self, folder)


def tensor_type_lines(types: dict[str, str]) -> str:
    """llama-quantize's ``--tensor-type-file``: one anchored pattern per tensor, ``^blk\\.3\\.attn_q\\.weight$=q4_0``."""
    return "".join(f"^{re.escape(name)}$={kind.lower()}\n" for name, kind in types.items())


def quantize(model: LanguageModel | str = DEFAULT_MODEL, config: QuantizeConfig | None = None, *,
             scan: ScanResult | str | Path | None = None, out: str | Path | None = None, force: bool = False,
             progress: bool = True, device: str | None = None, **options) -> QuantizeResult:
    """Give each block of ``model`` a width so that its block weights average ``config.bits`` bits, by
    ``config.score``, and evaluate the plan against the baselines on held-out text; with ``out``, write
    quantize.json, a report and the exports there.

    ``scan`` (a result or its folder) supplies the scores; without one the model is scanned first. ``config`` is a
    ``QuantizeConfig``, its fields also taken as keywords.

    >>> scanned = critlayer.scan(model_folder, probes=text_file, n=16, max_tokens=12, progress=False)
    >>> result = critlayer.quantize(model_folder, bits=5, widths="Q4_0,Q5_0,Q8_0", data=text_file, n_eval=4,
    ...                             calibration=4, draws=2, scan=scanned, progress=False)
    >>> round(result.bits_per_weight, 3) <= 5
    True
    """
    config = replace(config, **options) if config is not None else QuantizeConfig(**options)
    widths = parse_widths(config.widths, config.widths_family, config.group_size)
    parts = [(float(p.bits), w.name) for w in widths for p in (w, w.fallback) if p is not None]
    _check_bits(config.bits, min(parts), max(parts))
    if any(w.needs_llamacpp for w in widths):
        require_llamacpp()
    if config.llamacpp and config.widths_family != "gguf":
        raise CritlayerError("--llamacpp runs the written model.gguf, which holds llama.cpp's widths only: choose "
                             "--family gguf")
    lm = open_model(model, config, out=out, force=force, device=device)
    if not lm.is_causal and config.score == SENSITIVITY:
        raise CritlayerError(f"{lm.architecture} has no LM head: sensitivity needs a next-token loss; plan by a "
                             "scan score")
    weights = BlockWeights(lm, widths, per_kind=config.per_kind)
    _check_bits(config.bits, (weights.width_bits(0), weights.widths[0].name),
                (weights.width_bits(-1), weights.widths[-1].name))
    bench = open_bench(lm, config, scan, progress=progress)
    budgets = _budgets(config, weights)
    settings = {**bench.settings(), "bits": config.bits, "family": config.widths_family,
                "widths": {w.name: {"bits": round(weights.width_bits(k), 6), "group": w.group}
                           | ({"holds": weights.held_as(k)} if w.fallback else {})
                           for k, w in enumerate(weights.widths)}, "budgets": budgets,
                "ranked_rule": f"the first {UP_SHARE:.0%} of the weights in the order one width up, the last ones "
                               "one width down until the plan fits"}
    if bench.text is None:
        plan = ranked_plan(_order(bench.scan, config.score, weights), weights.costs, weights.sizes,
                           weights.budget(config.bits))
        method = Method(config.score, {config.bits: [plan]}, {config.bits: _cost(weights, plan, bench.scan.cost)})
        return _finish(lm, weights, plan, settings, {}, {config.score: method}, None, {}, config, out, force)

    _plan(bench, weights, budgets).announce(progress)
    if weights.needs_importance:
        with bench.compute():
            weights.measure_importance(bench.calibration)
        settings["importance"] = {"text": "calibration", "tokens": sum(map(len, bench.calibration))}
    sensitivity = None
    if MEASURED_PLAN in methods_run(config, bench.scan):
        sensitivity = measure_sensitivity(lm, weights, bench.calibration, bench.compute, progress)
    methods = plan_methods(weights, bench.scan, sensitivity, budgets, config)
    run_on = lambda texts: lambda plans: evaluate_plans(  # noqa: E731
        lm, texts, plans, weights, compute=bench.compute, progress=progress)[:2]
    reference = evaluate_methods(methods, run_on(bench.text.heldout))
    elsewhere = evaluate_elsewhere(bench, methods, config.bits, run_on)
    if elsewhere is not None:
        settings["also_heldout"] = elsewhere
    correlations = {}
    if sensitivity is not None:
        down = max(uniform_width(weights.costs, weights.budget(config.bits)) - 1, 0)
        sensitivity["correlated_width"] = weights.widths[down].name
        correlations = lens_correlations(bench.scan.scores, {
            "quantization_damage": weights.per_block(np.array(sensitivity["kl"])[:, down]),
            "loss_rise": weights.per_block(np.array(sensitivity["loss_rise"])[:, down])},
            eligible_blocks(lm.num_layers, 1))
    settings["baselines"] = list(methods)[1:]
    plan = next(iter(methods.values())).choices[config.bits][0]
    return _finish(lm, weights, plan, settings, reference.summary(), methods, sensitivity, correlations, config, out,
                   force, gguf_check(bench, partial(weights.at, dict(enumerate(plan)))))


def _plan(bench: Bench, weights: BlockWeights, budgets: list[float]) -> Plan:
    """The forward tokens a quantization plans once its scan is there: sensitivity (every unit alone at every width
    from its block on, and the loaded model, on calibration text), then every distinct plan (at most one per method,
    budget and draw) and the loaded model on held-out text."""
    runs = methods_run(bench.config, bench.scan)
    plan = Plan(f"quantization of {bench.lm.name}")
    if weights.needs_importance:
        plan.add("importance matrix", 1, sum(map(len, bench.calibration)))
    if MEASURED_PLAN in runs:
        passes = schedule(list(map(tuple, alone_plans(weights).values())), weights.blocks, bench.lm.num_layers).passes()
        plan.add_tokens(SENSITIVITY, math.ceil(passes), round(passes * sum(map(len, bench.calibration))))
    plan.add("evaluation", 1 + sum(runs.values()) * len(budgets), sum(map(len, bench.text.heldout)), at_most=True)
    plan_elsewhere(plan, bench, sum(runs.values()))
    return plan


def methods_run(config: QuantizeConfig, scan: ScanResult) -> dict[str, int]:
    """The methods a quantization runs, the chosen one first, and how many plans each makes per budget: uniform,
    and with ``baselines`` the reversed order, random's draws, llama.cpp's rule, the measured plan and the
    consensus."""
    runs = {MEASURED_PLAN if config.score == SENSITIVITY else config.score: 1, "uniform": 1}
    if config.baselines:
        runs |= {"reversed": 1, "random": config.draws, "llama.cpp rule": 1, MEASURED_PLAN: 1}
        if "consensus" in scan.scores:
            runs["consensus"] = 1
    return runs


def alone_plans(weights: BlockWeights) -> dict[str, list[int | None]]:
    """Every unit alone at every candidate width, every other unit as loaded: what sensitivity measures."""
    n, k = weights.costs.shape
    return {f"{i},{w}": [w if j == i else None for j in range(n)] for i in range(n) for w in range(k)}


def measure_sensitivity(lm: LanguageModel, weights: BlockWeights, calibration: list[list[int]], compute,
                        progress: bool) -> dict:
    """What one unit alone at each candidate width (every other unit as loaded) does on calibration text: the
    mean KL divergence per token to the loaded model's next-token distribution (what plans minimise: never below
    zero, and far less noisy than the loss rise beside it), and what measuring it cost."""
    start = time.perf_counter()
    n, k = weights.costs.shape
    reference, scores, passes = evaluate_plans(lm, calibration, alone_plans(weights), weights, compute=compute,
                                               progress=progress, desc="measuring sensitivity")
    kl = [[float(scores[f"{i},{w}"].kl.sum() / scores[f"{i},{w}"].tokens.sum()) for w in range(k)] for i in range(n)]
    rise = [[round(scores[f"{i},{w}"].mean_loss - reference.mean_loss, 6) for w in range(k)] for i in range(n)]
    return {"kl": kl, "loss_rise": rise, "widths": [w.name for w in weights.widths], "text": "calibration",
            "cost": {"seconds": round(time.perf_counter() - start, 3),
                     "forward_tokens": round(sum(map(len, calibration)) * passes)}}


def plan_methods(weights: BlockWeights, scan: ScanResult, sensitivity: dict | None, budgets: list[float],
                 config: QuantizeConfig) -> dict[str, Method]:
    """Every method's plan at every budget, the chosen one's first."""
    n, scan_cost = len(weights.sizes), scan.cost
    free = {"seconds": 0.0, "forward_tokens": 0}
    damage = None if sensitivity is None else np.array(sensitivity["kl"])

    def method(name: str, make, cost: dict, draws: int = 1) -> Method:
        choices = {b: [make(weights.budget(b), d) for d in range(draws)] for b in budgets}
        return Method(name, choices, {b: _cost(weights, choices[b][0], cost) for b in budgets})

    def ranked(order):
        return lambda budget, _: ranked_plan(order, weights.costs, weights.sizes, budget)

    measured = lambda budget, _: cheapest_plan(damage, weights.costs, budget)  # noqa: E731
    if config.score == SENSITIVITY:
        chosen = method(MEASURED_PLAN, measured, sensitivity["cost"])
        order = _sensitivity_order(damage, weights.costs, weights.budget(config.bits))
    else:
        order = _order(scan, config.score, weights)
        chosen = method(config.score, ranked(order), scan_cost)
    runs = methods_run(config, scan)
    methods = {chosen.name: chosen,
               "uniform": method("uniform", lambda budget, _: [uniform_width(weights.costs, budget)] * n, free)}
    if not config.baselines:
        return methods
    methods["reversed"] = method("reversed", ranked(order[::-1]), chosen.cost[config.bits])
    methods["random"] = method("random", lambda budget, d: ranked_plan(
        [int(i) for i in np.random.default_rng([config.seed, d]).permutation(n)], weights.costs, weights.sizes,
        budget), free, config.draws)
    llama_blocks, share = llama_cpp_order(weights.lm.num_layers)
    llama_order = weights.units_of(llama_blocks)
    methods["llama.cpp rule"] = method("llama.cpp rule", lambda budget, _: ranked_plan(
        llama_order, weights.costs, weights.sizes, budget, share), free)
    if MEASURED_PLAN not in methods:
        methods[MEASURED_PLAN] = method(MEASURED_PLAN, measured, sensitivity["cost"])
    if "consensus" in runs and "consensus" not in methods:
        methods["consensus"] = method("consensus", ranked(_order(scan, "consensus", weights)), scan_cost)
    return methods


def _order(scan: ScanResult, score: str, weights: BlockWeights) -> list[int]:
    """Every unit, most critical block first by one of the scan's scores (the edges included: they are quantized
    too)."""
    return weights.units_of(scan.ranking(score, list(range(weights.lm.num_layers))))


def _sensitivity_order(damage: np.ndarray, costs: np.ndarray, budget: int) -> list[int]:
    """Units by measured damage at the width below the uniform one (what a plan pushes units down to)."""
    down = max(uniform_width(costs, budget) - 1, 0)
    return sorted(range(len(damage)), key=lambda i: (-damage[i, down], i))


def _budgets(config: QuantizeConfig, weights: BlockWeights) -> list[float]:
    """The budget asked for first; with the curve, also the uniform point of every inner candidate width but the
    one uniform takes at that budget."""
    asked = uniform_width(weights.costs, weights.budget(config.bits))
    inner = [weights.width_bits(k) for k in range(1, len(weights.widths) - 1) if k != asked] if config.curve else []
    return [config.bits, *sorted(inner)]


def _check_bits(bits: float, lowest: tuple[float, str], highest: tuple[float, str]) -> None:
    """Refuse a budget outside the widths' (bits per weight, name) ``lowest`` to ``highest``."""
    if not lowest[0] <= bits <= highest[0]:
        raise CritlayerError(f"--bits {bits:g} lies outside the widths' {lowest[0]:g} ({lowest[1]}) to "
                             f"{highest[0]:g} ({highest[1]}) bits per weight")


def _cost(weights: BlockWeights, plan: list[int], cost: dict) -> dict:
    return {**cost, "bits_per_weight": round(weights.bits_per_weight(plan), 6)}


def _finish(lm: LanguageModel, weights: BlockWeights, plan: list[int], settings: dict, unquantized: dict, methods: dict[str, Method], sensitivity, correlations: dict, config: QuantizeConfig,
            out, force: bool, check: Callable[[Path], dict] | None = None) -> QuantizeResult:
    named = {weights.labels[u]: weights.widths[k].name for u, k in enumerate(plan)}
    source, architecture, held = _source(lm)
    exports, types, encoders, torchao_config = _exports(lm, weights, plan, source, architecture,
                                                        config.widths_family)
    if types and source is not None:
        settings["degenerate"] = _degenerate({held.get(name) for name in types}, weights, settings["budgets"])
    result = QuantizeResult(settings, methods, unquantized, correlations, named, weights.bits_per_weight(plan),
                            sensitivity, _held_fixed(lm, held), exports, source, types, torchao_config, check,
                            encoders)
    if out is not None:
        result.save(out, force=force)
    return result


def _source(lm: LanguageModel) -> tuple[Path | None, str, dict[str, str]]:
    """The GGUF file the model was loaded from (None if none), its architecture (else the config's model type) and
    the type each of its tensors holds, read once."""
    source = gguf_file(lm.spec)
    if source is None:
        return None, lm.config.model_type, {}
    import gguf

    reader = gguf.GGUFReader(source)
    return (source, reader.get_field(gguf.Keys.General.ARCHITECTURE).contents(),
            {t.name: t.tensor_type.name for t in reader.tensors})


def _exports(lm: LanguageModel, weights: BlockWeights, plan: list[int], source: Path | None, architecture: str,
             family: str) -> tuple[dict, dict | None, dict | None, dict | None]:
    """Where the plan goes: llama.cpp (a ``--tensor-type-file`` and, from a GGUF source, a mixed GGUF) for gguf
    widths; a torchao per-module configuration for integer widths. Returns what to say, the GGUF tensor types, how
    to encode the tensors only llama.cpp's quantizer makes (GGUF name: rows -> bytes) and the torchao
    configuration."""
    modules = {f"{lm.blocks_path}.{weights.blocks[u]}.{name}": (weights.widths[plan[u]].for_row(weights.row(m)), m)
               for u, layers in enumerate(weights.linears) for name, m in layers}
    if family == "int":
        from torchao.core.config import config_to_dict

        from .quantizers import torchao

        why = "a llama.cpp file holds none of torchao's integer widths: use the gguf format for one"
        exports = {"tensor_types": {"file": None, "why": why}, "gguf": {"file": None, "why": why}}
        if any(w.needs_importance for w, _ in modules.values()):
            why = ("scales chosen by an importance matrix are calibration data, which a torchao configuration "
                   "cannot carry")
            return {"torchao": {"file": None, "why": why}} | exports, None, None, None
        config = config_to_dict(torchao().FqnToConfig({m: w.torchao_config() for m, (w, _) in modules.items()}))
        return ({"torchao": {"file": "torchao_config.json",
                             "use": "transformers.TorchAoConfig(quant_type=torchao.core.config.config_from_dict(...))"}}
                | exports, None, None, config)
    named = {gguf_tensor_name(architecture, lm.num_layers, m): held for m, held in modules.items()}
    if None in named:
        why = f"gguf has no tensor names for {lm.architecture}"
        return {"tensor_types": {"file": None, "why": why}, "gguf": {"file": None, "why": why}}, None, None, None
    types = {name: w.llama_type for name, (w, _) in named.items()}
    encoders = {name: partial(w.encode, importance=weights.importance.get(m))
                for name, (w, m) in named.items() if w.needs_llamacpp}
    exports = {"tensor_types": {"file": "llama-quantize-tensor-types.txt",
                                "use": "llama-quantize --tensor-type-file llama-quantize-tensor-types.txt IN.gguf "
                                       "OUT.gguf TYPE (the embedding and head take TYPE's rule"
                                       + ("; add --imatrix FILE for the importance-weighted types: model.gguf was "
                                          "weighted by critlayer's calibration text)"
                                          if any(w.needs_importance for w, _ in named.values()) else ")"),
                                "types": dict(Counter(types.values()))}}
    exports["gguf"] = ({"file": "model.gguf", "source": str(source)} if source is not None else
                       {"file": None, "why": "the model was not loaded from a GGUF file: use the tensor types file"})
    return exports, types, encoders, None


def _degenerate(held: set[str], weights: BlockWeights, budgets: list[float]) -> dict:
    """Budgets whose uniform width is the type every block tensor already ``held`` in the source: requantising to
    it changes nothing, so uniform there is the unquantized model, not a win of anyone's plan."""
    out = {}
    for budget in budgets:
        name = weights.widths[uniform_width(weights.costs, weights.budget(budget))].name
        if held == {name} and name in GGUF_WIDTHS:  # their quantizers give a tensor of their type back exactly
            out[str(budget)] = f"the source holds every block tensor as {name}: uniform {name} is exact"
    return out


def _held_fixed(lm: LanguageModel, held: dict[str, str]) -> dict:
    """What the embedding and the head keep: their type in the GGUF source (``held``: tensor types), or the loaded
    dtype."""
    embedding, head = lm.model.get_input_embeddings().weight, lm.model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    parameters = embedding.numel() + (0 if head is None or tied else head.weight.numel())
    kinds = {name: held[name] for name in ("token_embd.weight", "output.weight") if name in held}
    held = ", ".join(f"{k} {v}" for k, v in kinds.items()) or str(embedding.dtype).removeprefix("torch.")
    text = (f"held as loaded ({held}; {parameters:,} parameters{', head tied to the embedding' if tied else ''}), "
            "not counted in the budget")
    return {"parameters": parameters, "tied": tied, "types": kinds, "text": text}
