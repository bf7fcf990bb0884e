"""Image and volume files: validated readers (2D images, CT volumes as NIfTI or DICOM series), output names,
and the PNG writers of masks and overlays. Errors name the file; writes are atomic."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import ITKReader
from PIL import Image
from scipy.ndimage import binary_erosion

from hybridseg.data.busi import read_busi_image
from hybridseg.io import InputDataError, atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") + NIFTI_SUFFIXES
IMAGE_2D_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")  # Pillow's names for the non-NIfTI suffixes above


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_2d(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a 2D image as ``(H, W)`` float32 plus a 4x4 affine (identity for PNG/JPEG).

    PNG/JPEG go through the BUSI reader (RGB -> gray, 8-bit checks); NIfTI keeps its array axes as stored
    (no reorientation, so outputs can be written back on the same grid) after dropping singleton axes.
    """
    if is_nifti(path):
        try:
            img = nib.load(str(path))
            arr = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as e:  # nibabel raises many types for corrupt files
            raise InputDataError(path, f"unreadable NIfTI file ({e.__class__.__name__}: {e})") from e
        arr = arr.reshape([s for s in arr.shape if s != 1]) if arr.ndim > 2 else arr
        if arr.ndim != 2:
            raise InputDataError(path, f"expected a 2D image, got array of shape {img.shape}")
        if not np.isfinite(arr).all():
            raise InputDataError(path, "image contains NaN or infinite values")
        return arr, np.asarray(img.affine, dtype=np.float64)
    # inference accepts the other 8-bit formats of IMAGE_2D_SUFFIXES; BUSI's own files are all PNG
    return read_busi_image(path, IMAGE_2D_FORMATS).astype(np.float32), np.eye(4)


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a CT volume (NIfTI file, or a DICOM series folder through ITK) as float32 ``(X, Y, Z)`` plus its
    4x4 affine; fails naming the file when it is unreadable, not 3D, or holds NaN/inf."""
    path = Path(path)
    try:
        if path.is_dir():
            reader = ITKReader()  # array axes (x, y, z) as nibabel gives them; RAS affine
            img = reader.read(str(path))
            arr, meta = reader.get_data(img)
            affine = np.asarray(meta["affine"], dtype=np.float64)
        else:
            img = nib.load(str(path))
            arr = np.asarray(img.dataobj, dtype=np.float32)
            affine = np.asarray(img.affine, dtype=np.float64)
    except InputDataError:
        raise
    except Exception as e:  # readers raise many types for corrupt or truncated files
        raise InputDataError(path, f"unreadable volume ({e.__class__.__name__}: {e})") from e
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise InputDataError(path, f"expected a 3D volume, got array of shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputDataError(path, "volume contains NaN or infinite values")
    return arr, affine


def output_stem(path: str | os.PathLike) -> str:
    """File name without the image suffix (``.nii.gz`` counted as one suffix)."""
    name = Path(path).name
    for suf in sorted(IMAGE_2D_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def overlay_rgb(image: np.ndarray, pred: np.ndarray | None = None, gt: np.ndarray | None = None) -> np.ndarray:
    """Gray image ``(H, W)`` with the ground-truth outline in green and the prediction outline in red, as
    ``(H, W, 3)`` uint8."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    g = ((img - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(img)).astype(np.uint8)
    rgb = np.stack([g, g, g], axis=-1)
    for mask, colour in ((gt, (0, 255, 0)), (pred, (255, 0, 0))):
        if mask is None:
            continue
        m = np.asarray(mask, dtype=bool)
        edge = m & ~binary_erosion(m, border_value=0)
        rgb[edge] = colour
    return rgb


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 gray or RGB array as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
