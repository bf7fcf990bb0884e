"""The BRAU-Net++ MONAI Deploy app on a generated CT DICOM series, against the bundle's own inference."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tests.bundles.conftest import infer
from tests.tools.deploy.conftest import bf16_app_env, deploy_python, export_tiny_bundle, run_app, write_ct_series

pytestmark = pytest.mark.slow

# CPU-sized network and slices (as the bundle tests: 64 px, n_win 4 divides the 16/8/4 feature maps).
TINY = {"image_size": [64, 64], "n_win": 4, "sw_batch_size": 8, "amp": False}
ORGANS = ["aorta", "gallbladder", "left kidney", "right kidney", "liver", "pancreas", "spleen", "stomach"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One generated CT series, one tiny exported network; the app's and the bundle's outputs."""
    from hybridseg.tools.synth_synapse import make_ct_case

    deploy_python()
    work = tmp_path_factory.mktemp("synapse_deploy")
    hu, _, spacing = make_ct_case((64, 56, 6), np.random.default_rng(3))
    series_uid = write_ct_series(work / "dicom" / "series1", hu, spacing)
    exported = export_tiny_bundle("braunetpp_synapse", work / "bundle", TINY)
    app_out = work / "app_out"
    app_out.mkdir()
    run_app("hybridseg.tools.deploy.synapse_app", work / "dicom", exported["ts"], app_out)
    bundle_out = work / "bundle_out"
    infer("braunetpp_synapse", work / "dicom", bundle_out, exported["ckpt"], **TINY)
    return {"hu": hu, "spacing": spacing, "series": series_uid, "app": app_out, "bundle": bundle_out}


def test_app_writes_a_dicom_seg_naming_the_organs_and_referencing_the_series(run):
    import highdicom as hd

    files = list(run["app"].glob("*.dcm"))
    assert len(files) == 1, f"expected one DICOM SEG, found {files}"
    seg = hd.seg.segread(files[0])
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ORGANS
    assert [s.SegmentNumber for s in seg.SegmentSequence] == list(range(1, 9))
    referenced = {r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence}
    assert referenced == {run["series"]}


def test_dicom_seg_frames_hold_the_predicted_labels(run):
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(next(run["app"].glob("*.dcm")))
    labels = np.asarray(nib.load(next(run["app"].glob("*_seg.nii.gz"))).dataobj)  # (x, y, z)
    # frame -> (segment number, slice index from its position along z)
    sz = float(run["spacing"][2])
    rebuilt = np.zeros_like(labels)
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        z = int(round(float(frame.PlanePositionSequence[0].ImagePositionPatient[2]) / sz))
        mask = seg.pixel_array[i] if seg.pixel_array.ndim == 3 else seg.pixel_array
        rebuilt[:, :, z][mask.T > 0] = number
    assert isinstance(seg, pydicom.Dataset)
    np.testing.assert_array_equal(rebuilt, labels)


def test_app_nifti_is_on_the_series_grid_and_matches_the_bundle_inference(run):
    app = next(run["app"].glob("*_seg.nii.gz"))
    assert app.name == f"{run['series']}_seg.nii.gz"
    ref = nib.load(run["bundle"] / "series1_seg.nii.gz")
    out = nib.load(app)
    assert out.shape == run["hu"].shape == ref.shape
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(np.abs(np.diag(out.affine)[:3]), run["spacing"], rtol=1e-5)
    app_labels, bundle_labels = np.asarray(out.dataobj), np.asarray(ref.dataobj)
    assert len(np.unique(bundle_labels)) > 1, "degenerate check: the bundle predicted one label everywhere"
    np.testing.assert_array_equal(app_labels, bundle_labels)
    sidecar = json.loads((run["app"] / f"{run['series']}_seg.json").read_text())
    assert list(sidecar["labels"].values()) == ["background", *ORGANS]


def test_mixed_precision_app_gives_the_bundles_mixed_precision_labels_bit_for_bit(tmp_path):
    """``amp`` on in the exported config: the slice-by-slice bf16 inference of the app (eager network rebuilt
    from the embedded config, weights cast once) labels every voxel as the bundle's bf16 inference does."""
    env = bf16_app_env()
    from hybridseg.tools.synth_synapse import make_ct_case

    hu, _, spacing = make_ct_case((64, 56, 6), np.random.default_rng(3))
    series_uid = write_ct_series(tmp_path / "dicom" / "series1", hu, spacing)
    amp = {**TINY, "amp": True}
    exported = export_tiny_bundle("braunetpp_synapse", tmp_path / "bundle", amp)
    (tmp_path / "app").mkdir()
    run_app("hybridseg.tools.deploy.synapse_app", tmp_path / "dicom", exported["ts"], tmp_path / "app", env=env)
    infer("braunetpp_synapse", tmp_path / "dicom", tmp_path / "bundle_out", exported["ckpt"], **amp)
    app = np.asarray(nib.load(tmp_path / "app" / f"{series_uid}_seg.nii.gz").dataobj)
    bundle = np.asarray(nib.load(tmp_path / "bundle_out" / "series1_seg.nii.gz").dataobj)
    assert len(np.unique(bundle)) > 1, "degenerate check: the bundle predicted one label everywhere"
    np.testing.assert_array_equal(app, bundle)
