"""Every file a docstring or comment of the package points to exists inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bundles" / "common" / "hybridseg"
# ``docs/x.md``, ``ci/x.py``, ``bundles/...``: repository-relative paths quoted in the sources
BUNDLES = [p.parents[1] for p in (ROOT / "bundles").glob("*/configs/metadata.json")]
PATH_REF = re.compile(r"``((?:docs|ci|bundles|tests)/[\w./-]+)``")


def test_package_sources_point_only_to_files_in_the_repository():
    missing, outside = [], []
    for src in sorted(PACKAGE.rglob("*.py")) + sorted(PACKAGE.rglob("*.json")):
        text = src.read_text(encoding="utf-8")
        if "shared/spec" in text or "/work/" in text:
            outside.append(str(src.relative_to(ROOT)))
        for ref in PATH_REF.findall(text):
            # a bundle's own ``docs/README.md`` counts when every bundle has it
            if "<" not in ref and not (ROOT / ref).exists() and not all((b / ref).exists() for b in BUNDLES):
                missing.append(f"{src.relative_to(ROOT)}: {ref}")
    assert not outside, f"references to files outside the repository: {outside}"
    assert not missing, f"references to files that do not exist: {missing}"


def test_runtime_modules_never_import_the_tools():
    """The packaged bundles vendor the runtime without ``hybridseg.tools``: no runtime module may import it."""
    import ast

    offenders = []
    for src in sorted(PACKAGE.rglob("*.py")):
        rel = src.relative_to(PACKAGE)
        if rel.parts[0] == "tools" or rel.name == "__main__.py":  # the CLI entry point is tooling too
            continue
        for node in ast.walk(ast.parse(src.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{rel}: {n}" for n in names if n == "hybridseg.tools" or n.startswith("hybridseg.tools.")]
    assert not offenders, f"runtime modules importing the tools: {offenders}"
