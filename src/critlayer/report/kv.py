"""The KV cache report: held-out perplexity against average bits for every plan, the table at the budget asked for
with paired intervals and the cache's measured size, the plan layer by layer, each layer's measured key and value
sensitivity, and which scan score predicts it."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .html import _STYLE, _image, elsewhere_section, lens_rows  # noqa: E402
from .plots import plot_budget_curve, save_perplexity_curve  # noqa: E402


def plot_kv(result, path: Path) -> None:
    """Perplexity (log scale) against bits per cached element, one line per method along the budgets, with the
    full-precision cache dashed; beside it, each layer's measured KL with its keys, or values, alone at the narrowest
    width."""
    sensitivity = result.sensitivity
    fig, axes = plt.subplots(1, 2 if sensitivity else 1, figsize=(12 if sensitivity else 8, 4.8), squeeze=False)
    ax = axes[0, 0]
    plot_budget_curve(ax, result, "bits_per_element", "full precision")
    if sensitivity:
        kl = np.array(sensitivity["kl"])[:, :, 0]
        layers = np.arange(len(kl))
        right = axes[0, 1]
        right.bar(layers - 0.2, kl[:, 0], 0.4, label="keys")
        right.bar(layers + 0.2, kl[:, 1], 0.4, label="values")
        right.set(xlabel="layer", ylabel="KL per token (log)", yscale="log",
                  title=f"one layer alone at {sensitivity['bits'][0]} bits (calibration)")
        right.legend(fontsize=8)
    save_perplexity_curve(fig, ax, path, result.settings, "bits per cached element (scales and shifts counted)",
                          "upper right")


def write_kv_report(result, folder: Path) -> None:
    """kv.png and kv.html."""
    plot_kv(result, folder / "kv.png")
    esc = html.escape
    s = result.settings
    chosen = next(iter(result.methods))
    rows = ""
    for name, bits, ppl, spread, kl, measured in result.rows():
        interval = result.methods[name].summary[s["bits"]][0].get("perplexity_ratio_to_chosen_95")
        ratio = "" if interval is None or spread else f"{interval[0]:.3f}-{interval[1]:.3f}"
        mb = result.methods[name].cost[s["bits"]]["cache_mb"]
        rows += (f"<tr><th>{esc(name)}</th><td>{bits:.4f}</td><td>{ppl:.3f}</td><td>{esc(spread)}</td>"
                 f"<td>{kl:.4f}</td><td>{measured:.3f}</td><td>{mb:.2f}</td><td>{ratio}</td></tr>")
    layers = "".join(f"<th>{i}</th>" for i in result.plan)
    plan = "".join(f"<td>{esc(p)}</td>" for p in result.plan.values())
    sensitivity = result.sensitivity
    cost = "" if not sensitivity else (
        f"<p>Measuring sensitivity (keys and values of {len(result.plan)} layers at {len(sensitivity['bits'])} "
        f"widths on {s['calibration']['texts']} calibration documents) cost {sensitivity['cost']['seconds']:.1f} s "
        f"and {sensitivity['cost']['forward_tokens']:,} forward tokens.</p>")
    lens = "".join(f"<h3>{esc(target.replace('_', ' '))}</h3><table>{lens_rows(result.correlations[target])}</table>"
                   for target in ("kv_damage", "key_damage", "value_damage") if target in result.correlations)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>critlayer kv</title>
<style>{_STYLE}</style></head><body><h1>The KV cache of {esc(s['model']['name'])}</h1>
<p>Plan by <code>{esc(s['score'])}</code> at {result.bits_per_element:.4f} bits per cached element (budget
{s['bits']:g}; scales and shifts counted). Read as a server reads: {esc(s['reading'])}. Held-out perplexity of the
continuations of {s['data']['n_heldout']} {esc(s['data']['source'])} documents (computed in {esc(s['dtype'])}):
full-precision cache {result.reference['perplexity']:.3f}. Cache: {esc(s['backend'])}.</p>
{_image(folder / 'kv.png')}
<h2>At {s['bits']:g} bits</h2><table><tr><th>method</th><th>bits</th><th>perplexity</th><th>range</th><th>KL</th>
<th>measured bits</th><th>cache MB</th><th>perplexity ÷ {esc(chosen)}, 95%</th></tr>{rows}</table>
<p>Bits: the budget's count (scales and shifts included). Measured bits and cache MB: the cache of one sequence of
{s['context_tokens']} tokens as held (full precision {result.cache['full_precision_mb']:.2f} MB), its newest tokens
in full precision included. KL: mean per token
to the full-precision cache's next-token distribution. The last column is a paired bootstrap interval over
documents: an interval that holds 1 is a difference within the noise. Random: median and range of
{s['config']['draws']} orders. Ranked plans: {esc(s['ranked_rule'])}.</p>{cost}
<h2>The plan</h2><table><tr><th>layer</th>{layers}</tr><tr><th>pair</th>{plan}</tr></table>
<h2>Which lens predicts KV sensitivity</h2>
<p>Spearman of each scan score with the measured KL of one layer's keys and values (together and apart) alone at
{esc(str((sensitivity or {}).get('correlated_bits', '-')))} bits: all layers | interior layers | depth regressed
out.</p>{lens}{elsewhere_section(result, 3)}</body></html>"""
    (folder / "kv.html").write_text(page, encoding="utf-8")
