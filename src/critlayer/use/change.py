"""The frame of every command that changes a model and compares it on held-out text (``prune``, ``quantize``): the
options they share, their setup, and the result base they save and reload.

A command states what it changes (its own config fields, its methods and their choices); the frame gives it the
model (its weights as a bfloat16 checkpoint stores them, or float32), the scan that supplies scores (given, or run
as ``critlayer scan`` would), held-out and calibration text drawn from one source and never overlapping (and, asked
for, a second held-out source every choice is evaluated on again), a written GGUF checked in llama.cpp, the
context the evaluation computes in, the settings every result records, and a result whose rows, table heading,
JSON and reload are the same for all.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..common.cost import Plan
from ..common.errors import CritlayerError
from ..common.folders import SavedResult, check_model_folder
from ..common.options import DTYPE_HELP, SEED_HELP, check_options, option
from ..data.text import TextData, check_source, load_data, sample_texts
from ..find.measures import DIRECTION
from ..find.result import ScanResult
from ..find.scan import scan_of
from ..models import LanguageModel
from ..models.llamacpp import require as require_llamacpp
from ..models.loading import DTYPES, change_model, gguf_file, resolve_dtype
from ..models.running import computing_in
from .evaluation import Method, Run, Variant, evaluate_methods


@dataclass
class ChangeConfig:
    """What every change-and-compare command shares (each field is the CLI flag of that name): the ``score`` that
    ranks the blocks (``MEASURED``, the command's own measurement, or any scan score), the ``data`` that gives
    ``n_eval`` held-out texts of at most ``max_tokens`` tokens (the context) and ``calibration`` texts never held out,
    ``draws`` of each random baseline, whether the ``baselines`` run, the ``seed``, the ``dtype`` the evaluation
    computes in, ``also_data`` (a second held-out source) and whether the written GGUF is checked in ``llamacpp``."""

    MEASURED: ClassVar[str]

    score: str | None = None  # each command's own: ``score_option``
    data: str = option("wiki", "held-out and calibration text: wiki, bbc, sharegpt or a .txt/.jsonl file")
    n_eval: int = option(32, "held-out texts", minimum=2)
    max_tokens: int = option(128, "tokens per text at most: the context", minimum=2)
    calibration: int = option(32, "calibration texts the measured choices read, never held out", minimum=2)
    draws: int = option(5, "draws of each random baseline", minimum=1)
    baselines: bool = option(True, "evaluate the chosen blocks only, without the baselines", flag="--no-baselines")
    seed: int = option(0, SEED_HELP, minimum=0)
    dtype: str = option("auto", DTYPE_HELP, choices=DTYPES)
    also_data: str | None = option(None, "a second source of held-out text (wiki, bbc, sharegpt or a file) that every "
                                         "method's choice at the point asked for is also evaluated on", none="none")
    llamacpp: bool = option(False, "also run the written model.gguf in llama.cpp on the held-out texts, beside "
                                   "transformers on the same weights (the llamacpp extra)")

    def __post_init__(self):
        self.score = self.score or next(f for f in fields(self) if f.name == "score").metadata["none"]
        if self.score != self.MEASURED and self.score not in DIRECTION:
            raise CritlayerError(f"unknown score {self.score!r}; choose {self.MEASURED} or a scan score: "
                                 f"{', '.join(sorted(DIRECTION))}")
        check_options(self)
        check_source(self.data, self.n_eval + 1)
        if self.also_data is not None:
            if self.also_data == self.data:
                raise CritlayerError(f"--also-data {self.also_data} is --data itself: name another source")
            check_source(self.also_data, self.n_eval + 1)


def score_option(measured: str, default: str):
    """The ``score`` field of a change's config: what ranks the blocks, ``measured`` by the command or any scan
    score, ``default`` when none is given."""
    return option(None, f"what ranks the blocks: {measured} (measured here) or any scan score, e.g. consensus",
                  none=default)


@dataclass
class Bench:
    """What a change is measured on: the model (``open_model``'s weights), the scan that supplies scores and what it
    cost, the held-out and calibration text (none for an encoder: it has no next-token loss), and the config."""

    lm: LanguageModel
    scan: ScanResult
    text: TextData | None
    calibration: list[list[int]]
    config: ChangeConfig
    also: TextData | None = None  # ``--also-data``'s held-out texts

    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.config.dtype, str(self.lm.device))

    def compute(self) -> AbstractContextManager:
        """The context every forward of the evaluation runs in (autocast to ``dtype`` over wider weights)."""
        return computing_in(self.lm.model, self.dtype)

    def settings(self) -> dict:
        """What every result of a change records of its setting."""
        out = {"model": self.lm.describe(), "score": self.config.score, "config": asdict(self.config),
               "scan": {"critical": self.scan.critical, "probes": self.scan.probes, "cost": self.scan.cost}}
        if self.text is None:
            return {**out, "evaluation": "none: the model has no LM head"}
        return {**out, "data": self.text.describe(), "context_tokens": self.config.max_tokens,
                "calibration": {"source": self.config.data, "texts": len(self.calibration),
                                "tokens": sum(map(len, self.calibration))},
                "dtype": str(self.dtype).removeprefix("torch.")}


def open_model(model: LanguageModel | str, config: ChangeConfig, *, out: str | Path | None, force: bool,
               device: str | None) -> LanguageModel:
    """Refuse an output folder in the way, then load the model (``loading.change_model``: weights as stored in
    bfloat16 where the change computes in it, else float32). A command checks what it asks of the model next, before
    ``open_bench`` runs the scan."""
    if out is not None:
        check_model_folder(Path(out), force)
    if config.llamacpp:
        if out is None:
            raise CritlayerError("--llamacpp runs the model.gguf written to the output folder: give one (out=...)")
        require_llamacpp()
    lm = change_model(model, config.dtype, device)
    if config.llamacpp and (gguf_file(lm.spec) is None or not lm.is_causal):
        raise CritlayerError(f"--llamacpp checks the model.gguf written from a GGUF source on next-token loss; "
                             f"{lm.name} is not a language model loaded from a GGUF file")
    return lm


def gguf_check(bench: Bench, same_weights: Variant) -> Callable[[Path], dict] | None:
    """With ``--llamacpp``, what runs a written GGUF in llama.cpp against transformers on ``same_weights`` (an
    evaluation variant) on the held-out texts; else None."""
    if not bench.config.llamacpp:
        return None
    from .llamacpp_check import check_in_llamacpp

    return partial(check_in_llamacpp, bench.lm, bench.text.heldout, same_weights=same_weights,
                   compute=bench.compute)


def open_bench(lm: LanguageModel, config: ChangeConfig, scan: ScanResult | str | Path | None, *,
               progress: bool) -> Bench:
    """The held-out and calibration text (none for an encoder), then the scan (given, or run as ``critlayer scan``
    would), checked to hold the config's score: text too short to evaluate ends before the scan runs."""
    text, calibration, also = None, [], None
    if lm.is_causal:
        text = load_data(lm, config.data, n_eval=config.n_eval, max_tokens=config.max_tokens)
        calibration = [ids for ids in sample_texts(lm, config.data, config.calibration, config.max_tokens,
                                                   seed=config.seed) if len(ids) >= 2]
        if config.also_data is not None:
            also = load_data(lm, config.also_data, n_eval=config.n_eval, max_tokens=config.max_tokens)
    result = scan_of(lm, scan, dtype=config.dtype, progress=progress)
    if config.score != config.MEASURED:
        result.ranking(config.score)  # a score the scan lacks ends here, in one line
    return Bench(lm, result, text, calibration, config, also)


def plan_elsewhere(plan: Plan, bench: Bench, choices: int) -> None:
    """``--also-data``'s evaluation in a command's plan: the unchanged model and at most ``choices`` choices."""
    if bench.also is not None:
        plan.add(f"evaluation on {bench.also.source}", 1 + choices, sum(map(len, bench.also.heldout)), at_most=True)


def evaluate_elsewhere(bench: Bench, methods: dict[str, Method], point: float,
                       run_on: Callable[[list[list[int]]], Run]) -> dict | None:
    """With ``--also-data``: every method's choices at ``point`` evaluated again on that source's held-out texts
    (``run_on(texts)`` evaluates named choices there), each single choice with its paired interval against the
    chosen method's, as on the first source; else None."""
    if bench.also is None:
        return None
    at_point = {name: Method(name, {point: m.choices[point]}) for name, m in methods.items() if point in m.choices}
    reference = evaluate_methods(at_point, run_on(bench.also.heldout))
    return {"source": bench.also.source, "n_heldout": len(bench.also.heldout),
            "heldout_tokens": sum(map(len, bench.also.heldout)), "reference": reference.summary(),
            "methods": {name: m.summary[point] for name, m in at_point.items()}}


@dataclass
class ChangeResult(SavedResult):
    """A change and its comparison: the settings, every method's choices and held-out figures along the curve (the
    chosen method first), the unchanged model's figures (``reference``, empty where nothing was evaluated) and
    which scan score predicts the damage (``correlations``).

    ``REFERENCE`` is what the unchanged model is called (``reference=`` where a subclass is declared); ``point``
    the point of the curve asked for (a count of blocks, a budget of bits). A subclass's own fields are saved beside these, but for
    the ones marked ``unsaved`` (the changed model itself, what its files are written from).
    """

    REFERENCE: ClassVar[str]

    def __init_subclass__(cls, *, reference: str | None = None, **options):
        super().__init_subclass__(**options)
        cls.REFERENCE = reference or getattr(cls, "REFERENCE", None)

    settings: dict
    methods: dict[str, Method]
    reference: dict
    correlations: dict

    @property
    def point(self) -> float:
        raise NotImplementedError

    def __getattr__(self, name: str):
        if name == type(self).REFERENCE:  # the old name of ``reference`` (unpruned, unquantized), for one release
            return self.reference
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def point_rows(self) -> list[tuple[str, Method, float, str]]:
        """(name, method, perplexity, range) of every method evaluated at the point asked for: a method with several
        draws by its median and the range of its draws."""
        out = []
        for name, m in self.methods.items():
            if self.point in m.perplexity:
                values = m.perplexity[self.point]
                spread = f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else ""
                out.append((name, m, m.median(self.point), spread))
        return out

    def heading(self, digits: int) -> str:
        """The table's line that says what the perplexities are measured on."""
        s = self.settings
        return (f"held-out perplexity on {s['data']['source']} ({s['data']['n_heldout']} texts, context "
                f"{s['context_tokens']} tokens), {self.REFERENCE} {self.reference['perplexity']:.{digits}f}:")

    def elsewhere_rows(self, digits: int) -> list[tuple[str, float, str]]:
        """(method, perplexity, note) of every method at the point asked for on ``--also-data``'s source: random by
        its median, its draws' range the note; a single choice with its paired interval against the chosen one's."""
        rows = []
        for name, summaries in self.settings.get("also_heldout", {}).get("methods", {}).items():
            values = [r["perplexity"] for r in summaries]
            interval = summaries[0].get("perplexity_ratio_to_chosen_95")
            note = (f"{min(values):.{digits}f}-{max(values):.{digits}f}" if len(values) > 1 else
                    f"[{interval[0]:.2f}-{interval[1]:.2f}x]" if interval else "")
            rows.append((name, float(np.median(values)), note))
        return rows

    def elsewhere_lines(self, digits: int) -> list[str]:
        """The table's lines for ``--also-data`` (none without it)."""
        rows = self.elsewhere_rows(digits)
        if not rows:
            return []
        also = self.settings["also_heldout"]
        width = max(len(name) for name, *_ in rows)
        return [f"held-out perplexity on {also['source']} ({also['n_heldout']} texts), {self.REFERENCE} "
                f"{also['reference']['perplexity']:.{digits}f}:",
                *(f"  {name:<{width}} {ppl:12.{digits}f} {note}" for name, ppl, note in rows)]

    @classmethod
    def own_fields(cls) -> list[str]:
        """The subclass's fields that are saved (and so reloaded), in order."""
        return [f.name for f in fields(cls) if f.name not in ("settings", "methods", "reference", "correlations")
                and not f.metadata.get("unsaved")]

    def to_json(self) -> dict:
        return {**self.settings, self.REFERENCE: self.reference,
                "methods": {k: m.to_json() for k, m in self.methods.items()}, "correlations": self.correlations,
                **{name: getattr(self, name) for name in self.own_fields()}}

    @classmethod
    def from_json(cls, data: dict) -> "ChangeResult":
        """A saved result, without what was never saved (the changed model: its folder holds it as files)."""
        taken = {cls.REFERENCE, "methods", "correlations", *cls.own_fields()}
        return cls(settings={k: v for k, v in data.items() if k not in taken}, reference=data[cls.REFERENCE],
                   methods={k: Method.from_json(k, m) for k, m in data["methods"].items()},
                   correlations=data["correlations"],
                   **{name: data[name] for name in cls.own_fields() if name in data})  # newer fields take defaults


def unsaved():
    """A result's field that is not written to its JSON (and so is None once reloaded)."""
    return field(default=None, metadata={"unsaved": True})
