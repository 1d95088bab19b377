"""Figures of a scan: the CKA heatmap, the per-layer profile of every score, all measures on one axis, and how firm
the answer is."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
import numpy as np  # noqa: E402

CRITICAL_COLOR = "#d62728"


def plot_cka(result, path: Path) -> None:
    """Heatmap of the L x L CKA matrix; critical blocks are outlined on the diagonal."""
    cka = result.cka
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    image = ax.imshow(cka, cmap="viridis", vmin=0.0, vmax=1.0, origin="upper")
    fig.colorbar(image, ax=ax, label="linear CKA (unbiased)")
    for i in result.critical:
        ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=CRITICAL_COLOR, lw=1.6))
    ax.set_xlabel("block (output of)")
    ax.set_ylabel("block (output of)")
    ax.set_title(f"{result.model['name']}: CKA between block outputs\n"
                 f"{result.probes['source']} probes, {result.probes['token_mode']} token, n={result.probes['n']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_profile(result, path: Path) -> None:
    """One panel per score against block index; critical blocks shaded, ineligible edges greyed."""
    names = list(result.scores)
    fig, axes = plt.subplots(len(names), 1, figsize=(7.5, 1.7 * len(names) + 0.8), sharex=True, squeeze=False)
    layers = np.array(result.layers)
    eligible = set(result.selection.eligible)
    for ax, name in zip(axes[:, 0], names):
        for i in result.layers:
            if i in result.critical:
                ax.axvspan(i - 0.5, i + 0.5, color=CRITICAL_COLOR, alpha=0.18, lw=0)
            elif i not in eligible:
                ax.axvspan(i - 0.5, i + 0.5, color="0.85", alpha=0.6, lw=0)
        ax.plot(layers, result.scores[name], marker="o", ms=3, lw=1.3, color="C0")
        arrow = "low = critical" if result.direction(name) < 0 else "high = critical"
        ax.set_ylabel(f"{name}\n({arrow})", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("block")
    axes[-1, 0].set_xticks(layers[:: max(1, len(layers) // 15)])
    rule = result.selection.rule
    fig.suptitle(f"{result.model['name']}: per-layer scores; critical blocks {result.critical} (red, rule {rule}); "
                 "grey: edge blocks not eligible", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_measures(result, path: Path) -> None:
    """Every measure's criticality rank scaled to [0, 1] (what the consensus averages) on one axis, with the
    consensus and P(critical); beside it, the signed Spearman agreement of every pair of scores."""
    names = result.consensus.scores
    fig, (ax, heat) = plt.subplots(1, 2, figsize=(15, 5.2), gridspec_kw={"width_ratios": [1.7, 1]})
    layers = np.array(result.layers)
    if "p_critical" in result.scores:
        ax.bar(layers, result.scores["p_critical"], color=CRITICAL_COLOR, alpha=0.22, width=0.8,
               label=f"P(critical), {result.consensus.bootstrap} bootstrap replicates")
    for c, (measure, rank) in enumerate(result.measure_ranks().items()):
        ax.plot(layers, rank, lw=1.1, alpha=0.8, color=f"C{c % 10}", marker=".", ms=4, label=measure)
    ax.plot(layers, result.scores["consensus"], color="black", lw=2.6, label="consensus (mean of the ranks)")
    ax.set(xlabel="block", ylabel="criticality rank, scaled (1 = most critical)", ylim=(-0.03, 1.03),
           title=f"{result.model['name']}: every measure on one axis; critical blocks {result.critical}")
    ax.set_xticks(layers[:: max(1, len(layers) // 15)])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0), framealpha=0.9)
    agree = np.array(result.consensus.agreement, dtype=float)
    image = heat.imshow(agree, cmap="RdBu", vmin=-1, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            heat.text(j, i, f"{agree[i, j]:.2f}", ha="center", va="center", fontsize=6)
    heat.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    heat.set_yticks(range(len(names)), names, fontsize=7)
    heat.set_title("agreement: Spearman of criticality", fontsize=9)
    fig.colorbar(image, ax=heat, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_firmness(result, path: Path) -> None:
    """Each block's chance of being picked, with the firm and tentative thresholds: how often another scan of as
    many probes would pick it where measured (and, as ticks, the share of this scan's halves that pick it), else
    its share of bootstrap replicates; beside it, round by round, the chances of the blocks ever firm or tentative."""
    firmness = result.firmness
    replicated = firmness.by_replication
    chance = np.asarray(firmness.chance)
    fig, (bars, rounds) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    colors = [CRITICAL_COLOR if p >= firmness.thresholds["firm"] else
              "#ff9896" if p >= firmness.thresholds["tentative"] else "#9e9e9e" for p in chance]
    bars.bar(result.layers, chance, color=colors)
    if replicated:
        bars.plot(result.layers, firmness.probability, "k_", ms=9, mew=1.5, ls="none", label="this scan's halves")
    for name, style in (("firm", "-"), ("tentative", "--")):
        bars.axhline(firmness.thresholds[name], color="k", lw=0.8, ls=style, label=f"{name} ({firmness.thresholds[name]:.0%})")
    what = (f"another scan would pick (from {firmness.replicates} halves)" if replicated else
            f"picked in {firmness.replicates} replicates")
    ylabel = "P(another scan picks)" if replicated else "P(picked)"
    bars.set(xlabel="block", ylabel=ylabel, ylim=(0, 1.02),
             title=f"{result.model['name']}: {what} ({firmness.score})")
    bars.legend(loc="upper left", fontsize=8)
    if firmness.rounds:
        read = [r.probes for r in firmness.rounds]
        shown = sorted({b for r in firmness.rounds for b in r.tentative + r.firm})
        chances = [r.replication if replicated else r.probability for r in firmness.rounds]
        for block in shown:
            rounds.plot(read, [c[block] for c in chances], marker=".", label=str(block))
        rounds.axhline(firmness.thresholds["firm"], color="k", lw=0.8)
        outcome = "settled" if firmness.stopped.startswith("settled") else "stopped"
        rounds.set(xlabel="probes read", ylabel=ylabel, ylim=(0, 1.02),
                   title=f"{outcome} after {len(firmness.rounds)} round(s) of {firmness.rounds[0].probes} probes")
        if shown:
            rounds.legend(title="block", fontsize=7, ncol=2)
    else:
        rounds.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_methods(ax, methods: dict, x_of, start: tuple[float, float] | None = None) -> None:
    """One line per method of a change (prune's, quantize's) along its points, the chosen one first and bold: the
    median held-out perplexity, the range of several draws as bars; ``x_of(method, point)`` places a point, and
    ``start`` (x, perplexity) begins every line (nothing removed yet)."""
    for colour, (name, method) in enumerate(methods.items()):
        points = sorted(method.perplexity)
        x = [x_of(method, p) for p in points]
        y = [method.median(p) for p in points]
        style = {"lw": 2.4, "zorder": 3} if colour == 0 else {"lw": 1.3}
        head = ([start[0]], [start[1]]) if start else ([], [])
        ax.plot(head[0] + x, head[1] + y, marker="o", ms=3.5, color=f"C{colour}",
                label=name + (" (chosen)" if colour == 0 else ""), **style)
        if any(len(method.perplexity[p]) > 1 for p in points):
            low = [y_ - min(method.perplexity[p]) for y_, p in zip(y, points)]
            high = [max(method.perplexity[p]) - y_ for y_, p in zip(y, points)]
            ax.errorbar(x, y, yerr=[low, high], fmt="none", color=f"C{colour}", capsize=3)


def plot_budget_curve(ax, result, cost_key: str, reference: str) -> None:
    """A change's methods along its budgets of bits (``cost_key`` places each point), perplexity on a log scale,
    the unchanged model (``reference``) dashed and the budget asked for dotted."""
    plot_methods(ax, result.methods, lambda method, budget: method.cost[budget][cost_key])
    ax.axhline(result.reference["perplexity"], color="grey", ls="--", lw=1, label=reference)
    ax.axvline(result.settings["bits"], color="grey", ls=":", lw=1)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def save_perplexity_curve(fig, ax, path: Path, settings: dict, xlabel: str, legend: str) -> None:
    """Label a held-out perplexity curve (prune's, quantize's) with its model and text, and save it."""
    data = settings["data"]
    ax.set(xlabel=xlabel, ylabel="held-out perplexity (log)",
           title=f"{settings['model']['name']}: {data['source']}, {data['n_heldout']} texts, "
                 f"context {settings['context_tokens']} tokens")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc=legend)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
