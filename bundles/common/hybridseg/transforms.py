"""MONAI dictionary transforms the bundles need beyond MONAI's own: validated 2D loading (BUSI PNG/JPEG and
2D NIfTI with mask union), validated CT loading and pair checks, and writers of masks, overlays and label
volumes on the input's grid. The file readers and writers they use are in :mod:`hybridseg.image_io`; HU
windowing and organ mapping are MONAI's ScaleIntensityRanged and MapLabelValued in the configs."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from hybridseg.data.busi import read_busi_mask
from hybridseg.data.synapse import check_label_ids
from hybridseg.image_io import is_nifti, output_stem, overlay_rgb, read_2d, read_volume, write_png
from hybridseg.io import InputDataError, atomic_path, atomic_write_text

logger = logging.getLogger("hybridseg")

# torchvision's ImageNet statistics, which both CFFormer backbones were pretrained with (RGB order).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LoadImage2Dd(MapTransform):
    """Load a 2D image -> ``(1, H, W)`` float32 MetaTensor (values as stored, 0..255 for 8-bit PNG) and,
    for ``label_key``, the union of one or more binary masks -> ``(1, H, W)`` float32 in {0, 1}.

    Every file is validated (readable, 2D, masks binary and the image's size); errors name the file.
    Not MONAI's LoadImaged: BUSI keeps several masks per image, which are loaded as their union.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        image_key: str = "image",
        label_key: str = "label",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_path = d.get(self.image_key)
        shape = None
        for key in self.key_iterator(d):
            if key == self.label_key:
                paths = d[key] if isinstance(d[key], (list, tuple)) else [d[key]]
                mask = read_busi_mask([str(p) for p in paths])
                arr, affine, name = mask.astype(np.float32), np.eye(4), str(paths[0])
            else:
                arr, affine = read_2d(d[key])
                name = str(d[key])
            if shape is None:
                shape = arr.shape
            elif arr.shape != shape:
                raise InputDataError(name, f"size {arr.shape} differs from its image {image_path} of size {shape}")
            meta = {
                "filename_or_obj": name,
                "spatial_shape": np.asarray(arr.shape),
                "original_affine": affine,
                "source_format": "nifti" if is_nifti(name) else "image",
            }
            d[key] = MetaTensor(torch.from_numpy(arr[None].copy()), affine=torch.eye(3), meta=meta)
        return d


class SaveMask2Dd(MapTransform):
    """Write each binary prediction ``(1, H, W)`` (already at the input's size) next to nothing the user owns:
    ``<output_dir>/<stem>_mask.png`` (0/255) for PNG/JPEG inputs or ``<stem>_mask.nii.gz`` on the input's
    grid and affine for NIfTI inputs, plus ``<stem>_overlay.png``. Writes are atomic; an output path equal to
    an input file is refused (neither of which MONAI's SaveImaged does)."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        image_key: str = "image",
        output_dir: str | os.PathLike = "./eval",
        overlay: bool = True,
        label_key: str | None = None,
    ) -> None:
        super().__init__(keys)
        self.image_key = image_key
        self.output_dir = Path(output_dir)
        self.overlay = overlay
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        src = d[self.image_key].meta["filename_or_obj"] if isinstance(d[self.image_key], MetaTensor) else None
        if src is None:
            raise ValueError("SaveMask2Dd needs the image's metadata (filename_or_obj)")
        stem = output_stem(src)
        for key in self.key_iterator(d):
            pred = np.asarray(torch.as_tensor(d[key]).detach().cpu())
            pred = pred.reshape(pred.shape[-2:]) > 0.5
            if is_nifti(src):
                ref = nib.load(src)
                dest = self.output_dir / f"{stem}_mask.nii.gz"
                self._guard(dest, src)
                out = pred.astype(np.uint8).reshape(ref.shape)
                with atomic_path(dest) as tmp:
                    nib.save(nib.Nifti1Image(out, ref.affine), str(tmp) + ".nii.gz")
                    os.replace(str(tmp) + ".nii.gz", tmp)
            else:
                dest = self.output_dir / f"{stem}_mask.png"
                self._guard(dest, src)
                write_png(dest, pred.astype(np.uint8) * 255)
            if self.overlay:
                image, _ = read_2d(src)
                gt = None
                if self.label_key is not None and self.label_key in d:
                    gt = np.asarray(torch.as_tensor(d[self.label_key]).cpu()).reshape(pred.shape) > 0.5
                if image.shape != pred.shape:
                    raise ValueError(f"{src}: prediction {pred.shape} is not at the image's size {image.shape}")
                write_png(self.output_dir / f"{stem}_overlay.png", overlay_rgb(image, pred, gt))
        return d

    @staticmethod
    def _guard(dest: Path, src: str) -> None:
        if dest.resolve() == Path(src).resolve():
            raise InputDataError(dest, "refusing to overwrite an input file with an output")


class CheckVolumePaird(MapTransform):
    """Validate a loaded CT pair ``(1, H, W, D)``: one channel, three spatial axes, finite
    intensities, the label on the image's grid and, with ``label_ids``, only those whole-number ids
    (MONAI's MapLabelValued, which follows, would pass unknown ids through). Errors name the file,
    instead of failing deep inside a later transform."""

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        image_key: str = "image",
        allow_missing_keys: bool = True,
        label_key: str = "label",
        label_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.label_key = image_key, label_key
        self.label_ids = None if label_ids is None else tuple(int(i) for i in label_ids)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref_shape = None
        for key in self.key_iterator(d):
            x = d[key]
            name = getattr(x, "meta", {}).get("filename_or_obj", key)
            shape = tuple(x.shape)
            if len(shape) != 4 or shape[0] != 1:
                raise InputDataError(name, f"expected a single-channel 3D volume, got shape {shape} (channel first)")
            if key == self.image_key and not torch.isfinite(torch.as_tensor(x)).all():
                raise InputDataError(name, "volume contains NaN or infinite values")
            if key == self.label_key and self.label_ids is not None:
                check_label_ids(torch.unique(torch.as_tensor(x)).cpu().numpy(), self.label_ids, path=name)
            if ref_shape is None:
                ref_shape = shape[1:]
            elif shape[1:] != ref_shape:
                raise InputDataError(name, f"shape {shape[1:]} differs from its image's shape {ref_shape}")
        return d


class LoadVolumed(MapTransform):
    """Load a CT volume (NIfTI file, or a DICOM series folder via ITK) -> ``(1, X, Y, Z)`` float32 MetaTensor
    with its affine, arrays kept as stored (no reorientation), after the checks of :func:`read_volume`. Not
    MONAI's LoadImaged: the same reader checks every input before anything is written (``collect_inputs``)."""

    def __init__(self, keys: KeysCollection = "image") -> None:
        super().__init__(keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            arr, affine = read_volume(d[key])
            meta = {"filename_or_obj": str(d[key]), "spatial_shape": np.asarray(arr.shape), "original_affine": affine}
            d[key] = MetaTensor(torch.from_numpy(arr[None].copy()), affine=torch.as_tensor(affine), meta=meta)
        return d


class SaveLabelVolumed(MapTransform):
    """Write a predicted label volume ``(1, X, Y, Z)`` on the input's own grid: ``<stem>_seg.nii.gz`` with the
    input's affine (and header for NIfTI input), plus ``<stem>_seg.json`` naming every label id. Atomic, and
    never over an input file (MONAI's SaveImaged neither keeps the input header nor writes the sidecar)."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        image_key: str = "image",
        output_dir: str | os.PathLike = "./eval",
        labels: Mapping[Any, str] | None = None,
    ) -> None:
        super().__init__(keys)
        self.image_key = image_key
        self.output_dir = Path(output_dir)
        self.labels = {str(k): str(v) for k, v in (labels or {}).items()}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        src = str(image.meta["filename_or_obj"])
        stem = output_stem(src.rstrip("/"))
        for key in self.key_iterator(d):
            pred = np.asarray(torch.as_tensor(d[key]).detach().cpu())
            pred = pred.reshape(pred.shape[1:]) if pred.ndim == 4 else pred
            expected = tuple(int(s) for s in image.shape[1:])
            if pred.shape != expected:
                raise ValueError(f"{src}: prediction shape {pred.shape} is not the input's grid {expected}")
            header = None
            affine = np.asarray(image.meta.get("original_affine", image.affine), dtype=np.float64)
            if is_nifti(src):
                ref = nib.load(src)
                header, affine = ref.header.copy(), ref.affine
            dest = self.output_dir / f"{stem}_seg.nii.gz"
            if dest.resolve() == Path(src).resolve():
                raise InputDataError(dest, "refusing to overwrite an input file with an output")
            out = nib.Nifti1Image(pred.astype(np.uint8), affine, header=header)
            out.set_data_dtype(np.uint8)
            out.header.set_slope_inter(1, 0)
            with atomic_path(dest) as tmp:
                gz = Path(str(tmp) + ".nii.gz")
                nib.save(out, str(gz))
                os.replace(gz, tmp)
            sidecar = {
                "source": src,
                "segmentation": dest.name,
                "labels": self.labels,
                "shape": list(pred.shape),
                "affine": np.asarray(affine).tolist(),
            }
            atomic_write_text(self.output_dir / f"{stem}_seg.json", json.dumps(sidecar, indent=4) + "\n")
            logger.info("wrote %s (%s)", dest, "x".join(map(str, pred.shape)))
        return d
