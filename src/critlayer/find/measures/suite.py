"""Run the chosen measures on one model: the shared capture pass over the probes, then every measure in turn.

The capture reads the probes in rounds (one round for a fixed number); after each, ``settle`` may say that
enough have been read. Every capture measure reads the same bounded row sample of that pass. A replicate
draws half the probes behind those rows and half the texts, without replacement, and every measure that
can recomputes on the draw; the others (``resampled = False``) are held fixed in it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ...common.errors import CritlayerError
from ...common.memory import trim_heap
from ...models import LanguageModel
from ..capture import Capture
from ..probes import Probes
from . import CAPTURE, MEASURES, Draw, Inputs, Measure, half_weights, resample_rows
from .rows import RowSample

# Block outputs whose rows differ by no more than this many units of rounding of the model's dtype are taken
# as not varying at all (centred, they are rounding noise, and CKA of noise is meaningless); the least varied real
# output seen lies well above it (docs/performance.md, tuned constants).
ROUNDING_UNITS = 2


@contextmanager
def timed(timing: dict, phase: str):
    """Time a phase into ``timing``, then hand the memory it freed back to the system, so that the next
    phase's peak does not sit on this one's leftovers (glibc keeps freed blocks of a few MB otherwise)."""
    start = time.perf_counter()
    yield
    timing[phase] = round(time.perf_counter() - start, 3)
    trim_heap()


@dataclass
class Measured:
    """The measures that ran, their scores, the CKA matrix, and how to recompute them on a bootstrap replicate."""

    measures: list[Measure]
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    cka: np.ndarray | None = None
    capture: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    row_samples: np.ndarray | None = None  # the probe behind each row of the sample
    texts: int = 0
    probes: Probes | None = None  # the probes the capture read (written by the model, or the first of those given)

    def groups(self) -> dict[str, list[str]]:
        """Measure -> the scores it contributes to the consensus."""
        return {m.name: [s for s in m.scores if s in self.scores] for m in self.measures}

    @property
    def fixed(self) -> list[str]:
        """Measures a bootstrap replicate cannot recompute."""
        return [m.name for m in self.measures if not m.resampled]

    def replicate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Every score on one replicate: half the probes and half the texts."""
        draw = Draw(
            rows=None if self.row_samples is None else torch.from_numpy(resample_rows(self.row_samples, rng)),
            text_weights=half_weights(self.texts, rng) if self.texts else None)
        scores = dict(self.scores)
        for measure in self.measures:
            if measure.resampled:
                scores.update(measure.resample(draw))
        return scores


# After a round: the row sample and the number of probes read so far; True when they are enough.
Settle = Callable[[RowSample, int], bool]


def run_measures(lm: LanguageModel, config, *, probes: Probes | None = None, text: list[list[int]] | None = None,
                 rounds: list[int] | None = None, settle: Settle | None = None, progress: bool = True) -> Measured:
    """Every measure ``config.measures`` names: ``probes`` feed the capture ones (None: the model writes them as
    they are captured), ``text`` the loss ones. The probes are read up to each of ``rounds`` in turn (default
    all of them at once) until ``settle`` says enough."""
    out = Measured([MEASURES[name](config) for name in config.measures], texts=len(text or ()))
    inputs = Inputs(lm, text=text, progress=progress)
    capturing = [m for m in out.measures if m.reads == CAPTURE]
    if capturing:
        inputs.sample = _capture(lm, probes, capturing, config, out, rounds or [len(probes)], settle, progress)
    per_measure: dict[str, float] = {}
    for measure in out.measures:
        with timed(per_measure, measure.name):
            out.scores.update(measure.compute(inputs))
        out.details.update(measure.details)
        if measure.matrix is not None:
            out.cka = measure.matrix
    out.timing["measures"] = per_measure
    if not all(np.isfinite(v).all() for v in out.scores.values()):
        raise CritlayerError("the probes give identical hidden states (no variance across rows); use more varied probes")
    return out


def _capture(lm: LanguageModel, probes: Probes | None, capturing: list[Measure], config, out: Measured,
             rounds: list[int], settle: Settle | None, progress: bool):
    """The one pass of the probes through the blocks, round by round: the row sample, and each capture measure's
    ``update``."""
    capture = Capture(lm, probes, token_mode=config.token_mode, batch_size=config.batch_size, seed=config.seed,
                      sink_ratio=config.sink_ratio, max_rows=config.max_rows, max_tokens=config.max_tokens,
                      progress=progress)
    sample, first = capture.sample, 0
    with timed(out.timing, "capture"):
        for stop in rounds:
            for batch in capture.round(first, stop):
                for measure in capturing:
                    measure.update(batch)
            first = stop
            if settle is not None and len(sample) >= 4 and settle(sample, stop):
                break
    if capture.written:  # known probes were checked before the pass
        capture.check_variety(first)
    if len(sample) < 4:
        raise CritlayerError(f"only {len(sample)} row(s) left after dropping massive activations; unbiased CKA "
                             "needs 4: raise --sink-ratio or use more probes")
    _require_variance(sample, lm.dtype)
    out.capture = {**capture.stats.as_dict(), "rows_for_cka": len(sample), "max_rows": config.max_rows}
    out.row_samples = sample.row_samples()
    out.probes = Probes(config.probe_source, capture.token_ids[:first])
    return sample.compute()


def _require_variance(sample: RowSample, dtype: torch.dtype) -> None:
    """Refuse block outputs that do not vary across the rows beyond the model's rounding (the embeddings may: with
    a chat template every last token is the template's own)."""
    limit = (ROUNDING_UNITS * torch.finfo(dtype).eps / 2) ** 2
    flat = (sample.spread()[1:] <= limit).nonzero().flatten().tolist()
    if flat:
        raise CritlayerError(f"block {flat[0]}'s output is the same for every probe (to the rounding of "
                             f"{str(dtype).removeprefix('torch.')}); use more varied probes")
