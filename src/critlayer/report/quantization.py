"""The quantization report: held-out perplexity against average bits for every method, the table at the budget asked
for with paired intervals, the plan block by block, and which scan score predicts quantization damage."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .engines import llamacpp_text  # noqa: E402
from .html import _STYLE, _image, elsewhere_section, lens_rows  # noqa: E402
from .plots import plot_budget_curve, save_perplexity_curve  # noqa: E402


def plot_quantization(result, path: Path) -> None:
    """Perplexity (log scale) against bits per block weight, one line per method along the budgets; random as its
    median with the range of its draws as bars; the unquantized model as a dashed line."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    plot_budget_curve(ax, result, "bits_per_weight", "unquantized")
    save_perplexity_curve(fig, ax, path, result.settings,
                          f"bits per block weight, {result.settings.get('family', result.settings.get('format'))} widths (scales and zero-points counted)",
                          "upper right")


def write_quantize_report(result, folder: Path) -> None:
    """quantize.png and quantize.html (an unevaluated plan, of an encoder, has its JSON only)."""
    if not result.reference:
        return
    plot_quantization(result, folder / "quantize.png")
    esc = html.escape
    s = result.settings
    chosen = next(iter(result.methods))
    rows = ""
    for name, bits, ppl, spread, kl in result.rows():
        interval = result.methods[name].summary[s["bits"]][0].get("perplexity_ratio_to_chosen_95")
        ratio = "" if interval is None or len(result.methods[name].perplexity[s["bits"]]) > 1 else \
            f"{interval[0]:.3f}-{interval[1]:.3f}"
        rows += (f"<tr><th>{esc(name)}</th><td>{bits:.4f}</td><td>{ppl:.3f}</td><td>{esc(spread)}</td>"
                 f"<td>{kl:.4f}</td><td>{ratio}</td></tr>")
    plan = "".join(f"<td>{esc(w)}</td>" for w in result.plan.values())
    blocks = "".join(f"<th>{b}</th>" for b in result.plan)
    lens = result.correlations.get("quantization_damage", {})
    exports = "".join(f"<li>{esc(kind)}: {esc(str(e.get('file') or e.get('why')))}</li>"
                      for kind, e in result.exports.items())
    if "llamacpp" in result.exports.get("gguf", {}):
        exports += f"<li>{esc(llamacpp_text(result.exports['gguf']['llamacpp']))}</li>"
    sensitivity = result.sensitivity
    cost = "" if not sensitivity else (
        f"<p>Measuring sensitivity ({len(sensitivity['widths'])} widths × {len(result.plan)} blocks on "
        f"{s['calibration']['texts']} calibration texts) cost {sensitivity['cost']['seconds']:.1f} s and "
        f"{sensitivity['cost']['forward_tokens']:,} forward tokens; a scan score costs nothing beyond the scan.</p>")
    degenerate = "".join(f"<p><b>At {esc(b)} bits</b>: {esc(why)}.</p>" for b, why in s.get("degenerate", {}).items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>critlayer quantize</title>
<style>{_STYLE}</style></head><body><h1>Quantizing {esc(s['model']['name'])}</h1>
<p>Plan by <code>{esc(s['score'])}</code> at {result.bits_per_weight:.4f} bits per block weight (budget {s['bits']:g}; scales and
zero-points counted). Embedding and head: {esc(result.held_fixed['text'])}. Held-out perplexity on
{esc(s['data']['source'])} ({s['data']['n_heldout']} texts, context {s['context_tokens']} tokens, computed in
{esc(s['dtype'])}): unquantized {result.reference['perplexity']:.3f}.</p>
{_image(folder / 'quantize.png')}
<h2>At {s['bits']:g} bits</h2><table><tr><th>method</th><th>bits</th><th>perplexity</th><th>range</th><th>KL</th>
<th>perplexity ÷ {esc(chosen)}, 95%</th></tr>{rows}</table>
<p>KL: mean per token to the unquantized model's next-token distribution. The last column is a paired bootstrap
interval over texts: an interval that holds 1 is a difference within the noise. Random: median and range of
{s['config']['draws']} orders. Ranked plans: {esc(s['ranked_rule'])}.</p>{degenerate}{cost}
<h2>The plan</h2><table><tr><th>block</th>{blocks}</tr><tr><th>width</th>{plan}</tr></table>
<h2>Which lens predicts quantization damage</h2>
<p>Spearman of each scan score with the KL divergence (on calibration text) of quantizing each block alone to
{esc(str((sensitivity or {}).get('correlated_width', '-')))}: all blocks | interior blocks | depth regressed out
(quantize.json also holds the same against the loss rise). A useful score correlates positively where high means
critical, negatively where low does.</p>
<table>{lens_rows(lens)}</table>{elsewhere_section(result, 3)}<h2>Exports</h2><ul>{exports}</ul></body></html>"""
    (folder / "quantize.html").write_text(page, encoding="utf-8")
