"""BRAU-Net++ multi-organ CT segmentation as a MONAI Deploy application (the SDK's spleen example pattern).

DICOM CT series -> series selector (first CT series) -> volume -> bundle inference (TorchScript from
``ckpt_export`` of ``braunetpp_synapse``) -> a DICOM SEG naming the 8 organs, and the NIfTI label volume
``<SeriesInstanceUID>_seg.nii.gz`` (+ ``_seg.json``) on the series' grid.

    python -m hybridseg.tools.deploy.synapse_app -i DICOM_FOLDER -m model.ts -o OUTPUT_FOLDER
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

from hybridseg.data.synapse import get_label_mapping
from hybridseg.tools.deploy.operators import BundleInferenceOperator, NiftiLabelWriterOperator

# Any CT series; the first one found is segmented (as in the spleen example).
CT_SELECTION = json.dumps({"selections": [{"name": "CT series", "conditions": {"Modality": "(?i)CT"}}]})

# SNOMED CT property type per organ name of the bundle's label mapping (TransUNet's 8-organ protocol, the
# names of metadata.json's channel_def). pydicom's dictionary has no separate left/right kidney code, so both
# are "Kidney", told apart by their segment labels.
ORGAN_CODES = {
    "aorta": codes.SCT.Aorta,
    "gallbladder": codes.SCT.Gallbladder,
    "left kidney": codes.SCT.Kidney,
    "right kidney": codes.SCT.Kidney,
    "liver": codes.SCT.Liver,
    "pancreas": codes.SCT.Pancreas,
    "spleen": codes.SCT.Spleen,
    "stomach": codes.SCT.Stomach,
}
LABELS = get_label_mapping("transunet_8organ").labels  # {0: "background", 1: "aorta", ...}
ORGANS = {k: (name, ORGAN_CODES[name]) for k, name in LABELS.items() if k != 0}
# DICOM LO values hold at most 64 characters
ALGORITHM = ("BRAU-Net++ multi-organ CT (hybridseg braunetpp_synapse)", "0.1.0")


def segment_descriptions() -> list[SegmentDescription]:
    """One DICOM SEG segment per organ, segment number = label id."""
    return [
        SegmentDescription(
            segment_label=label,
            segmented_property_category=codes.SCT.Organ,
            segmented_property_type=code,
            algorithm_name=ALGORITHM[0],
            algorithm_family=codes.DCM.ArtificialIntelligence,
            algorithm_version=ALGORITHM[1],
        )
        for _, (label, code) in sorted(ORGANS.items())
    ]


class SynapseSegApp(Application):
    """DICOM CT series in; DICOM SEG with organ names and a NIfTI label volume out."""

    def compose(self) -> None:
        app_context: AppContext = Application.init_app_context(self.argv)
        input_path = Path(app_context.input_path)
        output_path = Path(app_context.output_path)
        model_path = Path(app_context.model_path)
        logging.getLogger("hybridseg.tools.deploy").info(
            "input %s, model %s, output %s", input_path, model_path, output_path
        )

        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_path, name="dcm_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=CT_SELECTION, name="series_selector")
        to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
        inference = BundleInferenceOperator(
            self,
            spatial_dims=3,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            app_context=app_context,
            bundle_config_names=BundleConfigNames(config_names=["inference"]),
            bundle_path=model_path,
            name="braunetpp_inference",
        )
        seg_writer = DICOMSegmentationWriterOperator(
            self, segment_descriptions=segment_descriptions(), output_folder=output_path, name="dicom_seg_writer"
        )
        nifti_writer = NiftiLabelWriterOperator(self, output_folder=output_path, labels=LABELS, name="nifti_writer")
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, inference, {("image", "image")})
        self.add_flow(selector, seg_writer, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(inference, seg_writer, {("pred", "seg_image")})
        self.add_flow(inference, nifti_writer, {("pred", "seg_image")})


def main() -> None:
    SynapseSegApp().run()


if __name__ == "__main__":
    main()
