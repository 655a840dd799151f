"""README.md is a front page: short, and every link in it and in docs/ leads somewhere.

Relative links (README.md, docs/*.md, infra/README.md) must name a file of the repository and,
with a `#fragment`, one of that page's headings as GitHub anchors them; web links are not fetched.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", ROOT / "infra" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRONT_PAGE_MAX_LINES = 300
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`[^`\n]*`")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(line.lstrip("#")) for line in page.read_text().splitlines()
            if line.startswith("#")}


def relative_links(page: Path) -> list[str]:
    text = CODE.sub("", page.read_text())
    return [target for target in LINK.findall(text)
            if not target.startswith(("http://", "https://", "mailto:"))]


def test_readme_is_a_front_page_of_at_most_300_lines():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= FRONT_PAGE_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading(page):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target}: no such heading")
    assert broken == [], f"{page.relative_to(ROOT)}: {broken}"
