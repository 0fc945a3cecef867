"""Delta Sampling during a webui generation: the per-job state, the CFG denoiser callbacks, and loud failures.

Flow: the script's ``process()`` calls :func:`begin_job`, which validates the settings, loads the source pair and puts
a :class:`DeltaJob` on ``p``. The webui's CFG callbacks fire for every job of the process; they act only where ``p``
carries a job. ``on_cfg_denoiser`` notes the sampler's ``x`` and ``sigma`` of the call (the last B rows of the batched
input are exactly them) and ``on_cfg_after_cfg`` adds ``lambda * delta`` to the CFG-combined prediction: x0 for the
k-diffusion and LCM samplers, eps for DDIM/PLMS/UniPC. Both fire inside one ``CFGDenoiser.forward``, which is how the
after-CFG callback, which gets no ``p``, knows the call: ``_pending`` holds it from one to the other, nothing more.

The webui catches every exception in script hooks and callbacks and returns images without the effect. A DS failure
therefore stops sampling at once (``InterruptedException``, which the sampler treats as an interrupt) and is re-raised
by a wrapper around ``p.sample``, outside every ``except``: the API answers with an HTTP error naming the problem, the
UI shows it, and no image claims DS it did not get.

Forge keeps this callback API, with three differences mirrored here (:func:`host`): its ``x`` holds the images' rows
only (it batches cond and uncond later itself), its callbacks see x0 for every sampler, and it skips the uncond rows at
CFG scale 1 and uses the hires CFG scale in the hires pass. :func:`before_sampling` registers the source engines with
its memory manager for each sampling.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi.exceptions import HTTPException

from ..control_units import ControlStack, Moment, decode_image, forge_soft_middle
from ..delta import source_delta
from ..errors import DeltaSamplingError, OutOfMemory, ParamError
from ..latent import LatentFormat, LatentMap
from ..params import INFOTEXT_KEYS as PARAMS_INFOTEXT_KEYS
from ..params import UNIT_INFOTEXT_KEYS, DeltaParams
from ..prompt_loras import FAMILY_LABELS, CarryPlan, plan_carry
from ..resolution import LATENT_CELL, grid_multiple, pooled_size, pooling_factor
from ..schedule import LambdaSchedule, guard_delta
from ..timesteps import DiscreteSchedule, vp_to_ve, x0_delta_to_eps
from . import prompt_loras
from .image_prompts import TokenMaker, resolve_encoder, unit_tokens
from .legs import LegConds, LegRequest, PromptSet, SourceLegs, encode_legs
from .source_models import (
    A1111_SD3_REFUSAL,
    CACHE,
    FLUX_REFUSAL,
    OFFLOAD,
    SourcePair,
    latent_format_of,
    model_family,
    resolve_checkpoint,
)

JOB_ATTR = "delta_sampling_job"
XYZ_ATTR = "delta_sampling_xyz"
"""Per-cell overrides set by the XYZ axes: a dict of setting name -> value, replaced (never mutated) per cell."""

SKIPPED_KEYS_INFOTEXT = "Delta LoRA skipped keys"
INFOTEXT_KEYS = [*PARAMS_INFOTEXT_KEYS, "Delta LoRA hashes", SKIPPED_KEYS_INFOTEXT, *prompt_loras.INFOTEXT_KEYS]


class RequestError(DeltaSamplingError, HTTPException):
    """A Delta Sampling error with a known cause (the request's: a bad setting, file or name; or the GPU out of
    memory): the webui's API handler answers an HTTPException with its status and message and prints no traceback for
    it; internal errors keep theirs."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        DeltaSamplingError.__init__(self, message)
        HTTPException.__init__(self, status_code=status_code, detail=message)
        self.status_code = status_code

    @classmethod
    def from_error(cls, exc: DeltaSamplingError) -> RequestError:
        error = cls(str(exc), exc.status_code)
        error.__cause__ = exc
        return error

    def __str__(self) -> str:
        return str(self.detail)


@dataclass
class PassState:
    """One sampling pass (a CFGDenoiser instance): its conditioning, its space and its reusable delta."""

    active: bool
    eps_space: bool = False
    wrapper: str = "k"
    conds: LegConds | None = None
    schedule: DiscreteSchedule | None = None
    last_delta: torch.Tensor | None = None  # target-space x0 delta of the last computed call
    last_uncond_delta: torch.Tensor | None = None  # the same for the uncond predictions alone (CFG++ samplers)
    calls_in_window: int = 0
    factor: int = 1  # the legs' grid is this many times coarser than the pass's (source_resolution)
    legs_size: tuple[int, int] | None = None  # (width, height) in pixels the legs are conditioned on (SDXL's size)


@dataclass
class DeltaJob:
    """Delta Sampling for one ``process_images`` call (one XYZ cell)."""

    params: DeltaParams
    pair: SourcePair | None = None
    error: BaseException | None = None
    shown: DeltaParams | None = None  # the accordion's own settings (None: DS runs only for carried prompt LoRAs)
    carried: CarryPlan | None = None  # prompt LoRAs of another family on the adapted leg, after params.loras' own
    source_family: str | None = None
    passes: dict[int, tuple[weakref.ref, PassState]] = field(default_factory=dict)
    cond_cache: dict[PromptSet, LegConds] = field(default_factory=dict)
    schedule: LambdaSchedule | None = None
    controls: ControlStack | None = None  # the adapted leg's ControlNet units with their images
    target_calls: int = 0  # denoiser calls of this job, in and outside the window
    source_calls: int = 0  # calls that ran the source legs
    reused_calls: int = 0  # calls that reused the previous delta (reuse_steps > 1)
    skipped_calls: int = 0  # calls where only ControlNet units make the difference and none was active
    encode_seconds: float = 0.0  # the source legs' text encoding (their prompts through their own text encoders)
    encoder_runs: int = 0  # IP-Adapter units: CLIP vision forwards (one per distinct reference image and encoder)
    encoder_seconds: float = 0.0

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc

    def finish(self) -> None:
        """Release per-generation state; the models stay in the cache (or go, by the residency setting)."""
        if self.target_calls:
            CACHE.last_generation = {"target_calls": self.target_calls, "source_calls": self.source_calls,
                                     "reused_calls": self.reused_calls, "passes": len(self.passes),
                                     "pooling_factors": [state.factor for _, state in self.passes.values()],
                                     "legs_sizes": [state.legs_size for _, state in self.passes.values()],
                                     "controlnet_calls": self.controls.calls if self.controls else 0,
                                     "skipped_calls": self.skipped_calls,
                                     "encode_seconds": round(self.encode_seconds, 4),
                                     "image_encoder_runs": self.encoder_runs,
                                     "image_encoder_seconds": round(self.encoder_seconds, 4),
                                     **OFFLOAD.take_counts(),  # --lowvram/--medvram: source models' visits
                                     "carried_loras": [str(spec) for spec in self.carried.loras]
                                     if self.carried else [],
                                     "failed": self.error is not None}
        if self.pair is not None:
            self.pair.release()
            self.pair = None
            CACHE.park()
        self.passes.clear()
        self.cond_cache.clear()
        self.controls = None


# --- job set-up ----------------------------------------------------------------------------------------------------


def begin_job(p: Any, args: tuple) -> None:
    """Called from the script's ``process()``: set up DS for this generation, or make sure nothing of it remains.

    Prompt LoRAs of another family are seen per batch, later (:func:`_install_prompt_lora_carrier`)."""
    _clear_infotext(p)
    # A job found here was copied from an XYZ parent (cells are shallow copies) or left by an earlier run: it is not
    # this generation's. It is dropped, not finished: a parent's job may still be in use.
    p.__dict__.pop(JOB_ATTR, None)
    try:
        params = _params_for(p, args)
    except ParamError as exc:
        if _asks_enabled(args, getattr(p, XYZ_ATTR, None)):
            _install(p, DeltaJob(DeltaParams(), error=exc))
        else:
            print(f"Delta Sampling: ignoring invalid settings of a disabled job: {exc}")
            _install_prompt_lora_carrier(p, None)
        return
    _install_prompt_lora_carrier(p, params if params.enabled else None)
    if params.enabled:
        _start_job(p, params, shown=params)


def _start_job(p: Any, params: DeltaParams, *, shown: DeltaParams | None, carried: CarryPlan | None = None) -> None:
    """Install a job for ``params`` on ``p`` and load its source pair (errors are kept for the p.sample wrapper)."""
    job = DeltaJob(params, shown=shown, carried=carried)
    _install(p, job)
    OFFLOAD.take_counts()  # this generation's counts start here
    if not params.effective:
        if shown is not None:
            p.extra_generation_params.update(shown.infotext())
        return
    try:
        _refuse_global_unet_patches()
        _refuse_target_family()
        pair = CACHE.pair(params)
        _check_pair_fits_target(pair)
        job.source_family = pair.base.family
        print(f"Delta Sampling: {CACHE.last_event}")
        _write_infotext(p, job, pair)
        if pair.changes_nothing:
            pair.release()  # adapted == base: the delta is exactly 0, the legs need not run
            return
        if pair.controls:
            # Forge's own ControlNet fixes the soft modes' middle factor by family; DS on Forge does as it does
            middle = forge_soft_middle(pair.adapted.family) if host().forge else None
            job.controls = ControlStack([(unit, net, _control_image(p, unit, i))
                                         for i, (unit, net, _) in enumerate(pair.controls)], soft_middle=middle)
            _encode_image_prompts(job, pair)
        job.pair = pair
        job.schedule = params.lambda_schedule()
    except Exception as exc:  # surfaced by the p.sample wrapper, see the module docstring
        job.fail(exc)


def _refuse_target_family() -> None:
    """Targets DS cannot run on, refused before any source model loads."""
    from modules import shared

    family = model_family(shared.sd_model)
    if family in ("flux", "chroma"):
        raise ParamError("target", f"the target is a {family} model. {FLUX_REFUSAL}")
    if family == "sd3" and not host().forge:
        raise ParamError("target", f"the target is an SD3 model: {A1111_SD3_REFUSAL}")


def _check_pair_fits_target(pair: SourcePair) -> None:
    """A source pair whose latents cannot be mapped exactly onto the target's (4 vs 16 channels, or flow models of
    another VAE) is a request error naming both families, before sampling starts."""
    try:
        LatentMap.between(_target_format(), pair.latent_format)
    except DeltaSamplingError as exc:
        raise ParamError("source", f"{pair.base.info.name} ({pair.base.family}) does not fit the target "
                                   f"({_target_format().name}): {exc}") from exc


# --- prompt LoRAs of another family --------------------------------------------------------------------------------


def _install_prompt_lora_carrier(p: Any, accordion: DeltaParams | None) -> None:
    """Wrap this generation's ``p.parse_extra_network_prompts`` (the host's per-batch tag parsing): read each image's
    LoRA tags first, then withhold the carried ones from the host and run DS on them (:func:`_carry_for_batch`)."""
    original = type(p).parse_extra_network_prompts.__get__(p, type(p))  # never an XYZ parent's wrapper
    said: list[str] = []  # console lines already printed in this generation
    CACHE.prompt_loras = ""

    def parse_extra_network_prompts_with_carried_loras() -> Any:
        prompts = list(p.prompts)
        hr_prompts = None
        if getattr(p, "enable_hr", False) and getattr(p, "all_hr_prompts", None):
            first = p.iteration * p.batch_size
            hr_prompts = list(p.all_hr_prompts[first:first + p.batch_size])
        result = original()
        if not getattr(p, "disable_extra_networks", False):
            _carry_for_batch(p, accordion, prompts, hr_prompts, said)
        return result

    p.parse_extra_network_prompts = parse_extra_network_prompts_with_carried_loras


def _carry_for_batch(p: Any, accordion: DeltaParams | None, prompts: list[str], hr_prompts: list[str] | None,
                     said: list[str]) -> None:
    from modules import shared

    job = getattr(p, JOB_ATTR, None)
    if job is not None and job.error is not None and job.carried is None:
        return  # the accordion's own job already failed: the generation stops with that error
    try:
        settings = prompt_loras.carry_settings()
        target = model_family(shared.sd_model)
        first = p.iteration * p.batch_size
        images = prompt_loras.prompt_tags(prompts, first, target)
        pair_family = None
        if accordion is not None:
            pair_family = job.source_family if job is not None else None  # the accordion's base, loaded
            if pair_family is None:
                return  # the accordion's pair is off (lambda 0, an empty window): the host keeps its tags
        plan = plan_carry(images, target, settings, pair_family=pair_family,
                          host_does=prompt_loras.host_does(host().forge), first_image=first)
        if hr_prompts is not None and hr_prompts != prompts:
            hr_plan = plan_carry(prompt_loras.prompt_tags(hr_prompts, first, target), target, settings,
                                 pair_family=pair_family, first_image=first)
            if hr_plan.loras != plan.loras:
                raise ParamError("hr_prompt", "the hires prompt carries other LoRAs of another family "
                                              f"({', '.join(map(str, hr_plan.loras)) or 'none'}) than the prompt "
                                              f"({', '.join(map(str, plan.loras)) or 'none'}); Delta Sampling runs "
                                              "one source pair for both passes")
        wanted = _params_with_carried(accordion, plan, settings)
        if plan.loras and accordion is None:
            resolve_checkpoint(plan.base, f"Settings > Delta Sampling > source base for {FAMILY_LABELS[plan.family]} "
                                          "prompt LoRAs")
    except Exception as exc:  # raised by the p.sample wrapper, as a job's errors are
        _replace_job(p, DeltaJob(DeltaParams(), error=exc))
        return
    prompt_loras.withhold(p, plan.withheld)
    if plan.reported:
        note = prompt_loras.reported_text(plan)
        p.extra_generation_params[prompt_loras.NOTE_INFOTEXT] = note
        _say_once(said, note)
    else:
        p.extra_generation_params.pop(prompt_loras.NOTE_INFOTEXT, None)
    current = job.params if job is not None else None
    if wanted == current and (job.carried.loras if job is not None and job.carried else ()) == plan.loras:
        return
    _drop_job(p)
    for key in INFOTEXT_KEYS:
        if key != prompt_loras.NOTE_INFOTEXT:
            p.extra_generation_params.pop(key, None)
    if wanted is not None:
        if plan.loras:
            where = f"the accordion's {FAMILY_LABELS[plan.family]} pair" if accordion else f"base {plan.base}"
            _say_once(said, f"carrying the prompt's {FAMILY_LABELS[plan.family]} LoRA(s) "
                            f"{', '.join(map(str, plan.loras))} onto {where} (lambda {wanted.scale:g}, source "
                            f"resolution {wanted.source_resolution})")
        _start_job(p, wanted, shown=accordion, carried=plan if plan.loras else None)


def _params_with_carried(accordion: DeltaParams | None, plan: CarryPlan, settings: Any) -> DeltaParams | None:
    if not plan.loras:
        return accordion
    if accordion is not None:
        return accordion.replace(loras=[*accordion.loras, *plan.loras])
    try:
        return DeltaParams.create(enabled=True, scale=settings.scale, source=plan.base, loras=list(plan.loras),
                                  source_resolution=settings.source_resolution)
    except ParamError as exc:
        raise ParamError("Settings > Delta Sampling, carried prompt LoRAs", str(exc)) from exc


def _say_once(said: list[str], line: str) -> None:
    """Print a line once per generation; the status readout (route and accordion) keeps the generation's lines."""
    if line not in said:
        said.append(line)
        print(f"Delta Sampling: {line}")
        CACHE.prompt_loras = "; ".join(said)


def _replace_job(p: Any, job: DeltaJob) -> None:
    _drop_job(p)
    _install(p, job)


def _drop_job(p: Any) -> None:
    """Finish and remove this generation's job (its p.sample wrapper too); the prompt LoRA carrier stays."""
    job = p.__dict__.pop(JOB_ATTR, None)
    if job is not None:
        job.finish()
    sample = p.__dict__.get("sample")
    if sample is not None and getattr(sample, "__name__", "") == "sample_with_delta_sampling":
        del p.__dict__["sample"]


def _encode_image_prompts(job: DeltaJob, pair: SourcePair) -> None:
    """The IP-Adapter units' image tokens, made once for the generation (each reference image encoded once)."""
    if not any(unit.is_image_prompt for unit, _, _ in pair.controls):
        return
    from modules import devices

    device = devices.device
    dtype = torch.float32 if device.type == "cpu" else pair.adapted.compute_dtype

    def encoder_for(module: str) -> Any:
        filename = resolve_encoder(module)
        encoder, fresh = CACHE.encoder(filename, device, dtype)
        if fresh:
            print(f"Delta Sampling: loaded the image encoder {encoder.config.name} from {filename}")
        return encoder

    maker = TokenMaker(forge=host().forge)
    for index, (cond, uncond) in unit_tokens(job.controls.entries, maker, encoder_for).items():
        job.controls.set_tokens(index, cond, uncond)
    job.encoder_runs, job.encoder_seconds = maker.runs, maker.seconds


def _control_image(p: Any, unit: Any, index: int) -> Any:
    """The unit's image, decoded; in img2img a unit without one takes the init image."""
    where = f"controlnet[{index}]"
    image = unit.image
    if image is None and getattr(p, "init_images", None):
        image = p.init_images[0]
    if image is None:
        raise ParamError(where, f"image: unit {index + 1} ({unit.model}) has no control image; txt2img needs one")
    if isinstance(image, tuple):  # several reference images (their tokens are averaged)
        if not unit.is_image_prompt:
            raise ParamError(where, f"image: unit {index + 1} ({unit.model}) is a ControlNet, which takes one "
                                    "control image; several images are for IP-Adapter units")
        return [decode_image(item, f"{where}.image[{i}]") for i, item in enumerate(image)]
    return decode_image(image, where)


@functools.cache
def host() -> Any:
    """This process's webui (:func:`lib_delta.forge.detect`): a constant, looked up once."""
    from ..forge import detect

    return detect()


def before_sampling(p: Any, x: torch.Tensor | None = None) -> None:
    """Forge only (its ``process_before_every_sampling``, after ``forge_objects`` was reset for this sampling): tell
    the memory manager about the source engines, their ControlNets and the legs' activation memory, so it loads them
    with the target instead of evicting one for the other at every step."""
    job = getattr(p, JOB_ATTR, None)
    if job is None or job.pair is None or not host().forge:
        return
    from ..forge.source_models import register_for_sampling

    pair = job.pair
    unet = p.sd_model.forge_objects.unet.clone()
    engines = list({id(c): c for c in (pair.base, pair.adapted)}.values())
    register_for_sampling(unet, engines, [net for _, net, _ in pair.controls], x,
                          batched_pair=pair.shares_weights and job.params.batch_legs and not job.params.cond_only)
    p.sd_model.forge_objects.unet = unet


def _refuse_global_unet_patches() -> None:
    from modules import sd_unet

    if getattr(sd_unet, "current_unet", None) is not None:
        label = getattr(sd_unet.current_unet_option, "label", "?")
        raise DeltaSamplingError(
            f"the SD Unet option {label!r} (e.g. TensorRT) is active: it replaces every UNet's forward, the source "
            "models' too. Set Settings > SD Unet to None to use Delta Sampling"
        )


def _params_for(p: Any, args: tuple) -> DeltaParams:
    """The script's arguments with this XYZ cell's axis values applied."""
    params = DeltaParams.from_api(args)
    overrides = dict(getattr(p, XYZ_ATTR, None) or {})
    lora_weight = overrides.pop("lora_weight", None)
    unit_overrides = {name: overrides.pop(f"controlnet_{name}")
                      for name in ("weight", "guidance_start", "guidance_end") if f"controlnet_{name}" in overrides}
    if overrides:
        params = params.replace(**overrides)
    if lora_weight is not None:
        params = params.replace(loras=[{"name": spec.name, "weight": lora_weight} for spec in params.loras])
    if unit_overrides:  # an XYZ axis over every unit's weight, start or end
        params = params.replace(controlnet=[{**unit.as_dict(), **unit_overrides} for unit in params.controlnet])
    return params


def _asks_enabled(args: tuple, overrides: dict | None) -> bool:
    if overrides and overrides.get("enabled") is True:
        return True
    if args and isinstance(args[0], dict):
        return args[0].get("enabled") is True
    return bool(args) and args[0] is True


def _clear_infotext(p: Any) -> None:
    # XYZ cells share one extra_generation_params dict: a key left by an earlier cell would lie in this one.
    for key in INFOTEXT_KEYS:
        p.extra_generation_params.pop(key, None)


def _write_infotext(p: Any, job: DeltaJob, pair: SourcePair) -> None:
    """The accordion's settings as they paste back, and the carried prompt LoRAs apart from them: pasting the prompt
    (which keeps its tags) carries them again, so the accordion must not list them too."""
    entries: dict[str, Any] = {}
    shown = job.shown
    hashes = []
    for net, _ in pair.loras:
        on_disk = net.on_disk
        on_disk.read_hash()  # the webui's own LoRA hash (computed once, then cached by the webui)
        hashes.append(on_disk.shorthash or "unknown")
    own = len(shown.loras) if shown is not None else 0
    if shown is not None:
        entries.update(shown.infotext())
        entries["Delta source"] = pair.base.info.title
        if shown.adapted:
            entries["Delta adapted"] = pair.adapted.info.title
        if own:
            entries["Delta LoRA hashes"] = ", ".join(
                f"{net.name}: {h}" for (net, _), h in zip(pair.loras[:own], hashes[:own], strict=True))
        for key, (unit, _net, title) in zip(UNIT_INFOTEXT_KEYS, pair.controls, strict=False):
            entries[key] = unit.infotext(title)  # the model with its hash
    if job.carried is not None:
        entries[prompt_loras.CARRIED_INFOTEXT] = ", ".join(
            f"{spec} [{h}]" for spec, h in zip(job.carried.loras, hashes[own:], strict=True))
        if shown is None:
            entries[prompt_loras.CARRIED_BASE_INFOTEXT] = pair.base.info.title
            entries[prompt_loras.CARRIED_SETTINGS_INFOTEXT] = (
                f"lambda {job.params.scale:g}, source resolution {job.params.source_resolution}")
    # Keys that change nothing (no such layer, or a layer the webui would not apply them to either): the image
    # says how much of each file it got, not only that the file was named.
    skipped = [f"{net.name}: {net.skipped_text()}" for net, _ in pair.loras if net.not_applied]
    if skipped:
        entries[SKIPPED_KEYS_INFOTEXT] = "; ".join(skipped)
    p.extra_generation_params.update(entries)


def _install(p: Any, job: DeltaJob) -> None:
    setattr(p, JOB_ATTR, job)
    original = type(p).sample.__get__(p, type(p))  # the class's method: never wrap an XYZ parent's wrapper

    def sample_with_delta_sampling(*args: Any, **kwargs: Any) -> Any:
        try:
            if job.error is None:
                result = original(*args, **kwargs)
            if job.error is not None:
                error = _public_error(job.error)
                if isinstance(error, RequestError):
                    print(f"Delta Sampling: {error}")  # the request's own mistake: one line, no traceback
                raise error
            return result
        except BaseException:
            job.finish()
            raise

    p.sample = sample_with_delta_sampling


def _public_error(exc: BaseException) -> BaseException:
    """The error as users see it: a :class:`RequestError` for DS errors the request caused (status < 500), DS's
    other errors as they are, anything else wrapped with context."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        count = CACHE.unload()  # the next generation starts from an empty cache instead of failing the same way
        exc = OutOfMemory(
            f"out of GPU memory in the source legs: {str(exc).splitlines()[0] if str(exc) else 'no details'}. "
            f"{count} source model(s) were unloaded. Lower the resolution or the batch size, set the legs' resolution "
            "to native, use a LoRA pair (one model), or start the webui with --medvram"
        )
    if isinstance(exc, DeltaSamplingError):
        if exc.status_code < 500 or isinstance(exc, OutOfMemory):
            return RequestError.from_error(exc)
        return exc
    wrapped = DeltaSamplingError(f"Delta Sampling failed: {type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped


def end_job(p: Any) -> None:
    """Called from the script's ``postprocess()`` (a failed job already finished in the wrapper)."""
    _drop_job(p)
    carrier = p.__dict__.get("parse_extra_network_prompts")
    if getattr(carrier, "__name__", "") == "parse_extra_network_prompts_with_carried_loras":
        del p.__dict__["parse_extra_network_prompts"]


# --- per pass ------------------------------------------------------------------------------------------------------


def _prompt_set(p: Any, params: DeltaParams, is_hr: bool) -> PromptSet:
    from modules import extra_networks, sd_samplers

    if is_hr:
        prompts, negatives = p.hr_prompts, p.hr_negative_prompts
        width, height = p.hr_upscale_to_x, p.hr_upscale_to_y
        config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
        hr_steps = p.hr_second_pass_steps or p.steps
        hires_steps = config.total_steps(hr_steps) if config else hr_steps
    else:
        prompts, negatives = p.prompts, p.negative_prompts
        width, height, hires_steps = p.width, p.height, None
    if params.source_prompt:
        text = extra_networks.parse_prompts([params.source_prompt])[0][0]
        prompts = [text] * len(prompts)
    if params.source_negative_prompt:
        negatives = [params.source_negative_prompt] * len(negatives)
    return PromptSet(tuple(prompts), tuple(negatives), int(width), int(height), int(p.firstpass_steps), hires_steps)


def _pass_state(job: DeltaJob, denoiser: Any) -> PassState:
    entry = job.passes.get(id(denoiser))
    if entry is not None and entry[0]() is denoiser:
        return entry[1]
    from modules import sd_samplers_lcm, sd_samplers_timesteps

    p = denoiser.p
    is_hr = bool(getattr(p, "is_hr_pass", False))
    state = PassState(active=not (is_hr and not job.params.hires))
    if state.active:
        prompts = _prompt_set(p, job.params, is_hr)
        state.factor = pooling_factor(job.params.source_resolution, prompts.width, prompts.height,
                                      job.pair.base.family)
        if state.factor > 1:
            # The legs' own size (SDXL conditions on it): the pooled grid's, in pixels.
            multiple = grid_multiple(job.pair.base.family)
            prompts = dataclasses.replace(
                prompts, width=pooled_size(prompts.width // LATENT_CELL, state.factor, multiple) * LATENT_CELL,
                height=pooled_size(prompts.height // LATENT_CELL, state.factor, multiple) * LATENT_CELL)
        state.legs_size = (prompts.width, prompts.height)
        conds = job.cond_cache.get(prompts)
        if conds is None:
            started = time.perf_counter()
            conds = job.cond_cache[prompts] = encode_legs(job.pair, prompts)
            job.encode_seconds += time.perf_counter() - started
        state.conds = conds
        # Forge's denoiser hands its callbacks x0 for every sampler (it converts to eps after them)
        state.eps_space = not host().forge and isinstance(denoiser, sd_samplers_timesteps.CFGDenoiserTimesteps)
        if isinstance(denoiser, sd_samplers_lcm.CFGDenoiserLCM):
            state.wrapper = "lcm"
        elif state.eps_space:
            state.wrapper = "timesteps"  # the target's UNet sees integer steps (DDIM, PLMS) or fractional (UniPC)
            state.schedule = DiscreteSchedule(p.sd_model.alphas_cumprod.detach().double().cpu())
    job.passes[id(denoiser)] = (weakref.ref(denoiser), state)
    return state


def _target_cond_scale(denoiser: Any) -> float:
    """The CFG scale the target uses at this call (Forge: the hires CFG scale in the hires pass)."""
    p = denoiser.p
    if host().forge and getattr(p, "is_hr_pass", False):
        return float(p.hr_cfg)
    scale = denoiser.sampler.sampler_extra_args["cond_scale"]
    # A1111's CFG++ samplers scale the CFG scale down (cond_scale_miltiplier); Forge sets the attribute, never reads it
    return scale if host().forge else scale * getattr(denoiser, "cond_scale_miltiplier", 1.0)


def _target_skips_uncond(denoiser: Any, sigma0: float) -> bool:
    """The webui's own decision (``CFGDenoiser.forward``), evaluated for the same call. Forge sets the CFG scale to 1
    where A1111 drops the uncond rows, and then skips them at any CFG scale 1 (its "CFG 1 optimisation")."""
    from modules import shared

    opts = shared.opts
    if opts.skip_early_cond != 0.0 and denoiser.step / denoiser.total_steps <= opts.skip_early_cond:
        return True
    s_min_uncond = denoiser.sampler.sampler_extra_args.get("s_min_uncond", 0) or 0
    if (denoiser.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma0 < s_min_uncond:
        return True
    if host().forge:
        options = denoiser.p.sd_model.forge_objects.unet.model_options
        return math.isclose(_target_cond_scale(denoiser), 1.0) and not options.get("disable_cfg1_optimization")
    return False


# --- callbacks -----------------------------------------------------------------------------------------------------


@dataclass
class _Call:
    job: DeltaJob
    state: PassState
    denoiser: Any
    x: torch.Tensor
    sigma: torch.Tensor
    scale: float
    fraction: float  # the webui's sampling_step / sampling_steps at this call (sd-webui-controlnet's unit clock)


class _PendingCall:
    """The current ``CFGDenoiser.forward`` call between its two callbacks; the second one takes and clears it."""

    call: _Call | None = None


_pending = _PendingCall()


def _interrupt() -> BaseException:
    from modules.sd_samplers_common import InterruptedException

    return InterruptedException()


def on_cfg_denoiser(params: Any) -> None:
    _pending.call = None
    denoiser = params.denoiser
    job = getattr(getattr(denoiser, "p", None), JOB_ATTR, None)
    if job is None or job.pair is None:
        if job is not None and job.error is not None:
            raise _interrupt()
        return
    if job.error is not None:
        raise _interrupt()  # stop the sampler at once; the p.sample wrapper raises the error
    job.target_calls += 1
    try:
        state = _pass_state(job, denoiser)
        if not state.active:
            return
        scale = job.schedule.at_step(denoiser.step, denoiser.total_steps)
        if scale == 0:
            return
        uncond = params.text_uncond
        if host().forge or uncond is None:
            batch = params.x.shape[0]  # Forge batches cond and uncond itself, later: x holds the images only
        else:  # A1111's x is cond rows + uncond rows, the last B being the images' own x
            batch = (uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[0]
        fraction = params.sampling_step / max(params.total_sampling_steps, 1)
        _pending.call = _Call(job, state, denoiser, params.x[-batch:], params.sigma[-batch:], scale, fraction)
    except Exception as exc:
        job.fail(exc)
        raise _interrupt() from exc


def on_cfg_after_cfg(params: Any) -> None:
    call, _pending.call = _pending.call, None
    if call is None:
        return
    try:
        params.x = _apply(call, params.x)
    except Exception as exc:
        call.job.fail(exc)
        raise _interrupt() from exc


def _target_format() -> LatentFormat:
    from modules import shared

    return latent_format_of(shared.sd_model)


def _moment(call: _Call) -> Moment:
    """The units' clock at this call, as the host's own units read it: A1111's sd-webui-controlnet the webui's step
    fraction; Forge the call's sigma against the source model's ``percent_to_sigma``."""
    if host().forge:
        return Moment(call.fraction, float(call.sigma[0]), call.job.pair.adapted.percent_to_sigma)
    return Moment(call.fraction)


def _apply(call: _Call, denoised: torch.Tensor) -> torch.Tensor:
    job, state, denoiser, params = call.job, call.state, call.denoiser, call.job.params
    latent_map = LatentMap.between(_target_format(), job.pair.latent_format)
    if state.eps_space:
        x, sigma = vp_to_ve(call.x.double(), call.sigma.double(), state.schedule)
        x, sigma = x.to(denoised.dtype), sigma.to(denoised.dtype)
        target_x0 = x - sigma.view(-1, 1, 1, 1) * denoised
    else:
        x, sigma, target_x0 = call.x, call.sigma, denoised

    pair = job.pair
    moment = _moment(call)
    if pair.only_controls_differ and not job.controls.any_active(moment):
        # Only the ControlNet / IP-Adapter units make the adapted leg differ, and none runs now: the delta is 0.
        job.skipped_calls += 1
        return denoised
    reuse = state.last_delta is not None and state.calls_in_window % params.reuse_steps != 0
    state.calls_in_window += 1
    if reuse:
        delta, uncond_delta = state.last_delta, state.last_uncond_delta
        job.reused_calls += 1
    else:
        request = LegRequest(
            step=denoiser.step,
            cond_scale=params.source_cfg_scale or _target_cond_scale(denoiser),
            skip_uncond=_target_skips_uncond(denoiser, float(call.sigma[0])),
            cond_only=params.cond_only,
            batch_legs=params.batch_legs,
            wrapper=state.wrapper,
            moment=moment,
            controls=job.controls,
            forge=host().forge,
        )
        legs = SourceLegs(job.pair, state.conds, request)
        delta = source_delta(x, sigma, legs, latent_map, factor=state.factor)
        uncond_delta = None
        if getattr(denoiser, "need_last_noise_uncond", False) and legs.unconds is not None:
            # CFG++ samplers renoise with the uncond prediction itself: it gets the legs' uncond delta
            uncond_delta = source_delta(x, sigma, lambda _x, _s: legs.unconds, latent_map, factor=state.factor)
        state.last_delta, state.last_uncond_delta = delta, uncond_delta
        job.source_calls += 1
    if uncond_delta is not None and denoiser.last_noise_uncond is not None:
        _shift_last_noise_uncond(denoiser, call.scale * uncond_delta, sigma)

    scaled = guard_delta(call.scale * delta, target_x0, params.guard)
    if denoiser.mask is not None:
        scaled = scaled * denoiser.nmask  # only where the image is regenerated
    if state.eps_space:
        return denoised + x0_delta_to_eps(scaled, sigma)
    return denoised + scaled.to(denoised.dtype)


def _shift_last_noise_uncond(denoiser: Any, x0_delta: torch.Tensor, sigma: torch.Tensor) -> None:
    """Move the uncond noise a CFG++ sampler renoises with (``denoiser.last_noise_uncond``) by an x0 delta. A1111
    keeps it as the model's eps output, Forge as ``(x - uncond x0) / sigma``: eps at this call's sigma either way."""
    if denoiser.mask is not None:
        x0_delta = x0_delta * denoiser.nmask
    current = denoiser.last_noise_uncond
    denoiser.last_noise_uncond = current + x0_delta_to_eps(x0_delta, sigma).to(current.dtype)


def register_callbacks() -> None:
    """Register the CFG callbacks (called once per script load; the webui clears callbacks before reloading)."""
    from modules import script_callbacks

    script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="delta_sampling")
    script_callbacks.on_cfg_after_cfg(on_cfg_after_cfg, name="delta_sampling")
