"""File helpers shared by every reader and writer: clear input errors and atomic outputs."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


class InputDataError(ValueError):
    """Bad input data: the message always names the offending file (or folder) and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        super().__init__(path, problem)  # both arguments, so pickling (worker processes) rebuilds it
        self.path = None if path is None else str(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}" if self.path is not None else self.problem


def shape_str(shape: list[int]) -> str:
    """``(1, 3, 64, 64)``: a tensor shape for error messages, alike in eager and TorchScript code."""
    return "(" + ", ".join([str(d) for d in shape]) + ")"


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is renamed onto ``dest`` (atomic on POSIX).

    On any exception the temporary file is removed and ``dest`` is left as it was, so a crash
    never leaves a half-written output behind.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(dest: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``dest`` atomically (UTF-8)."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def ensure_not_input(dest: str | os.PathLike, inputs: list[str | os.PathLike]) -> None:
    """Refuse to write ``dest`` if it is one of the ``inputs`` (never overwrite a user's data)."""
    d = Path(dest).resolve()
    for p in inputs:
        if Path(p).resolve() == d:
            raise InputDataError(dest, "refusing to overwrite an input file with an output")


def load_state_checkpoint(
    path: str | os.PathLike, keys: Sequence[str] = (), map_location: Any = "cpu"
) -> Mapping[str, Any]:
    """Read a checkpoint of state dicts with ``torch.load(weights_only=True)``; refuse anything else.

    ``keys``: the entries a caller will load (e.g. ``model``, ``optimizer``, ``trainer``); with more than
    one, each must be present (a best-model ``model.pt`` cannot resume training). With one key, a bare
    state dict (name -> tensor) is accepted too, as MONAI's CheckpointLoader does. Every failure is an
    :class:`InputDataError` naming the file and saying what is wrong.
    """
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise InputDataError(p, "no such checkpoint file")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses pickled classes/functions: running their code on load is a security hole
        raise InputDataError(
            p,
            "not a checkpoint of state dicts: it holds pickled Python objects (for example a whole model "
            "saved with torch.save(model)), which are not loaded because unpickling can run arbitrary code; "
            f"save model.state_dict() instead ({str(e).splitlines()[0]})",
        ) from e
    except Exception as e:  # torch raises RuntimeError/EOFError/... for truncated or corrupt archives
        raise InputDataError(p, f"unreadable or truncated checkpoint ({e.__class__.__name__}: {e})") from e
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
