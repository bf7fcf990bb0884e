"""Helpers for the MONAI Deploy app tests: the deploy environment, tiny bundle exports, generated DICOM.

The apps run in their own environment (``ci/deploy_env.sh`` -> ``.venv-deploy``, or the python named by
``HYBRIDSEG_DEPLOY_PYTHON``); without it every test here skips, saying so. ``ci/test.sh`` builds it, so
CI runs them.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.reference import REPO_ROOT

DEPLOY_PYTHON = Path(os.environ.get("HYBRIDSEG_DEPLOY_PYTHON", REPO_ROOT / ".venv-deploy" / "bin" / "python"))
# Holoscan's scheduler threads overflow the default 8 MB stack on CPU (the spec's `ulimit -s 32768`).
APP_STACK_BYTES = 32768 * 1024


def deploy_python() -> Path:
    """The deploy environment's python; skips the calling test (naming the fix) when it is absent."""
    stamp = DEPLOY_PYTHON.parent.parent / ".hybridseg-deploy-installed"
    if not DEPLOY_PYTHON.is_file() or ("HYBRIDSEG_DEPLOY_PYTHON" not in os.environ and not stamp.is_file()):
        why = f"MONAI Deploy environment {DEPLOY_PYTHON} is absent; build it with `bash ci/deploy_env.sh`"
        if os.environ.get("HYBRIDSEG_REQUIRE_DEPLOY"):  # set by ci/test.sh after building it
            pytest.fail(why)
        pytest.skip(why)
    return DEPLOY_PYTHON


def bf16_app_env() -> dict:
    """Environment for an app run under ``amp`` that must match this process bit for bit; skips the calling
    test where ``amp`` means float32 (no native bf16). bf16 kernels split their sums by thread count, so the app
    gets this process's threads."""
    from hybridseg.inferers import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("amp runs bf16 only on a CPU with native bf16 (AVX512-BF16/AMX); here it is float32")
    deploy_python()
    return {"OMP_NUM_THREADS": str(torch.get_num_threads())}


def _raise_stack() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    want = APP_STACK_BYTES if hard == resource.RLIM_INFINITY else min(APP_STACK_BYTES, hard)
    resource.setrlimit(resource.RLIMIT_STACK, (max(soft, want) if soft != resource.RLIM_INFINITY else soft, hard))


def run_app(module: str, input_path: Path, model: Path, output: Path, timeout: int = 300, env: dict | None = None):
    """Run ``python -m <module> -i input -m model -o output`` in the deploy environment (``env``: extra
    environment variables); returns the result (fails the test with the app's output when it exits non-zero)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(deploy_python()), "-m", module, "-i", str(input_path), "-m", str(model), "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=output.parent,
        env=env,
        preexec_fn=_raise_stack,
    )
    assert proc.returncode == 0, f"{module} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def export_tiny_bundle(bundle: str, work: Path, overrides: dict, seed: int = 0) -> dict:
    """A randomly initialised network of ``bundle`` with CPU-sized ``overrides``, exported as the zoo does.

    Writes ``work/configs/inference.json`` (the bundle's inference.json with ``overrides`` applied: the
    TorchScript embeds the config file's text, so the tiny sizes must be in the file),
    ``work/models/model.pt`` and ``work/models/model.ts`` from ``monai.bundle ckpt_export`` (scripted, its default).
    """
    from monai.bundle import ConfigParser

    src = REPO_ROOT / "bundles" / bundle / "configs"
    config = json.loads((src / "inference.json").read_text())
    config.update(overrides)
    (work / "configs").mkdir(parents=True, exist_ok=True)
    (work / "models").mkdir(parents=True, exist_ok=True)
    config_file = work / "configs" / "inference.json"
    config_file.write_text(json.dumps(config, indent=4) + "\n")
    parser = ConfigParser(config)
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def")
    ckpt = work / "models" / "model.pt"
    torch.save(net.state_dict(), ckpt)
    ts = work / "models" / "model.ts"
    cmd = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "--net_id", "network_def",
        "--filepath", str(ts), "--ckpt_file", str(ckpt), "--meta_file", str(src / "metadata.json"),
        "--config_file", str(config_file),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0 and ts.is_file(), f"ckpt_export failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {"config": config_file, "ckpt": ckpt, "ts": ts, "meta": src / "metadata.json"}


def _patient_study(ds, study_uid: str, modality: str) -> None:
    """The patient / study / equipment attributes highdicom copies into a derived DICOM SEG."""
    now = datetime.datetime(2026, 1, 1, 12, 0, 0)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = ("Synthetic^Case", "SYN0001", "19700101", "O")
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study_uid, "1", "A0001"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName, ds.Manufacturer = "", "hybridseg synthetic"
    ds.Modality, ds.StudyDescription, ds.SeriesDescription = (modality, "synthetic study", f"synthetic {modality}")


def _file_dataset(path: Path, sop_class: str):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    return ds


def write_ct_series(folder: Path, hu_xyz: np.ndarray, spacing: tuple[float, float, float]) -> str:
    """A CT series, one axial slice per file, from a volume ``(x, y, z)`` in HU: stored unsigned with
    RescaleIntercept -1024 (as scanners do), axial orientation, slices ``spacing[2]`` apart along +z.
    Returns the SeriesInstanceUID."""
    from pydicom.uid import CTImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    sx, sy, sz = (float(s) for s in spacing)
    stored = np.clip(np.rint(hu_xyz) + 1024, 0, 4095).astype(np.uint16)
    for z in range(hu_xyz.shape[2]):
        ds = _file_dataset(folder / f"ct{z:03d}.dcm", CTImageStorage)
        _patient_study(ds, study, "CT")
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.SeriesNumber = series, frame, 1
        ds.InstanceNumber, ds.ImageType = z + 1, ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0.0, 0.0, z * sz]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [sy, sx]  # row spacing (along y), column spacing (along x)
        ds.SliceThickness, ds.PositionReferenceIndicator = sz, ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = hu_xyz.shape[1], hu_xyz.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, z].T).tobytes()  # rows = y, columns = x
        ds.save_as(folder / f"ct{z:03d}.dcm", enforce_file_format=True)
    return series


def write_us_image(path: Path, gray: np.ndarray) -> str:
    """A single-frame gray (MONOCHROME2, 8-bit) ultrasound DICOM of ``gray`` ``(H, W)``. Returns its
    SeriesInstanceUID."""
    from pydicom.uid import UltrasoundImageStorage, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _file_dataset(path, UltrasoundImageStorage)
    series = generate_uid()
    _patient_study(ds, generate_uid(), "US")
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series, 1, 1
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = generate_uid(), ""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = gray.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(gray.astype(np.uint8)).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return series
