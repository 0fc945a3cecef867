"""ControlNet files for the adapted source leg: read the known layouts into one, tell family and type, refuse the rest.

Host-free (torch + stdlib); groundwork for ControlNet on the adapted leg (the network is built from the source UNet's
own class elsewhere, so this module only has to produce ldm key names and check them against that UNet's shapes).

Layouts read (all end as bare ldm names: ``time_embed.*``, ``label_emb.*`` (SDXL), ``input_blocks.*``,
``middle_block.*``, ``input_hint_block.{0,2,..,14}.*``, ``zero_convs.{i}.0.*``, ``middle_block_out.0.*``):

* lllyasviel ldm, prefixed (``control_model.``; training checkpoints also hold ``model.diffusion_model.*``,
  ``first_stage_model.*`` and ``cond_stage_model.*``, which are dropped);
* ldm, bare (``extract_controlnet.py`` output);
* diffusers (``controlnet_cond_embedding.*``, ``down_blocks.*``, ...), renamed with the same arithmetic the webui uses
  for LoRA names (two res blocks per level);
* Stability control-LoRAs (``lora_controlnet`` key): ``kind == "control_lora"``; their encoder weights are the source
  UNet's own plus ``up @ down``, which needs the source, so they are kept as they are here.

T2I-Adapter, ControlNet++ union, ControlLLLite, IP-Adapter and "difference" ControlNets are refused with a message that
names what the file is. fp16 and fp32 files are both read; tensors keep their dtype (the builder casts).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import DeltaSamplingError


class ControlNetFileError(DeltaSamplingError, ValueError):
    """A ControlNet file cannot be used: unreadable, an unsupported kind, or made for another model family."""

    http_status = 422


CONTEXT_DIM_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TRAINING_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")
ENCODER_ROOTS = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
_CONTROL_ROOTS = ("input_hint_block.", "zero_convs.", "middle_block_out.")

# (test on the key set, what the file is): checked before anything is renamed
_UNSUPPORTED: tuple[tuple[str, str], ...] = (
    ("control_add_embedding.", "a ControlNet++ union model (it needs control-type ids)"),
    ("task_embedding", "a ControlNet++ union model (it needs control-type ids)"),
    ("lllite", "a kohya ControlLLLite module"),
    ("ip_adapter", "an IP-Adapter (an image prompt, not a ControlNet)"),
    ("image_proj.", "an IP-Adapter (an image prompt, not a ControlNet)"),
    ("adapter.body.", "a T2I-Adapter"),
    ("body.0.", "a T2I-Adapter"),
    ("difference", "a \"difference\" ControlNet (it holds weights relative to a base UNet)"),
    ("motion_modules", "a SparseCtrl / motion-module file"),
)

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_RE_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_RE_DOWNSAMPLE = re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)")
_RE_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_RE_HINT = re.compile(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)")
_RE_ZERO = re.compile(r"controlnet_down_blocks\.(\d+)\.(.+)")


@dataclass
class ControlNetFile:
    """One ControlNet file, read: ``tensors`` under bare ldm names, and what was learnt from them."""

    name: str
    layout: str  # "ldm-prefixed" | "ldm-bare" | "diffusers"
    kind: str  # "controlnet" | "control_lora"
    tensors: dict[str, Tensor]
    family: str | None  # "sd1" | "sd2" | "sdxl" from the cross-attention context width, None if it has no attention
    context_dim: int | None
    hint_channels: int
    residuals: int  # zero convs + the middle one
    dtype: torch.dtype
    dropped: list[str] = field(default_factory=list)  # training-checkpoint keys that are not part of the ControlNet

    def encoder_tensors(self) -> dict[str, Tensor]:
        """The tensors that must match the source UNet's own (time embedding, label embedding, encoder, middle)."""
        return {k: v for k, v in self.tensors.items() if k.startswith(ENCODER_ROOTS)}


def diffusers_to_ldm(key: str) -> str | None:
    """A diffusers ControlNet key -> its ldm name, or None for keys with no place in an ldm ControlNet."""
    if key.startswith("controlnet_cond_embedding.conv_in."):
        return "input_hint_block.0." + key.rsplit(".", 1)[1]
    if key.startswith("controlnet_cond_embedding.conv_out."):
        return "input_hint_block.14." + key.rsplit(".", 1)[1]
    if m := _RE_HINT.fullmatch(key):
        return f"input_hint_block.{2 * int(m[1]) + 2}.{m[2]}"
    if m := _RE_ZERO.fullmatch(key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if key.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + key[len("controlnet_mid_block.") :]
    if key.startswith("conv_in."):
        return "input_blocks.0.0." + key[len("conv_in.") :]
    for old, new in (("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
                     ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")):
        if key.startswith(old):
            return new + key[len(old) :]
    if m := _RE_DOWNSAMPLE.fullmatch(key):
        return f"input_blocks.{3 * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := _RE_DOWN.fullmatch(key):
        block = 3 * int(m[1]) + int(m[3]) + 1
        sub = "1" if m[2] == "attentions" else "0"  # TimestepEmbedSequential(ResBlock, SpatialTransformer)
        return f"input_blocks.{block}.{sub}.{_inner(m[2], m[4])}"
    if m := _RE_MID.fullmatch(key):
        index = 1 if m[1] == "attentions" else 2 * int(m[2])
        return f"middle_block.{index}.{_inner(m[1], m[3])}"
    return None


def _inner(kind: str, rest: str) -> str:
    """Names inside a block: ldm's SpatialTransformer uses diffusers' own; a ResBlock renames its layers."""
    if kind == "attentions":
        return rest
    part, _, tail = rest.partition(".")
    return f"{_RESNET.get(part, part)}.{tail}"


def _detect_unsupported(keys: list[str], name: str) -> None:
    for marker, what in _UNSUPPORTED:
        if any(marker in key for key in keys):
            raise ControlNetFileError(f"controlnet: {name} is {what}; Delta Sampling does not support it yet")


def read_controlnet(state_dict: Mapping[str, Tensor], name: str = "controlnet") -> ControlNetFile:
    """Read a loaded ControlNet state dict (any supported layout) into bare ldm names; refuse what is not one."""
    keys = list(state_dict)
    if not keys:
        raise ControlNetFileError(f"controlnet: {name} holds no tensors")
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise ControlNetFileError(f"controlnet: {name}: key {key} holds a {type(value).__name__}, not a tensor")
    if "lora_controlnet" in state_dict:
        return _finish(name, "ldm-bare", "control_lora", dict(state_dict), [])
    _detect_unsupported(keys, name)
    dropped: list[str] = []
    if any(k.startswith("control_model.") for k in keys):
        layout, tensors = "ldm-prefixed", {}
        for key, value in state_dict.items():
            if key.startswith("control_model."):
                tensors[key[len("control_model.") :]] = value
            elif key.startswith(_TRAINING_PREFIXES):
                dropped.append(key)
            else:
                raise ControlNetFileError(f"controlnet: {name}: unexpected key {key} beside control_model.* keys")
    elif any(k.startswith("controlnet_cond_embedding.") for k in keys):
        layout, tensors = "diffusers", {}
        for key, value in state_dict.items():
            ldm = diffusers_to_ldm(key)
            if ldm is None:
                raise ControlNetFileError(f"controlnet: {name}: diffusers key {key} has no place in a ControlNet")
            tensors[ldm] = value
    elif any(k.startswith("zero_convs.") for k in keys):
        layout, tensors = "ldm-bare", dict(state_dict)
    else:
        raise ControlNetFileError(
            f"controlnet: {name} is not a ControlNet (no zero_convs, control_model.* or controlnet_cond_embedding.* "
            f"keys; first keys: {', '.join(keys[:3])})"
        )
    unknown = [k for k in tensors if not k.startswith(ENCODER_ROOTS + _CONTROL_ROOTS)]
    if unknown:
        raise ControlNetFileError(f"controlnet: {name}: key {unknown[0]} is not part of a ControlNet")
    return _finish(name, layout, "controlnet", tensors, dropped)


def _finish(name: str, layout: str, kind: str, tensors: dict[str, Tensor], dropped: list[str]) -> ControlNetFile:
    context = None
    for key, value in tensors.items():
        if key.endswith("attn2.to_k.weight") and value.ndim == 2:
            context = int(value.shape[1])
            break
    family = CONTEXT_DIM_FAMILY.get(context) if context is not None else None
    if kind == "controlnet":
        if "input_hint_block.0.weight" not in tensors:
            raise ControlNetFileError(f"controlnet: {name} has no input_hint_block.0.weight (the hint encoder)")
        if "middle_block_out.0.weight" not in tensors:
            raise ControlNetFileError(f"controlnet: {name} has no middle_block_out.0.weight")
        hint_channels = int(tensors["input_hint_block.0.weight"].shape[1])
        zero = {int(k.split(".")[1]) for k in tensors if k.startswith("zero_convs.")}
        if zero != set(range(len(zero))):
            raise ControlNetFileError(f"controlnet: {name}: zero_convs are not numbered 0..{len(zero) - 1}")
        residuals = len(zero) + 1
    else:
        hint_channels, residuals = 3, 0
    floats = [v.dtype for v in tensors.values() if v.is_floating_point()]
    dtype = floats[0] if floats else torch.float32
    return ControlNetFile(name=name, layout=layout, kind=kind, tensors=tensors, family=family, context_dim=context,
                          hint_channels=hint_channels, residuals=residuals, dtype=dtype, dropped=dropped)


def check_against_unet(
    cn: ControlNetFile, unet_shapes: Mapping[str, tuple[int, ...]], *, source: str, source_family: str | None = None,
) -> None:
    """Raise naming the file, the source and the first mismatching tensor if ``cn`` was not made for this UNet.

    ``unet_shapes``: the source UNet's ``state_dict()`` shapes under its own names (``input_blocks.0.0.weight``, ...).
    The number of zero convs must equal the UNet's number of input blocks."""
    family_note = f" (made for {cn.family})" if cn.family and source_family and cn.family != source_family else ""
    the = f"the {source_family} source" if source_family else "the source"
    for key, value in cn.encoder_tensors().items():
        shape = unet_shapes.get(key)
        if shape is None:
            raise ControlNetFileError(
                f"controlnet: {cn.name}{family_note} does not fit {the} {source}: its tensor "
                f"{key} has no counterpart in the source UNet"
            )
        if tuple(value.shape) != tuple(shape):
            raise ControlNetFileError(
                f"controlnet: {cn.name}{family_note} does not fit {the} {source}: {key} is "
                f"{tuple(value.shape)} in the file and {tuple(shape)} in the source UNet"
            )
    blocks = {int(k.split(".")[1]) for k in unet_shapes if k.startswith("input_blocks.")}
    if cn.kind == "controlnet" and cn.residuals - 1 != len(blocks):
        raise ControlNetFileError(
            f"controlnet: {cn.name}{family_note} has {cn.residuals - 1} zero convs but {the} "
            f"{source} has {len(blocks)} input blocks"
        )
