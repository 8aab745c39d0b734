"""The documentation points at things that exist: every relative link in README.md, CONTRIBUTING.md
and docs/*.md leads to a file in the repository (and, with ``#anchor``, to a heading there), and
every repository path written in backticks names a file or folder that exists.

The pages are collected when the test runs, so a page added later is checked like the others."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# top-level folders of the repository: a backticked path starting with one of these must exist
REPO_DIRS = (
    "reneg/",
    "trainer/",
    "nodes/",
    "tests/",
    "benchmarks/",
    "a1111_extension/",
    "scripts/",
    "workflows/",
    "docs/",
    "embeddings/",
    "web/",
    ".ci/",
    "tools/",
)

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^(```|~~~)")


def pages() -> list[Path]:
    found = [ROOT / "README.md", ROOT / "CONTRIBUTING.md"] + sorted((ROOT / "docs").glob("*.md"))
    return [p for p in found if p.is_file()]


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[`*_]", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out, seen = set(), {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            a = slug(m.group(1))
            k = seen.get(a, 0)
            seen[a] = k + 1
            out.add(a if k == 0 else f"{a}-{k}")
    return out


def links(path: Path):
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(line):
            yield n, m.group(1)


def rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    broken = []
    where = page.relative_to(root).as_posix()
    for n, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        try:
            name = dest.relative_to(root).as_posix()
        except ValueError:
            broken.append(f"{where}:{n}: {target} leaves the repository")
            continue
        if not dest.exists():
            broken.append(f"{where}:{n}: {target} -> {name} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where}:{n}: {target}: no heading '#{anchor}' in {name}")
    return broken


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_relative_links_lead_somewhere(page):
    broken = broken_links(page)
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_backticked_repository_paths_exist(page):
    missing = []
    for n, line in prose_lines(page.read_text(encoding="utf-8")):
        for m in CODE_SPAN.finditer(line):
            span = m.group(1).strip()
            if " " in span or "<" in span or "{" in span or not span.startswith(REPO_DIRS):
                continue  # prose, or a placeholder such as `reneg/rewards/<name>.py`
            path = span.rstrip("/").split("::")[0]
            if not any(ch in path for ch in "*?[") and (ROOT / path).exists():
                continue
            if glob.glob(str(ROOT / path)):
                continue
            missing.append(f"{rel(page)}:{n}: `{span}` does not exist")
    assert not missing, "paths named in the docs that are not in the repository:\n" + "\n".join(missing)


def test_slug_matches_github():
    assert slug("SDXL") == "sdxl"
    assert slug("`reneg train`") == "reneg-train"
    assert slug("Inspect and convert") == "inspect-and-convert"
    assert slug("What lands in `--out`") == "what-lands-in---out"


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# A heading\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/there.md#a-heading) [gone](docs/missing.md) [web](https://example.org)\n"
        "[bad anchor](docs/there.md#nope) [up](../x.md)\n"
        "```\n[in code](docs/ignored.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page, root=tmp_path) == [
        "README.md:1: docs/missing.md -> docs/missing.md does not exist",
        "README.md:2: docs/there.md#nope: no heading '#nope' in docs/there.md",
        "README.md:2: ../x.md leaves the repository",
    ]


def test_docs_families_table_is_current():
    """docs/embeddings.md's families table is made from the family table (reneg/families.py)."""
    from reneg.families import markdown_table

    text = (ROOT / "docs" / "embeddings.md").read_text(encoding="utf-8")
    assert markdown_table() in text, "docs/embeddings.md: regenerate the table from reneg.families.markdown_table()"


def test_reliability_examples_name_the_current_families():
    """docs/reliability.md shows the real refusal of an unknown --family: its list is the family table's."""
    from reneg.families import FAMILIES

    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    assert f"--family bogus: expected one of {', '.join(FAMILIES)}\n" in text
