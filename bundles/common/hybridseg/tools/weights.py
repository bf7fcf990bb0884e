"""``python -m hybridseg weights fetch|list <bundle>``: download and check the pretrained files a bundle's
weights manifest (``configs/weights.json``) lists, into the weights folder shared by both bundles.

Downloads go to ``<file>.part`` beside their destination with a tqdm progress bar; an interrupted download
resumes with an HTTP Range request; the file is moved into place (atomic rename) only after its size and
SHA-256 are verified, and a file failing the check is deleted, so nothing wrong is ever cached. A file known
only by its published hash prefix (torchvision) gets its full SHA-256 pinned in ``<file>.sha256`` on that
first verified download. Files with no direct download (shared-drive archives) are explained, and checked
once the user has placed them.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from hybridseg.io import InputDataError, atomic_write_text
from hybridseg.weights import (
    Manifest,
    WeightsFile,
    entries_for,
    pinned_hash_file,
    read_manifest,
    read_state_dict,
    verify_file,
    weights_dir,
)

CHUNK = 1 << 20
USER_AGENT = "hybridseg-weights/1 (+urllib)"


def manifest_of(bundle: str, manifest: str | os.PathLike | None = None) -> Manifest:
    """The manifest given, else ``<bundle>/configs/weights.json`` (``bundle``: a folder or a bundle name)."""
    if manifest is not None:
        return read_manifest(manifest)
    from hybridseg.bundle import bundle_root

    root = Path(bundle) if Path(bundle).is_dir() else Path(bundle_root(bundle))
    return read_manifest(root / "configs" / "weights.json")


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)  # noqa: S310


def download(url: str, part: Path, timeout: float = 60.0, desc: str | None = None) -> None:
    """Download ``url`` into ``part``, continuing a partial ``part`` with a Range request (a server that
    ignores it sends the whole file, which then replaces the partial one). An interrupted transfer keeps
    what arrived and raises, so the next call resumes."""
    from tqdm import tqdm

    start = part.stat().st_size if part.is_file() else 0
    try:
        resp = _open(url, start, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # nothing left to send: the partial file is complete
            return
        raise InputDataError(url, f"download failed: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise InputDataError(url, f"download failed: {getattr(e, 'reason', e)}") from e
    with resp:
        resumed = start > 0 and resp.status == 206
        if start and not resumed:
            start = 0
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        written = start
        with (
            open(part, "ab" if resumed else "wb") as f,
            tqdm(
                total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False
            ) as bar,
        ):
            try:
                while block := resp.read(CHUNK):
                    f.write(block)
                    written += len(block)
                    bar.update(len(block))
            except (OSError, ValueError) as e:  # http.client.IncompleteRead, reset connections, timeouts
                raise InputDataError(
                    url,
                    f"download interrupted after {written} bytes ({e.__class__.__name__}); run fetch again to resume",
                ) from e
    if total is not None and written < total:
        raise InputDataError(url, f"download interrupted after {written} of {total} bytes; run fetch again to resume")


def _pin(entry: WeightsFile, path: Path, digest: str) -> None:
    if entry.sha256 is None:
        atomic_write_text(pinned_hash_file(path), digest + "\n")


def _check_placed(entry: WeightsFile, path: Path) -> str:
    """A file the user placed by hand: the manifest's checks, and it must load as a weights-only state dict."""
    digest = verify_file(entry, path)
    n = len(read_state_dict(path, ("model", "state_dict")))
    _pin(entry, path, digest)
    return f"{entry.file}: checked ({n} tensors, SHA-256 {digest})"


def fetch_one(entry: WeightsFile, directory: Path, timeout: float = 60.0) -> tuple[Path | None, str]:
    """Bring one manifest entry into ``directory``: (path or None when still missing, what happened)."""
    final = directory / entry.file
    if final.is_file():
        if not entry.direct:
            return final, _check_placed(entry, final)
        try:
            digest = verify_file(entry, final)
        except InputDataError as e:
            final.unlink()
            pinned_hash_file(final).unlink(missing_ok=True)
            print(f"{final}: {e.problem}; downloading it again")
        else:
            return final, f"{entry.file}: already cached and verified (SHA-256 {digest})"
    if not entry.direct:
        return None, (
            f"{entry.file}: no direct download ({entry.description or entry.name}). {entry.manual} "
            f"Source: {entry.url} . Place it as {final} and run fetch again to check it."
        )
    directory.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    download(entry.url, part, timeout=timeout, desc=entry.file)
    try:
        digest = verify_file(entry, part)
    except InputDataError as e:
        part.unlink(missing_ok=True)
        raise InputDataError(final, f"downloaded file rejected, nothing was cached: {e.problem}") from e
    _pin(entry, final, digest)
    os.replace(part, final)
    return final, f"{entry.file}: downloaded and verified (SHA-256 {digest})"


def fetch(
    bundle: str,
    dir: str | None = None,  # noqa: A002 - the issue's flag name (--dir)
    only: str | list[str] | None = None,
    manifest: str | None = None,
    timeout: float = 60.0,
) -> dict[str, str]:
    """Download (or check) the files of ``bundle``'s weights manifest into ``--dir`` (default: the shared
    cache, ``$HYBRIDSEG_WEIGHTS``); ``--only NAME`` for some entries. Returns ``{name: path}``; raises
    listing the files still missing (those with no direct download, after saying how to get them)."""
    man = manifest_of(bundle, manifest)
    directory = weights_dir(dir)
    names = [only] if isinstance(only, str) else only
    fetched: dict[str, str] = {}
    missing = []
    for entry in entries_for(man, names):
        path, note = fetch_one(entry, directory, timeout=timeout)
        print(note)
        if path is None:
            missing.append(entry.file)
        else:
            fetched[entry.name] = str(path)
    if missing:
        raise InputDataError(directory, f"still missing: {', '.join(missing)} (see above how to get them)")
    print(f"weights folder: {directory}")
    return fetched


def list_weights(
    bundle: str, dir: str | None = None, manifest: str | None = None  # noqa: A002 - the issue's flag name
) -> list[dict[str, str]]:
    """Say which files of ``bundle``'s weights manifest are in the weights folder and which are missing."""
    man = manifest_of(bundle, manifest)
    directory = weights_dir(dir)
    rows = []
    for e in man.files:
        path = directory / e.file
        if path.is_file():
            pinned = e.sha256 is not None or pinned_hash_file(path).is_file()
            status = f"cached ({path.stat().st_size / 2**20:.1f} MiB{'' if pinned else ', hash not yet pinned'})"
        elif path.with_name(path.name + ".part").is_file():
            status = "partial download (fetch resumes it)"
        else:
            status = "missing" + ("" if e.direct else " (manual download)")
        rows.append({"name": e.name, "file": e.file, "for": e.description or e.network, "status": status})
    width = shutil.get_terminal_size((120, 20)).columns
    print(f"weights folder: {directory}  (bundle {man.bundle}, manifest {man.path})")
    for r in rows:
        print(f"  {r['status']:<40} {r['file']:<36} {r['for']}"[:width])
    if any(r["status"].startswith("missing") for r in rows):
        print(f"get the missing files with: python -m hybridseg weights fetch {man.bundle}")
    return rows
