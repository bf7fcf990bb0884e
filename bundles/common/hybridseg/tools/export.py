"""Exports of a bundle's network: TorchScript through MONAI's ``ckpt_export`` and ONNX checked in onnxruntime.

TorchScript is made by scripting, as ``ckpt_export`` does by default (and the Model Zoo's CI runs it):
both networks compile with ``torch.jit.script``, so the file keeps every size-dependent decision (Swin's
window padding and shift, bi-level routing's padding to ``n_win``) and runs at any size the eager network
takes. Tracing (``use_trace=True``) stays available. The file carries the bundle's ``metadata.json`` and
``inference.json`` under ``extra/``, as the MONAI Deploy operator expects.

ONNX uses torch's TorchScript-based exporter (``dynamo=False``), which traces: the networks are written
to keep the trace size-independent where they can (Swin window layouts are built from traced sizes). The
dynamo exporter (torch 2.13's default) failed to decompose CFFormer (a ``view`` on a non-contiguous tensor)
after more than two minutes on 2 cores.

Input sizes an exported network accepts besides its export size:
* scripted TorchScript: every size the eager network takes (H, W multiples of 32);
* traced TorchScript and ONNX of CFFormer: any H, W that are multiples of 32;
* traced TorchScript and ONNX of BRAU-Net++: sizes with the same bi-level routing padding pattern as the
  export size, because the decision to pad a map to a multiple of ``n_win`` is a Python branch frozen by
  the trace. Exported at 224 with ``n_win`` 7 (maps 56, 28, 14, 7 are multiples of 7), it runs at
  multiples of 224 (448, ...); other sizes need an export at that size.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hybridseg.backends import INPUT_NAME, OUTPUT_NAME, write_onnx
from hybridseg.io import InputDataError, atomic_path
from hybridseg.weights import read_state_dict, torch_load

log = logging.getLogger("hybridseg.tools.export")


def bundle_config_files(bundle: str | os.PathLike) -> tuple[Path, Path]:
    """``(configs/inference.json, configs/metadata.json)`` of a bundle folder; a clear error if missing."""
    root = Path(bundle)
    files = root / "configs" / "inference.json", root / "configs" / "metadata.json"
    for f in files:
        if not f.is_file():
            raise InputDataError(f, "missing: not a bundle folder (needs configs/inference.json and metadata.json)")
    return files


def bundle_parser(bundle: str | os.PathLike, **overrides: Any):
    """The bundle's inference.json with its metadata and ``overrides``; ``bundle_root`` is ``bundle``."""
    from monai.bundle import ConfigParser

    config, meta = bundle_config_files(bundle)
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.read_meta(str(meta))
    parser.update({"bundle_root": str(Path(bundle).resolve()), **overrides})
    return parser


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A network state dict from a bundle checkpoint: a state dict, or a dict holding one under "model"."""
    return read_state_dict(path, ("model",))


def build_network(
    bundle: str | os.PathLike, ckpt_file: str | os.PathLike | None = None, **overrides: Any
) -> torch.nn.Module:
    """The bundle's ``network_def`` on the CPU in eval mode, with the checkpoint's weights when given."""
    net = bundle_parser(bundle, **overrides).get_parsed_content("network_def")
    if ckpt_file is not None:
        try:
            net.load_state_dict(load_state_dict(ckpt_file))
        except RuntimeError as e:
            raise InputDataError(ckpt_file, f"does not fit the bundle's network ({e})") from e
    return net.cpu().eval()


def example_input_shape(bundle: str | os.PathLike, **overrides: Any) -> list[int]:
    """``[1, C, H, W]``: channels from network_data_format, size from the config's ``image_size``."""
    parser = bundle_parser(bundle, **overrides)
    channels = parser["_meta_"]["network_data_format"]["inputs"][INPUT_NAME]["num_channels"]
    size = parser.get_parsed_content("image_size") if "image_size" in parser else None
    if size is None:
        size = parser["_meta_"]["network_data_format"]["inputs"][INPUT_NAME]["spatial_shape"]
    return [1, int(channels), *(int(s) for s in size)]


def _example(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def export_torchscript(
    bundle: str | os.PathLike,
    filepath: str | os.PathLike,
    ckpt_file: str | os.PathLike,
    input_shape: Sequence[int] | None = None,
    *,
    use_trace: bool = False,
    network: torch.nn.Module | None = None,
    **overrides: Any,
) -> Path:
    """Script (or with ``use_trace`` trace, at ``input_shape``) the bundle's network with its weights from
    ``ckpt_file`` through MONAI's ``ckpt_export`` into ``filepath``, written atomically with mode 0644.
    ``overrides`` are config overrides (e.g. ``variant="s"``). ``network``: the network already loaded
    strictly from ``ckpt_file`` (saves building it again)."""
    from monai.bundle import ckpt_export

    config, meta = bundle_config_files(bundle)
    filepath = Path(filepath)
    if Path(ckpt_file).resolve() == filepath.resolve():
        raise InputDataError(filepath, "is the checkpoint being exported; choose another output path")
    # MONAI loads the weights non-strictly; a strict load first gives a clear error for a wrong checkpoint.
    if network is None:
        build_network(bundle, ckpt_file, **overrides)
    trace_args: dict[str, Any] = {}
    if use_trace:
        shape = list(input_shape) if input_shape else example_input_shape(bundle, **overrides)
        trace_args = {"use_trace": True, "input_shape": shape}
    raw = torch_load(ckpt_file)
    key = "model" if isinstance(raw.get("model"), dict) else ""
    with atomic_path(filepath) as out:
        ckpt_export(
            key_in_ckpt=key,
            net_id="network_def",
            filepath=str(out),
            ckpt_file=str(ckpt_file),
            meta_file=str(meta),
            config_file=str(config),
            bundle_root=str(Path(bundle).resolve()),
            **trace_args,
            **overrides,
        )
        out.chmod(0o644)  # as the checkpoint beside it, not the temporary file's private 0600
    return filepath


def compare_torchscript(
    ts_file: str | os.PathLike, network: torch.nn.Module, shapes: Sequence[Sequence[int]]
) -> dict[str, float]:
    """Reload ``ts_file`` with ``torch.jit.load`` and compare it with the eager ``network`` on random inputs.

    Raises AssertionError (torch's float32 tolerances) on a mismatch; returns the max abs difference
    per shape.
    """
    ts = torch.jit.load(str(ts_file), map_location="cpu").eval()
    network = network.cpu().eval()
    diffs = {}
    with torch.no_grad():
        for i, shape in enumerate(shapes):
            x = _example(shape, seed=i)
            ref, got = network(x), ts(x)
            torch.testing.assert_close(got, ref, msg=lambda m, s=shape: f"TorchScript differs at {s}: {m}")
            diffs[str(list(shape))] = float((got - ref).abs().max())
    return diffs


def export_onnx(
    bundle: str | os.PathLike,
    filepath: str | os.PathLike,
    ckpt_file: str | os.PathLike | None = None,
    input_shape: Sequence[int] | None = None,
    check_shapes: Sequence[Sequence[int]] = (),
    rtol: float = 1e-3,
    atol: float = 1e-4,
    *,
    network: torch.nn.Module | None = None,
    **overrides: Any,
) -> dict[str, float]:
    """Export the network to ONNX (batch, H and W dynamic) and check it in onnxruntime against eager torch.

    The export input is ``input_shape`` (default ``[1, C, *image_size]``); the parity check runs on it and
    on every ``check_shapes``. A mismatch beyond ``atol + rtol * max|eager|`` raises AssertionError and
    leaves no file. Returns the max abs difference per checked shape. ``network``: the bundle's network
    with the checkpoint's weights, when already built.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    net = build_network(bundle, ckpt_file, **overrides) if network is None else network.cpu().eval()
    shape = list(input_shape) if input_shape else example_input_shape(bundle, **overrides)
    axes = {0: "batch", 2: "height", 3: "width"}
    diffs: dict[str, float] = {}
    with atomic_path(filepath) as out, torch.no_grad():
        write_onnx(net, _example(shape), out, axes)
        out.chmod(0o644)  # as the checkpoint, not the temporary file's private 0600
        onnx.checker.check_model(str(out))
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        for i, s in enumerate([shape, *check_shapes]):
            x = _example(s, seed=i)
            ref = net(x).numpy()
            (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
            if got.shape != ref.shape:
                raise AssertionError(f"onnxruntime output {got.shape} != eager {ref.shape} for input {list(s)}")
            diff, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max())
            if diff > atol + rtol * scale:
                raise AssertionError(
                    f"onnxruntime differs from eager torch at {list(s)}: max |diff| {diff:.3g} "
                    f"> {atol:g} + {rtol:g} * {scale:.3g}"
                )
            diffs[str(list(s))] = diff
    return diffs


def export(
    bundle: str,
    out: str,
    ckpt: str | None = None,
    onnx: bool = False,
    input_shape: Sequence[int] | None = None,
    check_shapes: Sequence[Sequence[int]] = (),
    use_trace: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Export a bundle's network to ``OUT/model.ts`` (and ``OUT/model.onnx`` with ``--onnx``), each checked.

    The TorchScript file is scripted (traced at the export size with ``--use_trace``), reloaded and compared
    with the eager network at the export size and at every ``--check_shapes``; the ONNX file is run in
    onnxruntime at the same sizes. Config overrides follow as ``--key value`` (e.g. ``--variant s
    --image_size "[64,64]"``). Prints and returns a JSON report with the largest differences.
    """
    out_dir = Path(out)
    shape = list(input_shape) if input_shape else example_input_shape(bundle, **overrides)
    shapes = [shape, *(list(s) for s in check_shapes)]
    with tempfile.TemporaryDirectory() as tmp:
        if ckpt is None:
            # Only useful to check the export itself; both exports then share these weights.
            log.warning("no checkpoint given: exporting %s with its random initial weights (seed 0)", bundle)
            torch.manual_seed(0)
            ckpt = str(Path(tmp) / "init.pt")
            torch.save(build_network(bundle, **overrides).state_dict(), ckpt)
        net = build_network(bundle, ckpt, **overrides)
        ts = export_torchscript(
            bundle, out_dir / "model.ts", ckpt, shape, use_trace=use_trace, network=net, **overrides
        )
        report: dict[str, Any] = {
            "torchscript": str(ts),
            "torchscript_mode": "trace" if use_trace else "script",
            "torchscript_max_abs_diff": compare_torchscript(ts, net, shapes),
        }
        if onnx:
            report["onnx"] = str(out_dir / "model.onnx")
            report["onnx_max_abs_diff"] = export_onnx(
                bundle, out_dir / "model.onnx", ckpt, shape, shapes[1:], network=net, **overrides
            )
    print(json.dumps(report, indent=4))
    return report
