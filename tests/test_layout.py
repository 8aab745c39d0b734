"""Where the code lives and who imports it: trainer/ sits at the top of the checkout (the shape users and
hosts know) and is installed as ``reneg.trainer``; every import of it says so, so that ``grep -rn
reneg.trainer`` and any import-graph tool find each one. And no installed or host-loaded module imports
the test builders."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python_files():
    for top in ("reneg", "trainer", "nodes", "a1111_extension", "scripts", "tests", "benchmarks", "tools"):
        yield from (ROOT / top).rglob("*.py")
    yield from ROOT.glob("*.py")


def _imports(files):
    """``(path relative to the checkout, import node)`` of every import statement in ``files``."""
    for f in files:
        rel = f.relative_to(ROOT)
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), filename=str(rel))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield rel, node


def test_the_trainer_is_imported_as_reneg_trainer_only():
    offenders = []
    for rel, node in _imports(_python_files()):
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name == "trainer" or a.name.startswith("trainer.")]
        else:
            m = node.module or ""
            # absolute "trainer...", or a relative import that climbs out of reneg/ into the checkout
            bad = [m] if node.level == 0 and (m == "trainer" or m.startswith("trainer.")) else []
            if node.level and rel.parts[0] == "reneg" and node.level >= len(rel.parts) and m.startswith("trainer"):
                bad = [f"{'.' * node.level}{m}"]
        offenders += [f"{rel}:{node.lineno}: {b}" for b in bad]
    assert not offenders, offenders


def test_the_packaging_maps_trainer_into_reneg():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"reneg.trainer" = "trainer"' in text.replace("'", '"'), "pyproject.toml: package-dir reneg.trainer"


def test_production_code_does_not_import_the_test_builders():
    """reneg.tiny holds the models only tests and benchmarks use; what --demo builds when the demo
    world's assets are missing lives in reneg.demo_fallback, and the CLIP tokenizer the single-file
    loader writes in reneg.backends.clip_tokenizer, so no installed or host-loaded module imports it."""
    packages = {"reneg": ("reneg",), "trainer": ("reneg", "trainer")}  # trainer/ is installed as reneg.trainer
    files = [
        f for top in ("reneg", "trainer", "nodes", "a1111_extension", "scripts") for f in (ROOT / top).rglob("*.py")
    ]
    files = [f for f in files + [ROOT / "__init__.py"] if f != ROOT / "reneg" / "tiny.py"]
    offenders = []
    for rel, node in _imports(files):
        package = packages.get(rel.parts[0], (rel.parts[0],)) + rel.parts[1:-1]
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(x for x in (base, node.module or "") if x)
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        if "reneg.tiny" in names:
            offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders
