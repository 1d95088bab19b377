"""``critlayer kv``: give every attention layer's KV cache a key and a value width at a fixed average of bits, where
the evidence says a layer bears fewer bits, and show on held-out continuations what that buys against the rules
users would otherwise pick.

A plan comes from a score: ``sensitivity`` (the default) measures, on calibration documents, how far the next-token
distribution of the continuation moves (KL divergence) when one layer's keys, or its values, alone take each width,
and minimises the sum over the pairs a plan gives (a multiple-choice knapsack, ``bitplan``); any scan score orders the
layers for the ranked rule. Against it, at the same budget: uniform pairs, keys high and values low, the first and
last layers high (a llama.cpp fork's rule), the reversed order, random orders and the consensus; each at the budget
asked for and at every inner pair's uniform point (a curve). The cache is transformers' with quanto's quantizer
(``kvcache``), read as a server reads it (``continuation``); ``kv_cache`` makes one of a plan for ``generate``.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..common.cost import Plan
from ..common.errors import CritlayerError
from ..common.folders import check_model_folder
from ..common.options import option, override
from ..common.stats import lens_correlations
from ..data.text import TextData, long_texts
from ..find.result import ScanResult
from ..find.scan import scan_of
from ..find.select import eligible_blocks
from ..models import DEFAULT_MODEL, LanguageModel
from ..models.loading import default_device, load, resolve_dtype
from ..models.loss import require_causal
from .bitplan import cheapest_plan, ranked_plan, uniform_width
from .change import Bench, ChangeConfig, ChangeResult, evaluate_elsewhere, plan_elsewhere, score_option
from .continuation import Reading, evaluate_caches, prompt_states
from .evaluation import Method, evaluate_methods
from .kvcache import DEFAULT_PAIRS, FULL, Pair, attention_layers, build_cache, parse_pair, parse_pairs

SENSITIVITY = "sensitivity"
MEASURED_PLAN = f"{SENSITIVITY} (measured)"
KINDS = ("key", "value")


@dataclass
class KVConfig(ChangeConfig):
    """How to plan a KV cache (each field is the CLI flag of that name), beside what every change shares.

    ``bits``: the average bits per cached key and value element, a group's scale and shift counted, over what every
    layer holds at the context (``max_tokens``; a sliding layer its window). ``widths``: the candidate pairs.
    ``prefill``, ``chunk``, ``group`` and ``residual``: how documents are read (``continuation.Reading``).
    """

    MEASURED: ClassVar[str] = SENSITIVITY

    score: str | None = score_option(SENSITIVITY, SENSITIVITY)
    n_eval: int = override(ChangeConfig, "n_eval", 16)
    max_tokens: int = override(ChangeConfig, "max_tokens", 1024)
    calibration: int = override(ChangeConfig, "calibration", 4)
    bits: float = option(3.0, "average bits per cached key and value element, scales and shifts counted",
                         positive=True, below=64)
    widths: str | None = option(None, "candidate key and value widths, a comma list of KV<b> and K<b>V<b> with b "
                                      f"2, 4, 8 or 16 (full precision); default {DEFAULT_PAIRS}")
    prefill: int | None = option(None, "tokens of each document prefilled before its scored continuation",
                                 none="half the context", minimum=1)
    chunk: int = option(64, "continuation tokens per forward, each chunk reading the cache the earlier ones wrote",
                        minimum=1)
    group: int = option(64, "tokens per key group and values per value group sharing a scale and shift", minimum=2)
    residual: int = option(128, "newest tokens kept in full precision (KIVI's window)", minimum=0)
    curve: bool = option(True, "evaluate at --bits only, not also at every inner pair's uniform point",
                         flag="--no-curve")

    def __post_init__(self):
        super().__post_init__()
        if self.llamacpp:
            raise CritlayerError("--llamacpp runs a written GGUF; critlayer kv writes none")
        if self.prefill is None:
            self.prefill = self.max_tokens // 2
        if self.prefill > self.max_tokens - 2:
            raise CritlayerError(f"--prefill {self.prefill} leaves no continuation to score in a context of "
                                 f"{self.max_tokens} tokens")

    @property
    def reading(self) -> Reading:
        return Reading(self.prefill, self.chunk, self.group, self.residual)


@dataclass
class KVResult(ChangeResult, file="kv.json", kind="KV cache plan", reference="full_precision"):
    """The chosen plan (a pair per layer), every method's evaluation along the curve, the lenses' correlations and
    the cache's measured size."""

    plan: dict[str, str]
    bits_per_element: float
    sensitivity: dict | None
    cache: dict

    @property
    def point(self) -> float:
        return self.settings["bits"]

    def heading(self, digits: int) -> str:
        s = self.settings
        return (f"held-out perplexity of the continuations of {s['data']['n_heldout']} {s['data']['source']} documents "
                f"of {s['context_tokens']} tokens, full-precision cache {self.reference['perplexity']:.{digits}f}:")

    def pairs(self) -> list[Pair]:
        """The plan as one pair per decoder layer, in order."""
        return [parse_pair(name) for name in self.plan.values()]

    def rows(self) -> list[tuple[str, float, float, str, float, float]]:
        """(method, bits per element, perplexity, range, KL, the cache's measured bits per element, full-precision
        window included) at the budget asked for; random as its median and range."""
        budget = self.point
        return [(name, m.cost[budget]["bits_per_element"], ppl, spread,
                 float(np.median([s["kl"] for s in m.summary[budget]])), m.cost[budget]["cache_bits"])
                for name, m, ppl, spread in self.point_rows()]

    def table(self) -> str:
        s = self.settings
        pairs = ", ".join(f"{p}: {n}" for p, n in sorted(Counter(self.plan.values()).items()))
        lines = [f"KV cache of {s['model']['name']} at {self.bits_per_element:.4f} bits per element (budget "
                 f"{s['bits']:g}) by {s['score']}: {pairs}", f"read as: {s['reading']}", self.heading(3)]
        rows = self.rows()
        width = max(len(r[0]) for r in rows)
        lines.append(f"  {'method':<{width}} {'bits':>7} {'perplexity':>11} {'range':>13} {'KL':>8} {'measured':>9}")
        for name, bits, ppl, spread, kl, measured in rows:
            lines.append(f"  {name:<{width}} {bits:7.4f} {ppl:11.3f} {spread:>13} {kl:8.4f} {measured:9.3f}")
        lines.append(f"measured: bits per element of the cache of one sequence of {s['context_tokens']} tokens, its "
                     f"newest tokens in full precision included (full precision: {self.cache['full_precision_mb']:.2f}"
                     " MB)")
        lines += self.elsewhere_lines(3)
        if self.sensitivity:
            cost = self.sensitivity["cost"]
            lines.append(f"measured sensitivity cost {cost['seconds']:.1f} s, {cost['forward_tokens']:,} forward "
                         "tokens")
        return "\n".join(lines)

    def write_files(self, folder: Path) -> None:
        from ..report.kv import write_kv_report

        write_kv_report(self, folder)


def kv(model: LanguageModel | str = DEFAULT_MODEL, config: KVConfig | None = None, *,
       scan: ScanResult | str | Path | None = None, out: str | Path | None = None, force: bool = False,
       progress: bool = True, device: str | None = None, **options) -> KVResult:
    """Give every attention layer of ``model`` a key and a value width so that its KV cache averages
    ``config.bits`` bits per element, by ``config.score``, and evaluate the plan against the baselines on held-out
    continuations; with ``out``, write kv.json (the plan, which ``kv_cache`` reads) and a report there.

    ``scan`` (a result or its folder) supplies the scores; without one the model is scanned first. ``config`` is a
    ``KVConfig``, its fields also taken as keywords.

    >>> scanned = critlayer.scan(model_folder, probes=text_file, n=16, max_tokens=12, progress=False)
    >>> result = critlayer.kv(model_folder, bits=5.5, data=text_file, max_tokens=64, group=16, residual=8, chunk=8,
    ...                       n_eval=2, calibration=2, draws=2, scan=scanned, progress=False)
    >>> result.bits_per_element <= 5.5
    True
    """
    config = replace(config, **options) if config is not None else KVConfig(**options)
    pairs = parse_pairs(config.widths)
    group = config.group
    if not pairs[0].bits(group) <= config.bits <= pairs[-1].bits(group):
        raise CritlayerError(f"--bits {config.bits:g} lies outside the widths' {pairs[0].bits(group):g} "
                             f"({pairs[0].name}) to {pairs[-1].bits(group):g} ({pairs[-1].name}) bits per element")
    if out is not None:
        check_model_folder(Path(out), force)
    lm = _open(model, config, device)
    bench = _bench(lm, config, scan, progress)
    sizes = _held_elements(lm, config)
    costs = np.array([[round(size * p.bits(group) * group) for p in pairs] for size in sizes], dtype=np.int64)
    budget = lambda bits: int(sizes.sum() * bits * group)  # noqa: E731
    budgets = _budgets(config, pairs)
    _plan(bench, pairs, budgets).announce(progress)
    sensitivity = None
    if MEASURED_PLAN in methods_run(config, bench.scan):
        sensitivity = measure_sensitivity(lm, pairs, bench, progress)
    methods = plan_methods(pairs, costs, sizes, budget, bench.scan, sensitivity, budgets, config)
    cache_mb: dict[tuple, float] = {}

    def run_on(documents):
        def run(plans):
            named = {name: [pairs[k] for k in plan] for name, plan in plans.items()}
            reference, scores, nbytes = evaluate_caches(lm, documents, named, config.reading, compute=bench.compute,
                                                        progress=progress)
            for name, plan in plans.items():
                cache_mb.setdefault(tuple(plan), nbytes[name] / 1e6)
            cache_mb.setdefault(("full",), nbytes["full precision"] / 1e6)
            return reference, scores
        return run

    reference = evaluate_methods(methods, run_on(bench.text.heldout))
    full_bits = torch.finfo(bench.dtype).bits  # what the full-precision cache holds an element in
    for m in methods.values():
        for b, choices in m.choices.items():
            mb = cache_mb[tuple(choices[0])]
            m.cost[b] |= {"cache_mb": round(mb, 4), "cache_bits": round(full_bits * mb / cache_mb[("full",)], 3)}
    settings = {**bench.settings(), "bits": config.bits, "budgets": budgets, "reading": config.reading.describe(
        config.max_tokens), "widths": {p.name: p.bits(group) for p in pairs}, "sizes": sizes.tolist(),
        "backend": "optimum-quanto (transformers' quanto cache layer): keys per channel, values per token",
        "ranked_rule": "from the widest uniform pair that fits, the first layers in the order one pair up until the "
                       "budget is spent (the last ones one pair down where it is overspent)"}
    elsewhere = evaluate_elsewhere(bench, methods, config.bits, run_on)
    if elsewhere is not None:
        settings["also_heldout"] = elsewhere
    correlations = {} if sensitivity is None else _lenses(bench, sensitivity)
    settings["baselines"] = list(methods)[1:]
    chosen = next(iter(methods.values()))
    result = KVResult(settings, methods, reference.summary(), correlations,
                      {str(i): pairs[k].name for i, k in enumerate(chosen.choices[config.bits][0])},
                      chosen.cost[config.bits]["bits_per_element"], sensitivity,
                      {"group": group, "residual": config.residual, "full_precision_mb": round(cache_mb[("full",)], 4),
                       "measured_at": f"one sequence of {config.max_tokens} tokens"})
    if out is not None:
        result.save(out, force=force)
    return result


def _lenses(bench: Bench, sensitivity: dict) -> dict:
    """Every scan score against each layer's measured damage at the narrowest width: keys and values together and
    apart."""
    damage = np.array(sensitivity["kl"])[:, :, 0]  # layers x (keys, values), at the narrowest width
    sensitivity["correlated_bits"] = sensitivity["bits"][0]
    return lens_correlations(bench.scan.scores, {"kv_damage": damage.sum(1), "key_damage": damage[:, 0],
                                                 "value_damage": damage[:, 1]},
                             eligible_blocks(bench.lm.num_layers, 1))


def _open(model: LanguageModel | str, config: KVConfig, device: str | None) -> LanguageModel:
    """The model with weights in the dtype it computes in (so that its cache is held in it, as a server holds it),
    checked to be a causal model of attention layers that reads the context asked for."""
    if isinstance(model, LanguageModel):
        lm = model
    else:
        device = device or default_device()
        lm = load(model, dtype=str(resolve_dtype(config.dtype, device)).removeprefix("torch."), device=device)
    require_causal(lm, "critlayer kv")
    attention_layers(lm.model.config)
    longest = getattr(lm.model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if longest is not None and config.max_tokens > longest:
        raise CritlayerError(f"--max-tokens {config.max_tokens} is longer than {lm.name}'s context of {longest}")
    build_cache(lm.model.config, [Pair(2, 2)] * lm.num_layers)  # optimum-quanto is there
    return lm


def _bench(lm: LanguageModel, config: KVConfig, scan, progress: bool) -> Bench:
    """Held-out and calibration documents of the context's length (and ``--also-data``'s), then the scan."""
    heldout = long_texts(lm, config.data, config.n_eval, config.max_tokens, heldout=True)
    calibration = long_texts(lm, config.data, config.calibration, config.max_tokens, heldout=False, seed=config.seed)
    also = None
    if config.also_data is not None:
        also = TextData(config.also_data, [], long_texts(lm, config.also_data, config.n_eval, config.max_tokens,
                                                         heldout=True))
    result = scan_of(lm, scan, dtype=config.dtype, progress=progress)
    if config.score != SENSITIVITY:
        result.ranking(config.score)
    return Bench(lm, result, TextData(config.data, [], heldout), calibration, config, also)


def _held_elements(lm: LanguageModel, config: KVConfig) -> np.ndarray:
    """Keys (as many as values) every layer holds of one sequence at the context: a sliding layer its window."""
    with torch.inference_mode():
        states = prompt_states(lm, torch.zeros(1, 1, dtype=torch.long, device=lm.device))
    windows = attention_layers(lm.model.config)
    return np.array([keys[0, :, 0].numel() * min(config.max_tokens, w or config.max_tokens)
                     for (keys, _), w in zip(states, windows)], dtype=np.int64)


def _plan(bench: Bench, pairs: list[Pair], budgets: list[float]) -> Plan:
    """The forward tokens a KV plan takes once its scan is there: the prefill once per document and plan set, every
    layer's keys and values alone at every width on the calibration continuations, then every distinct plan (at
    most one per method, budget and draw) and the full-precision cache on the held-out continuations."""
    config = bench.config
    scored = config.max_tokens - config.prefill
    plan = Plan(f"KV cache plan of {bench.lm.name}")
    runs = methods_run(config, bench.scan)
    if MEASURED_PLAN in runs:
        variants = len(alone_plans(bench.lm.num_layers, _bits(pairs)))
        plan.add("prefill (calibration)", 1, config.prefill * config.calibration)
        plan.add(SENSITIVITY, 1 + variants, scored * config.calibration)
    plan.add("prefill (held out)", 1, config.prefill * config.n_eval)
    plan.add("evaluation", 1 + sum(runs.values()) * len(budgets), scored * config.n_eval, at_most=True)
    plan_elsewhere(plan, bench, sum(runs.values()))
    return plan


def methods_run(config: KVConfig, scan: ScanResult) -> dict[str, int]:
    """The methods a plan runs, the chosen one first, and how many plans each makes per budget."""
    runs = {MEASURED_PLAN if config.score == SENSITIVITY else config.score: 1, "uniform": 1}
    if config.baselines:
        runs |= {"keys high": 1, "first/last high": 1, "reversed": 1, "random": config.draws, MEASURED_PLAN: 1}
        if "consensus" in scan.scores:
            runs["consensus"] = 1
    return runs


def _bits(pairs: list[Pair]) -> list[int]:
    """The quantized widths the pairs use, keys' and values' alike."""
    return sorted({b for p in pairs for b in (p.key, p.value)} - {FULL})


def alone_plans(n: int, bits: list[int]) -> dict[str, list[Pair]]:
    """Every layer's keys, then values, alone at every quantized width, everything else in full precision."""
    full = Pair(FULL, FULL)
    return {f"{i},{kind},{b}": [(Pair(b, FULL) if kind == "key" else Pair(FULL, b)) if j == i else full
                                for j in range(n)]
            for i in range(n) for kind in KINDS for b in bits}


def measure_sensitivity(lm: LanguageModel, pairs: list[Pair], bench: Bench, progress: bool) -> dict:
    """What one layer's keys, or values, alone at each width do to the calibration continuations: the mean KL
    divergence per token to the full-precision cache's next-token distribution, and the loss rise beside it."""
    start = time.perf_counter()
    n, bits = lm.num_layers, _bits(pairs)
    plans = alone_plans(n, bits)
    reference, scores, _ = evaluate_caches(lm, bench.calibration, plans, bench.config.reading, compute=bench.compute,
                                           progress=progress, desc="measuring sensitivity")
    kl = [[[float(scores[f"{i},{kind},{b}"].kl.sum() / scores[f"{i},{kind},{b}"].tokens.sum()) for b in bits]
           for kind in KINDS] for i in range(n)]
    rise = [[[round(scores[f"{i},{kind},{b}"].mean_loss - reference.mean_loss, 6) for b in bits] for kind in KINDS]
            for i in range(n)]
    scored = bench.config.max_tokens - bench.config.prefill
    return {"kl": kl, "loss_rise": rise, "bits": bits, "kinds": list(KINDS), "text": "calibration",
            "cost": {"seconds": round(time.perf_counter() - start, 3),
                     "forward_tokens": len(bench.calibration) * (bench.config.prefill + (1 + len(plans)) * scored)}}


def pair_damage(sensitivity: dict, pairs: list[Pair]) -> np.ndarray:
    """Every layer's measured damage at every pair: its keys' and its values' KL at their widths, summed (full
    precision none)."""
    kl, bits = np.array(sensitivity["kl"]), sensitivity["bits"]
    at = lambda layer, kind, b: 0.0 if b == FULL else kl[layer, kind, bits.index(b)]  # noqa: E731
    return np.array([[at(i, 0, p.key) + at(i, 1, p.value) for p in pairs] for i in range(len(kl))])


def plan_methods(pairs: list[Pair], costs: np.ndarray, sizes: np.ndarray, budget, scan: ScanResult,
                 sensitivity: dict | None, budgets: list[float], config: KVConfig) -> dict[str, Method]:
    """Every method's plan (a pair index per layer) at every budget, the chosen one's first."""
    n = len(sizes)
    free = {"seconds": 0.0, "forward_tokens": 0}
    damage = None if sensitivity is None else pair_damage(sensitivity, pairs)

    def method(name: str, make, cost: dict, draws: int = 1) -> Method:
        choices = {b: [make(budget(b), d) for d in range(draws)] for b in budgets}
        return Method(name, choices, {b: {**cost, "bits_per_element": round(
            float(costs[np.arange(n), choices[b][0]].sum() / (sizes.sum() * config.group)), 6)} for b in budgets})

    def ranked(order):
        return lambda bits, _: ranked_plan(order, costs, sizes, bits, _fill_share(costs, bits))

    def widest(keep):  # the widest pair of a kind every layer can take
        return lambda bits, _: [_widest(pairs, costs, bits, keep)] * n

    measured = lambda bits, _: cheapest_plan(damage, costs, bits)  # noqa: E731
    if config.score == SENSITIVITY:
        chosen = method(MEASURED_PLAN, measured, sensitivity["cost"])
        order = sorted(range(n), key=lambda i: (-damage[i, 0], i))
    else:
        order = scan.ranking(config.score, list(range(n)))
        chosen = method(config.score, ranked(order), scan.cost)
    methods = {chosen.name: chosen, "uniform": method("uniform", widest(lambda p: p.key == p.value), free)}
    if not config.baselines:
        return methods
    methods["keys high"] = method("keys high", widest(lambda p: p.key > p.value), free)
    edges = [i for pair in zip(range(n), reversed(range(n))) for i in pair]
    methods["first/last high"] = method("first/last high", ranked(list(dict.fromkeys(edges))), free)
    methods["reversed"] = method("reversed", ranked(order[::-1]), chosen.cost[config.bits])
    methods["random"] = method("random", lambda bits, d: ranked(
        [int(i) for i in np.random.default_rng([config.seed, d]).permutation(n)])(bits, d), free, config.draws)
    if MEASURED_PLAN not in methods:
        methods[MEASURED_PLAN] = method(MEASURED_PLAN, measured, sensitivity["cost"])
    if "consensus" in scan.scores and "consensus" not in methods:
        methods["consensus"] = method("consensus", ranked(scan.ranking("consensus", list(range(n)))), scan.cost)
    return methods


def _fill_share(costs: np.ndarray, bits: int) -> float:
    """The share of the cached elements a ranked plan moves one pair up so that it spends the budget, as the
    measured plan does (rather than a fixed third)."""
    base = uniform_width(costs, bits)
    if base == costs.shape[1] - 1:
        return 0.0
    low, high = costs[:, base].sum(), costs[:, base + 1].sum()
    return float(min(1.0, (bits - low) / (high - low)))


def _widest(pairs: list[Pair], costs: np.ndarray, bits: int, keep) -> int:
    """The widest pair that ``keep`` accepts and every layer can take within ``bits``; the narrowest pair where none
    of that kind fits."""
    fitting = [k for k, p in enumerate(pairs) if keep(p) and costs[:, k].sum() <= bits]
    return fitting[-1] if fitting else 0


def _budgets(config: KVConfig, pairs: list[Pair]) -> list[float]:
    """The budget asked for first; with the curve, also every inner pair's uniform point."""
    inner = [p.bits(config.group) for p in pairs[1:-1]] if config.curve else []
    return [config.bits, *sorted(b for b in inner if not math.isclose(b, config.bits))]


def kv_cache(model, plan, *, group: int | None = None, residual: int | None = None):
    """A fresh cache of ``plan`` for ``model`` (a transformers model or a ``LanguageModel``), to pass to
    ``model.generate(..., cache=critlayer.kv_cache(model, plan))`` (``past_key_values=`` before transformers 5.2x).

    ``plan``: a ``KVResult``, the folder or kv.json it was saved to, or one pair name per decoder layer (a list, or
    a dict of layer to name). ``group`` and ``residual`` default to the result's, else 64 and 128.

    >>> model = critlayer.load(model_folder).model
    >>> cache = critlayer.kv_cache(model, ["KV2", "K4V2", "KV4", "KV4", "KV8", "KV16"])
    >>> [layer.pair.name for layer in cache.layers[:5]]
    ['KV2', 'K4V2', 'KV4', 'KV4', 'KV8']
    """
    if isinstance(plan, (str, Path)):
        plan = KVResult.load(plan)
    cache = {"group": 64, "residual": 128}
    if isinstance(plan, KVResult):
        cache, plan = plan.cache, plan.pairs()
    elif isinstance(plan, dict):
        plan = [plan[k] for k in sorted(plan, key=int)]
    pairs = [p if isinstance(p, Pair) else parse_pair(p) for p in plan]
    model = model.model if isinstance(model, LanguageModel) else model
    return build_cache(model.config, pairs, group=group or cache["group"],
                       residual=cache["residual"] if residual is None else residual)

