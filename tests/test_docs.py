"""The README stays a front page (at most 250 lines) and every page of docs/ is reachable from it; no
relative link in the README or docs/ points at nothing."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _links(page: Path) -> list[str]:
    return [link for link in re.findall(r"\]\(([^)#\s]+)", page.read_text()) if not link.startswith("http")]


def test_the_readme_is_a_front_page_that_links_every_docs_page():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 250
    linked = {(ROOT / link).resolve() for link in _links(readme)}
    assert {p.resolve() for p in PAGES[1:]} <= linked


def test_every_relative_link_resolves():
    broken = [
        f"{page.relative_to(ROOT)}: {link}"
        for page in PAGES
        for link in _links(page)
        if not (page.parent / link).exists()
    ]
    assert not broken, broken
