"""The merge report: every merge's held-out perplexity on the fine-tuning source (the gain) against the second
source (what it forgets), and each rule's scale per block."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_merge(result, path: Path) -> None:
    """Left: perplexity on the fine-tuning source against the second source, one point per merge (lower left is
    better). Right: each rule's scale per block."""
    s = result.settings
    fig, (points, scales) = plt.subplots(1, 2, figsize=(12, 4.6))
    for colour, (name, figures) in enumerate(result.figures.items()):
        points.scatter(figures[s["data"]]["perplexity"], figures[s["also_data"]]["perplexity"], color=f"C{colour}",
                       label=name, s=40, zorder=3)
    points.set(xlabel=f"held-out perplexity on {s['data']} (the fine-tuning source)",
               ylabel=f"held-out perplexity on {s['also_data']}", title=f"{s['base']}: gain against forgetting")
    points.grid(alpha=0.3)
    points.legend(fontsize=8)
    for colour, (name, values) in enumerate(result.scales.items(), 1):
        scales.plot(range(len(values)), values, marker="o", ms=3, color=f"C{colour}", label=name)
    scales.set(xlabel="block", ylabel="scale of the fine-tuning update", ylim=(-0.05, 1.05), title="scales")
    scales.grid(alpha=0.3)
    scales.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
