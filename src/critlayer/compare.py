"""How stable is a scan across probe sets, token modes or models?

Spearman correlation between the score profiles of every pair of scans, and the overlap
(Jaccard) of their critical sets. This is how a user checks the data-oblivious claim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CritlayerError
from .outputs import check_output_folder, staged_folder
from .result import ScanResult
from .stats import jaccard, spearman

COMPARE_FILE = "compare.json"


@dataclass
class Comparison:
    labels: list[str]
    score: str
    results: list[ScanResult]
    spearman: np.ndarray  # NaN where the layer counts differ
    overlap: np.ndarray   # Jaccard of critical sets; NaN where the layer counts differ

    def to_json(self) -> dict:
        clean = lambda m: [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in m]  # noqa: E731
        return {"score": self.score, "labels": self.labels, "spearman": clean(self.spearman),
                "critical_overlap": clean(self.overlap),
                "critical": {label: r.critical for label, r in zip(self.labels, self.results)}}

    def table(self) -> str:
        width = max(len(label) for label in self.labels)
        lines = [f"{'scan':<{width}}  critical", *(f"{lab:<{width}}  {r.critical}" for lab, r in zip(self.labels, self.results)),
                 "", f"Spearman of {self.score} profiles / Jaccard overlap of critical sets:"]
        lines.append(" " * width + "  " + "  ".join(f"{i:>13}" for i in range(len(self.labels))))
        for i, label in enumerate(self.labels):
            cells = "  ".join(f"{_fmt(self.spearman[i, j]):>6} / {_fmt(self.overlap[i, j]):>4}" for j in range(len(self.labels)))
            lines.append(f"{label:<{width}}  {cells}")
        return "\n".join(lines)

    def save(self, folder: str | Path, *, force: bool = False) -> Path:
        folder = Path(folder)
        check_output_folder(folder, COMPARE_FILE, force)
        with staged_folder(folder) as tmp:
            (tmp / COMPARE_FILE).write_text(json.dumps(self.to_json(), indent=1))
            plot_comparison(self, tmp / "compare.png")
        return folder


def _fmt(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.2f}"


def compare(results: list[ScanResult | str | Path], labels: list[str] | None = None, score: str = "delta") -> Comparison:
    """Compare two or more scans (results or paths to their scan.json)."""
    if len(results) < 2:
        raise CritlayerError("compare needs at least two scans")
    loaded = [r if isinstance(r, ScanResult) else ScanResult.load(r) for r in results]
    labels = labels or [_label(r, i) for i, r in enumerate(results)]
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
    return Comparison(labels, score, loaded, rho, overlap)


def _label(result, index: int) -> str:
    if isinstance(result, (str, Path)):
        path = Path(result)
        return (path.parent if path.name.endswith(".json") else path).name or f"scan{index}"
    return f"{result.model['name']}:{result.probes['source']}:{result.probes['token_mode']}"


def plot_comparison(comparison: Comparison, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1.5, 1]})
    for label, r in zip(comparison.labels, comparison.results):
        values = r.scores[comparison.score]
        depth = np.arange(len(values)) / max(1, len(values) - 1)
        left.plot(depth, values, marker="o", ms=3, label=label)
    left.set_xlabel("relative depth (block / (L - 1))")
    left.set_ylabel(comparison.score)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    image = right.imshow(np.nan_to_num(comparison.spearman, nan=0.0), vmin=-1, vmax=1, cmap="RdBu_r")
    ticks = range(len(comparison.labels))
    right.set_xticks(ticks, [str(i) for i in ticks])
    right.set_yticks(ticks, [f"{i}: {lab}" for i, lab in enumerate(comparison.labels)], fontsize=7)
    for i in ticks:
        for j in ticks:
            right.text(j, i, _fmt(comparison.spearman[i, j]), ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=right, label=f"Spearman of {comparison.score}")
    fig.suptitle(f"Stability of {comparison.score} across scans")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
