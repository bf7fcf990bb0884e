"""Synapse (BTCV) multi-organ CT: label schemes, the named 13 -> 8 organ mapping, readers, datalists.

Label schemes (``LABEL_SCHEMES``):

* ``btcv13``: BTCV's ids 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver,
  7 stomach, 8 aorta, 9 inferior vena cava, 10 portal & splenic vein, 11 pancreas, 12 right adrenal
  gland, 13 left adrenal gland (0 background).
* ``transunet_8organ``: the 8-organ Synapse benchmark in TransUNet's preprocessed order 1 aorta,
  2 gallbladder, 3 left kidney, 4 right kidney, 5 liver, 6 pancreas, 7 spleen, 8 stomach.

A :class:`LabelMapping` maps a source scheme to a target scheme; its ``name`` is the target scheme and
``source`` the scheme labels are stored in on disk. ``ORGAN_MAPPINGS["transunet_8organ"]`` is the
benchmark's BTCV 8->1, 4->2, 3->3, 2->4, 6->5, 11->6, 1->7, 7->8 (the other 5 organs become background).
Some repositories dispute that order, which is why it is explicit, named configuration written into
every datalist (and why reports should name the organs, not just the ids).

BTCV layout read by :func:`datalist_synapse`: ``ROOT/RawData/Training/{img,label}`` or ``ROOT/{img,label}``,
files ``img0001.nii.gz`` / ``label0001.nii.gz`` (``.nii`` too). Labels stay in the 13-id scheme on disk;
the bundle applies the mapping named in the datalist (:func:`apply_label_mapping`).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from hybridseg.io import InputDataError, atomic_path, atomic_write_text, ensure_not_input

if TYPE_CHECKING:  # torch is optional here; imported only for the annotation
    import torch

LABEL_SCHEMES: dict[str, dict[int, str]] = {
    "btcv13": {
        0: "background",
        1: "spleen",
        2: "right kidney",
        3: "left kidney",
        4: "gallbladder",
        5: "esophagus",
        6: "liver",
        7: "stomach",
        8: "aorta",
        9: "inferior vena cava",
        10: "portal and splenic vein",
        11: "pancreas",
        12: "right adrenal gland",
        13: "left adrenal gland",
    },
    "transunet_8organ": {
        0: "background",
        1: "aorta",
        2: "gallbladder",
        3: "left kidney",
        4: "right kidney",
        5: "liver",
        6: "pancreas",
        7: "spleen",
        8: "stomach",
    },
}

# The 12 test cases of the TransUNet protocol (lists/lists_Synapse/test_vol.txt).
STANDARD_TEST_CASES = ("0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032", "0035", "0036", "0038")
# Intensity window of the benchmark (HU), applied by the bundle unless the datalist says "windowed".
HU_WINDOW = (-125, 275)


@dataclass(frozen=True)
class LabelMapping:
    """Map label ids of the ``source`` scheme to the target scheme ``name``; unlisted source ids -> 0."""

    name: str
    source: str
    map: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for scheme in (self.name, self.source):
            if scheme not in LABEL_SCHEMES:
                raise ValueError(f"unknown label scheme {scheme!r}; known: {sorted(LABEL_SCHEMES)}")
        for s, t in self.map.items():
            if int(s) not in LABEL_SCHEMES[self.source] or int(s) == 0:
                raise ValueError(f"mapping {self.name!r}: source id {s} is not an organ of {self.source!r}")
            if int(t) not in LABEL_SCHEMES[self.name] or int(t) == 0:
                raise ValueError(f"mapping {self.name!r}: target id {t} is not an organ of {self.name!r}")

    @property
    def labels(self) -> dict[int, str]:
        """Target ids and organ names, background included."""
        return dict(LABEL_SCHEMES[self.name])

    @property
    def source_ids(self) -> tuple[int, ...]:
        """Every id of the source scheme, background included."""
        return tuple(sorted(LABEL_SCHEMES[self.source]))

    @property
    def target_ids(self) -> tuple[int, ...]:
        """The target id of each of :attr:`source_ids` (0 for the organs the mapping leaves out)."""
        return tuple(int(self.map.get(i, 0)) for i in self.source_ids)

    def to_json(self) -> dict:
        """The ``label_mapping`` block of a datalist (JSON keys are strings)."""
        return {"name": self.name, "source": self.source, "map": {str(k): int(v) for k, v in self.map.items()}}

    @classmethod
    def from_json(cls, block: Mapping) -> LabelMapping:
        """Rebuild a mapping from a datalist's ``label_mapping`` block (validated)."""
        try:
            return cls(block["name"], block["source"], {int(k): int(v) for k, v in block["map"].items()})
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"label_mapping needs 'name', 'source' and 'map': got {block!r}") from err


def identity_mapping(scheme: str) -> LabelMapping:
    """The mapping that keeps every organ id of ``scheme``."""
    return LabelMapping(scheme, scheme, {i: i for i in LABEL_SCHEMES[scheme] if i != 0})


ORGAN_MAPPINGS: dict[str, LabelMapping] = {
    "transunet_8organ": LabelMapping("transunet_8organ", "btcv13", {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}),
    "btcv13": identity_mapping("btcv13"),
}


def get_label_mapping(mapping: str | LabelMapping | Mapping) -> LabelMapping:
    """A :class:`LabelMapping` from its registry name, a datalist ``label_mapping`` block, or itself.

    When loading a datalist, pass its whole ``label_mapping`` block, not just the name: the name says
    which labels come out (``transunet_8organ``), the block's ``source`` and ``map`` say how to get
    there, and those differ between raw BTCV (``btcv13`` source) and converted TransUNet data (identity).
    """
    if isinstance(mapping, LabelMapping):
        return mapping
    if isinstance(mapping, str):
        if mapping not in ORGAN_MAPPINGS:
            raise ValueError(f"unknown label mapping {mapping!r}; known: {sorted(ORGAN_MAPPINGS)}")
        return ORGAN_MAPPINGS[mapping]
    return LabelMapping.from_json(mapping)


def apply_label_mapping(
    labels: np.ndarray | torch.Tensor, mapping: str | LabelMapping | Mapping, path: str | os.PathLike | None = None
) -> np.ndarray | torch.Tensor:
    """Map a label array (numpy, or a torch tensor) from the mapping's source scheme to its target scheme.

    Returns uint8 numpy for numpy input; a tensor of the input's dtype and device for torch input.
    Raises :class:`InputDataError` (naming ``path`` when given) if ``labels`` holds ids outside the
    source scheme or non-integer values, because silently mapping them to background would hide a wrong
    data set or a wrong mapping. The mapping itself is MONAI's ``MapLabelValue``.
    """
    from monai.transforms import MapLabelValue  # MONAI imports torch, which this module leaves optional

    m = get_label_mapping(mapping)
    torch_mod = sys.modules.get("torch")  # only loaded if the caller uses torch; never imported here
    if torch_mod is not None and isinstance(labels, torch_mod.Tensor):
        check_label_ids(torch_mod.unique(labels).detach().cpu().numpy(), m.source_ids, m.source, path)
        return MapLabelValue(m.source_ids, m.target_ids, dtype=labels.dtype)(labels)
    arr = np.asarray(labels)
    check_label_ids(np.unique(arr), m.source_ids, m.source, path)
    return MapLabelValue(m.source_ids, m.target_ids, dtype=np.uint8)(arr)


def check_label_ids(
    values: np.ndarray, ids: Sequence[int], scheme: str | None = None, path: str | os.PathLike | None = None
) -> None:
    """Refuse label ``values`` that are not whole numbers or not among ``ids``; the error names ``path``.

    MONAI's ``MapLabelValue`` leaves unknown ids as they are, which would hide a wrong data set or mapping.
    """
    values = np.asarray(values)
    if values.size and not np.all(np.equal(np.mod(values, 1), 0)):
        raise InputDataError(path, f"label values must be integers; found e.g. {values[np.mod(values, 1) != 0][:3]}")
    allowed = {int(i) for i in ids}
    bad = sorted(int(v) for v in values if int(v) not in allowed)
    if bad:
        what = f"the {scheme!r} scheme" if scheme else "the expected ids"
        raise InputDataError(path, f"unexpected label ids {bad} for {what} (ids {min(allowed)}..{max(allowed)})")


def write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, compresslevel: int = 6) -> None:
    """Write a NIfTI-1 file atomically and byte-for-byte deterministically.

    The array is stored with its own dtype and no intensity scaling (values are exact); qform and sform
    both hold ``affine`` (code 1, mm). For ``.gz`` the gzip header's timestamp is fixed at 0, so the
    same array and affine always give the same bytes (nibabel's own writer stamps the current time).
    """
    path = Path(path)
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(np.asarray(data).dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    raw = img.to_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=compresslevel, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)


def load_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI volume: (data as stored, affine). Errors name the file (missing, corrupt, not 3D)."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "file does not exist")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib/gzip errors, ...)
        raise InputDataError(path, f"unreadable or corrupt NIfTI file ({type(err).__name__}: {err})") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputDataError(path, f"expected a 3D volume, found shape {data.shape}")
    return data, np.asarray(img.affine)


_CASE_RE = {"img": re.compile(r"^img(\d+)\.nii(\.gz)?$"), "label": re.compile(r"^label(\d+)\.nii(\.gz)?$")}


def btcv_folders(root: str | os.PathLike) -> tuple[Path, Path]:
    """The ``img`` and ``label`` folders of a BTCV copy: under ``RawData/Training`` or directly in root."""
    root = Path(root)
    if not root.is_dir():
        raise InputDataError(root, "dataset root folder is missing")
    for base in (root / "RawData" / "Training", root):
        if (base / "img").is_dir() or (base / "label").is_dir():
            for sub in ("img", "label"):
                if not (base / sub).is_dir():
                    raise InputDataError(base / sub, "folder is missing")
            return base / "img", base / "label"
    raise InputDataError(root, "no img/ and label/ folders here or under RawData/Training")


def _cases(folder: Path, kind: str) -> dict[str, Path]:
    found: dict[int, Path] = {}
    for p in sorted(folder.iterdir()):
        m = _CASE_RE[kind].match(p.name)
        if not m:
            continue
        cid = int(m.group(1))
        if cid in found:
            raise InputDataError(p, f"duplicate case id {cid:04d} (also {found[cid].name})")
        found[cid] = p
    if not found:
        raise InputDataError(folder, f"folder contains no {kind}NNNN.nii(.gz) files")
    # Keep the digits as written (BTCV uses 4), but compare ids as numbers.
    return {_CASE_RE[kind].match(p.name).group(1): p for _, p in sorted(found.items())}


def validate_btcv_pair(image: Path, label: Path, scheme: str = "btcv13", affine_atol: float = 1e-3) -> tuple[int, ...]:
    """Check one image/label pair (readable, 3D, same shape and affine, label ids in ``scheme``,
    image not already windowed to [0, 1]); returns the shape."""
    img, img_aff = load_volume(image)
    lab, lab_aff = load_volume(label)
    if img.shape != lab.shape:
        raise InputDataError(label, f"label shape {lab.shape} differs from its image's {img.shape} ({image.name})")
    if not np.allclose(img_aff, lab_aff, atol=affine_atol, rtol=0):
        raise InputDataError(
            label,
            f"label affine differs from its image's ({image.name}) by more than {affine_atol}:\n"
            f"{np.array2string(lab_aff, precision=4)}\nvs\n{np.array2string(img_aff, precision=4)}",
        )
    if np.issubdtype(img.dtype, np.floating) and not np.isfinite(img).all():
        raise InputDataError(image, "volume contains NaN or infinite values")
    if img.size and float(img.min()) >= 0.0 and float(img.max()) <= 1.0:
        raise InputDataError(
            image,
            "intensities lie in [0, 1]: this looks already windowed (e.g. TransUNet's release), not HU; "
            "use convert_transunet and its datalist for such data",
        )
    check_label_ids(np.unique(lab), tuple(LABEL_SCHEMES[scheme]), scheme, label)
    return img.shape


def btcv_pairs(root: str | os.PathLike) -> dict[str, tuple[Path, Path]]:
    """Find and validate every BTCV image/label pair: ``{case: (image, label)}`` in case order."""
    img_dir, lab_dir = btcv_folders(root)
    images, labels = _cases(img_dir, "img"), _cases(lab_dir, "label")
    by_num_img = {int(c): c for c in images}
    by_num_lab = {int(c): c for c in labels}
    for num, c in by_num_lab.items():
        if num not in by_num_img:
            raise InputDataError(labels[c], f"label without image: no img{c}.nii.gz in {img_dir}")
    pairs = {}
    for num, c in by_num_img.items():
        if num not in by_num_lab:
            raise InputDataError(images[c], f"image without label: no label{c}.nii.gz in {lab_dir}")
        validate_btcv_pair(images[c], labels[by_num_lab[num]])
        pairs[c] = (images[c], labels[by_num_lab[num]])
    return pairs


def split_cases(
    cases: Sequence[str],
    seed: int = 0,
    num_val: int = 4,
    test_cases: Sequence[str] | None = None,
    test_fraction: float = 0.4,
) -> dict[str, list[str]]:
    """Training / validation / test case ids.

    Test: ``test_cases`` when given; else the 12 standard test cases when all of them exist; else a
    seeded fallback of ``round(test_fraction * n)`` cases (at least one; 0.4 = 12/30 as in the
    benchmark). Validation: ``num_val`` cases drawn (seeded) from the rest, always leaving at least one
    training case. Case ids are compared as numbers (``"1"`` matches ``"0001"``).
    """
    cases = list(cases)
    num = {int(c): c for c in cases}
    rng = np.random.default_rng(int(seed))
    if test_cases is not None:
        missing = [t for t in test_cases if int(t) not in num]
        if missing:
            raise ValueError(f"test cases {missing} are not in the data set")
        test = [num[int(t)] for t in test_cases]
    elif all(int(t) in num for t in STANDARD_TEST_CASES):
        test = [num[int(t)] for t in STANDARD_TEST_CASES]
    else:
        n_test = min(max(1, round(test_fraction * len(cases))), max(len(cases) - 1, 0))
        test = sorted((cases[i] for i in rng.permutation(len(cases))[:n_test]), key=int)
    rest = [c for c in cases if c not in test]
    n_val = max(0, min(int(num_val), len(rest) - 1))
    val = sorted((rest[i] for i in rng.permutation(len(rest))[:n_val]), key=int)
    train = [c for c in rest if c not in val]
    return {"training": train, "validation": val, "test": sorted(test, key=int)}


def _as_case_list(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (str, int)):
        value = re.split(r"[,\s]+", str(value))
    return [str(v) for v in value if str(v)]


def datalist_synapse(
    root: str,
    out: str,
    seed: int = 0,
    num_val: int = 4,
    test_cases: Sequence[str] | None = None,
    mapping: str = "transunet_8organ",
    absolute: bool = False,
) -> str:
    """Write a Synapse (BTCV) datalist JSON: training / validation / test pairs plus the label mapping.

    Args:
        root: BTCV copy holding ``RawData/Training/{img,label}`` or ``{img,label}``.
        out: the JSON file to write (atomically; never over an input file).
        seed: seed of the validation hold-out (and of the test fallback).
        num_val: validation cases held out of the non-test cases (for checkpoint selection; never the
            test cases).
        test_cases: explicit test case ids; default the standard 12 (0001 0002 0003 0004 0008 0022 0025
            0029 0032 0035 0036 0038) when all exist, else a seeded 40% of the cases.
        mapping: name of the label mapping the bundle applies (``transunet_8organ``: BTCV 13 ids -> the
            8-organ benchmark; ``btcv13``: all 13 organs).
        absolute: write absolute paths instead of paths relative to ``root``.

    Returns:
        The path of the written JSON. Every pair is read and validated first (readable, 3D, same shape
        and affine, label ids within BTCV's 0..13, no duplicate or unpaired case); nothing is written
        when a check fails.
    """
    out_path = Path(out)
    if out_path.is_dir():
        raise InputDataError(out_path, "--out is a folder; give the path of the JSON file to write")
    m = get_label_mapping(mapping)
    if m.source != "btcv13":
        raise ValueError(f"mapping {m.name!r} reads {m.source!r} labels; raw BTCV labels are 'btcv13'")
    root_path = Path(root)
    pairs = btcv_pairs(root_path)
    ensure_not_input(out_path, [p for pair in pairs.values() for p in pair])
    parts = split_cases(list(pairs), seed=seed, num_val=num_val, test_cases=_as_case_list(test_cases))

    def entry(case: str) -> dict:
        img, lab = pairs[case]
        if absolute:
            return {"image": img.resolve().as_posix(), "label": lab.resolve().as_posix(), "case": case}
        return {
            "image": img.relative_to(root_path).as_posix(),
            "label": lab.relative_to(root_path).as_posix(),
            "case": case,
        }

    if test_cases is not None:
        test_kind = "explicit"
    elif parts["test"] == list(STANDARD_TEST_CASES):
        test_kind = "the standard 12"
    else:
        test_kind = "seeded fallback: the standard 12 are not all present"
    n_train, n_val, n_test = (len(parts[k]) for k in ("training", "validation", "test"))
    datalist = {
        "description": (
            f"Synapse/BTCV datalist: {n_train} training, {n_val} validation "
            f"(seed {seed}), {n_test} test cases ({test_kind})."
            f" Labels on disk use BTCV's 13 ids; apply label_mapping {m.name!r} when loading."
            f" Intensities are HU: window to hu_window, then scale to [0, 1]."
            f" Paths are {'absolute' if absolute else 'relative to root'}."
        ),
        "root": str(root),
        "paths": "absolute" if absolute else "relative",
        "labels": {str(k): v for k, v in m.labels.items()},
        "label_mapping": m.to_json(),
        "intensity": {"windowed": False, "hu_window": list(HU_WINDOW)},
        "seed": int(seed),
        **{part: [entry(c) for c in ids] for part, ids in parts.items()},
    }
    atomic_write_text(out_path, json.dumps(datalist, indent=4) + "\n")
    return str(out_path)
