"""Reports: plots and self-contained HTML pages of every result (they read results, never compute them)."""

from __future__ import annotations

from pathlib import Path

from .html import write_html
from .plots import plot_cka, plot_firmness, plot_measures, plot_profile


def write_report(result, folder: Path) -> None:
    """Write cka.png (when CKA was measured), profile.png, measures.png (with a consensus), firmness.png (when the
    answer's firmness was measured) and report.html."""
    images = []
    if result.cka is not None:
        plot_cka(result, folder / "cka.png")
        images.append(folder / "cka.png")
    plot_profile(result, folder / "profile.png")
    images.append(folder / "profile.png")
    if result.consensus.scores:
        plot_measures(result, folder / "measures.png")
        images.append(folder / "measures.png")
    if result.firmness is not None:
        plot_firmness(result, folder / "firmness.png")
        images.insert(0, folder / "firmness.png")
    write_html(result, folder, images)


__all__ = ["plot_cka", "plot_firmness", "plot_measures", "plot_profile", "write_html", "write_report"]
