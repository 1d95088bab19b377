"""How stable is a scan across probe sets, token modes or models?

Spearman correlation between the score profiles of every pair of scans, and the overlap
(Jaccard) of their critical sets. This is how a user checks the data-oblivious claim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common.errors import CritlayerError
from ..common.folders import SavedResult
from ..common.stats import jaccard, spearman
from ..find.result import ScanResult
from ..report.comparison import plot_comparison, two_places


@dataclass
class Comparison(SavedResult, file="compare.json", kind="comparison of scans"):
    """Scans side by side: the Spearman correlation of a score's profiles, and the overlap of critical sets."""

    labels: list[str]
    score: str
    results: list[ScanResult]
    spearman: np.ndarray  # NaN where the layer counts differ
    overlap: np.ndarray   # Jaccard of critical (firm) sets, 1 where both are empty; NaN where the layer counts differ

    def to_json(self) -> dict:
        clean = lambda m: [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in m]  # noqa: E731
        return {"score": self.score, "labels": self.labels, "spearman": clean(self.spearman),
                "critical_overlap": clean(self.overlap),
                "critical": {label: r.critical for label, r in zip(self.labels, self.results)}}

    def table(self) -> str:
        width = max(len(label) for label in self.labels)
        lines = [f"{'scan':<{width}}  critical (firm where measured)",
                 *(f"{lab:<{width}}  {r.critical}" + (f", tentative {r.firmness.tentative}" if r.firmness else "")
                   for lab, r in zip(self.labels, self.results)),
                 "", f"Spearman of {self.score} profiles / Jaccard overlap of critical sets:"]
        lines.append(" " * width + "  " + "  ".join(f"{i:>13}" for i in range(len(self.labels))))
        for i, label in enumerate(self.labels):
            cells = "  ".join(f"{two_places(self.spearman[i, j]):>6} / {two_places(self.overlap[i, j]):>4}" for j in range(len(self.labels)))
            lines.append(f"{label:<{width}}  {cells}")
        return "\n".join(lines)

    def write_files(self, folder: Path) -> None:
        plot_comparison(self, folder / "compare.png")


def compare(scans: list[ScanResult | str | Path], *, labels: list[str] | None = None, score: str = "delta",
            out: str | Path | None = None, force: bool = False) -> Comparison:
    """Compare two or more scans (results, or their folders or scan.json files); with ``out``, save the comparison.

    >>> first = critlayer.scan(model_folder, probes="random", n=16, max_tokens=12, progress=False)
    >>> second = critlayer.scan(model_folder, probes="random", n=16, max_tokens=12, seed=1, progress=False)
    >>> comparison = critlayer.compare([first, second], labels=["seed 0", "seed 1"])
    >>> comparison.labels, round(float(comparison.spearman[0, 0]), 6)
    (['seed 0', 'seed 1'], 1.0)
    """
    if len(scans) < 2:
        raise CritlayerError("compare needs at least two scans")
    loaded = [r if isinstance(r, ScanResult) else ScanResult.load(r) for r in scans]
    labels = labels or [_label(r, i) for i, r in enumerate(scans)]
    for label, r in zip(labels, loaded):
        if score not in r.scores:
            raise CritlayerError(f"scan {label} has no score {score!r}")
    n = len(loaded)
    rho, overlap = np.full((n, n), np.nan), np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            if len(loaded[i].layers) == len(loaded[j].layers):
                rho[i, j] = spearman(loaded[i].scores[score], loaded[j].scores[score])
                overlap[i, j] = jaccard(loaded[i].critical, loaded[j].critical)
    comparison = Comparison(labels, score, loaded, rho, overlap)
    if out is not None:
        comparison.save(out, force=force)
    return comparison


def _label(result, index: int) -> str:
    if isinstance(result, (str, Path)):
        path = Path(result)
        return (path.parent if path.name.endswith(".json") else path).name or f"scan{index}"
    return f"{result.model['name']}:{result.probes['source']}:{result.probes['token_mode']}"
