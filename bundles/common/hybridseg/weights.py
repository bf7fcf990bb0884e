"""Pretrained weights and checkpoints at run time: the package's only ``torch.load`` (``weights_only=True``),
state-dict checks shared by the networks' loaders, the bundles' weights manifests and the shared cache.

A manifest (``bundles/<bundle>/configs/weights.json``) is ``{"bundle": name, "files": [entry, ...]}``; each
entry has ``name`` (what configs ask for), ``file`` (its name in the cache), ``url`` (the official one),
``sha256`` (full hash, or null) and/or ``sha256_prefix`` (the prefix a publisher such as torchvision puts in
the file name; the full hash is then pinned in ``<file>.sha256`` on the first verified download),
``size_mib``, ``licence``, ``network``, ``variants``, ``description`` and, for a file with no direct download
(a shared-drive page or archive), ``manual``: how to get it by hand. The cache folder is
``$HYBRIDSEG_WEIGHTS`` or ``$XDG_CACHE_HOME/hybridseg/weights`` (``~/.cache/...``), shared by both bundles;
``python -m hybridseg weights fetch|list <bundle>`` fills and shows it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridseg.io import InputDataError

logger = logging.getLogger(__name__)

CACHE_ENV = "HYBRIDSEG_WEIGHTS"
PRETRAINED_MODES = ("auto", "required", "none")
# How many offending keys an error message lists per category (a wrong variant can mismatch hundreds).
MAX_LISTED_KEYS = 40
# Plain data that training scripts (DeiT-style, as BiFormer's) store beside the weights.
SAFE_GLOBALS = (argparse.Namespace,)


# --- reading files -------------------------------------------------------------------------------------


def torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never pickled code.

    Every failure is an :class:`InputDataError` naming the file: missing, truncated or corrupt, or holding
    pickled Python objects (a whole model saved with ``torch.save(model)``), which are refused because
    unpickling can run arbitrary code.
    """
    p = Path(path)
    if not p.is_file():
        raise InputDataError(p, "no such checkpoint file (it does not exist or is not a file)")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        with open(p, "rb") as f:
            head = f.read(16)
        if not head.startswith((b"PK", b"\x80")):  # neither torch.save's zip archive nor a legacy pickle
            raise InputDataError(
                p, f"cannot be read as a PyTorch checkpoint: not a torch.save file (it starts with {head!r})"
            ) from e
        raise InputDataError(
            p,
            "not a checkpoint of state dicts: it holds pickled Python objects (for example a whole model "
            "saved with torch.save(model)), which are not loaded because unpickling can run arbitrary code; "
            f"save model.state_dict() instead ({str(e).splitlines()[0]})",
        ) from e
    except Exception as e:  # torch raises RuntimeError/EOFError/... for truncated or corrupt archives
        raise InputDataError(
            p, f"cannot be read as a PyTorch checkpoint: unreadable or truncated ({type(e).__name__}: {e})"
        ) from e


def read_state_dict(path: str | os.PathLike, containers: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """A state dict (name -> tensor) from ``path``: the file itself, or the first of ``containers``
    (e.g. ``"model"``, ``"state_dict"``) that holds one. Anything else is an InputDataError."""
    obj = torch_load(path)
    for name in containers:
        if isinstance(obj, Mapping) and isinstance(obj.get(name), Mapping):
            obj = obj[name]
            break
    if not isinstance(obj, Mapping) or not obj:
        where = f" (nor under {', '.join(map(repr, containers))})" if containers else ""
        raise InputDataError(
            path, f"expected a non-empty state dict (name -> tensor){where}, found {type(obj).__name__}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise InputDataError(path, f"not a plain state dict; entries that are not tensors: {listing(bad)}")
    return dict(obj)


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A bare state dict file (torchvision's ImageNet files)."""
    return read_state_dict(path)


def load_state_checkpoint(
    path: str | os.PathLike, keys: Sequence[str] = (), map_location: Any = "cpu"
) -> Mapping[str, Any]:
    """Read a checkpoint of state dicts (``model``, ``optimizer``, ``trainer``...); refuse anything else.

    ``keys``: the entries a caller will load; with more than one, each must be present (a best-model
    ``model.pt`` cannot resume training). With one key, a bare state dict (name -> tensor) is accepted too,
    as MONAI's CheckpointLoader does. Every failure is an :class:`InputDataError` naming the file.
    """
    p = Path(path)
    obj = torch_load(p, map_location=map_location)
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise InputDataError(
            p, f"not a checkpoint of state dicts: it holds a {type(obj).__name__}, not a dict keyed by name"
        )
    keys = list(keys)
    if len(keys) == 1 and keys[0] not in obj:
        obj = {keys[0]: obj}
    missing = [k for k in keys if k not in obj]
    if missing:
        raise InputDataError(
            p,
            f"checkpoint has no {', '.join(map(repr, missing))} (it holds {', '.join(map(repr, obj))}); "
            "to resume training use the full training checkpoint (checkpoint_last.pt), not model.pt",
        )
    for k in keys:
        v = obj[k]
        if not isinstance(v, Mapping):
            raise InputDataError(p, f"entry {k!r} is a {type(v).__name__}, not a state dict")
    return obj


# --- checking and adapting state dicts -----------------------------------------------------------------


def listing(keys: Sequence[str]) -> str:
    """Comma-separated key list, cut after MAX_LISTED_KEYS with a count of the rest."""
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    rest = len(keys) - MAX_LISTED_KEYS
    return f"{shown}, ... and {rest} more" if rest > 0 else shown


def check_state_dict(
    sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str | os.PathLike | None, what: str
) -> None:
    """Raise InputDataError naming ``source`` when ``sd`` lacks, adds or misshapes keys of ``expected``."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshapen = [
        f"{k} {list(sd[k].shape)} (expected {list(expected[k].shape)})"
        for k in expected
        if k in sd and sd[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {listing(unexpected)}")
    if misshapen:
        problems.append(f"{len(misshapen)} keys with the wrong shape: {listing(misshapen)}")
    if problems:
        raise InputDataError(source, f"does not match {what}; " + "; ".join(problems))


def stem_weight_for_channels(
    weight: torch.Tensor, in_channels: int, key: str, source: str | os.PathLike | None
) -> torch.Tensor:
    """Adapt a pretrained stem conv weight (out, 3, k, k) to ``in_channels``.

    For one channel the RGB kernels are summed: conv(sum_c W_c, g) == conv(W, [g, g, g]), i.e. exactly
    the network fed the gray image repeated to three channels. Other channel counts have no faithful
    mapping and are refused.
    """
    if weight.ndim != 4 or weight.shape[1] == in_channels:
        return weight  # nothing to adapt (a wrong rank is reported by the shape check)
    if weight.shape[1] == 3 and in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    raise InputDataError(
        source,
        f"{key} has {weight.shape[1]} input channels and the model {in_channels}; only 3 -> 1 "
        "(summing the RGB kernels) can be adapted",
    )


def fill_missing_bn_counters(sd: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Add ``num_batches_tracked`` entries that old checkpoints lack (they are not read in eval)."""
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros_like(v, device="cpu")


@dataclass
class LoadReport:
    """What a pretrained-weights loader did: model keys loaded, checkpoint keys skipped (-> why), model keys
    left at their initialisation, and the files read."""

    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    left_at_init: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line with the three counts and the files."""
        return (
            f"{len(self.loaded)} tensors loaded, {len(self.skipped)} checkpoint entries skipped, "
            f"{len(self.left_at_init)} model tensors left at initialisation (from {', '.join(self.files)})"
        )


# --- manifests and the cache ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsFile:
    """One manifest entry: a published weights file and what it is for."""

    name: str
    file: str
    url: str
    licence: str
    network: str
    description: str = ""
    variants: tuple[str, ...] = ()
    sha256: str | None = None
    sha256_prefix: str | None = None
    size_mib: float | None = None
    manual: str | None = None  # how to get it by hand when there is no direct download

    @property
    def direct(self) -> bool:
        """True when ``url`` serves the file itself (no shared-drive page or archive)."""
        return self.manual is None


@dataclass(frozen=True)
class Manifest:
    """A bundle's weights manifest (``configs/weights.json``)."""

    bundle: str
    files: tuple[WeightsFile, ...]
    path: Path

    def get(self, name: str) -> WeightsFile:
        """The entry called ``name``; a clear error listing the known names otherwise."""
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(f"{self.path}: no weights entry {name!r}; known: {', '.join(f.name for f in self.files)}")

    @property
    def bundle_root(self) -> Path | None:
        """The bundle folder when the manifest sits in its ``configs/``."""
        return self.path.parent.parent if self.path.parent.name == "configs" else None


_ENTRY_FIELDS = {"name", "file", "url", "licence", "network", "description", "variants", "sha256"}
_ENTRY_FIELDS |= {"sha256_prefix", "size_mib", "manual"}


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Parse and check a weights manifest; InputDataError naming the file and the bad entry."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputDataError(p, f"cannot read the weights manifest ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("files"), list) or not data.get("bundle"):
        raise InputDataError(p, "a weights manifest is an object with 'bundle' and a list 'files'")
    files = []
    for i, entry in enumerate(data["files"]):
        where = f"files[{i}]"
        if not isinstance(entry, dict):
            raise InputDataError(p, f"{where} is not an object")
        unknown = set(entry) - _ENTRY_FIELDS
        lacking = {"name", "file", "url", "licence", "network"} - set(entry)
        if unknown or lacking:
            raise InputDataError(p, f"{where}: unknown fields {sorted(unknown)}, missing fields {sorted(lacking)}")
        if not (entry.get("sha256") or entry.get("sha256_prefix") or entry.get("manual")):
            raise InputDataError(p, f"{where} ({entry['name']}): needs sha256 or sha256_prefix to check downloads")
        if Path(entry["file"]).name != entry["file"]:
            raise InputDataError(p, f"{where}: 'file' must be a bare file name, not {entry['file']!r}")
        files.append(WeightsFile(**{**entry, "variants": tuple(entry.get("variants", ()))}))
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise InputDataError(p, f"duplicate entry names in {names}")
    return Manifest(bundle=str(data["bundle"]), files=tuple(files), path=p)


def cache_dir() -> Path:
    """``$HYBRIDSEG_WEIGHTS``, else ``$XDG_CACHE_HOME/hybridseg/weights`` (default ``~/.cache/...``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hybridseg" / "weights"


def weights_dir(directory: str | os.PathLike | None = None) -> Path:
    """``directory`` when given, else :func:`cache_dir`."""
    return Path(directory).expanduser() if directory not in (None, "") else cache_dir()


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pinned_hash_file(path: Path) -> Path:
    """Where the full SHA-256 of a file known only by its hash prefix is kept after a verified download."""
    return path.with_name(path.name + ".sha256")


def verify_file(entry: WeightsFile, path: str | os.PathLike) -> str:
    """Check ``path`` against ``entry`` (size, then SHA-256 or its published prefix, then a hash pinned by an
    earlier verified download); returns the file's SHA-256. InputDataError naming the file otherwise."""
    p = Path(path)
    size = p.stat().st_size
    # torchvision publishes sizes in MiB to 3 decimals: allow the rounding, nothing more
    if entry.size_mib is not None and abs(size / 2**20 - entry.size_mib) > 0.0005 + 1e-9:
        raise InputDataError(p, f"has {size} bytes ({size / 2**20:.3f} MiB); {entry.name} has {entry.size_mib} MiB")
    digest = sha256_of(p)
    pinned = pinned_hash_file(p)
    expected = entry.sha256 or (pinned.read_text().strip() if pinned.is_file() else None)
    if expected and digest != expected.lower():
        raise InputDataError(p, f"SHA-256 {digest} differs from the expected {expected} of {entry.name}")
    if entry.sha256_prefix and not digest.startswith(entry.sha256_prefix.lower()):
        raise InputDataError(
            p, f"SHA-256 {digest} does not start with {entry.sha256_prefix}, the published prefix of {entry.name}"
        )
    return digest


def fetch_command(manifest: Manifest, directory: str | os.PathLike | None = None) -> str:
    """The command that downloads a manifest's files (with ``--dir`` when not the default cache)."""
    cmd = f"python -m hybridseg weights fetch {manifest.bundle}"
    return cmd + (f" --dir {directory}" if directory not in (None, "") else "")


def find_cached(manifest: Manifest, entry: WeightsFile, directory: str | os.PathLike | None = None) -> Path | None:
    """The verified file of ``entry`` in the weights folder (or ``<bundle>/models/pretrained``, where a
    Model Zoo download of ``large_files.yml`` puts it); None when absent. A file that is there but fails
    verification is an error, never silently ignored."""
    places = [weights_dir(directory)]
    if manifest.bundle_root is not None:
        places.append(manifest.bundle_root / "models" / "pretrained")
    for place in places:
        candidate = place / entry.file
        if candidate.is_file():
            try:
                verify_file(entry, candidate)
            except InputDataError as e:
                raise InputDataError(
                    candidate, f"{e.problem}; delete it and run `{fetch_command(manifest, directory)}`"
                ) from e
            return candidate
    return None


def resolve_pretrained(
    manifest: str | os.PathLike | Manifest,
    mode: str,
    wanted: Mapping[str, str | os.PathLike | None],
    directory: str | os.PathLike | None = None,
) -> dict[str, str]:
    """The files a network loader gets, as ``{loader argument: path}``, following ``pretrained`` ``mode``.

    ``wanted`` maps each loader argument to a manifest entry name or to an explicit file path (a user's own
    file, used as given). ``auto``: the cached files; the missing ones are reported in ONE warning naming the
    fetch command, and their part of the network starts from its initialisation. ``required``: a missing file
    is an error naming the fetch command. ``none``: nothing (training from scratch).
    """
    if mode not in PRETRAINED_MODES:
        raise ValueError(f"pretrained must be one of {', '.join(PRETRAINED_MODES)}, got {mode!r}")
    if mode == "none":
        logger.info("pretrained=none: the network starts from its initialisation")
        return {}
    man = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    names = {f.name for f in man.files}
    found: dict[str, str] = {}
    missing: list[WeightsFile] = []
    for arg, value in wanted.items():
        if value in (None, ""):
            continue
        if str(value) not in names:
            if not Path(value).is_file():
                raise InputDataError(value, f"pretrained file for {arg!r} does not exist")
            found[arg] = str(value)
            continue
        entry = man.get(str(value))
        path = find_cached(man, entry, directory)
        if path is None:
            missing.append(entry)
        else:
            found[arg] = str(path)
    if missing:
        where = weights_dir(directory)
        what = ", ".join(f"{e.file} ({e.description or e.name})" for e in missing)
        cmd = fetch_command(man, directory)
        if mode == "required":
            raise InputDataError(where, f"pretrained=required but not in the weights folder: {what}; run `{cmd}`")
        logger.warning(
            "pretrained=auto: %s not in the weights folder %s, so %s from scratch; to start from the papers' "
            "pretrained weights run `%s`",
            what,
            where,
            "the network starts" if not found else "those parts start",
            cmd,
        )
    return found


def entries_for(manifest: Manifest, names: Iterable[str] | None = None) -> list[WeightsFile]:
    """The manifest entries called ``names`` (all when None)."""
    return list(manifest.files) if names is None else [manifest.get(n) for n in names]
