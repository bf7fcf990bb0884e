"""File helpers shared by every reader and writer: clear input errors and atomic outputs."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
