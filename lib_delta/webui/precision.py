"""How the source pair follows the webui's precision (A1111; Forge's loader picks its own dtypes).

The webui decides its UNet's precision at load (``modules/sd_models.py`` ``load_model_weights``): fp32 with
``--no-half``, else fp16, then Conv2d/Linear weights as ``float8_e4m3fn`` when ``fp8_storage`` asks for it (the
"cache fp16 weight for LoRA" option keeps an fp16 copy beside each). While it samples, three module globals of
``modules.devices`` steer every ldm/sgm model, the source models too, because the webui's hijacks are class-level:
``dtype_unet`` (``apply_model`` casts ``x``, ``t`` and the conditioning to it; ``timestep_embedding`` casts its result
to it), ``unet_needs_upcast`` (``--upcast-sampling``) and ``fp8`` with ``dtype_inference`` (``devices.autocast()``
picks CPU bf16 autocast, manual casting, CUDA autocast or none from them).

A source model stored like the target needs none of this. One stored otherwise (the "float32" setting under an fp16
webui, or an fp8 source beside a target that is not fp8) would get the target's casts and crash (fp16 inputs into
fp32 weights under ``--precision half``) or silently compute in fp16 (under CUDA autocast). :func:`leg_precision`
therefore points those globals at the source model's own storage for the length of one leg (its text encoding or its
forward) and puts them back after it: the legs run synchronously inside the target's denoiser call, so nothing else
sees the change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
CHOICES = ("auto", "float32")


@dataclass(frozen=True)
class Storage:
    """How one source model's weights are stored: ``dtype`` (also the dtype it computes in), and whether its Conv2d
    and Linear weights are fp8 as the webui's ``fp8_storage`` makes them (with an fp16 copy for LoRA when
    ``fp16_copy``)."""

    dtype: torch.dtype
    fp8: bool = False
    fp16_copy: bool = False

    def __str__(self) -> str:
        return str(self.dtype).replace("torch.", "") + (" + fp8 weights" if self.fp8 else "")


@dataclass(frozen=True)
class Precision:
    """The precision asked of source models now: the webui's rule for its own models (``fp8_storage`` is its option:
    "Disable", "Enable" or "Enable for SDXL"), or float32 by the setting "Source model precision"."""

    dtype: torch.dtype
    fp8_storage: str = "Disable"
    fp16_copy: bool = False

    def storage(self, is_sdxl: bool) -> Storage:
        """The webui's ``sd_models.check_fp8`` for a model of this kind."""
        fp8 = self.fp8_storage == "Enable" or (self.fp8_storage == "Enable for SDXL" and is_sdxl)
        return Storage(self.dtype, fp8, fp8 and self.fp16_copy)

    @property
    def key(self) -> str:
        """For the cache key: a model stored another way is another model."""
        return f"{self.dtype}/fp8:{self.fp8_storage}/fp16copy:{self.fp16_copy}"


def current_precision() -> Precision:
    """What source models get now. "float32" means full precision: no fp8 either."""
    from modules import devices, shared

    if getattr(shared.opts, "delta_sampling_dtype", "auto") == "float32":
        return Precision(torch.float32)
    dtype = torch.float32 if shared.cmd_opts.no_half else devices.dtype_unet
    fp8 = "Disable" if devices.get_optimal_device_name() == "mps" else getattr(shared.opts, "fp8_storage", "Disable")
    return Precision(dtype, fp8, bool(getattr(shared.opts, "cache_fp16_weight", False)))


def store_fp8(model: torch.nn.Module, storage: Storage) -> None:
    """Store a float32-loaded model as the webui stores a checkpoint it switches to under ``fp8_storage``: Conv2d
    and Linear weights and biases as fp8 of the file's values, with an fp16 copy of each beside them (on the CPU) when
    ``storage.fp16_copy``; MultiheadAttention's own ``in_proj`` as in the file; every other parameter and buffer
    (norms, embeddings, ``alphas_cumprod``) rounded through fp16; all of it in ``storage.dtype`` but the fp8 weights.

    Measured tensor by tensor in A1111 1.10.1 (tests/webui support route ``/delta-test/compare-with-target``): a
    checkpoint the webui switches to under fp8 comes out exactly so (``load_model_weights`` halves the model before
    loading into it). The checkpoint it starts with keeps its norms in full float32 instead, so its images can be a
    few levels from the same checkpoint switched to later; a source model matches the switched-to one."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            if storage.fp16_copy:
                module.fp16_weight = module.weight.data.clone().cpu().half()
                if module.bias is not None:
                    module.fp16_bias = module.bias.data.clone().cpu().half()
            module.to(FP8)
            continue
        if isinstance(module, torch.nn.MultiheadAttention):
            continue  # OpenCLIP's in_proj stays as in the file (its out_proj is a Linear: fp8 above)
        for tensors in (module._parameters, module._buffers):
            for tensor in tensors.values():
                if tensor is not None and tensor.is_floating_point():
                    tensor.data = tensor.data.half().to(storage.dtype)


@contextlib.contextmanager
def leg_precision(storage: Storage | None) -> Iterator[None]:
    """The webui's precision globals set for a model stored as ``storage`` during the block, then restored."""
    from modules import devices, shared

    if storage is None:
        yield
        return
    wanted = {
        "dtype_unet": storage.dtype,
        "unet_needs_upcast": bool(shared.cmd_opts.upcast_sampling) and storage.dtype == torch.float16
        and devices.dtype == torch.float16,
        "fp8": storage.fp8,
        # full precision: devices.autocast() must not cast a float32 source down (it is a no-op then)
        "dtype_inference": torch.float32 if storage.dtype == torch.float32 else devices.dtype_inference,
    }
    saved = {name: getattr(devices, name) for name in wanted}
    if saved == wanted:
        yield
        return
    for name, value in wanted.items():
        setattr(devices, name, value)
    try:
        with _no_outer_autocast() if storage.dtype == torch.float32 and not storage.fp8 else contextlib.nullcontext():
            yield
    finally:
        for name, value in saved.items():
            setattr(devices, name, value)


@contextlib.contextmanager
def _no_outer_autocast() -> Iterator[None]:
    """Off with the autocast the webui samples under (``processing.py`` enters ``devices.autocast()`` for the target:
    CUDA autocast on a default GPU, CPU bf16 autocast for an fp8 target on the CPU), which would compute a float32
    source in fp16/bf16."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cuda", "cpu"):
            if _autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 (A1111 ships 2.1): one function per device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
