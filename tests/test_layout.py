"""Where the code lives and who imports it: trainer/ sits at the top of the checkout (the shape users and
hosts know) and is installed as ``reneg.trainer``; every import of it says so, so that ``grep -rn
reneg.trainer`` and any import-graph tool find each one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python_files():
    for top in ("reneg", "trainer", "nodes", "a1111_extension", "scripts", "tests", "benchmarks", "tools"):
        yield from (ROOT / top).rglob("*.py")
    yield from ROOT.glob("*.py")


def test_the_trainer_is_imported_as_reneg_trainer_only():
    offenders = []
    for f in _python_files():
        rel = f.relative_to(ROOT)
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), filename=str(rel))):
            if isinstance(node, ast.Import):
                bad = [a.name for a in node.names if a.name == "trainer" or a.name.startswith("trainer.")]
            elif isinstance(node, ast.ImportFrom):
                m = node.module or ""
                # absolute "trainer...", or a relative import that climbs out of reneg/ into the checkout
                bad = [m] if node.level == 0 and (m == "trainer" or m.startswith("trainer.")) else []
                if node.level and rel.parts[0] == "reneg" and node.level >= len(rel.parts) and m.startswith("trainer"):
                    bad = [f"{'.' * node.level}{m}"]
            else:
                continue
            offenders += [f"{rel}:{node.lineno}: {b}" for b in bad]
    assert not offenders, offenders


def test_the_packaging_maps_trainer_into_reneg():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"reneg.trainer" = "trainer"' in text.replace("'", '"'), "pyproject.toml: package-dir reneg.trainer"
