"""CFFormer breast ultrasound lesion segmentation as a MONAI Deploy application.

Input: a folder (or file) of DICOM ultrasound (one gray frame; the first US series is used), or of PNG/JPEG
images. Output: ``<stem>_mask.png`` (0/255) at each input's size, where ``<stem>`` is the image's file name
or the DICOM SeriesInstanceUID, and for DICOM input also a DICOM SEG with the segment "lesion". The model is
the TorchScript from ``ckpt_export`` of ``cfformer_busi``.

    python -m hybridseg.tools.deploy.busi_app -i INPUT -m model.ts -o OUTPUT_FOLDER
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Image, IOType
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from monai.deploy.operators.monai_bundle_inference_operator import BundleConfigNames, IOMapping
from pydicom.sr.codedict import codes

from hybridseg.tools.deploy.operators import BundleInferenceOperator, MaskPngWriterOperator, PngLoaderOperator

US_SELECTION = json.dumps({"selections": [{"name": "US image", "conditions": {"Modality": "(?i)US"}}]})
# DICOM LO values hold at most 64 characters
ALGORITHM = ("CFFormer breast US lesion (hybridseg cfformer_busi)", "0.1.0")


def has_dicom(path: Path) -> bool:
    """Whether ``path`` is a DICOM file or a folder holding one (``.dcm``, or any file with the DICM
    preamble marker)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.suffix.lower() == ".dcm":
            return True
        try:
            with open(f, "rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False


def segment_descriptions() -> list[SegmentDescription]:
    return [
        SegmentDescription(
            segment_label="lesion",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_name=ALGORITHM[0],
            algorithm_family=codes.DCM.ArtificialIntelligence,
            algorithm_version=ALGORITHM[1],
            anatomic_regions=[codes.SCT.Breast],
        )
    ]


class BusiSegApp(Application):
    """Ultrasound DICOM or PNG in; mask PNG (and DICOM SEG for DICOM input) out."""

    def compose(self) -> None:
        app_context: AppContext = Application.init_app_context(self.argv)
        input_path = Path(app_context.input_path)
        output_path = Path(app_context.output_path)
        model_path = Path(app_context.model_path)
        dicom = has_dicom(input_path)
        logging.getLogger("hybridseg.tools.deploy").info(
            "input %s (%s), model %s, output %s", input_path, "DICOM" if dicom else "images", model_path, output_path
        )
        inference = BundleInferenceOperator(
            self,
            spatial_dims=2,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            app_context=app_context,
            bundle_config_names=BundleConfigNames(config_names=["inference"]),
            bundle_path=model_path,
            name="cfformer_inference",
        )
        mask_writer = MaskPngWriterOperator(self, output_folder=output_path, name="mask_png_writer")
        self.add_flow(inference, mask_writer, {("pred", "seg_image")})
        if not dicom:
            loader = PngLoaderOperator(self, input_path=input_path, name="png_loader")
            self.add_flow(loader, inference, {("image", "image")})
            return
        folder = input_path if input_path.is_dir() else input_path.parent
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=folder, name="dcm_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=US_SELECTION, name="series_selector")
        to_image = DICOMSeriesToVolumeOperator(self, name="series_to_image")
        seg_writer = DICOMSegmentationWriterOperator(
            self, segment_descriptions=segment_descriptions(), output_folder=output_path, name="dicom_seg_writer"
        )
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_image, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_image, inference, {("image", "image")})
        self.add_flow(selector, seg_writer, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(inference, seg_writer, {("pred", "seg_image")})


def main() -> None:
    BusiSegApp().run()


if __name__ == "__main__":
    main()
