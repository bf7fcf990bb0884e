"""``python -m hybridseg package bundles/<name> --out DIR``: a self-contained Model Zoo bundle (folder, zip).

The packaged bundle carries this package's runtime (not ``tools/``) in ``scripts/hybridseg``, its imports
sorted as the zoo's isort sorts them (see ``_sort_imports_as_the_zoo``). Its configs start their ``imports`` with
``$import scripts``, whose ``__init__`` puts ``scripts/`` on ``sys.path`` before ``$import hybridseg`` runs:
MONAI adds the bundle root to ``sys.path`` only when a workflow runs, after the imports were evaluated, so
without this the bundle's own code could not be found. ``python -m`` puts the working directory on
``sys.path``, so the zoo's commands work from the unpacked folder; from elsewhere set
``PYTHONPATH=<bundle>/scripts``.

The packaged ``docs/README.md`` is the bundle's README with its repository-only parts replaced
(``bundle_readme``), so that every command in it runs from the bundle folder.

Zoo rules checked (a violation raises InputDataError naming the file): metadata valid against the local
schema, ``version`` present in ``changelog`` and the newest entry, JSON indented 4, ``LICENSE`` and
``docs/README.md`` present, no file over ``max_file_mb`` (25 MB) inside. Weights (``models/*``) are always
listed in ``large_files.yml`` with a SHA-256 hash; those over the limit are left out of the bundle and
written to ``DIR/<name>_large_files/`` for upload to ``weights_url``. The pretrained files of the bundle's
weights manifest (``configs/weights.json``) are listed too, under ``models/pretrained/``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hybridseg.io import InputDataError, atomic_path, atomic_write_text
from hybridseg.weights import read_manifest, sha256_of

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # hybridseg/, one above tools/
BOOTSTRAP_IMPORT = "$import scripts"
# What the bootstrap module says and does; written into every packaged bundle as scripts/__init__.py.
BOOTSTRAP = '''"""Puts this folder on sys.path so that the bundle's configs find the vendored hybridseg.

The configs import ``scripts`` first (MONAI adds the bundle root to sys.path only after the configs'
imports ran). Written by ``python -m hybridseg package``.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)
'''
# Top-level items of a bundle folder that are packaged; run outputs (models/, eval/) are not.
PACKAGED_ITEMS = ("configs", "docs", "LICENSE")
MAX_FILE_MB = 25.0


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def dump_json(obj: Any) -> str:
    """JSON as the zoo wants it: indent 4, non-ASCII kept, newline at the end."""
    return json.dumps(obj, indent=4, ensure_ascii=False) + "\n"


def check_json_indent(path: Path) -> Any:
    """Parse ``path``; fail unless it is laid out exactly as ``json.dumps(indent=4)`` does."""
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise InputDataError(path, f"is not valid JSON ({e})") from e
    if text.rstrip("\n") != dump_json(obj).rstrip("\n"):
        raise InputDataError(path, "is not pretty-printed with indent 4 (the Model Zoo's rule)")
    return obj


def verify_metadata(meta_file: str | os.PathLike) -> dict:
    """Validate a metadata.json against the local zoo schema and check version and changelog agree."""
    import jsonschema

    from hybridseg.schemas import METADATA_SCHEMA

    meta_file = Path(meta_file)
    meta = check_json_indent(meta_file)
    schema = json.loads(METADATA_SCHEMA.read_text(encoding="utf-8"))
    try:
        jsonschema.validate(meta, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "top level"
        raise InputDataError(meta_file, f"metadata invalid at {where}: {e.message}") from e
    version, changelog = meta["version"], meta["changelog"]
    if version not in changelog:
        raise InputDataError(meta_file, f"version {version} has no changelog entry")
    newest = max(changelog, key=_version_key)
    if newest != version:
        raise InputDataError(meta_file, f"version {version} is not the newest changelog entry ({newest})")
    return meta


def check_bundle(bundle: str | os.PathLike) -> dict:
    """Check a bundle folder against the zoo rules above; returns its metadata."""
    bundle = Path(bundle)
    for needed in ("configs/metadata.json", "configs/inference.json", "docs/README.md", "LICENSE"):
        if not (bundle / needed).is_file():
            raise InputDataError(bundle / needed, "missing (a Model Zoo bundle needs it)")
    for f in sorted((bundle / "configs").glob("*.json")):
        check_json_indent(f)
    return verify_metadata(bundle / "configs" / "metadata.json")


def large_files_yml(entries: Sequence[dict[str, str]], notes: Sequence[str] = ()) -> str:
    """The zoo's ``large_files.yml`` (path, url, hash_val, hash_type per file), written without PyYAML;
    ``notes`` become comment lines (files that cannot be listed for download)."""
    lines = [
        "# Weights of this bundle: fetch each file from its url into its path and check its hash.",
        "# An empty url means the file is not published yet; an empty hash_val, that only its publisher's hash",
        "# prefix is known: the file name's part after its last '-' is the start of its SHA-256 (torchvision's",
        "# naming), so compare it with the start of `sha256sum FILE`.",
        *(f"# {n}" for n in notes),
    ]
    if not entries:
        return "\n".join([*lines, "large_files: []", ""])
    lines.append("large_files:")
    for e in entries:
        # YAML double-quoted scalars; json.dumps escapes the same characters YAML needs escaped
        lines += [f"  - path: {json.dumps(e['path'])}", f"    url: {json.dumps(e['url'])}"]
        lines += [f"    hash_val: {json.dumps(e['hash_val'])}", f"    hash_type: {json.dumps(e['hash_type'])}"]
    return "\n".join([*lines, ""])


def pretrained_entries(manifest_file: Path) -> tuple[list[dict[str, str]], list[str]]:
    """``large_files.yml`` entries for the pretrained files of a weights manifest, under
    ``models/pretrained/`` (where the bundle's ``pretrained=auto`` also looks), and notes for the files
    with no direct download."""
    if not manifest_file.is_file():
        return [], []
    entries, notes = [], []
    for e in read_manifest(manifest_file).files:
        path = f"models/pretrained/{e.file}"
        if e.direct:
            entries.append(
                {"path": path, "url": e.url, "hash_val": e.sha256 or "", "hash_type": "sha256" if e.sha256 else ""}
            )
        else:
            notes.append(f"{path}: no direct download ({e.url}); see configs/weights.json for how to get it.")
    return entries, notes


def _vendor(staging: Path) -> None:
    """Copy this package into ``scripts/hybridseg`` with the bootstrap, without caches or build metadata."""
    scripts = staging / "scripts"
    shutil.copytree(
        PACKAGE_DIR,
        scripts / "hybridseg",
        # the runtime only: the configs never import the tools (cli, export, deploy, ...), so they stay behind
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*", "tools", "__main__.py"),
    )
    (scripts / "__init__.py").write_text(BOOTSTRAP, encoding="utf-8")
    _sort_imports_as_the_zoo(scripts)


def _sort_imports_as_the_zoo(scripts: Path) -> None:
    """Sort the vendored imports with the zoo's isort settings (black profile, line 120, first party ``models``).

    Inside the zoo ``hybridseg`` is a third-party name, so its imports join the third-party block instead
    of the first-party block they have in this repository; nothing else changes (black and flake8 pass on
    the copy as it is).
    """
    import isort

    zoo = isort.Config(profile="black", line_length=120, known_first_party=["models"], quiet=True)
    for f in sorted(scripts.rglob("*.py")):
        isort.file(f, config=zoo)


# Third-party packages declared by their own metadata fields (monai_version, pytorch_version, numpy_version).
VERSION_FIELD_PACKAGES = ("monai", "torch", "numpy")


def imported_modules(paths: Sequence[Path]) -> set[str]:
    """Top-level names of the modules the Python files at ``paths`` (files or folders) import, anywhere in
    the code (also inside functions), without the standard library, relative imports and hybridseg."""
    names: set[str] = set()
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*.py")))]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), filename=str(f))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("__future__", "hybridseg")}


def distribution_names(modules: set[str]) -> dict[str, str]:
    """Module name -> the (normalised) name of the installed distribution that provides it (PIL -> pillow)."""
    provided = importlib.metadata.packages_distributions()
    out = {}
    for m in sorted(modules):
        if m not in provided:
            raise InputDataError(None, f"module {m!r} imported by hybridseg is not provided by any installed package")
        out[m] = _normalise(provided[m][0])
    return out


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def runtime_requirements(runtime: Path) -> set[str]:
    """Distributions the vendored runtime at ``runtime`` imports, besides monai, torch and numpy."""
    return set(distribution_names(imported_modules([runtime]) - set(VERSION_FIELD_PACKAGES)).values())


def tool_only_requirements() -> set[str]:
    """Distributions only the repository's tools import (fire, h5py, onnx...): not needed by a packaged bundle."""
    tools = [PACKAGE_DIR / "tools", PACKAGE_DIR / "__main__.py"]
    runtime = [p for p in PACKAGE_DIR.iterdir() if p.name not in ("tools", "__main__.py") and p.suffix in ("", ".py")]
    only = imported_modules(tools) - imported_modules(runtime) - set(VERSION_FIELD_PACKAGES)
    return set(distribution_names(only).values())


# Imported by the runtime only on request: onnxruntime for the "onnxruntime" inference backends
# (hybridseg.backends). MONAI's metadata has no optional-packages field (it renames optional_packages_version
# to required_packages_version), so these stay undeclared.
OPTIONAL_RUNTIME_PACKAGES = {"onnxruntime"}


def _declare_requirements(meta_file: Path, meta: dict, runtime: Path) -> None:
    """``required_packages_version`` of a packaged bundle: what its vendored code imports, as the source
    bundle pins it; ``hybridseg`` (it travels inside) and the tools' own packages are dropped."""
    declared = meta.setdefault("required_packages_version", {})
    missing = sorted(runtime_requirements(runtime) - {_normalise(k) for k in declared} - OPTIONAL_RUNTIME_PACKAGES)
    if missing:
        raise InputDataError(meta_file, f"required_packages_version lacks {missing}, which the vendored code imports")
    dropped = tool_only_requirements() | {"hybridseg"}
    for key in [k for k in declared if _normalise(k) in dropped]:
        declared.pop(key)


def _adapt_configs(staging: Path) -> None:
    """Bootstrap import first in every config that imports hybridseg; requirements of the vendored code only."""
    for f in sorted((staging / "configs").glob("*.json")):
        cfg = json.loads(f.read_text(encoding="utf-8"))
        imports = cfg.get("imports") if isinstance(cfg, dict) else None
        if isinstance(imports, list) and any("hybridseg" in str(i) for i in imports):
            if BOOTSTRAP_IMPORT not in imports:
                cfg["imports"] = [BOOTSTRAP_IMPORT, *imports]
        if f.name == "metadata.json":
            # The code travels inside the bundle; hybridseg is not a package anyone could install.
            _declare_requirements(f, cfg, staging / "scripts" / "hybridseg")
        f.write_text(dump_json(cfg), encoding="utf-8")


# The bundle READMEs are written for the repository; the packaged copy drops the parts marked
# ``<!-- repository-only -->...<!-- /repository-only -->``, shows the parts written inside a
# ``<!-- bundle-only ... -->`` comment, and makes repository paths of the bundle relative to its folder.
README_REPOSITORY_ONLY = re.compile(r"[ \t]*<!-- repository-only -->.*?<!-- /repository-only -->", re.S)
README_BUNDLE_ONLY = re.compile(r"[ \t]*<!-- bundle-only\n(.*?)\n?[ \t]*-->", re.S)
# Text that only works in the repository: its layout, its tools (not vendored), Makefile targets and docs.
REPOSITORY_ONLY_TEXT = (
    "bundles/",
    "python -m hybridseg",
    "hybridseg.tools",
    "make demo",
    "make test",
    "make env",
    "repository's tests",
    "../../../",
    "docs/performance.md",
    "docs/deploy.md",
    "docs/model_zoo.md",
)


def bundle_readme(text: str, name: str, source: str | os.PathLike | None = None) -> str:
    """The README of packaged bundle ``name``, every command runnable from the bundle folder (see above).

    Raises InputDataError naming ``source`` when repository-only text is left outside the markers.
    """
    text = README_REPOSITORY_ONLY.sub("", text)
    text = README_BUNDLE_ONLY.sub(lambda m: m.group(1), text)
    text = "\n".join(line.rstrip() for line in text.replace(f"bundles/{name}/", "").splitlines())
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"
    for i, line in enumerate(text.splitlines(), start=1):
        for bad in REPOSITORY_ONLY_TEXT:
            if bad in line:
                raise InputDataError(
                    source,
                    f"{bad!r} only works in the repository; mark it <!-- repository-only --> "
                    f"(packaged README line {i}: {line.strip()[:100]})",
                )
    return text


def package(
    bundle: str,
    out: str,
    ckpt: str | None = None,
    weights_url: str = "",
    max_file_mb: float = MAX_FILE_MB,
    input_shape: Sequence[int] | None = None,
    use_trace: bool = False,
    **overrides: Any,
) -> dict[str, str]:
    """Package bundle folder ``BUNDLE`` into ``OUT/<name>/`` and ``OUT/<name>_v<version>.zip``.

    With ``--ckpt`` the checkpoint becomes ``models/model.pt`` and a scripted ``models/model.ts`` (traced at
    ``--input_shape`` with ``--use_trace``; checked against the eager network), both listed in
    ``large_files.yml``; ``--weights_url`` is the base URL the
    files will be published under. Config overrides for the export follow as ``--key value``. Outputs are
    replaced atomically; nothing is written inside ``BUNDLE``.
    """
    from hybridseg.tools.export import build_network, compare_torchscript, export_torchscript

    src, out_dir = Path(bundle).resolve(), Path(out).resolve()
    if ckpt is not None and not Path(ckpt).is_file():
        raise InputDataError(ckpt, "no such checkpoint file")
    if out_dir == src or src in out_dir.parents:
        raise InputDataError(out, "is inside the bundle being packaged; choose an output folder outside it")
    meta = check_bundle(src)
    name, version = src.name, meta["version"]  # the folder is the bundle id; metadata "name" is a display name
    out_dir.mkdir(parents=True, exist_ok=True)
    dest, zip_path = out_dir / name, out_dir / f"{name}_v{version}.zip"
    large_dir = out_dir / f"{name}_large_files"
    if src in (dest, large_dir):
        raise InputDataError(out, f"packaging there would replace the bundle {src} itself; choose another")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the published folder private
    try:
        for item in PACKAGED_ITEMS:
            (shutil.copytree if (src / item).is_dir() else shutil.copy2)(src / item, staging / item)
        _vendor(staging)
        _adapt_configs(staging)
        readme = staging / "docs" / "README.md"
        readme.write_text(bundle_readme(readme.read_text(encoding="utf-8"), name, src / "docs" / "README.md"))
        entries = []
        if ckpt is not None:
            models = staging / "models"
            models.mkdir()
            shutil.copy2(ckpt, models / "model.pt")
            net = build_network(staging, models / "model.pt", **overrides)
            ts = export_torchscript(
                staging,
                models / "model.ts",
                models / "model.pt",
                input_shape,
                use_trace=use_trace,
                network=net,
                **overrides,
            )
            compare_torchscript(ts, net, [input_shape] if input_shape else [_shape(staging, overrides)])
            for f in sorted(models.iterdir()):
                rel = f.relative_to(staging).as_posix()
                url = f"{weights_url.rstrip('/')}/{f.name}" if weights_url else ""
                entries.append({"path": rel, "url": url, "hash_val": sha256_of(f), "hash_type": "sha256"})
        pretrained, notes = pretrained_entries(staging / "configs" / "weights.json")
        atomic_write_text(staging / "large_files.yml", large_files_yml(entries + pretrained, notes))
        (staging / "large_files.yml").chmod(0o644)

        # Weights over the limit leave the bundle (they are in large_files.yml) for separate upload.
        limit = max_file_mb * 1024 * 1024
        moved = []
        for f in sorted(p for p in staging.rglob("*") if p.is_file()):
            if f.stat().st_size > limit:
                rel = f.relative_to(staging)
                if rel.parts[0] != "models":
                    raise InputDataError(src / rel, f"is over {max_file_mb:g} MB, the Model Zoo's limit")
                moved.append(rel)
        check_bundle(staging)  # the packaged configs too

        _set_aside(staging, moved, large_dir)
        # The zip is complete before the folder is swapped in, and renamed into place right after it.
        with atomic_path(zip_path) as tmp:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                for f in sorted(p for p in staging.rglob("*") if p.is_file()):
                    z.write(f, Path(name) / f.relative_to(staging))
            tmp.chmod(0o644)
            _swap_in(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = {"folder": str(dest), "zip": str(zip_path)}
    if large_dir.is_dir() and any(large_dir.iterdir()):
        result["large_files"] = str(large_dir)
    print(json.dumps(result, indent=4))
    return result


def _shape(bundle: Path, overrides: dict) -> list[int]:
    from hybridseg.tools.export import example_input_shape

    return example_input_shape(bundle, **overrides)


def _set_aside(staging: Path, files: list[Path], large_dir: Path) -> None:
    """Move the over-limit ``files`` (relative to ``staging``) into a fresh ``large_dir``."""
    if large_dir.exists():
        shutil.rmtree(large_dir)
    for rel in files:
        (large_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, large_dir / rel)


def _swap_in(staging: Path, dest: Path) -> None:
    """Put ``staging`` in place of ``dest`` with one rename (the old folder is removed afterwards)."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
