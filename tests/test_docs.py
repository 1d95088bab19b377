"""The documentation holds together: every relative link resolves, README stays a short front door that links to
every docs page. Reads files only: no model, no network."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 250
# [text](target) and ![alt](target); a target may carry a title: (path "title").
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def pages() -> list[Path]:
    return [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def docs_pages() -> list[Path]:
    return sorted([*(ROOT / "docs").glob("*.md"), *(ROOT / "docs" / "method").glob("*.md")])


def links(page: Path) -> list[str]:
    """The link targets of a page, outside code blocks and inline code."""
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return LINK.findall(text)


def local(target: str) -> str | None:
    """The file part of a relative link, or None for a web or mail address or a link within the page."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
        return None
    return target.split("#", 1)[0].split("?", 1)[0]


def test_the_pages_exist():
    assert README.is_file() and (ROOT / "CHANGELOG.md").is_file()
    assert docs_pages(), "docs/ holds no page"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = [target for target in links(page)
              if (path := local(target)) is not None and not (page.parent / path).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}"


def test_readme_links_to_every_docs_page():
    linked = {(ROOT / path).resolve() for target in links(README) if (path := local(target))}
    missing = [str(p.relative_to(ROOT)) for p in docs_pages() if p.resolve() not in linked]
    assert not missing, f"README.md does not link to {missing}"


def test_the_link_pattern():
    page = "see [the CLI](docs/cli.md#scan), ![a plot](docs/cka.png) and [web](https://example.org)\n" \
           "`[not a link](nowhere.md)`\n```\n[nor this](nowhere.md)\n```\n"
    text = INLINE_CODE.sub("", FENCE.sub("", page))
    assert LINK.findall(text) == ["docs/cli.md#scan", "docs/cka.png", "https://example.org"]
    assert [local(t) for t in LINK.findall(text)] == ["docs/cli.md", "docs/cka.png", None]


def _sections(text: str) -> dict[str, str]:
    """A page's text under each ``## heading``."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def test_the_command_line_page_names_every_flag_of_every_command():
    import argparse

    from critlayer.cli import build_parser

    sections = _sections((ROOT / "docs" / "cli.md").read_text(encoding="utf-8"))
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, parser in commands.items():
        page = sections[name] + sections.get("Training flags", "") * (name in ("tune", "validate", "defend"))
        flags = [a.option_strings[0] for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
                 and a.dest != "help"]
        missing = [flag for flag in flags if f"`{flag}" not in page]
        assert not missing, f"docs/cli.md says nothing of {name} {missing}"
