"""Source checkpoints on Forge: Forge engines built by Forge's own loader, so every checkpoint Forge opens can be a
source, denoising through the engine's own ``KModel.apply_model`` (x0 at a k-diffusion sigma, as Forge's sampler
calls it for the target). The webui layer's cache, pair and legs use them like the A1111 ones.

SD3-family sources (SD3, SD3.5 M and L) are usually transformer-only files: Forge builds every such engine with
CLIP-L, CLIP-G, T5 and the VAE, taken from the checkpoint or from the "VAE / Text Encoder" menu. A source without them
gets the target's choices; when its text encoders then come from the very files the target's do, the source engine
uses the target's text encoders instead of a second copy (:func:`_share_text_encoders`).

LoRA/LyCORIS files work as in A1111 (the runtime LoRA of :mod:`lib_delta.lora` on one engine), on every family: Forge's
UNet keeps the ldm module names, and a view shows its HF text encoders under the paths A1111's key names map to
(:func:`_lora_view`). ControlNet units work too: the network is built from Forge's own UNet class and configuration, and
its residuals go in through that UNet's ``control=`` argument.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DeltaSamplingError
from ..webui.source_models import (
    FLUX_REFUSAL,
    LoadedCheckpoint,
    SourceModelError,
    latent_format_of,
    model_family,
)


class ForgeDenoiser:
    """``(x, sigma, cond) -> x0`` through a Forge engine's UNet, as Forge's ``calc_cond_uncond_batch`` calls it."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        from backend import memory_management

        unet = self.engine.forge_objects.unet
        # Registered for the sampling (hooks.before_sampling), the manager has placed it already. Not so after a
        # refiner swap mid-sampling: then load it here (load_models_gpu also logs two lines per call, so only then).
        if not any(loaded.model is unet for loaded in memory_management.current_loaded_models):
            memory_management.load_models_gpu([unet])
        if "c_crossattn" in cond:
            kwargs = {"c_crossattn": cond["c_crossattn"][0]}
        else:  # SDXL: {"crossattn", "vector"}
            kwargs = {"c_crossattn": cond["crossattn"], "y": cond["vector"]}
        device = unet.current_device if hasattr(unet, "current_device") else x.device
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        return unet.model.apply_model(x.to(device), sigma.to(device), **kwargs).to(x.device)


@dataclass
class ForgeCheckpoint(LoadedCheckpoint):
    """A source checkpoint as a Forge engine: Forge's memory manager places it (only the residency setting's "CPU
    between generations" hands it back to the manager's offload)."""

    net_patchers: dict[int, Any] = field(default_factory=dict)  # id(ControlNet) -> its ModelPatcher
    text_encoder_files: tuple[str, ...] | None = None  # SD3 family: the menu files its text encoders come from
    borrowed_text_encoders: bool = False  # the target's (same files): never moved, freed or counted as the source's

    def free(self) -> None:
        """Take the engine out of Forge's memory manager (which would keep it alive) and drop its weights."""
        from backend import memory_management

        self.release()
        for loaded in self._managed():
            memory_management.current_loaded_models.remove(loaded)
        for module in self._own_modules():
            module.to(device="meta")

    def prepare_for_target(self) -> None:
        """An SD3-family source whose text encoders come from the menu files alone conditions through the current
        target's, when the target takes them from the same files (the target may have changed since the source was
        built: a target of its own files again would otherwise keep the old target's encoders alive)."""
        if self.text_encoder_files is None or not _target_uses_text_encoders_of(self.text_encoder_files):
            return
        from modules import shared

        if self.model.forge_objects.clip is not shared.sd_model.forge_objects.clip:
            own = None if self.borrowed_text_encoders else self.model.forge_objects.clip
            _borrow_target_text_encoders(self.model)
            if own is not None:
                own.cond_stage_model.to(device="meta")
            self.borrowed_text_encoders = True

    @property
    def uses_target_text_encoders(self) -> bool:
        """Whether this source conditions through the current target's own text encoder objects (status readout)."""
        from modules import shared

        target_objects = getattr(shared.sd_model, "forge_objects", None)
        return target_objects is not None and self.model.forge_objects.clip is target_objects.clip

    def _own_modules(self) -> list[torch.nn.Module]:
        objects = self.model.forge_objects
        return [objects.unet.model] + ([] if self.borrowed_text_encoders else [objects.clip.cond_stage_model])

    def _managed(self, nets_only: bool = False) -> list[Any]:
        """The memory manager's entries (``LoadedModel``) for this engine's ControlNets, and unless ``nets_only`` its
        UNet and text encoder."""
        from backend import memory_management

        objects = self.model.forge_objects
        patchers = set() if nets_only else {id(objects.unet)}
        if not nets_only and not self.borrowed_text_encoders:
            patchers.add(id(objects.clip.patcher))
        patchers.update(id(p) for p in self.net_patchers.values())
        return [m for m in memory_management.current_loaded_models if id(m.model) in patchers]

    def net_patcher(self, net: torch.nn.Module) -> Any:
        """The memory manager's handle of a ControlNet built for this engine (one per network, made once: a new one
        per sampling would be a new entry in the manager for the same weights)."""
        from backend.patcher.base import ModelPatcher

        patcher = self.net_patchers.get(id(net))
        if patcher is None or patcher.model is not net:
            unet = self.model.forge_objects.unet
            patcher = ModelPatcher(net, load_device=unet.load_device, offload_device=unet.offload_device)
            self.net_patchers[id(net)] = patcher
        return patcher

    def release(self) -> None:
        from backend import memory_management

        for loaded in self._managed(nets_only=True):
            memory_management.current_loaded_models.remove(loaded)
        self.net_patchers.clear()
        super().release()

    @property
    def controlnet_storage(self) -> torch.dtype | None:
        """Forge stores its own ControlNets in ``unet_dtype()`` (the ``--unet-in-*`` flags) and computes them in the
        computation dtype (``modules_forge/supported_controlnet.py``): under fp8 storage their values are fp8's. DS's
        are rounded the same way (kept in the compute dtype: more memory than Forge's, the same numbers)."""
        from backend import memory_management

        stored = memory_management.unet_dtype()
        return None if stored == self.compute_dtype else stored

    @property
    def packed_storage(self) -> str | None:
        """Forge's quantised storage (nf4/fp4 through bitsandbytes, GGUF): its weights are packed bytes, not values."""
        for module in self.unet.modules():
            weight = getattr(module, "weight", None)
            kind = type(weight).__name__
            if weight is not None and ("GGUF" in kind or "4bit" in kind or not weight.dtype.is_floating_point):
                return f"{kind} ({weight.dtype})"
        return None

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

    def percent_to_sigma(self, percent: float) -> float:
        """Where Forge's units' windows end (its ControlNet's and IP-Adapter's rule): the model's own
        ``predictor.percent_to_sigma`` (the timestep-percent: 0 -> above every sigma, 1 -> 0)."""
        return float(self.model.forge_objects.unet.model.predictor.percent_to_sigma(percent))

    def move(self, device: torch.device) -> None:
        """Forge's memory manager places the engine for each sampling. Moving to the CPU (the "CPU between
        generations" residency) hands it back the way Forge unloads its own models: out of the manager, weights to
        its offload device."""
        if device.type != "cpu":
            return
        from backend import memory_management

        for loaded in self._managed():
            memory_management.current_loaded_models.remove(loaded)
            loaded.model_unload()

    def denoiser_for(self, wrapper: str) -> Any:
        # Forge's LCM sampler takes only its sigma grid from its LCM wrapper: its CFG denoiser gets x0 from the
        # engine's KModel for every sampler (backend/sampling/sampling_function.py), so the legs do the same.
        return self.denoiser

    def nbytes(self, seen: set[int] | None = None) -> int:
        seen = set() if seen is None else seen
        total = 0
        for module in self._own_modules():
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
    keys = _checkpoint_keys(info.filename)
    if any(".double_blocks.0." in k or k.startswith("double_blocks.0.") for k in keys):
        raise SourceModelError(f"{info.name} is a Flux-family checkpoint. {FLUX_REFUSAL}")
    mmdit = _is_mmdit(keys)
    if mmdit:
        _refuse_for_target(info)
    modules = _modules_for(keys) if mmdit else []
    try:
        with torch.inference_mode():
            engine = forge_loader(info.filename, additional_state_dicts=modules or None)
    except Exception as exc:
        hint = ""
        if mmdit and not modules:
            hint = ("; it holds no text encoders or VAE, which Forge needs for every SD3-family model: choose them in "
                    "Forge's \"VAE / Text Encoder\" menu (the source gets the target's choice)")
        raise SourceModelError(
            f"Forge cannot build a model from {info.name}: {type(exc).__name__}: {exc}{hint}") from exc
    if engine is None:
        raise SourceModelError(f"Forge cannot build a model from {info.name}: Forge does not recognise its type")
    if type(engine).__name__ in ("Flux", "Chroma"):
        raise SourceModelError(f"{info.name} is a {type(engine).__name__} checkpoint. {FLUX_REFUSAL}")
    family = model_family(engine)
    if family not in ("sd1", "sd2", "sdxl", "sd3") or not engine.is_webui_legacy_model():
        raise SourceModelError(f"{info.name} is not an SD1/SD2/SDXL/SD3 checkpoint ({type(engine).__name__}); Delta "
                               "Sampling sources must be one of those families")
    if getattr(engine, "is_inpaint", False):
        raise SourceModelError(f"{info.name} is an inpainting checkpoint; a source pair must be ordinary "
                               "text-to-image checkpoints (the target may be an inpainting one)")
    for objects in (engine.forge_objects, engine.forge_objects_original, engine.forge_objects_after_applying_lora):
        objects.vae = None  # DS never decodes with a source model
    engine.sd_checkpoint_info = info
    text_encoder_files, borrowed = _share_text_encoders(engine, keys, modules) if family == "sd3" else (None, False)
    unet = engine.forge_objects.unet.model.diffusion_model
    text_roots = {"sdxl": "conditioner", "sd3": "text_encoders"}
    checkpoint = ForgeCheckpoint(
        info=info, model=engine, denoiser=ForgeDenoiser(engine), family=family,
        latent_format=latent_format_of(engine), load_seconds=time.perf_counter() - started,
        text_encoder_root=text_roots.get(family, "cond_stage_model"),
        lora_view=_lora_view(engine, family),
        unet_kwargs=_constructor_kwargs(unet),
        text_encoder_files=text_encoder_files,
        borrowed_text_encoders=borrowed,
    )
    return checkpoint


def _checkpoint_keys(filename: str) -> list[str]:
    """A checkpoint's tensor names, from a safetensors header (nothing else is read); [] for other formats."""
    if not filename.lower().endswith(".safetensors"):
        return []
    try:
        from safetensors import safe_open

        with safe_open(filename, framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception:  # an unreadable file: Forge's loader says what is wrong with it
        return []


def _refuse_for_target(info: Any) -> None:
    """An SD3-family source under a target of another latent family, refused before Forge builds it (it would need
    text encoders the target was not built with)."""
    from modules import shared

    from ..latent import LATENT_FORMATS, LatentMap

    try:
        LatentMap.between(latent_format_of(shared.sd_model), LATENT_FORMATS["sd3"])
    except DeltaSamplingError as exc:
        raise SourceModelError(f"{info.name} (sd3) does not fit the target ({model_family(shared.sd_model)}): "
                               f"{exc}") from exc


def _is_mmdit(keys: list[str]) -> bool:
    return any(k.endswith("joint_blocks.0.context_block.attn.qkv.weight") for k in keys)


def _target_modules() -> list[str]:
    """The files of Forge's "VAE / Text Encoder" menu the current target was built with."""
    from modules import sd_models

    return list(sd_models.model_data.forge_loading_parameters.get("additional_modules", None) or [])


def _modules_for(keys: list[str]) -> list[str]:
    """The extra files an SD3-family source is built with: none when the checkpoint holds its text encoders and VAE,
    else the target's menu choices (Forge builds every SD3 engine with CLIP-L, CLIP-G, T5 and a VAE)."""
    complete = (any(k.startswith("text_encoders.") for k in keys)
                and any(k.startswith("first_stage_model.") for k in keys))
    return [] if complete else _target_modules()


def _target_uses_text_encoders_of(files: tuple[str, ...]) -> bool:
    """Whether the current target is an SD3-family engine whose text encoders all come from ``files`` (the menu
    choices it was built with; its checkpoint holds none of its own)."""
    from modules import shared

    target = shared.sd_model
    info = getattr(target, "sd_checkpoint_info", None)
    if not getattr(target, "is_sd3", False) or info is None or sorted(files) != sorted(_target_modules()):
        return False
    keys = _checkpoint_keys(info.filename)
    return bool(keys) and not any(k.startswith("text_encoders.") for k in keys)


def _share_text_encoders(engine: Any, keys: list[str], modules: list[str]) -> tuple[tuple[str, ...] | None, bool]:
    """Let an SD3-family source use the target's text encoders when both take them from the same files (neither
    checkpoint holds text encoders of its own, the same menu choices): the conditioning is then the target's, and one
    copy of CLIP-L/G and T5 (10 GB in bf16 with a real T5) stays in memory instead of two; the source's own copy is
    dropped at once. Returns the files when the source's text encoders come from them alone (then each generation
    borrows the current target's again: :meth:`ForgeCheckpoint.prepare_for_target`), else None; and whether they are
    borrowed now."""
    if not modules or any(k.startswith("text_encoders.") for k in keys):
        return None, False
    files = tuple(modules)
    if not _target_uses_text_encoders_of(files):
        return files, False
    own = engine.forge_objects.clip
    _borrow_target_text_encoders(engine)
    own.cond_stage_model.to(device="meta")
    return files, True


def _borrow_target_text_encoders(engine: Any) -> None:
    from modules import shared

    target = shared.sd_model
    for objects in (engine.forge_objects, engine.forge_objects_original, engine.forge_objects_after_applying_lora):
        objects.clip = target.forge_objects.clip
    for name in ("text_processing_engine_l", "text_processing_engine_g", "text_processing_engine_t5"):
        setattr(engine, name, getattr(target, name))


def _constructor_kwargs(unet: torch.nn.Module) -> dict[str, Any]:
    """The arguments Forge built its UNet with (its diffusers-style ``config``, minus what the constructor does not
    take): a ControlNet for it is built from the same class with the same arguments."""
    import inspect

    accepted = inspect.signature(type(unet).__init__).parameters
    return {k: v for k, v in dict(unet.config).items() if k in accepted and k != "self"}


def _lora_view(engine: Any, family: str) -> torch.nn.Module:
    """The engine's UNet and text encoders under the module paths A1111's LoRA key names map to.

    Forge's UNet keeps ldm's module names (``model.diffusion_model...``). Its text encoders are all HF CLIP models:
    CLIP-L is at home under ``...transformer.text_model`` as in A1111, and OpenCLIP-H (SD2) and bigG (SDXL encoder 2)
    are shown as OpenCLIP's ``model.transformer.resblocks.N`` with ``attn.{q,k,v,out}_proj`` and ``mlp.c_fc/c_proj``
    standing for HF's ``self_attn.*`` and ``mlp.fc1/fc2``. A kohya key then finds the very layer Forge's own key map
    patches for it (``lora_te_``/``lora_te2_text_model_encoder_layers_N_self_attn_q_proj`` -> that layer's
    ``q_proj``): q/k/v are whole Linear layers here, not slices of an ``in_proj``."""
    encoders = engine.forge_objects.clip.cond_stage_model
    view = torch.nn.Module()
    view.model = torch.nn.Module()
    view.model.diffusion_model = engine.forge_objects.unet.model.diffusion_model
    if family == "sd3":
        return view  # the transformer's layers only: text-encoder keys of SD3 LoRAs are reported as not applied
    if family == "sd1":
        view.cond_stage_model = encoders.clip_l  # .transformer: HF CLIP-L
    elif family == "sd2":
        view.cond_stage_model = _as_openclip(encoders.clip_h)
    else:
        view.conditioner = torch.nn.Module()
        view.conditioner.embedders = torch.nn.ModuleList([encoders.clip_l, _as_openclip(encoders.clip_g)])
    return view


def _as_openclip(encoder: Any) -> torch.nn.Module:
    """An HF CLIP text encoder's layers under OpenCLIP's names (the layers themselves, not copies)."""
    blocks = torch.nn.ModuleList()
    for layer in encoder.transformer.text_model.encoder.layers:
        block = torch.nn.Module()
        block.attn = layer.self_attn  # its children are q_proj, k_proj, v_proj, out_proj
        block.mlp = torch.nn.Module()
        block.mlp.c_fc, block.mlp.c_proj = layer.mlp.fc1, layer.mlp.fc2
        blocks.append(block)
    view = torch.nn.Module()
    view.model = torch.nn.Module()
    view.model.transformer = torch.nn.Module()
    view.model.transformer.resblocks = blocks
    return view


def install(cache: Any) -> None:
    """Make the webui layer's cache load Forge engines, and its LoRA code accept Forge's Linear layers."""
    from backend.operations import ForgeOperations

    from ..lora import register_linear_type

    cache.loader = load_checkpoint
    register_linear_type(ForgeOperations.Linear)


def register_for_sampling(target_unet: Any, engines: list[ForgeCheckpoint], nets: list[torch.nn.Module],
                          x: torch.Tensor | None, batched_pair: bool) -> None:
    """Tell Forge's memory manager, for one sampling, about everything the source legs use: the engines' UNets, the
    adapted leg's ControlNets, and the activation memory the legs' forwards need beyond the target's own (Forge
    reserves it for the target's ``[2B, C, H, W]`` only; a batched LoRA pair runs ``4B`` rows)."""
    for engine in engines:
        target_unet.add_extra_model_patcher_during_sampling(engine.model.forge_objects.unet)
    owner = engines[-1]  # the adapted leg's engine holds the ControlNets
    for net in nets:
        target_unet.add_extra_model_patcher_during_sampling(owner.net_patcher(net))
    if x is None:
        return
    batch, _, height, width = x.shape
    rows = batch * (4 if batched_pair else 2)
    target_needs = target_unet.memory_required([batch * 2, *x.shape[1:]])
    legs_need = max(e.model.forge_objects.unet.memory_required([rows, e.latent_format.channels, height, width])
                    for e in engines)
    if legs_need > target_needs:
        target_unet.add_extra_preserved_memory_during_sampling(int(legs_need - target_needs))
