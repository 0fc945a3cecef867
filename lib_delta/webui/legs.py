"""The source legs inside the webui: their own text conditioning, and their CFG-combined x0 predictions.

Each leg mirrors what the webui's ``CFGDenoiser.forward`` does for the target, on the source model: the same prompt
schedule (built with the same step counts and reconstructed at the same denoiser call), the same AND-prompt layout and
CFG combine, the same "skip the uncond" decisions (NGMS, skip early CFG), rows with different token lengths in
separate calls. So with the target checkpoint as the source base, the base leg reproduces the target's prediction.

The two legs of a LoRA pair run on one model: base rows and adapted rows go through one batched forward with the LoRA
applied to the adapted rows only (``RuntimeLora`` in ``rows_from`` mode). ControlNet units of the adapted leg work the
same way: for the length of one forward the UNet instance's ``forward`` is a stand-in that adds the units' residuals
to the adapted rows only (:func:`lib_delta.controlnet.controlled_forward`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..composition import combine_a1111, combine_forge
from ..control_units import ControlStack, Moment
from ..controlnet import ActiveControl, controlled_forward
from ..ip_adapter import ImagePrompt, image_prompt_forwards
from ..resolution import LATENT_CELL
from .source_models import LoadedCheckpoint, SourcePair


@dataclass(frozen=True)
class PromptSet:
    """The texts and schedule parameters of one pass, as the webui builds them for the target."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    width: int
    height: int
    steps: int
    hires_steps: int | None


@dataclass
class LegConds:
    """Prompt schedules of both legs (``MulticondLearnedConditioning`` and lists of ``ScheduledPromptConditioning``)."""

    base_cond: Any
    base_uncond: Any
    adapted_cond: Any
    adapted_uncond: Any


def _encode(model: torch.nn.Module, prompts: PromptSet) -> tuple[Any, Any]:
    from modules import devices, prompt_parser, shared

    texts = prompt_parser.SdConditioning(list(prompts.prompts), width=prompts.width, height=prompts.height)
    negatives = prompt_parser.SdConditioning(list(prompts.negative_prompts), width=prompts.width,
                                             height=prompts.height, is_negative_prompt=True)
    use_old = shared.opts.use_old_scheduling
    with devices.autocast(), torch.no_grad():
        uncond = prompt_parser.get_learned_conditioning(model, negatives, prompts.steps, prompts.hires_steps, use_old)
        cond = prompt_parser.get_multicond_learned_conditioning(model, texts, prompts.steps, prompts.hires_steps,
                                                                use_old)
    return cond, uncond


def encode_legs(pair: SourcePair, prompts: PromptSet) -> LegConds:
    """Both legs' conditioning, each from its own text encoder (the adapted one with its LoRAs merged)."""
    with pair.base.on_compute_device():
        base_cond, base_uncond = _encode(pair.base.model, prompts)
    if pair.adapted is pair.base and not pair.has_text_encoder_loras():
        return LegConds(base_cond, base_uncond, base_cond, base_uncond)
    merged = pair.merged_text_encoder_loras()
    try:
        with pair.adapted.on_compute_device():
            adapted_cond, adapted_uncond = _encode(pair.adapted.model, prompts)
    finally:
        if merged is not None:
            merged.restore()
    return LegConds(base_cond, base_uncond, adapted_cond, adapted_uncond)


# --- evaluation ----------------------------------------------------------------------------------------------------


def _cat(conds: list[Any]) -> Any:
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def _length(cond: Any) -> tuple:
    tensor = cond["crossattn"] if isinstance(cond, dict) else cond
    return tuple(tensor.shape[1:])


@dataclass
class _Segment:
    """Rows to denoise with one conditioning tensor, on the adapted side or not."""

    x: torch.Tensor
    sigma: torch.Tensor
    cond: Any
    adapted: bool
    uncond: bool = False
    out: torch.Tensor | None = None


def _condition_dict(cond: Any) -> dict:
    if isinstance(cond, dict):  # sgm (SDXL): {"crossattn", "vector"}
        return dict(cond)
    return {"c_crossattn": [cond]}


def _run_segments(checkpoint: LoadedCheckpoint, segments: list[_Segment], runtime_lora: Any, wrapper: str,
                  controls: ControlScope | None = None) -> None:
    """Denoise every segment, batching those with equal token lengths; base rows first, adapted rows after them."""
    groups: dict[tuple, list[_Segment]] = {}
    for seg in segments:
        groups.setdefault(_length(seg.cond), []).append(seg)
    for group in groups.values():
        group.sort(key=lambda s: s.adapted)  # stable: base segments first
        x = torch.cat([s.x for s in group])
        sigma = torch.cat([s.sigma for s in group])
        cond = _cat([s.cond for s in group])
        n_base = sum(s.x.shape[0] for s in group if not s.adapted)
        if runtime_lora is None:
            mode, split = "off", None
        elif n_base == 0:
            mode, split = "all", None
        elif n_base == x.shape[0]:
            mode, split = "off", None
        else:
            mode, split = "rows_from", n_base
        with checkpoint.on_compute_device(), _lora_mode(runtime_lora, mode, split), \
                _control_mode(checkpoint, controls, group, x.device):
            out = checkpoint.denoiser_for(wrapper)(x, sigma, cond=_condition_dict(cond))
        start = 0
        for seg in group:
            seg.out = out[start:start + seg.x.shape[0]]
            start += seg.x.shape[0]


def _lora_mode(runtime_lora: Any, mode: str, split: int | None) -> Any:
    return contextlib.nullcontext() if runtime_lora is None else runtime_lora.scoped(mode, split)


@dataclass
class ControlScope:
    """The ControlNet and IP-Adapter units active at this call, and who counts the ControlNet calls."""

    active: list[ActiveControl]
    on_call: Any = None
    prompts: list[ImagePrompt] = field(default_factory=list)


@contextlib.contextmanager
def _control_mode(checkpoint: LoadedCheckpoint, controls: ControlScope | None, group: list[_Segment],
                  device: torch.device) -> Any:
    """For one forward: the UNet instance's ``forward`` adds the ControlNet units' residuals to the group's adapted
    rows, and its cross-attention layers the IP-Adapter units' image attention (cond rows attending to the reference's
    tokens, uncond rows to the uncond tokens)."""
    if controls is None or not (controls.active or controls.prompts) or not any(seg.adapted for seg in group):
        yield
        return
    rows, cond_rows, uncond_flags, start = [], [], [], 0
    for seg in group:
        n = seg.x.shape[0]
        if seg.adapted:
            rows.extend(range(start, start + n))
            uncond_flags.extend([seg.uncond] * n)
            if not seg.uncond:
                cond_rows.extend(range(start, start + n))
        start += n
    unet = checkpoint.unet
    row_index = torch.tensor(rows, device=device, dtype=torch.long)
    with contextlib.ExitStack() as stack:
        if controls.active:
            assert "forward" not in unet.__dict__, "the source UNet's forward is already replaced"
            unet.forward = controlled_forward(unet, controls.active, row_index,
                                              torch.tensor(cond_rows, device=device, dtype=torch.long),
                                              controls.on_call)
            stack.callback(unet.__dict__.pop, "forward", None)
        stack.enter_context(image_prompt_forwards(unet, controls.prompts, row_index,
                                                  torch.tensor(uncond_flags, dtype=torch.bool)))
        yield


@dataclass
class LegRequest:
    """What one denoiser call of the target asks of the source pair."""

    step: int  # the target denoiser's call counter: picks the prompt-schedule stage
    moment: Moment  # where sampling is, as the host's own units read it: the units' windows
    cond_scale: float
    skip_uncond: bool  # the target skipped its uncond rows at this call (NGMS / skip early CFG)
    cond_only: bool  # the user's cheaper variant: no uncond rows and no CFG for the source legs
    batch_legs: bool
    wrapper: str = "k"  # "lcm" (LCM scales x0 its own way) or "timesteps" (DDIM/PLMS/UniPC): denoiser_for
    controls: ControlStack | None = None  # the adapted leg's ControlNet and IP-Adapter units
    forge: bool = False  # combine AND-terms as Forge does (lib_delta.composition)


class SourceLegs:
    """A :data:`lib_delta.PairDenoiser` over the pair for one call: ``(x_s, sigma_s) -> (D_base, D_adapted)``."""

    def __init__(self, pair: SourcePair, conds: LegConds, request: LegRequest) -> None:
        self.pair, self.conds, self.request = pair, conds, request
        self.unconds: tuple[torch.Tensor, torch.Tensor] | None = None  # (base, adapted) uncond x0 of the last call

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from modules import prompt_parser

        req = self.request
        legs = []
        for adapted in (False, True):
            cond = self.conds.adapted_cond if adapted else self.conds.base_cond
            uncond = self.conds.adapted_uncond if adapted else self.conds.base_uncond
            conds_list, cond_tensor = prompt_parser.reconstruct_multicond_batch(cond, req.step)
            repeats = [len(c) for c in conds_list]
            index = [i for i, n in enumerate(repeats) for _ in range(n)]
            segments = [_Segment(x[index], sigma[index], cond_tensor, adapted)]
            with_uncond = not (req.skip_uncond or req.cond_only)
            if with_uncond:
                segments.append(_Segment(x, sigma, prompt_parser.reconstruct_cond_batch(uncond, req.step), adapted,
                                         uncond=True))
            legs.append((conds_list, segments, with_uncond))

        pair, wrapper = self.pair, req.wrapper
        controls = None
        if req.controls is not None:
            height, width = (int(n) * LATENT_CELL for n in x.shape[-2:])  # the hint is at the legs' pixel size
            controls = ControlScope(req.controls.active(req.moment, width, height), req.controls.count_call,
                                    req.controls.image_prompts(req.moment))
        if pair.shares_weights and req.batch_legs:
            _run_segments(pair.base, [s for _, segs, _ in legs for s in segs], pair.runtime_lora, wrapper, controls)
        else:
            base_lora = pair.runtime_lora if pair.shares_weights else None
            _run_segments(pair.base, legs[0][1], base_lora, wrapper)
            _run_segments(pair.adapted, legs[1][1], pair.runtime_lora, wrapper, controls)

        if legs[0][2] and legs[1][2]:
            self.unconds = (legs[0][1][1].out, legs[1][1][1].out)
        results = []
        for conds_list, segments, with_uncond in legs:
            cond_out = segments[0].out
            if req.forge:  # with the uncond skipped, Forge guides against zero at scale 1
                uncond_out = segments[1].out if with_uncond else None
                results.append(combine_forge(cond_out, uncond_out, conds_list, req.cond_scale if with_uncond else 1.0))
            elif with_uncond:
                results.append(combine_a1111(cond_out, segments[1].out, conds_list, req.cond_scale))
            else:
                # As the webui does when it skips the uncond: each image's first cond row stands in for it, scale 1.
                first_rows = torch.stack([cond_out[c[0][0]] for c in conds_list])
                results.append(combine_a1111(cond_out, first_rows, conds_list, 1.0))
        return results[0], results[1]
