"""Generated data sets and config helpers shared by the bundle tests (Model Zoo style ConfigWorkflow runs)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.reference import REPO_ROOT

BUNDLES = REPO_ROOT / "bundles"


def bundle_files(name: str) -> dict[str, str]:
    configs = BUNDLES / name / "configs"
    return {
        "meta_file": str(configs / "metadata.json"),
        "logging_file": str(configs / "logging.conf"),
        "train": str(configs / "train.json"),
        "evaluate": str(configs / "evaluate.json"),
        "inference": str(configs / "inference.json"),
    }


def run_workflow(workflow_type: str, config_file, meta_file: str, logging_file: str, **overrides):
    """initialize / check_properties / run / finalize, as the zoo's unit tests do; returns the workflow."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=config_file,
        meta_file=meta_file,
        logging_file=logging_file,
        **overrides,
    )
    wf.initialize()
    missing = wf.check_properties()
    assert not missing, f"required properties missing from the config: {missing}"
    wf.run()
    wf.finalize()
    logging.getLogger().handlers[:] = [
        h for h in logging.getLogger().handlers if not isinstance(h, logging.FileHandler)
    ]
    return wf


def infer(bundle: str, input_dir: Path, output_dir: Path, ckpt_path: Path, **overrides):
    """Run the bundle's inference.json on ``input_dir`` with a given checkpoint."""
    files = bundle_files(bundle)
    return run_workflow(
        "infer",
        files["inference"],
        files["meta_file"],
        files["logging_file"],
        input_dir=str(input_dir),
        output_dir=str(output_dir),
        ckpt_path=str(ckpt_path),
        **overrides,
    )


def train_config(bundle: str, **overrides):
    """The bundle's train.json and metadata parsed with ``overrides``, for tests that drive its parts."""
    from monai.bundle import ConfigParser

    files = bundle_files(bundle)
    parser = ConfigParser()
    parser.read_config(files["train"])
    parser.read_meta(files["meta_file"])
    parser.update(overrides)
    return parser


def train_then_evaluate(bundle: str, dataset_dir: Path, work: Path, **overrides) -> Path:
    """Train with ``train.json``, then evaluate with ``[train.json, evaluate.json]`` as the zoo's tests do.

    Checkpoints go to ``work/models``, training outputs to ``work/eval``, test-set outputs to
    ``work/test_eval``.
    """
    files = bundle_files(bundle)
    common = dict(dataset_dir=str(dataset_dir), ckpt_dir=str(work / "models"), **overrides)
    run_workflow(
        "train", files["train"], files["meta_file"], files["logging_file"], output_dir=str(work / "eval"), **common
    )
    run_workflow(
        "train",
        [files["train"], files["evaluate"]],
        files["meta_file"],
        files["logging_file"],
        output_dir=str(work / "test_eval"),
        **common,
    )
    return work


@pytest.fixture(scope="session")
def busi_dir(tmp_path_factory) -> Path:
    """A tiny BUSI-like set (24 images of 96 px) with its datalist, made once per session."""
    from hybridseg.data.busi import datalist_busi
    from hybridseg.tools.synth_busi import synth_busi

    root = tmp_path_factory.mktemp("busi") / "Dataset_BUSI_with_GT"
    synth_busi(out=str(root), n=24, size=96, seed=0)
    datalist_busi(root=str(root), out=str(root / "datalist.json"), seed=0)
    return root


@pytest.fixture(scope="session")
def synapse_dir(tmp_path_factory) -> Path:
    """Six tiny BTCV-like volumes (64x64x12) with a datalist: 4 training (1 of them validation), 2 test."""
    from hybridseg.data.synapse import datalist_synapse
    from hybridseg.tools.synth_synapse import synth_synapse

    root = tmp_path_factory.mktemp("synapse") / "Training"
    synth_synapse(out=str(root), n=6, shape=(64, 64, 32), seed=0)
    datalist_synapse(root=str(root), out=str(root / "datalist.json"), seed=0, num_val=1)
    return root


def error_text(exc: BaseException) -> str:
    """The messages of an exception and of every exception behind it (MONAI's config parser wraps errors)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def workflow_error(config_file, meta_file: str, logging_file: str, **overrides) -> str:
    """Run a train-type workflow that must fail; return the text of the error and of every error behind it."""
    with pytest.raises(Exception) as info:
        run_workflow("train", config_file, meta_file, logging_file, **overrides)
    return error_text(info.value)


@pytest.fixture(autouse=True, scope="session")
def _empty_weights_cache(tmp_path_factory):
    """Bundle runs never see a developer's cached pretrained weights (``pretrained=auto`` trains from scratch)."""
    import os

    before = os.environ.get("HYBRIDSEG_WEIGHTS")
    os.environ["HYBRIDSEG_WEIGHTS"] = str(tmp_path_factory.mktemp("empty weights cache"))
    yield
    if before is None:
        os.environ.pop("HYBRIDSEG_WEIGHTS", None)
    else:
        os.environ["HYBRIDSEG_WEIGHTS"] = before
