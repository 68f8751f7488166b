"""The documentation site (mkdocs.yml, docs/) builds with `mkdocs build --strict`: no broken
link or anchor, no page missing from the nav; and the README stays a short entry point."""
import os
import re
import subprocess
import sys

import yaml

from conftest import REPO

DOCS = REPO / "docs"
MAX_README_LINES = 300


def nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {MAX_README_LINES})"


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert config.get("strict") is True
    pages = nav_pages(config["nav"])
    assert sorted(pages) == sorted(p.name for p in DOCS.glob("*.md"))


def test_readme_links_into_docs_resolve():
    text = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\((docs/[^)#\s]+)", text):
        assert (REPO / target).exists(), f"README links to a missing file: {target}"


def test_the_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (site / "index.html").exists()
    for page in DOCS.glob("*.md"):
        name = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (site / name).exists(), f"{page.name} was not built"
