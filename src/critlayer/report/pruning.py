"""The pruning report: held-out perplexity against blocks removed for every method, and the table at the count asked
for, with what each choice cost and which scan score predicts pruning damage."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .engines import llamacpp_text  # noqa: E402
from .html import _STYLE, _image, elsewhere_section, lens_rows  # noqa: E402
from .plots import plot_methods, save_perplexity_curve  # noqa: E402


def plot_pruning(result, path: Path) -> None:
    """Perplexity (log scale) against blocks removed; random as its median with the range of its draws as bars. The
    axis stops at five times the chosen method's worst: baselines that run away leave through the top."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    base = result.reference["perplexity"]
    plot_methods(ax, result.methods, lambda method, count: count, start=(0, base))
    ax.axvline(result.count, color="grey", ls=":", lw=1)
    ax.set_yscale("log")
    chosen = next(iter(result.methods.values()))
    ax.set_ylim(base / 1.2, 5 * max(chosen.median(n) for n in chosen.perplexity))  # runaway baselines leave the top
    save_perplexity_curve(fig, ax, path, result.settings, f"{result.settings['parts']}s removed", "lower right")


def write_prune_report(result, folder: Path) -> None:
    """prune.png and prune.html (an unevaluated pruning, of an encoder, has its table only)."""
    if not result.reference:
        return
    plot_pruning(result, folder / "prune.png")
    esc = html.escape
    rows = "".join(
        f"<tr><th>{esc(name)}</th><td>{ppl:.2f}</td><td>{esc(spread)}</td><td>{esc(str(blocks))}</td>"
        f"<td>{cost.get('seconds', 0):.1f}</td><td>{cost.get('forward_tokens', 0):,}</td></tr>"
        for name, blocks, ppl, spread, cost in result.rows())
    lens = result.correlations.get("pruning_damage", {})
    s, speed = result.settings, result.speed
    healing = "" if not result.healing else (
        f"<p>Healed {result.healing['steps']} steps: perplexity {result.healing['before']['perplexity']:.2f} → "
        f"{result.healing['after']['perplexity']:.2f}.</p>")
    llamacpp = f"<p>{esc(llamacpp_text(result.gguf['llamacpp']))}.</p>" if "llamacpp" in result.gguf else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>critlayer prune</title>
<style>{_STYLE}</style></head><body><h1>Pruning {esc(s['model']['name'])}</h1>
<p>Removed {result.count} of {s['model']['num_layers']} ({esc(s['parts'])}) by <code>{esc(s['method'])}</code>:
blocks {esc(str(result.removed))}. Held-out perplexity on {esc(s['data']['source'])} ({s['data']['n_heldout']} texts,
context {s['context_tokens']} tokens, computed in {esc(s['dtype'])}): unpruned {result.reference['perplexity']:.2f}.
Tokens/s {speed['unpruned']:.0f} → {speed['pruned']:.0f}; parameters {speed['parameters_unpruned']:,} →
{speed['parameters_pruned']:,}.</p>{healing}
{_image(folder / 'prune.png')}
<h2>At {result.count} removed</h2><table><tr><th>method</th><th>perplexity</th><th>range</th><th>blocks</th>
<th>seconds</th><th>forward tokens</th></tr>{rows}</table>
<p>Cost: what choosing the blocks took (a scan score pays for the scan; sleb for its passes over the calibration
text). Random: median and range of {s['config']['draws']} draws.</p>
<h2>Which lens predicts pruning damage</h2>
<p>{'' if lens else 'Not measured: the lenses are correlated with the first step of sleb, which runs with the baselines. '}Spearman of each scan score with the calibration loss rise of removing each block alone: all blocks | eligible
blocks | depth regressed out. A useful score correlates positively where high means critical, negatively where low
does.</p><table>{lens_rows(lens)}</table>
{elsewhere_section(result, 2)}
<p>GGUF: {esc(str(result.gguf.get('file') or result.gguf.get('why')))}</p>{llamacpp}
</body></html>"""
    (folder / "prune.html").write_text(page, encoding="utf-8")
