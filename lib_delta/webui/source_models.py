"""Loading, sharing and caching the source pair inside the webui, without touching the user's model.

A source checkpoint is built with the webui's own machinery (state-dict reader, config finder, meta-device
instantiation, type flags, the webui's text-encoder wrappers) but never through ``sd_models.load_model``, which would
replace ``shared.sd_model``. Its VAE is never kept: DS only needs the UNet and the text encoders.

The adapted leg is another checkpoint, or the base plus LoRA/LyCORIS files, or both. When it is the base plus LoRAs,
one model holds the base weights once and the LoRAs run as a switchable runtime delta (:class:`lib_delta.lora.
RuntimeLora`), so both legs can be evaluated in one batched forward. Two checkpoints share every tensor that is
identical in both (often the text encoders).

:data:`CACHE` is the one owner of loaded source models: it keeps up to ``delta_sampling_cache_size`` checkpoints
between generations (LRU), keyed by file, size, mtime and precision (:mod:`.precision`), and frees them on
:meth:`SourceCache.unload`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..clip_vision import ClipVision, ClipVisionError, read_clip_vision
from ..control_units import IP_ENCODERS, ControlUnit
from ..controlnet import ControlNet, build_controlnet, expand_control_lora
from ..controlnet_files import ControlNetFileError, read_controlnet
from ..errors import DeltaSamplingError, OutOfMemory
from ..ip_adapter import IPAdapter, IPAdapterFileError, build_ip_adapter, is_ip_adapter, read_ip_adapter
from ..latent import LATENT_FORMATS, LatentFormat
from ..lora import LoraError, LoraMisfitError, LoraNetwork, MergedLora, RuntimeLora, merge, parse_network
from ..lora_keys import MMDIT_FAMILIES, layers_named_per_family
from ..lora_mmdit import is_diffusers_mmdit, rewrite_diffusers_mmdit
from ..params import DeltaParams, LoraSpec
from ..residency import Offloader
from .precision import Precision, Storage, current_precision, leg_precision, store_fp8

CONTROLNETS_PER_CHECKPOINT = 4
ENCODERS_KEPT = 1
"""CLIP vision encoders (IP-Adapter units) the cache keeps between generations (ViT-H is 2.5 GB in fp32)."""


class SourceModelError(DeltaSamplingError):
    """A source model or LoRA could not be used; HTTP callers get status 422 (their request named it)."""

    http_status = 422


# --- resolving names -----------------------------------------------------------------------------------------------


_NAME_WITH_HASH = re.compile(r"(.*?)\s*\[([0-9a-fA-F]{8,64})\]")


def split_hash(name: str) -> tuple[str, str | None]:
    """``"name [0123abcd]"`` -> ``("name", "0123abcd")``; a name without a bracketed hash -> ``(name, None)``."""
    m = _NAME_WITH_HASH.fullmatch(name)
    return (m.group(1), m.group(2).lower()) if m else (name, None)


def resolve_checkpoint(name: str, what: str) -> Any:
    """The webui CheckpointInfo for ``name``, matched exactly (title, file name, name without extension, or hash).

    ``sd_models.get_closet_checkpoint_match`` falls back to substring matching, so a short name could silently pick
    some other checkpoint; here a name must match exactly, optionally followed by `` [hash]``.
    """
    from modules import sd_models

    if not name:
        raise SourceModelError(f"{what}: no checkpoint given")
    info = sd_models.checkpoint_aliases.get(name)
    wanted_hash = None
    if info is None:
        bare, wanted_hash = split_hash(name)
        if wanted_hash:
            info = sd_models.checkpoint_aliases.get(bare)
    if info is None:
        known = ", ".join(sorted(sd_models.checkpoint_tiles(use_short=False))[:20]) or "none"
        raise SourceModelError(
            f"{what}: no checkpoint named {name!r}. Use a name from the checkpoint list (refresh it after adding "
            f"files); known: {known}"
        )
    if wanted_hash:
        shorthash = info.calculate_shorthash() or ""
        if not (shorthash.startswith(wanted_hash) or (info.sha256 or "").startswith(wanted_hash)):
            raise SourceModelError(
                f"{what}: {info.name} has hash {shorthash}, but {wanted_hash} was asked for: a different file now has "
                "that name"
            )
    return info


def resolve_lora(name: str) -> Any:
    """The webui's NetworkOnDisk for a LoRA/LyCORIS name (exact name or alias)."""
    try:
        import networks  # the built-in Lora extension's module, loaded before any extension script runs
    except ImportError as exc:
        raise SourceModelError(
            "the built-in Lora extension is disabled, so LoRA files cannot be listed; enable it or use a checkpoint"
        ) from exc
    if not networks.available_networks:
        networks.list_available_networks()
    on_disk = networks.available_networks.get(name) or networks.available_network_aliases.get(name)
    if on_disk is None:
        networks.list_available_networks()  # files added since start-up
        on_disk = networks.available_networks.get(name) or networks.available_network_aliases.get(name)
    if on_disk is None:
        known = ", ".join(sorted(networks.available_networks)[:20]) or "none"
        raise SourceModelError(f"loras: no LoRA/LyCORIS named {name!r} in the Lora folder; known: {known}")
    return on_disk


CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


def controlnet_dirs() -> list[str]:
    """Where ControlNet files are looked for: models/ControlNet, and the folders sd-webui-controlnet reads."""
    from modules import paths, shared
    from modules.paths_internal import extensions_dir

    dirs = [os.path.join(paths.models_path, "ControlNet"),
            os.path.join(extensions_dir, "sd-webui-controlnet", "models"),
            getattr(shared.cmd_opts, "controlnet_dir", None),
            getattr(shared.opts, "control_net_models_path", None)]
    out: list[str] = []
    for folder in dirs:
        if folder and os.path.isdir(folder) and os.path.abspath(folder) not in out:
            out.append(os.path.abspath(folder))
    return out


def list_controlnets() -> dict[str, str]:
    """ControlNet names (file names without extension; the first folder wins a clash) -> file paths, sorted."""
    found: dict[str, str] = {}
    for folder in controlnet_dirs():
        for root, _dirs, files in os.walk(folder, followlinks=True):
            for file in sorted(files):
                stem, suffix = os.path.splitext(file)
                if suffix.lower() in CONTROLNET_SUFFIXES and stem not in found:
                    found[stem] = os.path.join(root, file)
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def controlnet_hash(name: str, filename: str) -> str:
    """The file's sha256, first 10 hex digits, through the webui's hash cache (computed once per file)."""
    from modules import hashes

    return (hashes.sha256(filename, f"controlnet/{name}") or "")[:10]


def resolve_controlnet(name: str) -> tuple[str, str]:
    """(name, file) for a ControlNet named exactly (``name``, ``name.ext`` or ``name [hash]``); lists folders anew."""
    available = list_controlnets()
    name, wanted_hash = split_hash(name)
    stem = os.path.splitext(name)[0] if os.path.splitext(name)[1].lower() in CONTROLNET_SUFFIXES else name
    filename = available.get(stem)
    if filename is None:
        known = ", ".join(list(available)[:20]) or "none"
        folders = ", ".join(controlnet_dirs()) or "models/ControlNet (missing)"
        raise SourceModelError(f"controlnet: no ControlNet named {name!r} in {folders}; known: {known}")
    if wanted_hash:
        full = controlnet_hash(stem, filename)
        if not full.startswith(wanted_hash[: len(full)]):
            raise SourceModelError(f"controlnet: {stem} has hash {full}, but {wanted_hash} was asked for: a different "
                                   "file now has that name")
    return stem, filename


# --- one loaded checkpoint -----------------------------------------------------------------------------------------


def _file_key(filename: str) -> tuple[str, int, float]:
    st = os.stat(filename)
    return (os.path.abspath(filename), st.st_size, st.st_mtime)


FLUX_REFUSAL = ("Flux and Chroma models are not supported by Delta Sampling yet: Forge fixes their full size (12B "
                "parameters), so no test model small enough for this project's test machines exists to prove a "
                "transfer with them; the SD3 family (SD3, SD3.5 M and L) is supported in Forge")
A1111_SD3_REFUSAL = ("Delta Sampling does not run the SD3 family in the AUTOMATIC1111 webui: 1.10 loads SD3 Medium "
                     "alone (SD3.5 Medium fails to load, SD3.5 Large loads without its QK-norm and draws noise), so "
                     "the SD3 <-> SD3.5 transfers the family is for cannot run here; Forge runs them")


def model_family(model: Any) -> str:
    """The family of a loaded webui model: "sd1", "sd2", "sdxl", "sd3" (SD3 and SD3.5), or Forge's "flux" and
    "chroma" (which DS refuses)."""
    if getattr(model, "is_sd3", False):
        return "sd3"
    kind = type(model).__name__
    if kind in ("Flux", "Chroma"):  # Forge's engines; no is_* flag tells them
        return kind.lower()
    if getattr(model, "is_sdxl", False):
        return "sdxl"
    if getattr(model, "is_sd2", False):
        return "sd2"
    if getattr(model, "is_sd1", False):
        return "sd1"
    return "sd1"


def latent_format_of(model: Any) -> LatentFormat:
    """The latent format of a loaded webui model, with the scale factor the model itself uses."""
    family = model_family(model)
    shipped = LATENT_FORMATS[family]
    scale = float(getattr(model, "scale_factor", shipped.scale))
    channels = int(getattr(model, "latent_channels", shipped.channels))
    # the family's flow, VAE and grid rules as shipped, with the factors the model itself uses
    return replace(shipped, channels=channels, scale=scale,
                   shift=float(getattr(model, "shift_factor", shipped.shift)))


def _param_bytes(module: torch.nn.Module, seen: set[int] | None = None) -> int:
    total = 0
    seen = set() if seen is None else seen
    for tensor in list(module.parameters()) + list(module.buffers()):
        ptr = tensor.data_ptr()
        if ptr in seen or tensor.device.type == "meta":
            continue
        seen.add(ptr)
        total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class LoadedCheckpoint:
    """A source checkpoint ready to denoise: the webui model (no VAE) and its k-diffusion denoiser."""

    info: Any
    model: torch.nn.Module
    denoiser: torch.nn.Module
    family: str
    latent_format: LatentFormat
    load_seconds: float
    text_encoder_root: str  # "cond_stage_model" (SD1/SD2) or "conditioner" (SDXL): where text-encoder LoRAs apply
    lora_view: torch.nn.Module  # the model under its original module paths, as LoRA key names expect them
    unet_kwargs: dict[str, Any] = field(default_factory=dict)  # the UNet's constructor arguments (its config)
    controlnets: OrderedDict[tuple, ControlNet] = field(default_factory=OrderedDict)  # built for this UNet, LRU
    lora_cache: dict[tuple, LoraNetwork] = field(default_factory=dict)
    runtime_lora: RuntimeLora | None = None  # hooks currently installed on this model (at most one set)
    offload: bool = False  # --lowvram/--medvram: wait on the CPU, visit the GPU for each forward
    storage: Storage | None = None  # A1111: how the weights are stored (None: the host's loader decided, Forge)
    _wrappers: dict[str, torch.nn.Module] = field(default_factory=dict)  # denoiser_for's other wrappers, built once

    @contextlib.contextmanager
    def on_compute_device(self) -> Iterator[None]:
        """The model ready to compute for the block: the webui's precision globals set to its own storage
        (:func:`.precision.leg_precision`), and under --lowvram/--medvram the model visiting the GPU
        (:data:`OFFLOAD`)."""
        with leg_precision(self.storage):
            if not self.offload:
                yield
                return
            from modules import devices

            with OFFLOAD.visit(self, devices.device, devices.cpu):
                yield

    @property
    def title(self) -> str:
        return self.info.title

    def nbytes(self, seen: set[int] | None = None) -> int:
        seen = set() if seen is None else seen
        return _param_bytes(self.model, seen) + sum(_param_bytes(net, seen) for net in self.controlnets.values())

    @property
    def unet(self) -> torch.nn.Module:
        return self.model.model.diffusion_model

    @property
    def controlnet_storage(self) -> torch.dtype | None:
        """The dtype the host stores its own ControlNets in where it differs from the compute dtype (None: A1111,
        whose ControlNet extension has no fp8 storage; sd-webui-controlnet keeps them in the UNet's dtype)."""
        return None

    @property
    def packed_storage(self) -> str | None:
        """What a quantised storage packs its weights as (Forge: nf4/fp4/GGUF), or None: LoRA deltas and control-LoRA
        expansion read weights as values, which packed bytes are not. fp8 is not packed (it is upcast)."""
        return None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the UNet computes in (ControlNets are built in it): its storage dtype, never fp8."""
        return self.storage.dtype if self.storage is not None else next(self.unet.parameters()).dtype

    def controlnet(self, name: str, filename: str) -> ControlNet | IPAdapter:
        """The ControlNet or IP-Adapter in ``filename`` built for this checkpoint's UNet (cached; at most
        :data:`CONTROLNETS_PER_CHECKPOINT` per checkpoint, least recently used freed first)."""
        key = _file_key(filename)
        net = self.controlnets.get(key)
        if net is None:
            state_dict = read_checked_state_dict(filename, "ControlNet file")
            try:
                if is_ip_adapter(state_dict):
                    net = build_ip_adapter(self.unet, read_ip_adapter(state_dict, name), source=self.info.name,
                                           source_family=self.family, device=self.device, dtype=self.compute_dtype)
                    return self._keep(key, net)
                cn = read_controlnet(state_dict, name)
                if cn.kind == "control_lora":
                    _refuse_packed(self, f"the control-LoRA {name}")
                    cn = expand_control_lora(cn, self.unet.state_dict())
                net = build_controlnet(self.unet, self.unet_kwargs, cn, device=self.device, dtype=self.compute_dtype,
                                       source=self.info.name, source_family=self.family,
                                       stored_as=self.controlnet_storage)
            except (ControlNetFileError, IPAdapterFileError) as exc:
                raise SourceModelError(f"{exc} ({filename})") from exc
            finally:
                del state_dict
            return self._keep(key, net)
        self.controlnets.move_to_end(key)
        return net

    def _keep(self, key: tuple, net: ControlNet | IPAdapter) -> ControlNet | IPAdapter:
        while len(self.controlnets) >= CONTROLNETS_PER_CHECKPOINT:
            self.controlnets.popitem(last=False)
        self.controlnets[key] = net
        return net

    def denoiser_for(self, wrapper: str) -> torch.nn.Module:
        """The k-diffusion wrapper matching the target's: the usual one; LCM's (its own x0 scaling and t grid); or,
        for the timestep samplers (DDIM, PLMS, UniPC: ``"timesteps"``), the usual one with the timestep it computes
        back from sigma snapped to the integer step the target was called at (see :func:`_snapping_to_steps`)."""
        if wrapper == "k":
            return self.denoiser
        if wrapper not in self._wrappers:
            if wrapper == "lcm":
                from modules.sd_samplers_lcm import LCMCompVisDenoiser

                self._wrappers[wrapper] = LCMCompVisDenoiser(self.model)
            else:
                self._wrappers[wrapper] = _snapping_to_steps(type(self.denoiser))(
                    self.model, quantize=getattr(self.denoiser, "quantize", False))
        return self._wrappers[wrapper]

    @property
    def device(self) -> torch.device:
        return self.model.alphas_cumprod.device

    def move(self, device: torch.device) -> None:
        self.denoiser.to(device)  # the denoiser holds the model as a submodule, plus its sigma tables
        self.model.alphas_cumprod = self.model.alphas_cumprod.to(device)
        for net in self.controlnets.values():
            net.to(device)
        self._wrappers.clear()  # rebuilt on the new device when needed
        # LoRA factors copied to the device the model left must not stay there (VRAM under --medvram)
        if self.runtime_lora is not None:
            self.runtime_lora.clear_device_copies()
        for network in self.lora_cache.values():
            network.clear_cache()

    def prepare_for_target(self) -> None:
        """Called for each generation before the pair is used: a host's model may adjust to the current target (Forge:
        SD3-family sources condition through the target's text encoders when they are the same files)."""

    def drop_runtime_lora(self) -> None:
        if self.runtime_lora is not None:
            self.runtime_lora.remove()
            self.runtime_lora = None

    def free(self) -> None:
        """Free the weights even while something still references this object (a finished job, a traceback): they
        move to the meta device, shared tensors included."""
        self.release()
        self.denoiser.to(device="meta")  # the denoiser holds the model as a submodule

    def release(self) -> None:
        """Forget this model: hooks off, parsed LoRAs dropped. Tensors it shares with another model stay alive."""
        self.drop_runtime_lora()
        self.lora_cache.clear()
        self.controlnets.clear()


def _snapping_to_steps(denoiser_class: type) -> type:
    """``denoiser_class`` (k-diffusion's CompVis(V)Denoiser) whose ``sigma_to_t`` returns the integer step when it
    lands within 1e-3 of one. The timestep samplers call the target's UNet at integer steps; a leg gets the same
    point as a k-diffusion sigma, and the sigma -> t round trip through the source's float32 table comes back a few
    1e-5 off. In float32 that is invisible; under bf16 autocast (the webui's fp8 path) the timestep embedding rounds
    differently and the image moves by tenths of a level (measured: DDIM mean 0.21 / max 2)."""

    def sigma_to_t(self: Any, sigma: torch.Tensor, quantize: Any = None) -> torch.Tensor:
        t = denoiser_class.sigma_to_t(self, sigma, quantize)
        nearest = t.round()
        return torch.where((t - nearest).abs() < 1e-3, nearest, t)

    return type(f"StepSnapping{denoiser_class.__name__}", (denoiser_class,), {"sigma_to_t": sigma_to_t})


def read_checked_state_dict(filename: str, what: str) -> dict:
    """A checkpoint or LoRA file's tensors, read through the webui's readers; pickles only via its safe unpickler."""
    from modules import sd_models

    try:
        if os.path.splitext(filename)[1].lower() == ".safetensors":
            loaded = sd_models.read_state_dict(filename, map_location="cpu")
            if loaded is None:  # Forge's read_state_dict is a stub (its loader reads checkpoints itself)
                import safetensors.torch

                loaded = safetensors.torch.load_file(filename, device="cpu")
            return loaded
        # The webui replaces torch.load with its safe unpickler, which returns None (after printing why) for a pickle
        # that holds anything but plain tensor data.
        loaded = torch.load(filename, map_location="cpu")
        if loaded is None:
            raise SourceModelError(
                f"the webui's safe unpickler refused {filename}: the pickle holds code or objects that are not plain "
                "tensor data (the console says which). Use a .safetensors file instead"
            )
        return sd_models.get_state_dict_from_checkpoint(loaded)
    except SourceModelError:
        raise
    except Exception as exc:
        raise SourceModelError(
            f"cannot read {what} {filename}: {type(exc).__name__}: {exc}. The file is damaged or not a {what}; "
            "download it again"
        ) from exc


def _clip_weights_present(state_dict: dict) -> bool:
    from modules import sd_models

    probes = [sd_models.sd1_clip_weight, sd_models.sd2_clip_weight, sd_models.sdxl_clip_weight,
              sd_models.sdxl_refiner_clip_weight]
    return any(p in state_dict for p in probes)


def _wrap_text_encoders(model: Any) -> None:
    """Give the source model the webui's prompt handling (weights, emphasis, BREAK, >75 tokens, TI), as
    ``sd_hijack.hijack`` does, without calling it: that would repoint the global hijack at this model."""
    import ldm.modules.encoders.modules as ldm_encoders
    from modules import sd_hijack, sd_hijack_clip, sd_hijack_open_clip
    from modules.sd_hijack import EmbeddingsWithFixes

    hijack = sd_hijack.model_hijack  # used only as the textual-inversion database and the "fixes" channel
    conditioner = getattr(model, "conditioner", None)
    if conditioner is not None:
        wrapped = []
        for i, embedder in enumerate(conditioner.embedders):
            typename = type(embedder).__name__
            if typename == "FrozenOpenCLIPEmbedder":
                embedder.model.token_embedding = EmbeddingsWithFixes(embedder.model.token_embedding, hijack)
                conditioner.embedders[i] = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(embedder, hijack)
            elif typename == "FrozenCLIPEmbedder":
                emb = embedder.transformer.text_model.embeddings
                emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding, hijack)
                conditioner.embedders[i] = sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords(embedder, hijack)
            elif typename == "FrozenOpenCLIPEmbedder2":
                embedder.model.token_embedding = EmbeddingsWithFixes(
                    embedder.model.token_embedding, hijack, textual_inversion_key="clip_g"
                )
                conditioner.embedders[i] = sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords(embedder, hijack)
            else:
                continue
            wrapped.append(conditioner.embedders[i])
        model.cond_stage_model = wrapped[0] if len(wrapped) == 1 else conditioner
        return
    encoder = model.cond_stage_model
    if type(encoder) is ldm_encoders.FrozenCLIPEmbedder:
        emb = encoder.transformer.text_model.embeddings
        emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding, hijack)
        model.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(encoder, hijack)
    elif type(encoder) is ldm_encoders.FrozenOpenCLIPEmbedder:
        encoder.model.token_embedding = EmbeddingsWithFixes(encoder.model.token_embedding, hijack)
        model.cond_stage_model = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(encoder, hijack)
    else:
        raise SourceModelError(f"unsupported text encoder {type(encoder).__name__} in a source checkpoint")


def _send_webui_models_out() -> None:
    """The webui's module that stays on the GPU after its forward under --medvram/--lowvram goes to the CPU."""
    from modules import lowvram

    lowvram.send_everything_to_cpu()


OFFLOAD = Offloader(send_host_out=_send_webui_models_out)
"""The low-VRAM policy of every source model (:mod:`lib_delta.residency`); its counts go into each generation's
status (``last_generation``)."""


def low_vram_mode(family: str | None = None) -> bool:
    """The webui runs with --lowvram or --medvram (or --medvram-sdxl and an SDXL model)."""
    from modules import shared

    opts = shared.cmd_opts
    return bool(getattr(opts, "lowvram", False) or getattr(opts, "medvram", False)
                or (getattr(opts, "medvram_sdxl", False) and family == "sdxl"))


def load_checkpoint(info: Any, device: torch.device, precision: Precision) -> LoadedCheckpoint:
    """Build one source model from a checkpoint file, stored as the webui stores its own models at ``precision``
    (fp8 weights included); on failure nothing stays allocated."""
    import k_diffusion.external
    from modules import sd_disable_initialization, sd_models, sd_models_config, sd_models_xl, shared
    from omegaconf import OmegaConf

    started = time.perf_counter()
    model = None
    try:
        if not info.is_safetensors and getattr(shared.cmd_opts, "disable_safe_unpickle", False):
            raise SourceModelError(
                f"{info.name} is a pickle checkpoint and the webui's safe unpickler is disabled "
                "(--disable-safe-unpickle); convert it to .safetensors to use it as a DS source"
            )
        state_dict = read_checked_state_dict(info.filename, "checkpoint")
        if any(k.endswith("x_embedder.proj.weight") for k in state_dict):  # an MMDiT, before building anything
            raise SourceModelError(f"{info.name} is an SD3-family checkpoint: {A1111_SD3_REFUSAL}")
        config_path = sd_models_config.find_checkpoint_config(state_dict, info)
        config = OmegaConf.load(config_path)
        sd_models.repair_config(config, state_dict)
        unet_config = config.model.params.get("unet_config") or config.model.params.get("network_config")
        if precision.dtype == torch.float32 and unet_config.params.get("use_fp16"):
            # repair_config sets it under --precision half / --upcast-sampling: the UNet would cast its input to fp16
            unet_config.params.use_fp16 = False
        unet_kwargs = OmegaConf.to_container(unet_config.params, resolve=True)
        for key in [k for k in state_dict if k.startswith("first_stage_model.")]:
            del state_dict[key]  # the VAE is never needed for DS
        with sd_disable_initialization.DisableInitialization(disable_clip=_clip_weights_present(state_dict)), \
                sd_disable_initialization.InitializeOnMeta():
            model = sd_models.instantiate_from_config(config.model, state_dict)
        model.first_stage_model = None
        sd_models.set_model_type(model, state_dict)
        sd_models.set_model_fields(model)
        if model.is_sdxl:
            sd_models_xl.extend_sdxl(model)
        _refuse_unusable(model, info)
        storage = precision.storage(bool(model.is_sdxl))
        dtype = storage.dtype
        # (fp8: loaded in float32, store_fp8 makes the fp8 weights from the file's own values)
        conversion = (None if dtype == torch.float32 or storage.fp8
                      else {"first_stage_model": None, "alphas_cumprod": None, "": dtype})
        with sd_disable_initialization.LoadStateDictOnMeta(state_dict, device="cpu",
                                                           weight_dtype_conversion=conversion):
            model.load_state_dict(state_dict, strict=False)
        del state_dict
        missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
        if missing:
            raise SourceModelError(
                f"checkpoint {info.name} lacks {len(missing)} weights its config needs (first: {missing[0]}); it is "
                f"incomplete or does not match its config {os.path.basename(config_path)}"
            )
        alphas = model.alphas_cumprod
        if storage.fp8:
            store_fp8(model, storage)  # alphas_cumprod rounded in place with the other buffers
        else:
            model.alphas_cumprod = None
            model.to(dtype)
        model.alphas_cumprod = alphas.float()
        model.alphas_cumprod_original = model.alphas_cumprod
        sd_models.apply_alpha_schedule_override(model)  # the same schedule override the target gets
        model.lowvram = False
        model.is_sdxl_inpaint = False  # _refuse_unusable let only 4-channel UNets through
        model.sd_checkpoint_info = info
        model.sd_model_checkpoint = info.filename
        model.eval()
        model.requires_grad_(False)
        text_root = "conditioner" if getattr(model, "conditioner", None) is not None else "cond_stage_model"
        lora_view = _lora_view(model, text_root)
        _wrap_text_encoders(model)
        model.to(device)
        model.alphas_cumprod = model.alphas_cumprod.to(device)
        wrapper = (k_diffusion.external.CompVisVDenoiser if model.parameterization == "v"
                   else k_diffusion.external.CompVisDenoiser)
        denoiser = wrapper(model, quantize=shared.opts.enable_quantization)
        return LoadedCheckpoint(
            info=info, model=model, denoiser=denoiser, family=model_family(model),
            latent_format=latent_format_of(model), load_seconds=time.perf_counter() - started,
            text_encoder_root=text_root, lora_view=lora_view, unet_kwargs=unet_kwargs, storage=storage,
        )
    except torch.cuda.OutOfMemoryError as exc:
        _discard(model)
        raise OutOfMemory(
            f"out of GPU memory while loading the source checkpoint {info.name} (nothing of it stays loaded). Free "
            "memory (Delta Sampling settings: keep source models on CPU between generations, or unload them), use "
            "smaller checkpoints, or start the webui with --medvram"
        ) from exc
    except SourceModelError:
        _discard(model)
        raise
    except Exception as exc:
        _discard(model)
        raise SourceModelError(f"cannot build a model from {info.name}: {type(exc).__name__}: {exc}") from exc


def _refuse_unusable(model: Any, info: Any) -> None:
    if getattr(model, "is_sd3", False):
        raise SourceModelError(f"{info.name} is an SD3 checkpoint: {A1111_SD3_REFUSAL}")
    unet_in = getattr(getattr(model.model, "diffusion_model", None), "in_channels", 4)
    if unet_in != 4 or getattr(model, "cond_stage_key", "") == "edit":
        raise SourceModelError(
            f"{info.name} is an inpainting or instruct-pix2pix checkpoint ({unet_in} UNet input channels); a source "
            "pair must be ordinary text-to-image checkpoints (the target may be an inpainting one)"
        )


def _discard(model: Any) -> None:
    if model is not None:
        with contextlib.suppress(Exception):  # best effort while already failing
            model.to(device="meta")
    gc.collect()
    _empty_device_cache()


def _empty_device_cache() -> None:
    from modules import devices

    devices.torch_gc()


def share_identical_tensors(keep: torch.nn.Module, other: torch.nn.Module) -> int:
    """Make ``other`` use ``keep``'s tensor wherever both hold an identical parameter; returns the bytes saved."""
    kept = dict(keep.named_parameters())
    saved = 0
    with torch.no_grad():
        for name, param in list(other.named_parameters()):
            twin = kept.get(name)
            if twin is None or twin is param or twin.shape != param.shape or twin.dtype != param.dtype:
                continue
            if twin.device != param.device or not torch.equal(twin, param):
                continue
            owner_path, _, attr = name.rpartition(".")
            owner = other.get_submodule(owner_path) if owner_path else other
            setattr(owner, attr, twin)
            saved += param.numel() * param.element_size()
    return saved


# --- LoRA networks -------------------------------------------------------------------------------------------------


def _refuse_packed(checkpoint: LoadedCheckpoint, what: str) -> None:
    packed = checkpoint.packed_storage
    if packed is not None:
        raise SourceModelError(
            f"{what} cannot be applied to {checkpoint.info.name}: its UNet weights are stored quantised as {packed}, "
            "packed bytes that a delta cannot be built from or added to. Set Forge's 'Diffusion in Low Bits' to "
            "Automatic, fp16 or fp8 for the source, or use a checkpoint stored in fp16/fp8"
        )


def load_lora(checkpoint: LoadedCheckpoint, spec: LoraSpec) -> LoraNetwork:
    """Parse a LoRA/LyCORIS file for a loaded source checkpoint (cached per file and checkpoint)."""
    _refuse_packed(checkpoint, f"loras: {spec.name}")
    on_disk = resolve_lora(spec.name)
    key = _file_key(on_disk.filename)
    cached = checkpoint.lora_cache.get(key)
    if cached is not None:
        return cached
    try:
        state_dict = read_checked_state_dict(on_disk.filename, "LoRA file")
    except SourceModelError as exc:
        raise SourceModelError(f"loras: {exc}") from exc
    if checkpoint.family in MMDIT_FAMILIES and is_diffusers_mmdit(state_dict):
        state_dict = rewrite_diffusers_mmdit(state_dict, last_block=len(checkpoint.unet.joint_blocks) - 1)
    made_for = getattr(getattr(on_disk, "sd_version", None), "name", None) or "unknown"
    hint = (f"it was probably made for another model family (its file says: {made_for}); pick a LoRA trained on the "
            "source base's family")
    try:
        network = parse_network(state_dict, checkpoint.family, name=spec.name, model=checkpoint.lora_view)
    except LoraMisfitError as exc:
        raise SourceModelError(
            f"loras: {spec.name} does not fit the {checkpoint.family} source {checkpoint.info.name}: {exc}; {hint}"
        ) from exc
    except LoraError as exc:
        raise SourceModelError(f"loras: {spec.name} ({on_disk.filename}) cannot be applied: {exc}") from exc
    if network.matched_keys == 0:
        per_family = layers_named_per_family(state_dict)
        others = [family for family, count in per_family.items() if count and family != checkpoint.family]
        if others and per_family.get(checkpoint.family, 0) < max(per_family[f] for f in others):
            why = (f"its keys name layers of {' / '.join(others)} models; {hint}")
        elif network.skipped_keys:
            reasons = sorted(set(network.skipped_keys.values()))
            why = f"the webui would not apply any of them either ({'; '.join(reasons[:2])})"
        else:
            why = (f"none of its keys names a layer of this model (first: {', '.join(network.not_applied[:3])}); "
                   "it is not a LoRA/LyCORIS file for this family")
        raise SourceModelError(
            f"loras: {spec.name} matched 0 of {network.total_keys} keys of the {checkpoint.family} source "
            f"{checkpoint.info.name}: {why}"
        )
    network.on_disk = on_disk
    checkpoint.lora_cache[key] = network
    return network


def _lora_view(model: Any, text_root: str) -> torch.nn.Module:
    """A container whose module paths are the unwrapped model's (``model.diffusion_model...``,
    ``cond_stage_model.transformer...``, ``conditioner.embedders.N...``), built before the text encoders are wrapped:
    LoRA key names refer to those paths, and wrapping moves the encoders under ``.wrapped``."""
    view = torch.nn.Module()
    view.model = model.model
    if text_root == "conditioner":
        conditioner = torch.nn.Module()
        conditioner.embedders = torch.nn.ModuleList(list(model.conditioner.embedders))
        view.conditioner = conditioner
    else:
        view.cond_stage_model = model.cond_stage_model
    return view


# --- the pair ------------------------------------------------------------------------------------------------------


@dataclass
class SourcePair:
    """The two legs of one generation: which models they run on and how the adapted leg differs from the base."""

    base: LoadedCheckpoint
    adapted: LoadedCheckpoint  # may be ``base`` itself (then the LoRAs make the difference)
    loras: list[tuple[LoraNetwork, float]]
    runtime_lora: RuntimeLora | None
    loaded_now: list[str]  # titles loaded for this generation (empty: everything came from the cache)
    controls: list[tuple[ControlUnit, ControlNet, str]] = field(default_factory=list)  # (unit, network, title)

    @property
    def changes_nothing(self) -> bool:
        """Adapted is the base itself with no LoRA and no ControlNet: the delta is exactly 0."""
        return self.adapted is self.base and not self.loras and not self.controls

    @property
    def only_controls_differ(self) -> bool:
        """Adapted is the base itself plus ControlNet units only: where no unit runs, the delta is exactly 0."""
        return self.adapted is self.base and not self.loras and bool(self.controls)

    @property
    def shares_weights(self) -> bool:
        """Both legs run on one model (the LoRA pair): they can go in one batched forward."""
        return self.adapted is self.base

    @property
    def latent_format(self) -> LatentFormat:
        return self.base.latent_format

    def merged_text_encoder_loras(self) -> MergedLora | None:
        """Merge the LoRAs' text-encoder parts into the adapted leg's text encoder until the handle is restored."""
        if not self.loras:
            return None
        root = self.adapted.text_encoder_root
        return merge(getattr(self.adapted.lora_view, root), self.loras, root=root)

    def release(self) -> None:
        """Take the runtime LoRA hooks off (the models stay in the cache)."""
        self.adapted.drop_runtime_lora()
        self.runtime_lora = None

    def has_text_encoder_loras(self) -> bool:
        root = self.adapted.text_encoder_root + "."
        return any(path.startswith(root) for net, _ in self.loras for path in net.modules)


def _unit_for(unit: ControlUnit, net: ControlNet | IPAdapter, index: int) -> ControlUnit:
    """The unit with its module checked against its file: an IP-Adapter takes a CLIP vision encoder (the default
    "none" becomes ip-adapter-auto), a ControlNet a preprocessor."""
    if isinstance(net, IPAdapter):
        if unit.module == "none":
            return replace(unit, module="ip-adapter-auto")
        if not unit.is_image_prompt:
            raise SourceModelError(f"controlnet[{index}]: module: {unit.model} is an IP-Adapter; its module is the "
                                   f"image encoder ({', '.join(IP_ENCODERS)}), not the preprocessor {unit.module!r}")
    elif unit.is_image_prompt:
        raise SourceModelError(f"controlnet[{index}]: module: {unit.module} is an IP-Adapter image encoder, but "
                               f"{unit.model} is a ControlNet")
    return unit


class SourceCache:
    """The owner of every source model DS keeps loaded. Thread-safe; one instance, :data:`CACHE`."""

    def __init__(self) -> None:
        self._models: OrderedDict[tuple, LoadedCheckpoint] = OrderedDict()
        self._encoders: OrderedDict[tuple, ClipVision] = OrderedDict()  # IP-Adapter units' CLIP vision towers
        self.loader = load_checkpoint  # the host's: Forge installs its own (lib_delta.forge.source_models)
        self._lock = threading.RLock()
        self.last_event = "nothing loaded yet"
        self.last_generation: dict[str, Any] = {}  # counters of the last finished DS generation (status readout)
        self.prompt_loras = ""  # what the last generation did with prompt LoRAs of another family (status readout)

    def _limit(self) -> int:
        from modules import shared

        return max(1, int(getattr(shared.opts, "delta_sampling_cache_size", 2)))

    def checkpoint(self, info: Any, device: torch.device, precision: Precision, pinned: set[tuple]) -> tuple[
            LoadedCheckpoint, bool]:
        """A loaded checkpoint from the cache, or loaded now; returns (checkpoint, loaded_now)."""
        from modules import devices

        key = (*_file_key(info.filename), precision.key)
        with self._lock:
            loaded = self._models.get(key)
            fresh = loaded is None
            if fresh:
                self._evict(keep=pinned, room_for=1)
                loaded = self.loader(info, devices.cpu if low_vram_mode() else device, precision)
                self._models[key] = loaded
            self._models.move_to_end(key)
            # Deliberate policy under --lowvram/--medvram: the pair waits on the CPU and each leg visits the GPU
            # for its own forward (slow, but it never holds more than one source model in VRAM).
            loaded.offload = low_vram_mode(loaded.family) and device.type != "cpu"
            wanted = devices.cpu if loaded.offload else device
            if loaded.device != wanted:
                loaded.move(wanted)
            return loaded, fresh

    def _evict(self, keep: set[tuple], room_for: int) -> None:
        limit = self._limit()
        for cache_key in list(self._models):
            if len(self._models) + room_for <= limit:
                break
            if cache_key in keep:
                continue
            self._models.pop(cache_key).release()
        gc.collect()
        _empty_device_cache()

    def pair(self, params: DeltaParams) -> SourcePair:
        """The source pair for ``params``: loads what the cache lacks, nothing when it has everything."""
        from modules import devices

        device, precision = devices.device, current_precision()
        base_info = resolve_checkpoint(params.source, "source")
        adapted_info = resolve_checkpoint(params.adapted, "adapted") if params.adapted else None
        if adapted_info is not None and adapted_info.filename == base_info.filename and not params.loras:
            adapted_info = None  # base == adapted: the delta is exactly 0
        loaded_now: list[str] = []
        with self._lock:
            pinned = {(*_file_key(base_info.filename), precision.key)}
            if adapted_info is not None:
                pinned.add((*_file_key(adapted_info.filename), precision.key))
            base, fresh = self.checkpoint(base_info, device, precision, pinned)
            if fresh:
                loaded_now.append(base.title)
            adapted = base
            if adapted_info is not None and adapted_info.filename != base_info.filename:
                adapted, fresh = self.checkpoint(adapted_info, device, precision, pinned)
                if fresh:
                    loaded_now.append(adapted.title)
                    if isinstance(adapted.model, torch.nn.Module):  # a Forge engine is not one module
                        share_identical_tensors(base.model, adapted.model)
                if adapted.latent_format != base.latent_format or adapted.family != base.family:
                    raise SourceModelError(
                        f"adapted: {adapted.info.name} is an {adapted.family} checkpoint but the source base "
                        f"{base.info.name} is {base.family}; the adapted leg must be the same family as the base"
                    )
            for checkpoint in {id(base): base, id(adapted): adapted}.values():
                checkpoint.prepare_for_target()
            networks = [(load_lora(adapted, spec), spec.weight) for spec in params.loras]
            # A generation that ended without cleaning up (an error elsewhere in the webui) may have left hooks.
            base.drop_runtime_lora()
            adapted.drop_runtime_lora()
            runtime = None
            if networks:
                try:
                    runtime = RuntimeLora(adapted.lora_view.model, networks, root="model")
                except LoraError as exc:
                    raise SourceModelError(f"loras: {exc}") from exc
                adapted.runtime_lora = runtime
            if params.controlnet and adapted.family == "sd3":
                raise SourceModelError(
                    "controlnet: Delta Sampling runs no ControlNet or IP-Adapter units on SD3-family sources yet "
                    f"({adapted.info.name}); Forge has no SD3 ControlNet of its own to check them against")
            controls = []
            for index, asked in enumerate(params.controlnet):
                name, filename = resolve_controlnet(asked.model)
                fresh = _file_key(filename) not in adapted.controlnets
                title = f"{name} [{controlnet_hash(name, filename)}]"
                net = adapted.controlnet(name, filename)
                unit = _unit_for(asked, net, index)
                controls.append((unit, net, title))
                if fresh:
                    loaded_now.append(f"{'IP-Adapter' if unit.is_image_prompt else 'ControlNet'} {name}")
            self.last_event = (f"loaded {', '.join(loaded_now)}" if loaded_now
                               else "reused the cached source models (nothing loaded)")
            if networks:
                self.last_event += "; LoRA " + "; ".join(net.summary() for net, _ in networks)
            return SourcePair(base, adapted, networks, runtime, loaded_now, controls)

    def encoder(self, filename: str, device: torch.device, dtype: torch.dtype) -> tuple[ClipVision, bool]:
        """The CLIP vision encoder in ``filename`` (kept: at most :data:`ENCODERS_KEPT`, least recently used freed
        first); returns (encoder, loaded_now)."""
        key = (*_file_key(filename), str(dtype))
        with self._lock:
            found = self._encoders.get(key)
            if found is not None:
                self._encoders.move_to_end(key)
                if next(found.parameters()).device != device:
                    found.to(device)
                return found, False
            while len(self._encoders) >= ENCODERS_KEPT:
                self._encoders.popitem(last=False)[1].to(device="meta")
            gc.collect()
            state_dict = read_checked_state_dict(filename, "CLIP vision file")
            try:
                encoder = read_clip_vision(state_dict, os.path.basename(filename), device=device, dtype=dtype)
            except ClipVisionError as exc:
                raise SourceModelError(f"{exc} ({filename})") from exc
            finally:
                del state_dict
            encoder.filename = filename
            self._encoders[key] = encoder
            return encoder, True

    def park(self) -> None:
        """Apply the residency setting after a generation: stay, move to CPU, or unload."""
        from modules import devices, shared

        residency = getattr(shared.opts, "delta_sampling_residency", "gpu")
        with self._lock:
            if residency == "unload":
                self.unload()
            elif residency == "cpu" and devices.device.type != "cpu":
                for loaded in self._models.values():
                    loaded.move(devices.cpu)
                for encoder in self._encoders.values():
                    encoder.to(devices.cpu)
                _empty_device_cache()

    def unload(self) -> int:
        """Free every source model; returns how many were freed."""
        with self._lock:
            count = len(self._models)
            for loaded in self._models.values():
                loaded.release()
                # Everything goes, shared tensors included: move the weights to the meta device so that their memory
                # returns even while some object (a finished job, a traceback) still references a model.
                loaded.free()
            self._models.clear()
            for encoder in self._encoders.values():
                encoder.to(device="meta")
            self._encoders.clear()
            self.last_event = f"unloaded {count} source model(s)" if count else self.last_event
        gc.collect()
        _empty_device_cache()
        return count

    def status(self) -> dict[str, Any]:
        """What is loaded, where, and how much memory it holds (shared tensors counted once)."""
        with self._lock:
            seen: set[int] = set()
            models = []
            for loaded in self._models.values():
                models.append({
                    "title": loaded.title,
                    "family": loaded.family,
                    # Forge, SD3 family: the source conditions through the target's own text encoders (same files)
                    "uses_target_text_encoders": bool(getattr(loaded, "uses_target_text_encoders", False)),
                    "device": str(loaded.device),
                    "dtype": str(loaded.storage) if loaded.storage is not None
                    else str(next(loaded.unet.parameters()).dtype).replace("torch.", ""),
                    "bytes": loaded.nbytes(seen),
                    "load_seconds": round(loaded.load_seconds, 3),
                    "loras_parsed": [net.name for net in loaded.lora_cache.values()],
                    "controlnets": len(loaded.controlnets),
                    "loras": [{"name": net.name, "applied_keys": net.matched_keys,
                               "not_applied_keys": len(net.not_applied), "first_not_applied": net.not_applied[:3],
                               "module_types": net.kinds()} for net in loaded.lora_cache.values()],
                })
            encoders = [{"name": encoder.config.name, "file": key[0], "bytes": _param_bytes(encoder, seen),
                         "device": str(next(encoder.parameters()).device)} for key, encoder in self._encoders.items()]
            return {
                "models": models,
                "encoders": encoders,
                "total_bytes": sum(m["bytes"] for m in models) + sum(e["bytes"] for e in encoders),
                "cache_size": self._limit(),
                "last_event": self.last_event,
                "last_generation": dict(self.last_generation),
                "prompt_loras": self.prompt_loras,
            }

    def __len__(self) -> int:
        return len(self._models)


CACHE = SourceCache()
