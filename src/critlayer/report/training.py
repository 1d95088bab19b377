"""Loss curves of fine-tuning runs: held-out loss (and train loss) against step."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(runs: dict, path: Path, title: str) -> None:
    """One colour per spec: held-out loss (mean over seeds, band = min..max) and faint train loss."""
    fig, (train_ax, heldout_ax) = plt.subplots(1, 2, figsize=(12, 4.4))
    for colour, (spec, spec_runs) in enumerate(runs.items()):
        c = f"C{colour}"
        for run in spec_runs:
            steps, losses = zip(*run.train_loss) if run.train_loss else ((), ())
            train_ax.plot(steps, _smooth(losses), color=c, alpha=0.6, lw=1)
        steps = [s for s, _ in spec_runs[0].heldout_loss]
        values = np.array([[v for _, v in run.heldout_loss] for run in spec_runs])
        heldout_ax.plot(steps, values.mean(0), color=c, marker="o", ms=3, label=f"{spec} (n={len(spec_runs)})")
        if len(spec_runs) > 1:
            heldout_ax.fill_between(steps, values.min(0), values.max(0), color=c, alpha=0.2)
        train_ax.plot([], [], color=c, label=spec)
    train_ax.set(xlabel="step", ylabel="train loss (moving average of 10)", title="train loss")
    heldout_ax.set(xlabel="step", ylabel="held-out loss", title="held-out loss (band: seed min..max)")
    for ax in (train_ax, heldout_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values, width: int = 10) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if len(values) < width:
        return values
    kernel = np.ones(width) / width
    head = np.cumsum(values[: width - 1]) / np.arange(1, width)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])
