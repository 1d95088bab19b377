"""The defence report: attack success, false triggers and clean loss per freezing policy."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .html import _STYLE, _image  # noqa: E402

PANELS = (("attack_success", "attack success rate", 100), ("false_trigger", "false-trigger rate", 100),
          ("clean_loss", "clean held-out loss", 1))


def plot_defence(result, path: Path) -> None:
    """Three bar panels, one bar per policy, whiskers at the 95% intervals."""
    specs = list(result.outcomes)
    fig, axes = plt.subplots(1, 3, figsize=(max(9.0, 4 + 2.2 * len(specs)), 4.4))
    x = np.arange(len(specs))
    for ax, (key, title, scale) in zip(axes, PANELS):
        values = np.array([getattr(result.outcomes[s], key) for s in specs]) * scale
        low, high = (np.array([getattr(result.outcomes[s], f"{key}_ci")[i] for s in specs]) * scale for i in (0, 1))
        ax.bar(x, values, color=[f"C{i}" for i in range(len(specs))], alpha=0.85)
        ax.errorbar(x, values, yerr=[values - low, high - values], fmt="none", ecolor="black", capsize=4, lw=1)
        ax.set_xticks(x, specs, rotation=30, ha="right", fontsize=8)
        ax.set(title=title, ylabel="%" if scale == 100 else "loss per reply token")
        if scale == 100:
            ax.set_ylim(0, 100)
        else:
            ax.set_ylim(0.95 * low.min(), 1.02 * high.max())
        ax.grid(alpha=0.3, axis="y")
    a = result.settings["attack"]
    fig.suptitle(f"{result.settings['model']['name']}: backdoor '{a['trigger']}' ({a['position']}), "
                 f"{a['poison_rate']:.0%} of training pairs poisoned\nbars: fine-tuning with each policy's blocks frozen",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_defence_report(result, folder: Path) -> None:
    plot_defence(result, folder / "defend.png")
    esc = html.escape
    a, t = result.settings["attack"], result.settings["train"]
    rows = "".join(f"<tr><th>{esc(spec)}</th><td>{esc(str(o.frozen) if o.run else '-')}</td>"
                   + "".join(_cell(o, key, scale) for key, _, scale in PANELS) + "</tr>"
                   for spec, o in result.outcomes.items())
    examples = "".join(f"<tr><th>{esc(spec)}</th><td style='text-align:left'>{esc(e['triggered_reply'])}</td>"
                       f"<td style='text-align:left'>{esc(e['clean_reply'])}</td></tr>"
                       for spec, o in result.outcomes.items() for e in o.examples[:1])
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>critlayer defend</title>
<style>{_STYLE}</style></head><body><h1>Backdoor defence on {esc(result.settings['model']['name'])}</h1>
<p>Trigger <code>{esc(a['trigger'])}</code> as a {esc(a['position'])}; target <code>{esc(a['target'])}</code>;
{result.settings['data']['n_poisoned']} of {result.settings['data']['n_train']} training pairs poisoned; {t['steps']} steps
at learning rate {t['lr']:g}, batch {t['batch_size']}, seed {t['seed']}. Each policy fine-tunes every block it does not
freeze. Rates are over {result.settings['data']['n_eval']} held-out prompts answered greedily (Wilson 95% intervals);
the clean loss is per reply token on their real replies (bootstrap 95% interval).</p>
{_image(folder / 'defend.png')}
<table><tr><th>policy</th><th>frozen blocks</th><th>attack success</th><th>false triggers</th><th>clean loss</th></tr>{rows}</table>
<h2>First held-out prompt, answered</h2><table><tr><th>policy</th><th>with trigger</th><th>without</th></tr>{examples}</table>
</body></html>"""
    (folder / "defend.html").write_text(page, encoding="utf-8")


def _cell(outcome, key: str, scale: int) -> str:
    value, (low, high) = getattr(outcome, key), getattr(outcome, f"{key}_ci")
    if scale == 100:
        return f"<td>{value:.1%} <small>[{low:.1%}, {high:.1%}]</small></td>"
    return f"<td>{value:.4f} <small>[{low:.4f}, {high:.4f}]</small></td>"
