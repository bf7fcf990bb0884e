"""MONAI inferers for the bundles: mixed precision on any device, resized slice-by-slice 3D inference."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer
from torch import nn
from torch.func import functional_call
from tqdm import tqdm


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls/convolutions natively (AVX512-BF16 or AMX, as oneDNN reports).

    Without it (e.g. AVX2-only CPUs) PyTorch falls back to slow reference kernels: bf16 autocast is
    then several times slower than float32 (measured ~10x for BRAU-Net++, docs/performance.md).
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN or without the query
        return False


def autocast_dtype(device: torch.device | str, amp: bool) -> torch.dtype | None:
    """The mixed-precision dtype ``amp`` means on ``device``, None (float32) when ``amp`` is off.

    CUDA: bf16 when the GPU supports it, else fp16. CPU: bf16 only where the CPU has native bf16
    (AVX512-BF16/AMX), float32 otherwise, since emulated bf16 is slower than float32 and less exact.
    """
    if not amp:
        return None
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


# Modules whose weights autocast casts for every call (convolutions and linear layers run in low precision).
_CAST_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


class CastWeights:
    """Low-precision copies of a network's convolution and linear weights, made once per weight version.

    Under autocast every call casts every such weight anew (fp32 -> bf16: at batch 1 a quarter of
    CFFormer-B's bf16 forward on a CPU). Running the network on copies cast once
    (``torch.func.functional_call``) gives bitwise the same outputs, since autocast hands those ops the same
    bf16 tensors. Inference only: eval mode, no autograd, an ``nn.Module`` that is not scripted or wrapped by
    DDP; otherwise the network is called as it is. A module whose weight is also read outside the
    autocast-cast ops sets ``weights_read_in_full_precision = True`` and keeps its own (BRA's q/k/v, which
    routing reads in float64). The copies follow the weights: any in-place update or reload makes new ones.
    They are held until then (one low-precision copy of those weights: 240 MB for CFFormer-B in bf16).
    """

    def __init__(self) -> None:
        self._network: weakref.ref | None = None
        self._key: tuple = ()
        self._copies: dict[str, torch.Tensor] = {}

    @staticmethod
    def applies(network: Any) -> bool:
        """Whether ``network`` can run on cast copies now (see the class docstring)."""
        return (
            isinstance(network, nn.Module)
            and not isinstance(network, (torch.jit.ScriptModule, nn.parallel.DistributedDataParallel))
            and not network.training
            and not torch.is_grad_enabled()
        )

    @staticmethod
    def _weights(network: nn.Module, dtype: torch.dtype) -> dict[str, nn.Parameter]:
        return {
            f"{name}.{pname}" if name else pname: p
            for name, module in network.named_modules()
            if isinstance(module, _CAST_MODULES) and not getattr(module, "weights_read_in_full_precision", False)
            for pname, p in module.named_parameters(recurse=False)
            if p.is_floating_point() and p.dtype != dtype
        }

    def __call__(self, network: Any, dtype: torch.dtype | None) -> Callable[..., Any]:
        """``network`` itself, or a callable running it on copies cast to ``dtype`` (None: no autocast)."""
        if dtype is None or not self.applies(network):
            return network
        weights = self._weights(network, dtype)
        key = (dtype, *((name, p.data_ptr(), p._version, p.device) for name, p in weights.items()))
        if self._network is None or self._network() is not network or key != self._key:
            self._copies = {name: p.detach().to(dtype) for name, p in weights.items()}
            self._network, self._key = weakref.ref(network), key

        def run(*args: Any, **kwargs: Any) -> Any:
            return functional_call(network, self._copies, args, kwargs, strict=False)

        return run


class AutocastInferer(Inferer):
    """Run another inferer under ``torch.autocast`` and return float32 outputs.

    MONAI's engines autocast only on CUDA; wrapping the inferer instead gives the same mixed precision on
    CPU (bf16) and keeps the loss, metrics and post-processing in float32. The network gets a plain
    tensor: MetaTensor's per-operation metadata handling costs more than the network on CPU.
    """

    def __init__(self, inferer: Inferer | None = None, dtype: torch.dtype | None = torch.bfloat16) -> None:
        self.inferer = inferer if inferer is not None else SimpleInferer()
        self.dtype = dtype
        self.cast_weights = CastWeights()

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if isinstance(inputs, MetaTensor):
            inputs = inputs.as_tensor()
        if self.dtype is None:
            return self.inferer(inputs, network, *args, **kwargs)
        with torch.autocast(inputs.device.type, dtype=self.dtype):
            out = self.inferer(inputs, self.cast_weights(network, self.dtype), *args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) else out


class ResizedSliceInferer(Inferer):
    """Axial slice-by-slice inference of a 2D network on a volume ``(B, C, H, W, D)``, as the papers test.

    Each batch of ``sw_batch_size`` slices is resized to ``roi_size`` (bicubic for the image, as the official
    cubic zoom), run through the network, and the logits are resized back to ``(H, W)`` with nearest
    neighbour, so ``argmax`` afterwards equals the official argmax-then-nearest-zoom. With
    ``output="labels"`` each slice batch is reduced by argmax at once and the result is a ``(B, 1, H, W, D)``
    label map: memory then stays bounded by one slice batch of logits, whatever the volume depth.
    Not MONAI's SliceInferer, which tiles each slice at ``roi_size`` instead of resizing it as the papers do.
    """

    def __init__(
        self,
        roi_size: tuple[int, int] | list[int] = (224, 224),
        sw_batch_size: int = 16,
        output: str = "logits",
        image_mode: str = "bicubic",
        dtype: torch.dtype | None = None,
        progress: bool = False,
    ) -> None:
        if output not in ("logits", "labels"):
            raise ValueError(f"output must be 'logits' or 'labels', got {output!r}")
        self.roi_size = tuple(int(s) for s in roi_size)
        self.sw_batch_size = int(sw_batch_size)
        self.output = output
        self.image_mode = image_mode
        self.dtype = dtype
        self.cast_weights = CastWeights()
        self.progress = progress

    def _slices(self, depth: int):
        steps = range(0, depth, self.sw_batch_size)
        if self.progress:
            steps = tqdm(steps, desc="slices", unit="batch", leave=False)
        return steps

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if inputs.ndim != 5:
            raise ValueError(f"expected a volume batch (B, C, H, W, D), got shape {tuple(inputs.shape)}")
        b, c, h, w, d = inputs.shape
        # a plain tensor: slicing a batched MetaTensor would try to split its metadata per slice
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else torch.as_tensor(inputs)
        out: torch.Tensor | None = None
        amp = torch.autocast(x.device.type, dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()
        network = self.cast_weights(network, self.dtype)
        for start in self._slices(d):
            stop = min(start + self.sw_batch_size, d)
            # (B, C, H, W, k) -> (B*k, C, H, W)
            sl = x[..., start:stop].permute(0, 4, 1, 2, 3).reshape(-1, c, h, w).float()
            if (h, w) != self.roi_size:
                sl = F.interpolate(sl, size=self.roi_size, mode=self.image_mode, align_corners=False)
            with amp:
                logits = network(sl, *args, **kwargs)
            logits = logits.float()
            k = stop - start
            if self.output == "labels":
                # argmax before the nearest resize back: nearest only repeats pixels, so the labels are
                # identical, with 1/C of the data to resize and (H*W)/ROI fewer pixels to reduce (5x
                # faster per slice batch at 512 x 512). argmax over channels is fast channels-last.
                res = logits.contiguous(memory_format=torch.channels_last).argmax(1, keepdim=True)
                res = res.to(torch.uint8 if logits.shape[1] < 256 else torch.int64)
                if res.shape[-2:] != (h, w):
                    res = F.interpolate(res, size=(h, w), mode="nearest")
            else:
                res = logits
                if res.shape[-2:] != (h, w):
                    res = F.interpolate(res, size=(h, w), mode="nearest")
            res = res.reshape(b, k, res.shape[1], h, w).permute(0, 2, 3, 4, 1)
            if out is None:
                out = torch.empty((b, res.shape[1], h, w, d), dtype=res.dtype, device=res.device)
            out[..., start:stop] = res
        assert out is not None
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out, meta=inputs.meta, applied_operations=list(inputs.applied_operations))
        return out
