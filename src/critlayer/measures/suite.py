"""Run the chosen measures on one model: the shared capture pass, the text passes, the weights.

Every capture measure reads the same bounded row sample, and a bootstrap replicate draws the
probe samples behind those rows with replacement and recomputes them all on the drawn rows
(block influence too, on the sample; its reported score uses every row). Ablation resamples
its texts. The gradient (one backward over all the text; per-text gradients would each be as
large as the model) and the weight spectrum (no data) are held fixed in a replicate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..capture import BATCH_SIZE, Capture
from ..errors import CritlayerError
from ..memory import trim_heap
from ..models import LanguageModel
from ..probes import Probes
from . import MEASURES, BlockSimilarity, RowSample, cka_matrix, delta_scores, resample_rows, similarity_scores
from .ablation import Ablation
from .clusters import TokenClusters
from .gradient import gradient_scores
from .spectral import spectral_scores
from .weights import weight_snr

TEXT_BATCH = 8  # texts per forward when logits are needed: keeps a 49k- or 262k-word vocabulary affordable


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
    """Scores of the measures that ran, the CKA matrix, and how to recompute them on a bootstrap replicate."""

    scores: dict[str, np.ndarray] = field(default_factory=dict)
    cka: np.ndarray | None = None
    capture: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    resamplers: list[Callable[[np.random.Generator], dict[str, np.ndarray]]] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)  # measures a bootstrap replicate cannot recompute

    def groups(self, measures: tuple[str, ...]) -> dict[str, list[str]]:
        """Measure -> the scores it contributes to the consensus."""
        return {m: [s for s in MEASURES[m].scores if s in self.scores] for m in measures}

    def replicate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        scores = dict(self.scores)
        for resample in self.resamplers:
            scores.update(resample(rng))
        return scores


def run_measures(lm: LanguageModel, measures: tuple[str, ...], *, probes: Probes | None = None,
                 text: list[list[int]] | None = None, token_mode: str = "last", batch_size: int = BATCH_SIZE,
                 seed: int = 0, sink_ratio: float = 5.0, max_rows: int = 2048, window: int = 2,
                 ablate: tuple[str, ...] = ("block",), progress: bool = True) -> Measured:
    """Compute every measure in ``measures``; ``probes`` feed the capture ones, ``text`` the loss ones."""
    out = Measured()
    per_measure: dict[str, float] = {}
    if any(MEASURES[m].capture for m in measures):
        _capture_measures(lm, measures, probes, out, per_measure, token_mode=token_mode, batch_size=batch_size,
                          seed=seed, sink_ratio=sink_ratio, max_rows=max_rows, window=window, progress=progress)
    if "ablation" in measures:
        with timed(per_measure, "ablation"):
            ablation = Ablation(lm, text, ablate, batch_size=TEXT_BATCH, progress=progress)
            out.scores.update(ablation.compute())
        out.resamplers.append(ablation.resample)
    if "gradient" in measures:
        with timed(per_measure, "gradient"):
            out.scores["gradient"] = gradient_scores(lm, text, batch_size=TEXT_BATCH)
        out.fixed.append("gradient")
    if "weights" in measures:
        with timed(per_measure, "weights"):
            out.scores["weight_snr"], out.details["weights_read_from"] = weight_snr(lm)
        out.fixed.append("weights")
    out.timing["measures"] = per_measure
    return out


def _capture_measures(lm, measures, probes, out: Measured, per_measure: dict, *, token_mode, batch_size, seed,
                      sink_ratio, max_rows, window, progress) -> None:
    capture = Capture(lm, probes, token_mode=token_mode, batch_size=batch_size, seed=seed, sink_ratio=sink_ratio,
                      max_rows=max_rows, progress=progress)
    sample = RowSample(capture.sample_keys)
    similarity = BlockSimilarity() if "influence" in measures else None
    with timed(out.timing, "capture"):
        for batch in capture:
            sample.update(batch)
            if similarity is not None:
                similarity.update(batch)
    rows = min(capture.stats.rows, len(sample))
    if rows < 2:
        raise CritlayerError(f"only {rows} row(s) left after dropping massive activations; "
                             "raise --sink-ratio or use more probes")
    out.capture = {**capture.stats.as_dict(), "rows_for_cka": len(sample), "max_rows": max_rows}
    states, row_samples = sample.compute(), sample.row_samples()
    on_rows: dict[str, Callable[[torch.Tensor], dict[str, np.ndarray]]] = {}
    if "cka" in measures:
        with timed(per_measure, "cka"):
            out.cka = cka_matrix(states[1:])
            out.scores["delta"] = delta_scores(out.cka, window)
        on_rows["cka"] = lambda rows: {"delta": delta_scores(cka_matrix(states[1:], rows), window)}
    if similarity is not None:
        with timed(per_measure, "influence"):
            out.scores.update(similarity.compute())
        on_rows["influence"] = lambda rows: similarity_scores(states, rows)
    if "spectral" in measures:
        with timed(per_measure, "spectral"):
            out.scores.update(spectral_scores(states[1:]))
        on_rows["spectral"] = lambda rows: spectral_scores(states[1:], rows=rows)
    if "clusters" in measures:
        with timed(per_measure, "clusters"):
            clusters = TokenClusters(states, seed=seed)
            out.scores.update(clusters.scores())
        out.details["clusters_k"] = clusters.k
        on_rows["clusters"] = lambda rows: clusters.scores(rows.numpy())
    if not all(np.isfinite(v).all() for v in out.scores.values()):
        raise CritlayerError("the probes give identical hidden states (no variance across rows); use more varied probes")

    def resample(rng: np.random.Generator) -> dict[str, np.ndarray]:
        rows = torch.from_numpy(resample_rows(row_samples, rng))
        return {name: value for compute in on_rows.values() for name, value in compute(rows).items()}

    out.resamplers.append(resample)
