"""The validation report: fine-tuning importance per block and how well each score predicts it."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .html import _STYLE, _image  # noqa: E402

VARIANTS = (("all", "all blocks"), ("interior", "interior blocks"), ("partial", "depth regressed out"))


def plot_validation(v, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    blocks = np.arange(len(v.importance))
    if len(v.importance_per_seed) > 1:
        for per_seed in v.importance_per_seed:
            axes[0].plot(blocks, per_seed, color="C3", alpha=0.3, lw=0.8)
    axes[0].plot(blocks, v.importance, marker="o", ms=3, color="C3", label="importance (mean loss rise)")
    twin = axes[0].twinx()
    twin.plot(blocks, v.weight_change, marker="s", ms=3, color="C0", label="relative weight change")
    axes[0].set(xlabel="block", ylabel="held-out loss rise when restored", title="what fine-tuning changed")
    twin.set_ylabel("||tuned - pre-trained|| / ||pre-trained||")
    for ax in (axes[0], twin):
        ax.legend(loc="upper left" if ax is axes[0] else "upper right", fontsize=8)
    for ax, target in zip(axes[1:], ("importance", "weight_change")):
        rows, spread = v.correlations[target], v.spread(target)
        names = list(rows)
        x = np.arange(len(names))
        for j, (key, label) in enumerate(VARIANTS):
            ax.bar(x + (j - 1) * 0.27, [np.nan_to_num(rows[n][key]) for n in names], width=0.27, label=label,
                   yerr=[np.nan_to_num(spread[n][key]) for n in names], capsize=2)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, names, rotation=40, ha="right", fontsize=8)
        ax.set(ylim=(-1, 1), ylabel="Spearman", title=f"scores vs {target}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{v.settings['model']['name']}: do scan scores predict what fine-tuning changes?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_validation_report(v, folder: Path) -> None:
    plot_validation(v, folder / "validate.png")
    esc = html.escape
    seeds = len(v.loss_tuned)
    tables = []
    for target, rows in v.correlations.items():
        spread = v.spread(target)
        body = "".join(f"<tr><th>{esc(name)}</th>" + "".join(
            f"<td>{r[key]:+.2f}" + (f" ± {spread[name][key]:.2f}" if seeds > 1 else "")
            + f" <small>(p {r[key + '_p']:.3f})</small></td>" for key, _ in VARIANTS) + "</tr>"
            for name, r in rows.items())
        tables.append(f"<h2>Spearman with {esc(target)}</h2><table><tr><th>score</th>"
                      + "".join(f"<th>{label}</th>" for _, label in VARIANTS) + f"</tr>{body}</table>")
    passing = v.beyond_depth()
    over_seeds = (f" ({seeds} seeds; correlations are with the seed-mean importance, ± their standard deviation over "
                  "seeds)" if seeds > 1 else "")
    every = ", and in that direction in every seed" if seeds > 1 else ""
    yes, no = [n for n, ok in passing.items() if ok], [n for n, ok in passing.items() if not ok]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>critlayer validate</title>
<style>{_STYLE}</style></head><body><h1>Validation on {esc(v.settings['model']['name'])}</h1>
<p>Held-out loss on {esc(v.settings['data']['source'])}: pre-trained {v.loss_pretrained:.4f}, tuned
{', '.join(f'{loss:.4f}' for loss in v.loss_tuned)}{over_seeds}.
Each block's importance is the mean rise of held-out loss when a window of {v.window} blocks containing it is set
back to its pre-trained weights. A score is worth using only where it beats the depth baselines, holds on interior
blocks (blocks {v.interior[0]}-{v.interior[-1]}), and survives with depth regressed out. Low delta should mean high
importance: a useful delta correlates negatively. p-values are from {v.settings['permutations']:,} random
permutations.</p>
<p><b>Predict fine-tuning importance beyond depth</b> (partial correlation in the useful direction, p &lt; 0.05{every}):
{esc(', '.join(yes) or 'none')}. <b>Do not:</b>
{esc(', '.join(no) or 'none')}. Best lens, which <code>--from-validation</code> ranks by:
<b>{esc(v.best_lens or 'none')}</b>.</p>
{_image(folder / 'validate.png')}{''.join(tables)}</body></html>"""
    (folder / "validate.html").write_text(page, encoding="utf-8")
