"""BUSI and Dataset B readers, and the seeded stratified BUSI datalist builder.

Layouts read (``data.md``):

* BUSI (``layout="busi"``): ``ROOT/{benign,malignant,normal}/``, images ``benign (1).png`` and masks
  ``benign (1)_mask.png``, ``benign (1)_mask_1.png``, ... (several lesions: the masks are unioned).
* Dataset B (``layout="datasetb"``): ``ROOT/original/*.png`` with ``ROOT/GT/*.png`` of the same name.

Datalist entries have the form::

    {"image": "benign/benign (1).png",
     "label": ["benign/benign (1)_mask.png", "benign/benign (1)_mask_1.png"],
     "class": "benign", "id": "benign (1)"}

``label`` is always a list (every mask of the image, ``_mask`` first, then ``_mask_1``, ``_mask_2``, ...);
whoever loads an entry unions them (:func:`read_busi_mask`). Paths are relative to the dataset root by
default (``monai.data.load_decathlon_datalist(path, base_dir=root)`` resolves them), absolute with
``absolute=True``. Dataset B does not record benign/malignant in its file layout, so its entries have
``"class": "unknown"``.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hybridseg.io import InputDataError, atomic_write_text, ensure_not_input

BUSI_CLASSES = ("benign", "malignant", "normal")
DATASETB_IMAGE_DIR = "original"
DATASETB_MASK_DIR = "GT"
DATASETB_CLASS = "unknown"
DEFAULT_SPLIT = (0.7, 0.1, 0.2)
PARTS = ("training", "validation", "test")

# ITU-R BT.601 luma weights; the documented RGB -> gray conversion of read_busi_image.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

_MASK_RE = re.compile(r"^(?P<id>.+)_mask(?:_(?P<k>\d+))?$")
_GRAY_MODES = {"L", "LA", "RGB", "RGBA", "P", "1"}


def natural_key(text: str) -> tuple:
    """Sort key ordering ``benign (2)`` before ``benign (10)`` (numbers compared as numbers)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t)


_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _load_png(path: Path, formats: tuple[str, ...] = ("PNG",)) -> Image.Image:
    """Open and fully decode a PNG (or another of Pillow's ``formats``), turning every decoder failure
    into an error naming the file."""
    if not path.is_file():
        raise InputDataError(path, "file does not exist")
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.load()  # decode now, so truncated or corrupt files fail here, not later in training
            img = im.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise InputDataError(path, f"unreadable or corrupt image file ({err})") from err
    if fmt not in formats:
        expected = "a PNG file" if formats == ("PNG",) else f"one of the formats {', '.join(formats)}"
        raise InputDataError(path, f"expected {expected}, found format {fmt}")
    if fmt == "PNG":
        with open(path, "rb") as f:
            # Pillow decodes a PNG whose end was cut off after the pixel data; a file without its closing
            # IEND chunk is still a truncated copy, so it is refused rather than trusted
            f.seek(max(0, path.stat().st_size - 12))
            if f.read() != _PNG_IEND:
                raise InputDataError(path, "truncated PNG file (no IEND chunk at the end)")
    if img.mode not in _GRAY_MODES:
        raise InputDataError(
            path, f"unsupported {fmt} mode {img.mode!r}: expected 8-bit gray, gray+alpha, RGB, RGBA or palette"
        )
    if img.width == 0 or img.height == 0:
        raise InputDataError(path, "image has zero size")
    return img


def _to_gray(img: Image.Image) -> np.ndarray:
    """(H, W) uint8 gray: gray kept, alpha dropped, RGB by BT.601 luma rounded to nearest."""
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8) * np.uint8(255)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("L", "LA"):
        return np.asarray(img, dtype=np.uint8)[..., 0] if img.mode == "LA" else np.asarray(img, dtype=np.uint8)
    rgb = np.asarray(img, dtype=np.float64)[..., :3]
    gray = rgb @ np.asarray(LUMA_WEIGHTS)
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def read_busi_image(path: str | os.PathLike, formats: tuple[str, ...] = ("PNG",)) -> np.ndarray:
    """Read one BUSI / Dataset B image as an (H, W) uint8 gray array.

    Gray PNGs are returned as stored; an alpha channel is ignored; RGB(A) and palette images are
    converted with the ITU-R BT.601 luma formula ``round(0.299 R + 0.587 G + 0.114 B)`` (gray images
    stored as RGB, as some BUSI files are, come back unchanged). Raises :class:`InputDataError` naming
    the file when it is missing, unreadable, not a PNG, or not an 8-bit 2D image.
    """
    return _to_gray(_load_png(Path(path), formats))


def _read_one_mask(path: Path) -> np.ndarray:
    gray = _to_gray(_load_png(path))
    values = np.unique(gray)
    if np.isin(values, (0, 255)).all():
        return gray == 255
    if np.isin(values, (0, 1)).all():
        return gray == 1
    shown = ", ".join(str(v) for v in values[:8]) + (", ..." if values.size > 8 else "")
    raise InputDataError(path, f"mask values must be only {{0, 255}} or only {{0, 1}}; found {shown}")


def read_busi_mask(
    paths: str | os.PathLike | Sequence[str | os.PathLike], shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Read one or several masks of one image and return their union as an (H, W) bool array.

    Each mask must be a readable 2D PNG whose gray values are only {0, 255} or only {0, 1}
    (RGB masks are converted to gray first). All masks must have the same height and width,
    and ``shape`` (the image's (H, W)) when given; any violation raises :class:`InputDataError`
    naming the mask file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if len(paths) == 0:
        raise InputDataError(None, "read_busi_mask needs at least one mask path")
    union: np.ndarray | None = None
    for p in paths:
        mask = _read_one_mask(Path(p))
        h, w = mask.shape
        if shape is not None and mask.shape != tuple(shape):
            raise InputDataError(p, f"mask size {h}x{w} (HxW) differs from its image's {shape[0]}x{shape[1]}")
        if union is not None and mask.shape != union.shape:
            raise InputDataError(
                p, f"mask size {h}x{w} (HxW) differs from {union.shape[0]}x{union.shape[1]} of the first mask"
            )
        union = mask if union is None else union | mask
    return union


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) of a fully decoded, validated image."""
    return read_busi_image(path).shape


def _png_files(folder: Path) -> list[Path]:
    """Visible ``*.png`` files of a folder (any case of the extension); other files are ignored."""
    if not folder.is_dir():
        raise InputDataError(folder, "folder is missing")
    files = [p for p in folder.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")]
    if not files:
        raise InputDataError(folder, "folder contains no PNG files")
    return sorted(files, key=lambda p: natural_key(p.name))


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _busi_class_entries(root: Path, cls: str) -> list[dict]:
    folder = root / cls
    if not folder.is_dir():
        hint = ""
        if (root / "Dataset_BUSI_with_GT").is_dir():
            hint = f" (the data seem to be in {root / 'Dataset_BUSI_with_GT'}: pass that folder as the root)"
        raise InputDataError(folder, f"class folder is missing{hint}")
    images: dict[str, Path] = {}
    masks: dict[str, list[tuple[int, Path]]] = {}
    for path in _png_files(folder):
        stem = path.stem
        m = _MASK_RE.match(stem)
        if m:
            k = int(m.group("k")) if m.group("k") is not None else 0
            group = masks.setdefault(m.group("id"), [])
            if any(k == kk for kk, _ in group):
                other = next(pp for kk, pp in group if kk == k)
                raise InputDataError(path, f"duplicate mask: {other.name} is the same mask of the same image")
            group.append((k, path))
        else:
            if stem in images:
                raise InputDataError(path, f"duplicate image id {stem!r} (also {images[stem].name})")
            images[stem] = path
    for mid, group in masks.items():
        if mid not in images:
            raise InputDataError(group[0][1], f"mask without image: no {mid}.png in {folder}")
    entries = []
    for iid, ipath in images.items():
        if iid not in masks:
            raise InputDataError(ipath, f"image without mask: no {iid}_mask.png beside it")
        mpaths = [p for _, p in sorted(masks[iid], key=lambda t: t[0])]
        read_busi_mask(mpaths, shape=_image_size(ipath))
        entries.append({"image": _rel(ipath, root), "label": [_rel(p, root) for p in mpaths], "class": cls, "id": iid})
    return entries


def _datasetb_entries(root: Path) -> list[dict]:
    images: dict[str, Path] = {}
    for path in _png_files(root / DATASETB_IMAGE_DIR):
        if path.stem in images:
            raise InputDataError(path, f"duplicate image id {path.stem!r} (also {images[path.stem].name})")
        images[path.stem] = path
    masks: dict[str, Path] = {}
    for path in _png_files(root / DATASETB_MASK_DIR):
        if path.stem in masks:
            raise InputDataError(path, f"duplicate mask id {path.stem!r} (also {masks[path.stem].name})")
        if path.stem not in images:
            raise InputDataError(path, f"mask without image: no {path.stem}.png in {root / DATASETB_IMAGE_DIR}")
        masks[path.stem] = path
    entries = []
    for iid, ipath in images.items():
        if iid not in masks:
            raise InputDataError(ipath, f"image without mask: no {iid}.png in {root / DATASETB_MASK_DIR}")
        read_busi_mask([masks[iid]], shape=_image_size(ipath))
        entries.append(
            {"image": _rel(ipath, root), "label": [_rel(masks[iid], root)], "class": DATASETB_CLASS, "id": iid}
        )
    return entries


def _as_str_tuple(value: str | Sequence[str]) -> tuple[str, ...]:
    """Accept ``"benign,malignant"``, ``"benign malignant"`` or a sequence (fire passes any of them)."""
    if isinstance(value, str):
        return tuple(v for v in re.split(r"[,\s]+", value) if v)
    return tuple(str(v) for v in value)


def busi_entries(
    root: str | os.PathLike, classes: str | Sequence[str] = ("benign", "malignant"), layout: str = "busi"
) -> list[dict]:
    """Find, pair and validate every image of a BUSI or Dataset B copy; entries with root-relative paths.

    Every image and mask is decoded and checked (readable PNG, 2D, mask HxW equal to the image's,
    mask values {0, 255} or {0, 1}); image without mask, mask without image, duplicate ids and
    missing or empty folders are errors naming the file or folder. Files other than ``*.png`` and hidden
    files are ignored. Entries are in natural name order.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputDataError(root, "dataset root folder is missing")
    if layout == "busi":
        classes = _as_str_tuple(classes)
        if not classes:
            raise ValueError("classes must name at least one BUSI class")
        unknown = [c for c in classes if c not in BUSI_CLASSES]
        if unknown:
            raise ValueError(f"unknown BUSI classes {unknown}; choose from {list(BUSI_CLASSES)}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes listed twice: {list(classes)}")
        entries = [e for cls in classes for e in _busi_class_entries(root, cls)]
    elif layout == "datasetb":
        entries = _datasetb_entries(root)
    else:
        raise ValueError(f"unknown layout {layout!r}: expected 'busi' or 'datasetb'")
    seen: dict[str, str] = {}
    for e in entries:
        if e["id"] in seen:
            raise InputDataError(root / e["image"], f"duplicate image id {e['id']!r} (also {seen[e['id']]})")
        seen[e["id"]] = e["image"]
    return entries


def _check_split(split: Sequence[float]) -> tuple[float, float, float]:
    if isinstance(split, str):
        split = [float(v) for v in re.split(r"[,\s]+", split) if v]
    split = tuple(float(v) for v in split)
    if len(split) != 3 or any(v < 0 for v in split) or abs(sum(split) - 1.0) > 1e-6:
        raise ValueError(f"split must be three non-negative fractions (train, val, test) summing to 1, got {split}")
    return split


def split_counts(n: int, split: Sequence[float]) -> tuple[int, int, int]:
    """How many of ``n`` items go to (train, val, test).

    Largest-remainder rounding of ``n * split`` (ties to the earlier part); then, so that tiny data
    sets still have every requested part, a part with a non-zero fraction that got nothing takes one
    item from the largest part when ``n`` is at least the number of non-zero parts.
    """
    split = _check_split(split)
    raw = [n * f for f in split]
    counts = [int(np.floor(r)) for r in raw]
    order = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    wanted = [i for i in range(3) if split[i] > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                donor = max(range(3), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return counts[0], counts[1], counts[2]


def stratified_split(entries: list[dict], split: Sequence[float], seed: int) -> dict[str, list[dict]]:
    """Split entries per class into training/validation/test with :func:`split_counts`.

    Each class is shuffled by its own generator seeded with ``(seed, crc32(class name))``, so adding
    or removing another class (e.g. ``normal``) leaves a class's split unchanged. Within each part,
    entries keep the input (natural name) order.
    """
    parts: dict[str, list[dict]] = {p: [] for p in PARTS}
    by_class: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        by_class.setdefault(e["class"], []).append(i)
    assignment: dict[int, str] = {}
    for cls, idx in by_class.items():
        rng = np.random.default_rng([int(seed), zlib.crc32(cls.encode("utf-8"))])
        perm = [idx[j] for j in rng.permutation(len(idx))]
        n_train, n_val, _ = split_counts(len(idx), split)
        for k, i in enumerate(perm):
            assignment[i] = PARTS[0] if k < n_train else PARTS[1] if k < n_train + n_val else PARTS[2]
    for i, e in enumerate(entries):
        parts[assignment[i]].append(e)
    return parts


def _absolutise(entry: dict, root: Path) -> dict:
    out = dict(entry)
    out["image"] = (root / entry["image"]).as_posix()
    out["label"] = [(root / p).as_posix() for p in entry["label"]]
    return out


def build_busi_datalist(
    root: str | os.PathLike,
    classes: str | Sequence[str] = ("benign", "malignant"),
    seed: int = 0,
    split: Sequence[float] | None = None,
    absolute: bool = False,
    layout: str = "busi",
) -> dict:
    """The datalist dictionary :func:`datalist_busi` writes (see there), without writing it."""
    if split is None:
        split = DEFAULT_SPLIT if layout == "busi" else (0.0, 0.0, 1.0)
    split = _check_split(split)
    entries = busi_entries(root, classes, layout)
    parts = stratified_split(entries, split, seed)
    if absolute:
        abs_root = Path(root).resolve()
        parts = {k: [_absolutise(e, abs_root) for e in v] for k, v in parts.items()}
    used_classes = list(_as_str_tuple(classes)) if layout == "busi" else [DATASETB_CLASS]
    name = "BUSI" if layout == "busi" else "Dataset B"
    counts = ", ".join(f"{k} {len(v)}" for k, v in parts.items())
    return {
        "description": (
            f"{name} datalist ({'+'.join(used_classes)}): seeded stratified split (seed {seed}, fractions "
            f"{'/'.join(f'{f:g}' for f in split)} per class): {counts}. 'label' lists every mask of an "
            f"image; load them as their union. Paths are {'absolute' if absolute else 'relative to root'}."
        ),
        "root": str(root),
        "paths": "absolute" if absolute else "relative",
        "layout": layout,
        "classes": used_classes,
        "seed": int(seed),
        "split": list(split),
        **parts,
    }


def datalist_busi(
    root: str,
    out: str,
    classes: str | Sequence[str] = ("benign", "malignant"),
    seed: int = 0,
    split: Sequence[float] | None = None,
    absolute: bool = False,
    layout: str = "busi",
) -> str:
    """Write a BUSI (or Dataset B) datalist JSON with a seeded, per-class stratified split.

    Args:
        root: dataset root. For ``layout="busi"`` the folder holding ``benign/``, ``malignant/``,
            ``normal/`` (``Dataset_BUSI_with_GT``); for ``layout="datasetb"`` the folder holding
            ``original/`` and ``GT/``.
        out: the JSON file to write (atomically; never over an input file).
        classes: BUSI classes to include; default benign + malignant (the 647-image protocol),
            add ``normal`` (empty masks) explicitly. Ignored for Dataset B.
        seed: seed of the split; the same seed and files give the same split.
        split: train/validation/test fractions, per class (default 0.7 0.1 0.2 for BUSI; for Dataset B,
            a test-only set, the default puts everything in ``test``).
        absolute: write absolute paths instead of paths relative to ``root``.
        layout: ``busi`` or ``datasetb``.

    Returns:
        The path of the written JSON. Every image and mask is validated first; nothing is written when
        any check fails (the error names the file and the problem).
    """
    out_path = Path(out)
    if out_path.is_dir():
        raise InputDataError(out_path, "--out is a folder; give the path of the JSON file to write")
    datalist = build_busi_datalist(root, classes, seed, split, absolute, layout)
    inputs = [Path(root) / p for part in PARTS for e in datalist[part] for p in [e["image"], *e["label"]]]
    ensure_not_input(out_path, inputs)
    atomic_write_text(out_path, json.dumps(datalist, indent=4) + "\n")
    return str(out_path)
