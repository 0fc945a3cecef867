"""Source checkpoints on Forge: Forge engines built by Forge's own loader, so every checkpoint Forge opens can be a
source, denoising through the engine's own ``KModel.apply_model`` (x0 at a k-diffusion sigma, as Forge's sampler
calls it for the target). The webui layer's cache, pair and legs use them like the A1111 ones.

LoRA/LyCORIS files on an SD1 source work as in A1111 (the runtime LoRA of :mod:`lib_delta.lora` on one engine): Forge's
UNet keeps the ldm module names and its CLIP-L is the same HF model, so a view with A1111's module paths is all the key
mapping needs. ControlNet units work too: the network is built from Forge's own UNet class and configuration, and its
residuals go in through that UNet's ``control=`` argument. Not on Forge yet, and refused with a message saying so: LoRAs
on SD2/SDXL sources (Forge's OpenCLIP encoders are HF models, not OpenCLIP's).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..webui.source_models import LoadedCheckpoint, SourceModelError, latent_format_of, model_family


class ForgeDenoiser:
    """``(x, sigma, cond) -> x0`` through a Forge engine's UNet, as Forge's ``calc_cond_uncond_batch`` calls it."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        from backend import memory_management

        unet = self.engine.forge_objects.unet
        memory_management.load_models_gpu([unet])  # a no-op when it is already where it computes
        if "c_crossattn" in cond:
            kwargs = {"c_crossattn": cond["c_crossattn"][0]}
        else:  # SDXL: {"crossattn", "vector"}
            kwargs = {"c_crossattn": cond["crossattn"], "y": cond["vector"]}
        device = unet.current_device if hasattr(unet, "current_device") else x.device
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        return unet.model.apply_model(x.to(device), sigma.to(device), **kwargs).to(x.device)


class ForgeCheckpoint(LoadedCheckpoint):
    """A source checkpoint as a Forge engine: Forge's memory manager places it, so there is nothing to move here."""

    supports_loras = False  # set per instance: SD1 sources take LoRA files

    def free(self) -> None:
        """Take the engine out of Forge's memory manager (which would keep it alive) and drop its weights."""
        from backend import memory_management

        self.release()
        objects = self.model.forge_objects
        patchers = {id(objects.unet), id(objects.clip.patcher)}
        for loaded in list(memory_management.current_loaded_models):
            if id(loaded.model) in patchers:
                memory_management.current_loaded_models.remove(loaded)
        for module in (objects.unet.model, objects.clip.cond_stage_model):
            module.to(device="meta")

    @contextlib.contextmanager
    def on_compute_device(self) -> Iterator[None]:
        yield

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def unet(self) -> torch.nn.Module:
        return self.model.forge_objects.unet.model.diffusion_model

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.model.forge_objects.unet.model.computation_dtype  # storage may be fp8; compute never is

    def move(self, device: torch.device) -> None:
        pass  # Forge's memory manager owns placement

    def denoiser_for(self, wrapper: str) -> Any:
        if wrapper != "k":
            raise SourceModelError("the LCM sampler is not supported with Delta Sampling on Forge yet")
        return self.denoiser

    def nbytes(self, seen: set[int] | None = None) -> int:
        seen = set() if seen is None else seen
        total = 0
        objects = self.model.forge_objects
        for module in (objects.unet.model, objects.clip.cond_stage_model):
            for tensor in list(module.parameters()) + list(module.buffers()):
                if tensor.data_ptr() in seen or tensor.device.type == "meta":
                    continue
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
        return total


def load_checkpoint(info: Any, device: torch.device, dtype: torch.dtype) -> ForgeCheckpoint:
    """A Forge engine for ``info`` (a webui CheckpointInfo), built with Forge's own loader; the VAE is dropped."""
    from backend.loader import forge_loader

    started = time.perf_counter()
    try:
        with torch.inference_mode():
            engine = forge_loader(info.filename)
    except Exception as exc:
        raise SourceModelError(f"Forge cannot build a model from {info.name}: {type(exc).__name__}: {exc}") from exc
    family = model_family(engine)
    if family not in ("sd1", "sd2", "sdxl") or not engine.is_webui_legacy_model():
        raise SourceModelError(f"{info.name} is not an SD1/SD2/SDXL checkpoint ({type(engine).__name__}); Delta "
                               "Sampling sources must be one of those families")
    if getattr(engine, "is_inpaint", False):
        raise SourceModelError(f"{info.name} is an inpainting checkpoint; a source pair must be ordinary "
                               "text-to-image checkpoints (the target may be an inpainting one)")
    for objects in (engine.forge_objects, engine.forge_objects_original, engine.forge_objects_after_applying_lora):
        objects.vae = None  # DS never decodes with a source model
    engine.sd_checkpoint_info = info
    unet = engine.forge_objects.unet.model.diffusion_model
    checkpoint = ForgeCheckpoint(
        info=info, model=engine, denoiser=ForgeDenoiser(engine), family=family,
        latent_format=latent_format_of(engine), load_seconds=time.perf_counter() - started,
        text_encoder_root="cond_stage_model", lora_view=_lora_view(engine, family),
        unet_kwargs=_constructor_kwargs(unet),
    )
    checkpoint.supports_loras = family == "sd1"
    return checkpoint


def _constructor_kwargs(unet: torch.nn.Module) -> dict[str, Any]:
    """The arguments Forge built its UNet with (its diffusers-style ``config``, minus what the constructor does not
    take): a ControlNet for it is built from the same class with the same arguments."""
    import inspect

    accepted = inspect.signature(type(unet).__init__).parameters
    return {k: v for k, v in dict(unet.config).items() if k in accepted and k != "self"}


def _lora_view(engine: Any, family: str) -> torch.nn.Module:
    """The engine's UNet and (SD1) CLIP-L under the module paths A1111's LoRA key names map to
    (``model.diffusion_model...``, ``cond_stage_model.transformer.text_model...``)."""
    view = torch.nn.Module()
    view.model = torch.nn.Module()
    view.model.diffusion_model = engine.forge_objects.unet.model.diffusion_model
    if family == "sd1":
        view.cond_stage_model = engine.forge_objects.clip.cond_stage_model.clip_l  # .transformer: HF CLIP-L
    return view


def install(cache: Any) -> None:
    """Make the webui layer's cache load Forge engines, and its LoRA code accept Forge's Linear layers."""
    from backend.operations import ForgeOperations

    from ..lora import register_linear_type

    cache.loader = load_checkpoint
    register_linear_type(ForgeOperations.Linear)
