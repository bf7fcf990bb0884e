"""Helpers the bundle configs call: bundle location, device and rank, inference inputs, log files, weights."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from hybridseg.image_io import output_stem, read_2d, read_volume
from hybridseg.io import InputDataError


def bundle_root(name: str) -> str:
    """Absolute path of bundle ``name``, whatever the working directory.

    MONAI's runner does not tell a config where its own file is, and the zoo default ``"."`` breaks when a
    command runs from the repository root. Order: the working directory if it is that bundle; the bundle
    folder beside this package in the repository (``bundles/<name>``); a packaged bundle that carries this
    package inside it (``<bundle>/scripts/hybridseg``).
    """
    cwd = Path.cwd()
    if _is_bundle(cwd, name):
        return str(cwd)
    here = Path(__file__).resolve().parent
    if _is_bundle(here.parents[1] / name, name):
        return str(here.parents[1] / name)
    if here.parent.name == "scripts" and (here.parents[1] / "configs" / "metadata.json").is_file():
        return str(here.parents[1])  # the packaged bundle this copy was vendored into, whatever its folder name
    for candidate in (cwd / "bundles" / name, cwd / name):
        if _is_bundle(candidate, name):
            return str(candidate.resolve())
    raise FileNotFoundError(
        f"cannot find bundle {name!r} from {cwd}; run from the repository root or the bundle folder, "
        "or pass --bundle_root"
    )


def _is_bundle(path: Path, name: str) -> bool:
    """A bundle folder named ``name`` (the bundle id; metadata ``name`` is a display name, as in the zoo)."""
    return path.name == name and (path / "configs" / "metadata.json").is_file()


def default_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when a GPU is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a ``torch.distributed`` job (the rank that logs and writes)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def collect_inputs(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    suffixes: Sequence[str],
    output_dir: str | os.PathLike | None = None,
    check: str | None = None,
    series_dirs: bool = False,
    allow_output_in_input_dir: bool = False,
) -> list[dict[str, str]]:
    """Turn a folder, a file or a list of files into ``[{"image": path}, ...]`` for inference.

    Fails before anything is written: on a missing path, an empty folder, a file with an unsupported
    suffix, an output folder equal to an input folder (outputs never land next to inputs), or, with
    ``check="2d"`` / ``"3d"``, any file that cannot be read completely as a 2D image / 3D volume.
    With ``series_dirs``, a folder holding ``.dcm`` files is one DICOM series, and so is each such
    sub-folder of a given folder. ``allow_output_in_input_dir`` lets outputs go into an input folder when a
    user asks for it (outputs have their own suffixes and never replace an input file).
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise InputDataError(None, "no input images given")
    suffixes = tuple(s.lower() for s in suffixes)
    files: list[Path] = []

    def is_series(folder: Path) -> bool:
        return series_dirs and any(f.suffix.lower() == ".dcm" for f in folder.iterdir() if f.is_file())

    for item in items:
        p = Path(item)
        if p.is_dir() and is_series(p):
            files.append(p)
        elif p.is_dir():
            found = sorted(
                f
                for f in p.iterdir()
                if (f.is_file() and f.name.lower().endswith(suffixes)) or (f.is_dir() and is_series(f))
            )
            if not found:
                raise InputDataError(p, f"folder contains no input images ({', '.join(suffixes)})")
            files.extend(found)
            if not allow_output_in_input_dir and output_dir is not None and Path(output_dir).resolve() == p.resolve():
                raise InputDataError(output_dir, "the output folder is an input folder; choose another")
        elif p.is_file():
            if not p.name.lower().endswith(suffixes):
                raise InputDataError(p, f"unsupported file type (expected one of {', '.join(suffixes)})")
            files.append(p)
        else:
            raise InputDataError(p, "no such file or folder")
    names = {}
    for f in files:
        stem = output_stem(f)
        if stem in names:
            raise InputDataError(f, f"has the same output name as {names[stem]}; outputs would collide")
        names[stem] = f
    if check is not None:
        reader = {"2d": read_2d, "3d": read_volume}[check]
        for f in files:
            reader(f)
    return [{"image": str(f)} for f in files]


_FILE_HANDLERS: list = []


def log_to_file(path: str | os.PathLike, level: str = "INFO") -> str:
    """Also write the root logger (MONAI's StatsHandler, ignite, ours) to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    handler.setLevel(level)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.getLevelName(level) or root.level == logging.NOTSET:
        root.setLevel(level)
    _FILE_HANDLERS.append(handler)
    return str(path)


def close_log_files() -> None:
    """Detach and close the handlers added by :func:`log_to_file` (workflows may share a process)."""
    root = logging.getLogger()
    while _FILE_HANDLERS:
        h = _FILE_HANDLERS.pop()
        root.removeHandler(h)
        h.close()


def with_weights(model: torch.nn.Module, loader, **paths) -> torch.nn.Module:
    """Call ``loader(model, **paths)`` with the paths that are set (a network's weight loader, e.g. ImageNet
    backbones), log its report (loaded / skipped / left at initialisation), and return ``model``; with no
    path set the model is returned untouched."""
    given = {k: v for k, v in paths.items() if v not in (None, "", False)}
    if given:
        report = loader(model, **given)
        text = report.summary() if hasattr(report, "summary") else str(report)
        logging.getLogger("hybridseg").info("pretrained weights (%s): %s", loader.__name__, text)
    return model


def select_network(builders: dict, name: str) -> torch.nn.Module:
    """Build network ``name`` from ``builders`` (name -> callable, the configs' ``network_defs`` written with
    ``"_mode_": "callable"`` so that only the chosen network is constructed)."""
    if name not in builders:
        raise ValueError(f"network_name {name!r} is not one of: {', '.join(sorted(builders))}")
    return builders[name]()
