"""Convert TransUNet's preprocessed Synapse release to NIfTI volumes plus a datalist.

Input (``ROOT``): ``train_npz/caseXXXX_sliceYYY.npz`` (keys ``image``, ``label``; one 2D slice each) and
``test_vol_h5/caseXXXX.npy.h5`` (datasets ``image``, ``label``; D x H x W), optionally
``lists/lists_Synapse/train.txt`` (slice names) and ``test_vol.txt`` (case names) which then decide what
is converted. The release is already windowed: CT clipped to [-125, 275] HU and scaled to [0, 1], labels
in the 8-organ order 1 aorta, 2 gallbladder, 3 left kidney, 4 right kidney, 5 liver, 6 pancreas,
7 spleen, 8 stomach.

Output (``OUT``): ``images/caseXXXX.nii.gz`` and ``labels/caseXXXX.nii.gz`` plus ``datalist.json``
(``"intensity": {"windowed": true, ...}`` so the bundle does not window again; ``label_mapping`` the
identity on ``transunet_8organ``).

Conventions:

* Values are preserved exactly: images are written with the release's float dtype (float32; float64 only
  if a value would not survive float32), no scaling; labels as uint8.
* Axes: NIfTI array shape (H, W, D) with ``volume[:, :, k]`` equal to slice k exactly as stored
  (``caseXXXX_slice{k}.npz``'s ``image``, or ``h5["image"][k]``), so 2D slices read from the NIfTI are
  the network inputs of the original code, untransposed. Training slices are stacked in slice-number
  order.
* The release carries no spacing or orientation: the affine is the identity (unit spacing, in voxels).
  Distances measured on these volumes are in voxels, not mm.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import h5py
import numpy as np

from hybridseg.data.synapse import HU_WINDOW, LABEL_SCHEMES, identity_mapping, split_cases, write_nifti
from hybridseg.io import InputDataError, atomic_write_text, ensure_not_input
from hybridseg.tools.synth_busi import prepare_output_dir

_NPZ_RE = re.compile(r"^case(\d+)_slice(\d+)\.npz$")
_H5_RE = re.compile(r"^case(\d+)(?:\.npy)?\.h5$")
SCHEME = "transunet_8organ"


def _check_arrays(path: Path, image: np.ndarray, label: np.ndarray, ndim: int, what: str = "") -> None:
    """Shape, value and id checks shared by slices and volumes; errors name the file."""
    if image.ndim != ndim or label.ndim != ndim:
        raise InputDataError(path, f"{what}expected {ndim}D image and label, found shapes {image.shape}, {label.shape}")
    if image.shape != label.shape:
        raise InputDataError(path, f"{what}label shape {label.shape} differs from image shape {image.shape}")
    if image.size == 0:
        raise InputDataError(path, f"{what}empty image")
    if not np.issubdtype(image.dtype, np.floating) and not np.issubdtype(image.dtype, np.integer):
        raise InputDataError(path, f"{what}image has non-numeric dtype {image.dtype}")
    if not np.all(np.isfinite(image)):
        raise InputDataError(path, f"{what}image contains NaN or infinite values")
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0:
        raise InputDataError(
            path, f"{what}image values span [{lo:g}, {hi:g}], outside [0, 1]: not TransUNet's windowed release"
        )
    ids = np.unique(label)
    if not np.all(np.mod(ids, 1) == 0):
        raise InputDataError(path, f"{what}label values must be integers")
    bad = sorted(int(v) for v in ids if int(v) not in LABEL_SCHEMES[SCHEME])
    if bad:
        raise InputDataError(path, f"{what}unexpected label ids {bad}: TransUNet's labels are 0..8")


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("image", "label") if k not in z.files]
            if missing:
                raise InputDataError(path, f"missing key(s) {missing} (found {z.files})")
            image, label = z["image"], z["label"]
    except InputDataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as err:
        raise InputDataError(path, f"unreadable or corrupt npz file ({type(err).__name__}: {err})") from err
    _check_arrays(path, image, label, 2)
    return image, label


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise InputDataError(path, f"missing dataset(s) {missing} (found {list(f.keys())})")
            image, label = f["image"][()], f["label"][()]
    except InputDataError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputDataError(path, f"unreadable or corrupt HDF5 file ({type(err).__name__}: {err})") from err
    _check_arrays(path, np.asarray(image), np.asarray(label), 3)
    return np.asarray(image), np.asarray(label)


def _read_list(path: Path) -> list[str]:
    try:
        names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise InputDataError(path, f"unreadable list file ({err})") from err
    if not names:
        raise InputDataError(path, "list file is empty")
    seen = set()
    for n in names:
        if n in seen:
            raise InputDataError(path, f"duplicate entry {n!r}")
        seen.add(n)
    return names


def _listed_files(folder: Path, pattern: re.Pattern, suffix: str) -> list[Path]:
    if not folder.is_dir():
        raise InputDataError(folder, "folder is missing")
    files = [p for p in sorted(folder.iterdir()) if p.name.endswith(suffix) and not p.name.startswith(".")]
    if not files:
        raise InputDataError(folder, f"folder contains no *{suffix} files")
    for p in files:
        if not pattern.match(p.name):
            raise InputDataError(p, f"unexpected file name: expected {pattern.pattern}")
    return files


def _train_cases(root: Path, list_file: Path | None) -> tuple[dict[str, list[Path]], int]:
    """{case: [slice files in slice order]} and the number of npz files left out by ``train.txt``."""
    folder = root / "train_npz"
    files = _listed_files(folder, _NPZ_RE, ".npz")
    if list_file is not None:
        by_name = {p.name[: -len(".npz")]: p for p in files}
        names = [n.removesuffix(".npz") for n in _read_list(list_file)]
        for n in names:
            if n not in by_name:
                raise InputDataError(list_file, f"lists slice {n!r} but {folder / (n + '.npz')} does not exist")
        chosen = [by_name[n] for n in names]
    else:
        chosen = files
    cases: dict[str, dict[int, Path]] = {}
    for p in chosen:
        m = _NPZ_RE.match(p.name)
        case, k = f"{int(m.group(1)):04d}", int(m.group(2))
        slices = cases.setdefault(case, {})
        if k in slices:
            raise InputDataError(p, f"duplicate slice {k} of case {case} (also {slices[k].name})")
        slices[k] = p
    ordered: dict[str, list[Path]] = {}
    for case, slices in sorted(cases.items()):
        ks = sorted(slices)
        gaps = sorted(set(range(ks[0], ks[-1] + 1)) - set(ks))
        if gaps:
            shown = ", ".join(str(g) for g in gaps[:10]) + (", ..." if len(gaps) > 10 else "")
            raise InputDataError(folder, f"case {case} is missing slice(s) {shown}: cannot stack a volume")
        ordered[case] = [slices[k] for k in ks]
    return ordered, len(files) - len(chosen)


def _test_cases(root: Path, list_file: Path | None) -> tuple[dict[str, Path], int]:
    folder = root / "test_vol_h5"
    files = _listed_files(folder, _H5_RE, ".h5")
    by_case: dict[str, Path] = {}
    for p in files:
        case = f"{int(_H5_RE.match(p.name).group(1)):04d}"
        if case in by_case:
            raise InputDataError(p, f"duplicate case {case} (also {by_case[case].name})")
        by_case[case] = p
    if list_file is None:
        return by_case, 0
    chosen = {}
    for n in _read_list(list_file):
        m = re.match(r"^case(\d+)(?:\.npy)?(?:\.h5)?$", n)
        if not m or f"{int(m.group(1)):04d}" not in by_case:
            raise InputDataError(list_file, f"lists case {n!r} but there is no {folder / (n + '.npy.h5')}")
        chosen[f"{int(m.group(1)):04d}"] = by_case[f"{int(m.group(1)):04d}"]
    return dict(sorted(chosen.items())), len(by_case) - len(chosen)


def _image_dtype(path: Path, image: np.ndarray) -> np.dtype:
    """float32 unless some value would change in float32 (then float64); integers become float32."""
    if image.dtype == np.float64 and not np.array_equal(image.astype(np.float32).astype(np.float64), image):
        return np.dtype(np.float64)
    if np.issubdtype(image.dtype, np.integer) and image.size and int(np.abs(image).max()) > 2**24:
        raise InputDataError(path, "integer image values too large for exact float32")
    return np.dtype(np.float32)


def _stack_case(case: str, files: list[Path]) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    images, labels, dtype = [], [], np.dtype(np.float32)
    for p in files:
        image, label = _read_npz(p)
        if images and image.shape != images[0].shape:
            raise InputDataError(p, f"slice shape {image.shape} differs from {images[0].shape} of {files[0].name}")
        if _image_dtype(p, image) == np.float64:
            dtype = np.dtype(np.float64)
        images.append(image)
        labels.append(label)
    return np.stack(images, axis=-1), np.stack(labels, axis=-1), dtype


def convert_transunet(
    root: str, out: str, lists_dir: str | None = None, seed: int = 0, num_val: int = 4, overwrite: bool = False
) -> str:
    """Convert TransUNet's ``train_npz`` / ``test_vol_h5`` release to NIfTI volumes and a datalist.

    Args:
        root: folder holding ``train_npz/`` and ``test_vol_h5/`` (TransUNet's ``data/Synapse``).
        out: output folder for ``images/``, ``labels/`` and ``datalist.json``; not inside ``root``,
            and empty unless ``overwrite``.
        lists_dir: folder with ``train.txt`` / ``test_vol.txt`` (default ``root/lists/lists_Synapse``
            when it exists); listed slices and cases are converted, others left out (counted in the
            datalist's description). Without lists, every file is converted.
        seed: seed of the validation hold-out drawn from the training cases.
        num_val: training cases held out for validation (checkpoint selection never uses the test cases).
        overwrite: allow a non-empty ``out`` (files of the same names are replaced).

    Returns:
        The path of the written datalist. Every input file is read and checked first (keys, shapes,
        image values finite and in [0, 1], label ids 0..8, complete slice runs, no duplicate case);
        nothing is written when a check fails. Values round-trip exactly (module docstring: axes,
        dtypes, unit spacing).
    """
    root_path, out_path = Path(root), Path(out)
    if not root_path.is_dir():
        raise InputDataError(root_path, "TransUNet data folder is missing")
    r, o = root_path.resolve(), out_path.resolve()
    if o == r or r in o.parents:
        raise InputDataError(out_path, f"output folder must not be inside the input folder {root_path}")
    lists = Path(lists_dir) if lists_dir is not None else root_path / "lists" / "lists_Synapse"
    if lists_dir is not None and not lists.is_dir():
        raise InputDataError(lists, "lists folder is missing")
    train_list = lists / "train.txt" if (lists / "train.txt").is_file() else None
    test_list = lists / "test_vol.txt" if (lists / "test_vol.txt").is_file() else None

    train, n_unlisted_npz = _train_cases(root_path, train_list)
    test, n_unlisted_h5 = _test_cases(root_path, test_list)
    for case, p in test.items():
        if case in train:
            raise InputDataError(p, f"case {case} is in both train_npz and test_vol_h5")
    # Validate everything before writing anything (volumes are re-read while converting, one at a time,
    # so memory stays at one case).
    for case, files in train.items():
        _stack_case(case, files)
    for p in test.values():
        _read_h5(p)

    def img_rel(case: str) -> str:
        return f"images/case{case}.nii.gz"

    def lab_rel(case: str) -> str:
        return f"labels/case{case}.nii.gz"

    outputs = [out_path / f(c) for c in [*train, *test] for f in (img_rel, lab_rel)] + [out_path / "datalist.json"]
    inputs = [p for files in train.values() for p in files] + list(test.values())
    for dest in outputs:
        ensure_not_input(dest, inputs)
    prepare_output_dir(out_path, overwrite)

    affine = np.eye(4)
    for case, files in train.items():
        image, label, dtype = _stack_case(case, files)
        write_nifti(out_path / img_rel(case), image.astype(dtype, copy=False), affine)
        write_nifti(out_path / lab_rel(case), label.astype(np.uint8), affine)
    for case, p in test.items():
        image, label = _read_h5(p)
        write_nifti(out_path / img_rel(case), np.moveaxis(image, 0, -1).astype(_image_dtype(p, image)), affine)
        write_nifti(out_path / lab_rel(case), np.moveaxis(label, 0, -1).astype(np.uint8), affine)

    parts = split_cases([*train, *test], seed=seed, num_val=num_val, test_cases=list(test))
    left_out = []
    if n_unlisted_npz:
        left_out.append(f"{n_unlisted_npz} npz slices not in {train_list.name}")
    if n_unlisted_h5:
        left_out.append(f"{n_unlisted_h5} h5 volumes not in {test_list.name}")
    mapping = identity_mapping(SCHEME)
    lists_used = " / ".join(str(p) if p else "none" for p in (train_list, test_list))
    datalist = {
        "description": (
            f"TransUNet Synapse release converted to NIfTI: {len(parts['training'])} training, "
            f"{len(parts['validation'])} validation (seed {seed}, held out of train_npz), "
            f"{len(parts['test'])} test cases (test_vol_h5). Images are already windowed to [0, 1] "
            f"(from HU {list(HU_WINDOW)}): do not window again. Labels are TransUNet's 1..8. "
            f"Unit spacing and identity affine (the release has none): distances are in voxels. "
            f"volume[:, :, k] is slice k as "
            f"stored in the release."
            + (f" Left out: {'; '.join(left_out)}." if left_out else "")
            + f" Lists used: {lists_used}."
        ),
        "root": str(out),
        "source": str(root),
        "paths": "relative",
        "labels": {str(k): v for k, v in mapping.labels.items()},
        "label_mapping": mapping.to_json(),
        "intensity": {"windowed": True, "hu_window": list(HU_WINDOW)},
        "spacing": "unit (voxels): the TransUNet release records no spacing",
        "seed": int(seed),
        **{part: [{"image": img_rel(c), "label": lab_rel(c), "case": c} for c in ids] for part, ids in parts.items()},
    }
    atomic_write_text(out_path / "datalist.json", json.dumps(datalist, indent=4) + "\n")
    return str(out_path / "datalist.json")
