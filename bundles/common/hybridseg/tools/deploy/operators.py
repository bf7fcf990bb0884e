"""MONAI Deploy operators shared by the two apps: bundle inference on the app's in-memory images, and writers
of the bundle's own output formats (NIfTI label volume with its label sidecar, mask PNG) plus a PNG loader.

Needs the MONAI Deploy App SDK (``.venv-deploy``, see ``ci/deploy_env.sh``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.deploy.conditions import CountCondition
from monai.deploy.core import Fragment, Image, Operator, OperatorSpec
from monai.deploy.operators.monai_bundle_inference_operator import MonaiBundleInferenceOperator

from hybridseg.io import InputDataError

LOG = logging.getLogger("hybridseg.tools.deploy")

# The bundles' own file loaders and writers. The app does the I/O (DICOM in, DICOM SEG / NIfTI / PNG out),
# so, as the SDK drops MONAI's LoadImage*/SaveImage*, these are dropped from the config before they are
# built: a writer would otherwise resolve output paths inside a bundle folder the deployed app lacks.
BUNDLE_IO_TRANSFORMS = ("LoadVolumed", "LoadImage2Dd", "SaveLabelVolumed", "SaveMask2Dd")
PNG_SUFFIXES = (".png", ".jpg", ".jpeg")


def _is_bundle_io(item: Any) -> bool:
    target = item.get("_target_", "") if isinstance(item, dict) else ""
    return isinstance(target, str) and target.rsplit(".", 1)[-1] in BUNDLE_IO_TRANSFORMS


class BundleInferenceOperator(MonaiBundleInferenceOperator):
    """The SDK's MonaiBundleInferenceOperator, fed the layout the bundle's loader would have produced.

    ``spatial_dims=3``: the SDK's volume ``(W, H, D)`` gets the channel axis the bundle's ``LoadVolumed``
    adds -> ``(1, W, H, D)``, the axes ITK gives the bundle for the same series. ``spatial_dims=2``: a
    one-frame DICOM image ``(1, rows, columns)`` or a loaded 2D image ``(H, W)`` becomes ``(1, H, W)``
    (rows first), as the bundle's ``LoadImage2Dd`` gives it. The rest of ``preprocessing``, the ``inferer``
    and ``postprocessing`` come unchanged from the inference.json inside the TorchScript file.

    ``backend`` (default: the environment variable ``HYBRIDSEG_BACKEND``, else ``torch``) runs the TorchScript
    network as is, or exported to ONNX Runtime (``onnxruntime``, ``onnxruntime_int8``: see
    ``hybridseg.backends``), the graph cached next to the model file; int8 is then calibrated on the first
    input, as the app has no other images. The ONNX graph is exported from the network rebuilt from the embedded
    config's ``network_def`` with the TorchScript file's weights, so scripted exports (the default) and traced
    ones both work. With ``torch`` under mixed precision (the config's ``amp`` where the device has it) that
    rebuilt network runs instead of the TorchScript one: the inferer then casts its weights once rather than on
    every call, and its outputs are the bundle's own ``inference.json`` outputs bit for bit, which the scripted
    module's under autocast are not.
    """

    def __init__(
        self, fragment: Fragment, *args: Any, spatial_dims: int = 3, backend: str | None = None, **kwargs: Any
    ) -> None:
        from hybridseg.backends import check_backend

        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.backend = check_backend(backend or os.environ.get("HYBRIDSEG_BACKEND", "torch"))
        self._eager_network: torch.nn.Module | None = None
        super().__init__(fragment, *args, **kwargs)

    def _init_config(self, config_names):
        super()._init_config(config_names)
        from hybridseg.backends import BackendInferer

        inner = self._inferer.inferer if isinstance(self._inferer, BackendInferer) else self._inferer
        # the app's own backend choice, whatever the exported config says; no calibration images here
        self._inferer = BackendInferer(inner, self.backend, cache_dir=Path(self.bundle_path).parent)
        # the embedded inferer's low-precision dtype (AutocastInferer / ResizedSliceInferer); None: float32
        self._autocast_dtype = getattr(inner, "dtype", None)
        LOG.info("inference backend: %s", self.backend)

    def predict(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        if self.backend == "torch" and self._autocast_dtype is None:
            return super().predict(data, *args, **kwargs)
        return self._inferer(data, self._eager_twin(), *args, **kwargs)

    def _eager_twin(self) -> torch.nn.Module:
        """``network_def`` of the embedded config, given the TorchScript's weights: the eager module it came from.

        ONNX export needs it (torch's exporter cannot convert the Python control flow a scripted module keeps),
        and so does mixed precision: autocast over a scripted module casts every weight on every call and
        rounds differently from the eager module the bundle runs.
        """
        if self._eager_network is None:
            # the SDK's TorchScriptModel holds the loaded module as ``predictor``
            scripted = getattr(self._model_network, "predictor", self._model_network)
            try:
                network = self._parser.get_parsed_content("network_def", instantiate=True)
                # TorchScript's state_dict also holds the non-persistent buffers (fixed tables the network
                # rebuilds itself); every persistent tensor must come from the file
                expected = network.state_dict().keys()
                weights = {k: v for k, v in scripted.state_dict().items() if k in expected}
                network.load_state_dict(weights, strict=True)
            except Exception as e:  # noqa: BLE001 - any failure here means the file runs only as TorchScript
                why = f"{self.bundle_path}: cannot rebuild the network from its embedded inference config"
                why += f" ({type(e).__name__}: {e})"
                if self.backend != "torch":
                    raise RuntimeError(f"{why} for {self.backend}; run with HYBRIDSEG_BACKEND=torch") from e
                LOG.warning("%s; running the TorchScript module under autocast", why)
                self._eager_network = scripted
                return scripted
            device = next(scripted.parameters(), torch.empty(0)).device
            self._eager_network = network.to(device).eval()
        return self._eager_network

    def _get_compose(self, obj_name, disallowed_prefixes):
        # Filter pre- and postprocessing together, before either is built: editing the config later makes
        # the parser rebuild "@preprocessing", and Invertd then refuses the new Resize (another object).
        for name in (self._bundle_config_names.preproc_name, self._bundle_config_names.postproc_name):
            transforms = self._parser.get(f"{name}#transforms")
            if isinstance(transforms, list) and any(_is_bundle_io(t) for t in transforms):
                self._parser[f"{name}#transforms"] = [t for t in transforms if not _is_bundle_io(t)]
        return super()._get_compose(obj_name, disallowed_prefixes)

    def pre_process(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        data = {k: self._to_bundle_layout(v) for k, v in data.items()}
        return super().pre_process(data, *args, **kwargs)

    def _convert_from_image(self, img: Image):
        if self.spatial_dims == 3:
            return super()._convert_from_image(img)
        # 2D: keep the frame as stored, rows first, as the bundle reads a PNG. The SDK's conversion swaps
        # to (W, H, D) and builds an affine a single frame has none of (no ImagePositionPatient).
        kept = (str, int, float, np.ndarray)
        meta = {k: v for k, v in (img.metadata() or {}).items() if isinstance(v, kept)}
        meta.pop("affine", None)
        return img.asnumpy(), meta

    def _to_bundle_layout(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        meta = dict(value.meta) if isinstance(value, MetaTensor) else {}
        x = value.as_tensor() if isinstance(value, MetaTensor) else value
        name = meta.get("filename_or_obj") or meta.get("SeriesInstanceUID") or "input"
        if self.spatial_dims == 3:
            if x.ndim != 3:
                raise InputDataError(name, f"expected a 3D volume, got array of shape {tuple(x.shape)}")
            return MetaTensor(x[None].float(), meta=meta)
        if x.ndim == 3 and x.shape[0] == 1:
            x = x[0]  # one DICOM frame as stored, (1, rows, columns)
        if x.ndim != 2:
            raise InputDataError(
                name, f"expected one gray 2D image (one MONOCHROME frame), got array of shape {tuple(x.shape)}"
            )
        meta["spatial_shape"] = np.asarray(x.shape)
        # identity 2D affine, as LoadImage2Dd sets it, so Resized/Invertd see the same geometry
        return MetaTensor(x[None].float().contiguous(), affine=torch.eye(3), meta=meta)


def _stem(meta: dict, default: str) -> str:
    from hybridseg.image_io import output_stem

    src = meta.get("filename_or_obj")
    if src:
        return output_stem(str(src).rstrip("/"))
    return str(meta.get("SeriesInstanceUID") or default)


class NiftiLabelWriterOperator(Operator):
    """Writes the predicted label Image (SDK axes ``(D, H, W)``) as ``<SeriesInstanceUID>_seg.nii.gz`` on the
    series' grid and RAS affine, with a ``_seg.json`` sidecar naming each label id: the format of the
    bundle's ``SaveLabelVolumed``. Both files are written atomically."""

    def __init__(
        self, fragment: Fragment, *args: Any, output_folder: Path, labels: dict[int, str], **kwargs: Any
    ) -> None:
        self.output_folder = Path(output_folder)
        self.labels = {str(k): str(v) for k, v in labels.items()}
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("seg_image")

    def compute(self, op_input, op_output, context) -> None:
        import nibabel as nib

        from hybridseg.io import atomic_path, atomic_write_text

        seg = op_input.receive("seg_image")
        labels = np.ascontiguousarray(np.swapaxes(seg.asnumpy(), 0, 2)).astype(np.uint8)  # -> (x, y, z)
        meta = seg.metadata()
        affine = sdk_affine_fixed(meta)
        stem = _stem(meta, "volume")
        dest = self.output_folder / f"{stem}_seg.nii.gz"
        out = nib.Nifti1Image(labels, affine)
        out.set_data_dtype(np.uint8)
        out.header.set_slope_inter(1, 0)
        with atomic_path(dest) as tmp:
            gz = Path(str(tmp) + ".nii.gz")  # nibabel picks gzip from the suffix
            nib.save(out, str(gz))
            gz.replace(tmp)
        sidecar = {
            "source": str(meta.get("SeriesInstanceUID", "")),
            "segmentation": dest.name,
            "labels": self.labels,
            "shape": list(labels.shape),
            "affine": affine.tolist(),
        }
        atomic_write_text(self.output_folder / f"{stem}_seg.json", json.dumps(sidecar, indent=4) + "\n")
        LOG.info("wrote %s (%s)", dest, "x".join(map(str, labels.shape)))


def sdk_affine_fixed(meta: dict) -> np.ndarray:
    """The RAS affine of an SDK volume ``(W, H, D)`` with its in-plane spacings put right.

    SDK 4.0.0 (``DICOMSeriesToVolumeOperator.compute_affine_transform``) scales the row direction (array
    axis 0, along a row = across columns) by PixelSpacing[0], the spacing between rows, and the column
    direction by PixelSpacing[1]; DICOM's image plane equation uses the opposite. The two agree only for
    square pixels, so the scales are swapped back here (the directions are right).
    """
    affine = np.array(meta.get("original_affine", meta.get("affine")), dtype=np.float64)
    vr, vc = meta.get("row_pixel_spacing"), meta.get("col_pixel_spacing")
    if vr and vc:
        affine[:3, 0] *= float(vc) / float(vr)
        affine[:3, 1] *= float(vr) / float(vc)
    return affine


class PngLoaderOperator(Operator):
    """Emits the PNG/JPEG images of a folder (or one file) one per run, read by the bundle's own reader
    (8-bit checks, RGB -> gray by BT.601) as ``(H, W)`` float32 Images that name their file."""

    def __init__(self, fragment: Fragment, *args: Any, input_path: Path, **kwargs: Any) -> None:
        self.files = png_inputs(Path(input_path))
        self._next = 0
        super().__init__(fragment, CountCondition(fragment, len(self.files)), *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("image")

    def compute(self, op_input, op_output, context) -> None:
        from hybridseg.image_io import read_2d

        path = self.files[self._next]
        self._next += 1
        arr, affine = read_2d(path)
        # "spacing" + "original_affine" tell the SDK this Image needs no DICOM-style axis conversion
        meta = {"filename_or_obj": str(path), "spacing": np.ones(2), "original_affine": affine}
        op_output.emit(Image(arr, metadata=meta), "image")


def png_inputs(path: Path) -> list[Path]:
    """The PNG/JPEG inputs at ``path`` (a file or a folder), sorted; fails naming ``path`` if none."""
    if path.is_file():
        if not path.name.lower().endswith(PNG_SUFFIXES):
            raise InputDataError(path, f"unsupported file type (expected one of {', '.join(PNG_SUFFIXES)})")
        return [path]
    if not path.is_dir():
        raise InputDataError(path, "no such file or folder")
    files = sorted(f for f in path.iterdir() if f.is_file() and f.name.lower().endswith(PNG_SUFFIXES))
    if not files:
        raise InputDataError(path, f"folder contains no DICOM files and no images ({', '.join(PNG_SUFFIXES)})")
    return files


class MaskPngWriterOperator(Operator):
    """Writes a binary mask Image ``(H, W)`` as ``<stem>_mask.png`` (0/255, the bundle's format) at the
    input's size, atomically; ``<stem>`` is the input file's name, or the SeriesInstanceUID for DICOM."""

    def __init__(self, fragment: Fragment, *args: Any, output_folder: Path, **kwargs: Any) -> None:
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("seg_image")

    def compute(self, op_input, op_output, context) -> None:
        from hybridseg.image_io import write_png

        seg = op_input.receive("seg_image")
        mask = np.asarray(seg.asnumpy())
        meta = seg.metadata()
        expected = tuple(int(s) for s in meta.get("spatial_shape", mask.shape))
        if mask.shape != expected:
            raise ValueError(f"mask shape {mask.shape} is not the input's size {expected}")
        dest = self.output_folder / f"{_stem(meta, 'image')}_mask.png"
        write_png(dest, (mask > 0).astype(np.uint8) * 255)
        LOG.info("wrote %s (%dx%d)", dest, *mask.shape)
