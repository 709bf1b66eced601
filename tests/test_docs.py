"""The README and docs/ say only what is true of the repository: generated pages are current, links
resolve, the API and CLI names they use exist, and they speak of the project, not of its history."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.M | re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HISTORY = re.compile(r"\b(?:issue|session)s?\s+#?\d+|(?<![\w&/])#\d+\b", re.I)


def _ids(paths):
    return [p.relative_to(REPO).as_posix() for p in paths]


def _code_blocks(text: str, languages: tuple[str, ...] | None = None) -> list[str]:
    return [body for lang, body in _FENCE.findall(text) if languages is None or lang.strip() in languages]


def _prose(text: str) -> str:
    """The text without fenced code blocks (links inside code are not links)."""
    return _FENCE.sub("", text)


def test_docs_benchmarks_md_is_the_summary_of_the_result_files():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "summary.py")], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8") == out, (
        "docs/benchmarks.md is stale; run: python benchmarks/summary.py > docs/benchmarks.md")


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_relative_link_points_to_an_existing_file(page):
    missing = []
    for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor on the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert missing == [], f"{page.name} links to files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_no_issue_session_or_hash_number_references(page):
    found = [m.group(0) for m in _HISTORY.finditer(page.read_text(encoding="utf-8"))]
    assert found == [], f"{page.name} refers to the project's history ({found}); say what is true now instead"


def test_readme_calls_only_public_api_names():
    import medtl

    called = set()
    for block in _code_blocks(README.read_text(encoding="utf-8")):
        called |= set(re.findall(r"(?<![\w.])medtl\.(\w+)\(", block))
    assert called, "no medtl.<name>( call found in the README's code blocks"
    assert sorted(called - set(medtl.__all__)) == [], "README calls names that are not in medtl.__all__"


def test_readme_uses_only_real_subcommands():
    from medtl.cli import app, weights_app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    groups = {g.name for g in app.registered_groups}
    weights = {c.name or c.callback.__name__ for c in weights_app.registered_commands}
    assert "weights" in groups
    used, bad = set(), []
    for block in _code_blocks(README.read_text(encoding="utf-8"), ("bash", "sh", "console", "")):
        for line in block.splitlines():
            code = line.split("#", 1)[0]
            for m in re.finditer(r"(?<![\w./-])medtl[ \t]+([a-z][\w-]*)(?:[ \t]+([a-z][\w-]*))?", code):
                sub, arg = m.group(1), m.group(2)
                used.add(sub)
                if sub not in commands | groups:
                    bad.append(line.strip())
                elif sub == "weights" and arg not in weights:
                    bad.append(line.strip())
    assert used, "no `medtl <subcommand>` found in the README's code blocks"
    assert bad == [], f"README uses subcommands the CLI does not have: {bad}"
