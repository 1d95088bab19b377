"""Reports of a scan: the plots and a self-contained HTML page."""

from __future__ import annotations

from pathlib import Path

from .html import write_html
from .plots import plot_cka, plot_profile


def write_report(result, folder: Path) -> None:
    """Write cka.png (when CKA was measured), profile.png and report.html into ``folder``."""
    images = []
    if result.cka is not None:
        plot_cka(result, folder / "cka.png")
        images.append(folder / "cka.png")
    plot_profile(result, folder / "profile.png")
    images.append(folder / "profile.png")
    write_html(result, folder, images)


__all__ = ["plot_cka", "plot_profile", "write_html", "write_report"]
