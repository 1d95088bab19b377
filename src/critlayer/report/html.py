"""One self-contained HTML page per scan: settings, plots, table, and the chosen layers with why."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

_STYLE = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
tr.crit{background:#fde2e2}th{background:#f3f3f3}code{background:#f3f3f3;padding:1px 4px}
img{max-width:100%}.kv td{text-align:left}"""

HOW_TO_READ = (
    "Each block's <b>delta</b> is the mean linear CKA (the unbiased estimator, which does not drift with the number "
    "of probes) between its output and the outputs of the blocks within "
    "the window around it: a low delta means the representation shifts sharply there. The heatmap shows CKA "
    "for every pair of blocks; bright squares along the diagonal are runs of blocks that barely change the "
    "representation, and dark bands crossing them mark the shifts. Block influence and angular distance measure "
    "how far a block turns its own input (high = important); the spectral scores ask whether a block's top "
    "principal components match its neighbours' (low = a shift). Edge blocks have clipped windows and are "
    "greyed out unless the scan was run with edges eligible. The <b>consensus</b> is the mean over measures of "
    "each block's criticality rank scaled to [0, 1] (1 = most critical); <b>p_critical</b> is how often the "
    "selection rule picks a block from the consensus of a replicate drawn from half the probes. <b>P(picked)</b> is "
    "the share of random halves of the probes on which the rule picks a block; <b>P(another scan picks)</b> is how "
    "often the rule picks it on the whole profile plus sqrt(2) times each half's deviation from it (another scan of "
    "as many probes lands that much farther away than a half does). A block is <b>firm</b> when another scan would "
    "pick it in at least 90% of cases (where that is measured; else when 90% of the replicates pick it), "
    "<b>tentative</b> at 50-90%; the firm blocks are the answer."
)


def lens_rows(rows: dict) -> str:
    """Table rows of ``lens_correlations`` for one target: each lens's Spearman over all blocks, interior blocks and
    with depth regressed out, each with its p-value."""
    def cell(r: dict, key: str) -> str:
        return f"<td>{r[key]:+.2f} <small>(p {r[key + '_p']:.3f})</small></td>" if math.isfinite(r[key]) else "<td>-</td>"

    return "".join(f"<tr><th>{html.escape(name)}</th>" + "".join(cell(r, k) for k in ("all", "interior", "partial"))
                   + "</tr>" for name, r in rows.items())


def elsewhere_section(result, digits: int) -> str:
    """``--also-data``'s table for a change's page (empty without it)."""
    rows = result.elsewhere_rows(digits)
    if not rows:
        return ""
    also, esc = result.settings["also_heldout"], html.escape
    body = "".join(f"<tr><th>{esc(name)}</th><td>{ppl:.{digits}f}</td><td>{esc(note)}</td></tr>"
                   for name, ppl, note in rows)
    return (f"<h2>On {esc(also['source'])} too</h2><p>Every method's choice again on {also['n_heldout']} held-out "
            f"texts of a second source ({also['heldout_tokens']:,} tokens); {result.REFERENCE} "
            f"{also['reference']['perplexity']:.{digits}f}. The last column: random's range, else the paired 95% "
            f"interval of perplexity ÷ the chosen method's.</p><table><tr><th>method</th><th>perplexity</th>"
            f"<th>range or ratio</th></tr>{body}</table>")


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{path.stem}" src="data:image/png;base64,{data}">'


def write_html(result, folder: Path, images: list[Path]) -> Path:
    esc = html.escape
    settings = {**{f"model.{k}": v for k, v in result.model.items()},
                **{f"probes.{k}": v for k, v in result.probes.items()},
                **{f"capture.{k}": v for k, v in result.capture.items()},
                **{f"timing.{k} (s)": v for k, v in result.timing.items()}}
    rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(json.dumps(v) if isinstance(v, (list, dict)) else str(v))}</td></tr>"
                   for k, v in settings.items())
    names = list(result.scores)
    head = "".join(f"<th>{esc(n)}<br><small>{'low' if result.direction(n) < 0 else 'high'} = critical</small></th>"
                   for n in names)
    firmness = result.firmness
    label = {**dict.fromkeys(firmness.tentative if firmness else [], "tentative"),
             **dict.fromkeys(result.critical, "firm" if firmness else "critical")}
    replicated = firmness is not None and bool(firmness.replication)
    picked = (lambda i: f"<td>{firmness.probability[i]:.2f}</td>"
              + (f"<td>{firmness.replication[i]:.2f}</td>" if replicated else "")) if firmness else (lambda i: "")
    body = "".join(
        f"<tr class='{'crit' if i in result.critical else ''}'><td>{i}</td>"
        + "".join(f"<td>{result.scores[n][i]:.4f}</td>" for n in names)
        + picked(i) + f"<td>{label.get(i, '')}</td></tr>"
        for i in result.layers)
    picked_head = ("<th>P(picked)</th>" + ("<th>P(another scan picks)</th>" if replicated else "")) if firmness else ""
    rounds = "" if not firmness or not firmness.rounds else (
        "<h2>Rounds</h2><table><tr><th>probes read</th><th>firm</th><th>tentative</th><th>undecided</th></tr>"
        + "".join(f"<tr><td>{r.probes}</td><td>{r.firm}</td><td>{r.tentative}</td><td>{r.undecided}</td></tr>"
                  for r in firmness.rounds)
        + f"</table><p>Stopped: {esc(firmness.stopped)}. Rule: {esc(firmness.rule)}.</p>")
    sel = result.selection
    con = result.consensus
    held = ", ".join(con.held_fixed) or "none"
    consensus_note = (f"<p>Consensus of {esc(', '.join(con.groups))}; bootstrap replicates: "
                      f"{con.bootstrap}; held fixed in them: {esc(held)}.</p>" if con.groups else "")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>critlayer scan: {esc(result.model['name'])}</title>
<style>{_STYLE}</style></head><body>
<h1>Critical layers of {esc(result.model['name'])}</h1>
<p><b>{esc(result.answer())}</b></p>
<p>On all the probes read, rule <code>{esc(sel.rule)}</code> on <code>{esc(sel.score)}</code> chose
{esc(str(sel.critical))}: {esc(sel.reason)}.</p>
<p>{HOW_TO_READ}</p>
{consensus_note}
{''.join(_image(p) for p in images)}
<h2>Per-layer scores</h2><table><tr><th>block</th>{head}{picked_head}<th></th></tr>{body}</table>
{rounds}
<h2>Settings</h2><table class="kv">{rows}</table>
<p><small>critlayer {esc(result.versions.get('critlayer', ''))}; selection parameters
<code>{esc(json.dumps(sel.to_json()['params']))}</code></small></p>
</body></html>"""
    path = folder / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
