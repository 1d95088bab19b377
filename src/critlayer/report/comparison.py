"""The comparison of scans: every pair's Spearman of a score profile, beside the profiles themselves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_comparison(comparison, path: Path) -> None:
    """A ``prove.compare.Comparison``: each scan's profile of its score against relative depth, and the pairwise
    Spearman matrix."""
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
            right.text(j, i, two_places(comparison.spearman[i, j]), ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=right, label=f"Spearman of {comparison.score}")
    fig.suptitle(f"Stability of {comparison.score} across scans")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def two_places(value: float) -> str:
    """A correlation to two places, or n/a."""
    return "n/a" if np.isnan(value) else f"{value:.2f}"
