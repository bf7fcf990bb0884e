"""Inference backends: the bundle's torch network, or its ONNX Runtime twin (float32 or int8), chosen by name.

``BackendInferer`` wraps the bundle's inferer (``AutocastInferer``, ``ResizedSliceInferer``, ...) and hands it,
in place of the torch network, an ``OnnxRuntimeNetwork``: a callable with the same contract as the network
(float32 ``(N, C, H, W)`` in, logits ``(N, K, H, W)`` out), so the inferer and the post-processing are unchanged.
The network is exported once per weights and input size with torch's TorchScript-based exporter
(``dynamo=False``, opset 18, batch axis dynamic: see ``hybridseg.tools.export``) and cached as
``<cache_dir>/<network>-<sha256 of the state dict>-<C>x<H>x<W>[-int8].onnx``, written atomically. Height and
width are fixed per file because a trace freezes BRAU-Net++'s routing padding, which depends on the size.

``onnxruntime_int8`` quantises that graph statically (QDQ, per-channel int8 weights, uint8 activations
calibrated by min/max) on the network inputs the wrapped inferer makes from a few calibration images.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from hybridseg.io import atomic_path

log = logging.getLogger("hybridseg.backends")

BACKENDS = ("torch", "onnxruntime", "onnxruntime_int8")
# Names of the network's input and output: the keys of network_data_format (and of the Deploy operator's
# IOMapping), so exported graphs say what they take.
INPUT_NAME, OUTPUT_NAME = "image", "pred"
ONNX_OPSET = 18  # ONNX 1.23 / onnxruntime 1.31 support it; the TorchScript-based exporter goes up to 20


def write_onnx(network: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike, axes: dict) -> None:
    """Export ``network`` (N, C, H, W) -> logits with torch's TorchScript-based exporter (the dynamo one fails
    on CFFormer), naming input and output as the metadata does; ``axes``: the dynamic dimensions."""
    torch.onnx.export(
        network,
        (example,),
        str(path),
        dynamo=False,
        opset_version=ONNX_OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
    )


# Quantising only the convolutions and matmuls keeps softmax, normalisation and the additions in float32:
# they cost little time and most of the int8 error (our choice).
INT8_OP_TYPES = ("Conv", "MatMul", "Gemm")
# Calibration runs an augmented graph that keeps every intermediate tensor: a slice batch of 24 at 224 x 224
# took BRAU-Net++ past 4.6 GB, so calibration inputs are fed at most this many at a time.
CALIBRATION_BATCH = 4


def check_backend(backend: str) -> str:
    """``backend`` if it is one of ``BACKENDS``, else a ValueError naming the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown inference backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return backend


def state_dict_sha256(network: torch.nn.Module) -> str:
    """SHA-256 over the network's state dict (names, dtypes, shapes and values), hex."""
    h = hashlib.sha256(type(network).__qualname__.encode())
    for name, t in network.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _weights_version(network: torch.nn.Module) -> tuple[int, ...]:
    # every in-place write (load_state_dict, an optimiser step) bumps a tensor's version counter: a cheap test
    # of whether the cached hash still holds
    return tuple(t._version for t in network.state_dict(keep_vars=True).values())


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()


class _Calibration:
    """ONNX Runtime calibration reader over a list of float32 ``(N, C, H, W)`` arrays."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        from onnxruntime.quantization import CalibrationDataReader

        chunks = [b[i : i + CALIBRATION_BATCH] for b in batches for i in range(0, len(b), CALIBRATION_BATCH)]

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(chunks)

            def get_next(self) -> dict[str, np.ndarray] | None:
                b = next(self.it, None)
                return None if b is None else {INPUT_NAME: b}

        self.reader = Reader()


class OnnxRuntimeNetwork:
    """A torch network's ONNX Runtime twin: float32 ``(N, C, H, W)`` -> logits ``(N, K, H, W)`` (float32).

    One session per input ``(C, H, W)``, exported (and for int8 quantised) on first use and cached in
    ``cache_dir``; a new export is checked against the eager network on random inputs of that size.
    ``calibration(shape)`` returns the network inputs of that shape to calibrate int8 on (None: the first
    input given). The weights are re-hashed only when a tensor of the network was written since.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        backend: str = "onnxruntime",
        cache_dir: str | os.PathLike | None = None,
        calibration: Callable[[tuple[int, ...]], list[np.ndarray]] | None = None,
        num_threads: int | None = None,
        rtol: float = 1e-3,
        atol: float = 1e-4,
    ) -> None:
        if check_backend(backend) == "torch":
            raise ValueError("OnnxRuntimeNetwork runs the onnxruntime backends; use the network itself for torch")
        self.network, self.backend = network, backend
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "hybridseg_onnx"
        self.calibration = calibration
        self.num_threads = num_threads
        self.rtol, self.atol = rtol, atol
        self._version: tuple[int, ...] | None = None
        self._hash = ""
        self._sessions: dict[tuple[int, ...], Any] = {}

    @property
    def weights_hash(self) -> str:
        """SHA-256 of the network's current weights (recomputed only after a write to them)."""
        version = _weights_version(self.network)
        if version != self._version:
            self._hash, self._version, self._sessions = state_dict_sha256(self.network), version, {}
        return self._hash

    def model_path(self, shape: Sequence[int]) -> Path:
        """The cache file of the graph for inputs ``(N, *shape)``."""
        name = str(getattr(self.network, "original_name", type(self.network).__name__)).lower()
        suffix = "-int8" if self.backend == "onnxruntime_int8" else ""
        return self.cache_dir / f"{name}-{self.weights_hash[:16]}-{'x'.join(map(str, shape))}{suffix}.onnx"

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.no_grad(), _no_autocast(x.device):
                return self.network(x.to(next(self.network.parameters()).device)).float().cpu()
        finally:
            self.network.train(was_training)

    def _export(self, dest: Path, shape: tuple[int, ...]) -> None:
        device = next(self.network.parameters()).device
        example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)).to(device)
        axes = {0: "batch"}
        was_training = self.network.training
        self.network.eval()
        log.info("exporting %s for inputs (N, %s) to %s", type(self.network).__name__, shape, dest)
        try:
            with atomic_path(dest) as tmp, torch.no_grad(), _no_autocast(device), warnings.catch_warnings():
                # the trace's warnings (Python values frozen, legacy exporter) are about what _check tests
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                try:
                    write_onnx(self.network, example, tmp, axes)
                except Exception as e:
                    if isinstance(self.network, torch.jit.ScriptModule):
                        raise RuntimeError(
                            "a scripted TorchScript network does not export to ONNX (its graph keeps Python control "
                            "flow); for the onnxruntime backends export the bundle traced: ckpt_export --use_trace "
                            f"True ({type(e).__name__}: {str(e)[:200]})"
                        ) from e
                    raise
        finally:
            self.network.train(was_training)

    def _quantize(self, fp32: Path, dest: Path, batches: list[np.ndarray]) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if not batches:
            raise ValueError(f"int8 calibration needs at least one input of shape (N, {fp32.stem.split('-')[-1]})")
        log.info("quantising %s to int8 on %d calibration batch(es)", fp32.name, len(batches))
        with atomic_path(dest) as tmp:
            quantize_static(
                str(fp32),
                str(tmp),
                _Calibration(batches).reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(INT8_OP_TYPES),
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )

    def _session(self, x: torch.Tensor) -> Any:
        import onnxruntime as ort

        shape = tuple(int(s) for s in x.shape[1:])
        path = self.model_path(shape)
        if shape in self._sessions:
            return self._sessions[shape]
        fp32 = path.with_name(path.name.replace("-int8.onnx", ".onnx"))
        fresh = not fp32.is_file()
        if fresh:
            self._export(fp32, shape)
        if self.backend == "onnxruntime_int8" and not path.is_file():
            batches = self.calibration(shape) if self.calibration is not None else []
            if not batches:
                log.warning("no calibration inputs of shape %s given: calibrating int8 on the first input", shape)
                batches = [x.detach().float().cpu().numpy()]
            self._quantize(fp32, path, batches)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(self.num_threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        if fresh:  # a new fp32 export must reproduce the eager network on the input that caused it
            self._check(ort.InferenceSession(str(fp32), opts, providers=["CPUExecutionProvider"]), x, fp32)
        self._sessions[shape] = session
        return session

    def _check(self, session: Any, x: torch.Tensor, path: Path) -> None:
        # on random inputs: images have flat regions whose tied routing scores (BRAU-Net++'s top-k) torch and
        # onnxruntime may break differently, which tests tie-breaking, not the graph
        x = torch.randn(min(2, x.shape[0]), *x.shape[1:], generator=torch.Generator().manual_seed(0)).to(x.device)
        ref = self._eager(x).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.float().cpu().numpy()})
        diff, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max())
        if got.shape != ref.shape or diff > self.atol + self.rtol * scale:
            path.unlink(missing_ok=True)
            raise RuntimeError(
                f"{path}: the ONNX export differs from the eager network (output {got.shape} vs {ref.shape}, "
                f"max |diff| {diff:.3g} > {self.atol:g} + {self.rtol:g} * {scale:.3g}); the file was removed"
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, MetaTensor):
            x = x.as_tensor()
        session = self._session(x)
        (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x.detach().float().cpu().numpy())})
        return torch.from_numpy(out).to(x.device)


class _Recorder:
    """Stands in for the network while the wrapped inferer runs a calibration image: records its inputs."""

    def __init__(self, network: Callable[..., torch.Tensor]) -> None:
        self.network = network
        self.inputs: list[np.ndarray] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.as_tensor() if isinstance(x, MetaTensor) else x
        self.inputs.append(x.detach().float().cpu().numpy())
        return self.network(x)


class BackendInferer(Inferer):
    """Run ``inferer`` with the network on ``backend``: ``torch`` (as is), ``onnxruntime`` or ``onnxruntime_int8``.

    Args:
        inferer: the bundle's inferer; it gets an ``OnnxRuntimeNetwork`` in place of the network.
        backend: one of ``BACKENDS``.
        cache_dir: where exported graphs are cached (the checkpoint's folder in the bundles); when it is not
            writable, a folder in the system's temporary directory.
        calibration_data: images for int8 calibration (or a callable returning them, called only when int8
            is calibrated): dicts with ``image`` or tensors ``(C, ...)``, preprocessed as for inference or
            made so by ``calibration_transform``. The first ``num_calibration`` are used, each run through
            ``inferer`` to get the network inputs it makes. None: the first input given.
        calibration_transform: applied to each calibration item first (e.g. the bundle's preprocessing).
        num_calibration: how many calibration images to use.
        num_threads: ONNX Runtime's intra-op threads (None: ``torch.get_num_threads()``).
    """

    def __init__(
        self,
        inferer: Inferer,
        backend: str = "torch",
        cache_dir: str | os.PathLike | None = None,
        calibration_data: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
        calibration_transform: Callable[[Any], Any] | None = None,
        num_calibration: int = 4,
        num_threads: int | None = None,
    ) -> None:
        self.inferer = inferer
        self.backend = check_backend(backend)
        self.cache_dir = cache_dir
        self.calibration_data = calibration_data
        self.calibration_transform = calibration_transform
        self.num_calibration = int(num_calibration)
        self.num_threads = num_threads
        self._runners: dict[int, OnnxRuntimeNetwork] = {}

    @staticmethod
    def _writable(cache_dir: str | os.PathLike | None) -> Path | None:
        if cache_dir is None:
            return None
        path = Path(cache_dir)
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path):
                pass
        except OSError as e:
            log.warning("cannot write ONNX cache to %s (%s): using the temporary directory", path, e)
            return None
        return path

    def _calibration(self, network: torch.nn.Module) -> Callable[[tuple[int, ...]], list[np.ndarray]] | None:
        if self.calibration_data is None:
            return None

        def batches(shape: tuple[int, ...]) -> list[np.ndarray]:
            recorder = _Recorder(network)
            data = self.calibration_data() if callable(self.calibration_data) else self.calibration_data
            with torch.no_grad():
                for i, item in enumerate(data):
                    if i >= self.num_calibration:
                        break
                    if self.calibration_transform is not None:
                        item = self.calibration_transform(item)
                    image = item["image"] if isinstance(item, dict) else item
                    device = next(network.parameters()).device
                    self.inferer(torch.as_tensor(image)[None].to(device), recorder)
            return [b for b in recorder.inputs if b.shape[1:] == tuple(shape)]

        return batches

    def runner(self, network: torch.nn.Module) -> OnnxRuntimeNetwork:
        """The ONNX Runtime twin of ``network`` this inferer uses (made on first use)."""
        key = id(network)
        if key not in self._runners or self._runners[key].network is not network:
            self._runners[key] = OnnxRuntimeNetwork(
                network, self.backend, self._writable(self.cache_dir), self._calibration(network), self.num_threads
            )
        return self._runners[key]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.backend == "torch":
            return self.inferer(inputs, network, *args, **kwargs)
        if not isinstance(network, torch.nn.Module):
            raise TypeError(f"the {self.backend} backend exports a torch.nn.Module, got {type(network).__name__}")
        return self.inferer(inputs, self.runner(network), *args, **kwargs)
