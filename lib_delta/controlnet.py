"""A ControlNet for a source UNet, built from that UNet's own class, and the source UNet run with its residuals.

Host-free in the sense of the engine: no webui imports. It works on any ldm/sgm ``UNetModel`` instance (the classes the
webui builds its checkpoints from) and reads two functions from the module that defines the UNet's class, as that
class's own ``forward`` does: ``timestep_embedding`` and ``th`` (the webui replaces both with patched versions, and the
source legs must get the same ones).

* :func:`build_controlnet`: a fresh instance of the source UNet's class with the source's constructor arguments
  (on the meta device), minus its decoder, plus the hint encoder, the zero convolutions and the middle output
  convolution, loaded strictly from a :class:`~lib_delta.controlnet_files.ControlNetFile`. Heads, linear projections,
  depths and attention code are the source's by construction.
* :func:`controlnet_residuals`: the ControlNet's forward: one residual per input block plus the middle one.
* :func:`forward_with_control`: the UNet's own forward (``UNetModel.forward`` re-stated with the instance's modules),
  with residual ``i`` added to the skip of input block ``i`` as the decoder pops it and the last one after the middle
  block; optionally to some batch rows only. Without residuals it is the UNet's forward, operation for operation.
* :func:`controlled_forward`: a per-call stand-in for a UNet instance's ``forward`` that sums the active units'
  residuals (each on its own rows) and runs :func:`forward_with_control`; nothing is patched on any class.
* :func:`expand_control_lora`: a Stability control-LoRA made into an ordinary ControlNet file with the source's weights.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .controlnet_files import ENCODER_ROOTS, ControlNetFile, ControlNetFileError, check_against_unet, read_controlnet

# The hint encoder every ControlNet implementation hard-codes: 8 convolutions, SiLU between, x8 down to latent size.
HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2, 1)


class _Sequential(nn.Sequential):
    """``nn.Sequential`` that accepts (and ignores) the timestep embedding and context the UNet blocks take."""

    def forward(self, x: Tensor, emb: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        return super().forward(x)


def _hint_block(hint_channels: int, model_channels: int) -> _Sequential:
    widths = (hint_channels, *HINT_WIDTHS, model_channels)
    layers: list[nn.Module] = []
    for i, stride in enumerate(HINT_STRIDES):
        layers.append(nn.Conv2d(widths[i], widths[i + 1], 3, padding=1, stride=stride))
        if i < len(HINT_STRIDES) - 1:
            layers.append(nn.SiLU())
    return _Sequential(*layers)


class ControlNet(nn.Module):
    """The encoder half of a source UNet (its own modules) plus a ControlNet's hint encoder and zero convolutions."""

    def __init__(self, body: nn.Module, hint_channels: int, zero_channels: Sequence[int], middle_channels: int):
        super().__init__()
        self.model_channels = int(body.model_channels)
        self.time_embed = body.time_embed
        if getattr(body, "num_classes", None) is not None:
            self.label_emb = body.label_emb
        self.input_blocks = body.input_blocks
        self.middle_block = body.middle_block
        self.input_hint_block = _hint_block(hint_channels, self.model_channels)
        self.zero_convs = nn.ModuleList(_Sequential(nn.Conv2d(c, c, 1)) for c in zero_channels)
        self.middle_block_out = _Sequential(nn.Conv2d(middle_channels, middle_channels, 1))
        self.unet_module = type(body).__module__

    @property
    def has_label_emb(self) -> bool:
        return hasattr(self, "label_emb")


def _module_of(obj_module: str) -> Any:
    module = sys.modules.get(obj_module)
    if module is None or not hasattr(module, "timestep_embedding"):
        raise ControlNetFileError(f"the UNet class's module {obj_module} has no timestep_embedding")
    return module


def build_controlnet(
    unet: nn.Module, unet_kwargs: Mapping[str, Any], cn: ControlNetFile, *, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32, source: str = "the source", source_family: str | None = None,
    stored_as: torch.dtype | None = None,
) -> ControlNet:
    """The ControlNet of ``cn`` for ``unet`` (built with ``unet_kwargs``), in ``dtype``; with ``stored_as`` its
    values are rounded through that dtype first (a host that stores its own ControlNets in fp8 and computes them in
    ``dtype`` gets exactly these values). Raises :class:`ControlNetFileError` naming the first key or shape of the
    file that does not fit."""
    if cn.kind != "controlnet":
        raise ControlNetFileError(f"controlnet: {cn.name} is a {cn.kind}; only full ControlNets are built here")
    with torch.device("meta"):
        body = type(unet)(**dict(unet_kwargs))
    # the encoder tensors first, in file order (the first one that does not fit is named), then the residual count
    check_against_unet(cn, {k: tuple(v.shape) for k, v in body.state_dict().items()}, source=source,
                       source_family=source_family)
    zero = [int(cn.tensors[f"zero_convs.{i}.0.weight"].shape[0]) for i in range(cn.residuals - 1)]
    middle = int(cn.tensors["middle_block_out.0.weight"].shape[0])
    with torch.device("meta"):
        net = ControlNet(body, cn.hint_channels, zero, middle)
    expected = net.state_dict()
    encoder = cn.encoder_tensors()  # already checked against the UNet above
    for key, value in cn.tensors.items():
        if key in encoder:
            continue
        if key not in expected:
            raise ControlNetFileError(f"controlnet: {cn.name}: {key} has no counterpart in {source}'s architecture")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ControlNetFileError(
                f"controlnet: {cn.name} does not fit {source}: {key} is {tuple(value.shape)} in the file and "
                f"{tuple(expected[key].shape)} in the ControlNet built for it"
            )
    missing = [k for k in expected if k not in cn.tensors]
    if missing:
        raise ControlNetFileError(f"controlnet: {cn.name} lacks {missing[0]} (and {len(missing) - 1} more tensors)")
    rounded = cn.tensors if stored_as is None else {k: v.to(stored_as) for k, v in cn.tensors.items()}
    net.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in rounded.items()}, strict=True, assign=True)
    return net.eval().requires_grad_(False)


def controlnet_residuals(
    net: ControlNet, x: Tensor, timesteps: Tensor, context: Tensor, hint: Tensor, *, y: Tensor | None = None,
) -> list[Tensor]:
    """The residuals for one batch: ``hint`` is (B, C, 8H, 8W) in [0, 1] for ``x`` of (B, 4, H, W)."""
    unet_module = _module_of(net.unet_module)
    # Forge's blocks take a transformer_options dict and write into it: give each call a fresh one (its default
    # argument is one shared dict); ldm's and sgm's blocks take no such argument.
    extra = (lambda: {"transformer_options": {}}) if takes_control(unet_module) else dict
    # Forge's timestep_embedding returns fp32 (its UNet casts it to x's dtype itself); A1111's patched one returns
    # the UNet's dtype: in the network's dtype either way
    emb = net.time_embed(unet_module.timestep_embedding(timesteps, net.model_channels, repeat_only=False).to(x.dtype))
    if net.has_label_emb:
        if y is None:
            raise ControlNetFileError("this ControlNet has a label embedding (SDXL) and needs the vector conditioning")
        emb = emb + net.label_emb(y)
    guided = net.input_hint_block(hint, emb, context)
    h = x
    out = []
    for index, (block, zero_conv) in enumerate(zip(net.input_blocks, net.zero_convs, strict=True)):
        h = block(h, emb, context, **extra())
        if index == 0:
            h = h + guided  # the hint enters once, right after the input convolution
        out.append(zero_conv(h, emb, context))
    h = net.middle_block(h, emb, context, **extra())
    out.append(net.middle_block_out(h, emb, context))
    return out


def takes_control(unet_module: Any) -> bool:
    """Whether the UNet class's module is Forge's (its forward takes ``control=`` and applies it with
    ``apply_control``), as opposed to ldm's or sgm's, whose forward :func:`forward_with_control` re-states."""
    return hasattr(unet_module, "apply_control")


def forward_with_control(
    unet: nn.Module, x: Tensor, timesteps: Tensor, context: Tensor | None = None, y: Tensor | None = None, *,
    residuals: Sequence[Tensor] | None = None, rows: slice | Tensor | None = None,
) -> Tensor:
    """``unet``'s own forward with ControlNet residuals (None: none), added to batch ``rows`` only when given."""
    module = _module_of(type(unet).__module__)
    hs = []
    emb = unet.time_embed(module.timestep_embedding(timesteps, unet.model_channels, repeat_only=False))
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    # ldm casts the input to the UNet's dtype; sgm does not (its line is commented out)
    h = x.type(unet.dtype) if type(unet).__module__.startswith("ldm.") else x
    for block in unet.input_blocks:
        h = block(h, emb, context)
        hs.append(h)
    h = unet.middle_block(h, emb, context)
    if residuals is not None:
        if len(residuals) != len(hs) + 1:
            raise ControlNetFileError(f"{len(residuals)} residuals for a UNet with {len(hs)} input blocks")
        h = _add(h, residuals[-1], rows)
    for block in unet.output_blocks:
        skip = hs.pop()
        if residuals is not None:
            skip = _add(skip, residuals[len(hs)], rows)
        h = module.th.cat([h, skip], dim=1)
        h = block(h, emb, context)
    h = h.type(x.dtype)
    return unet.out(h)


def _add(h: Tensor, residual: Tensor, rows: slice | Tensor | None) -> Tensor:
    if rows is None:
        return h + residual.to(h.dtype)
    out = h.clone()
    out[rows] = out[rows] + residual.to(h.dtype)
    return out


@dataclass
class ActiveControl:
    """One unit that runs at this denoiser call: its network, its hint at the legs' pixel size, its residual
    factors (:func:`lib_delta.control_units.residual_scales`) and whether it steers the cond rows only."""

    net: ControlNet
    hint: Tensor  # (1, C, 8H, 8W) in [0, 1]
    scales: Sequence[float]
    cond_rows_only: bool = False


def controlled_forward(
    unet: nn.Module, controls: Sequence[ActiveControl], rows: Tensor, cond_rows: Tensor,
    on_call: Callable[[], None] | None = None,
) -> Callable[..., Tensor]:
    """A stand-in for ``unet.forward`` (same signature as ldm's, sgm's and Forge's) that adds the units' summed
    residuals to batch ``rows`` (indices) only; a "cond rows only" unit runs on ``cond_rows`` alone. Other rows get the
    UNet's own forward, operation for operation: ldm/sgm through :func:`forward_with_control`, Forge through its own
    forward's ``control=`` (zero residuals on the other rows, which leave them bit for bit as they are). ``on_call``
    is told of every ControlNet call (counted for the status)."""
    native = takes_control(_module_of(type(unet).__module__))
    own_forward = type(unet).forward.__get__(unet)

    def forward(x: Tensor, timesteps: Tensor | None = None, context: Tensor | None = None, y: Tensor | None = None,
                **kwargs: Any) -> Tensor:
        if kwargs and not native:
            raise ControlNetFileError(f"the source UNet was called with {sorted(kwargs)}, which ControlNet does not "
                                      "handle")
        total: list[Tensor] | None = None
        for control in controls:
            picked = cond_rows if control.cond_rows_only else rows
            if picked.numel() == 0:
                continue
            if next(control.net.parameters()).device != x.device:
                # Built while its UNet waited on the CPU (Forge's offload device), or left there by a host's memory
                # manager: the network goes where the UNet computes (once; it stays there). No reference to a
                # parameter may be held across the move (torch swaps parameter tensors for some tensor types).
                control.net.to(x.device)
            net_param = next(control.net.parameters())
            hint = control.hint.to(device=x.device, dtype=net_param.dtype).expand(picked.numel(), -1, -1, -1)
            residuals = controlnet_residuals(
                control.net, x[picked].to(net_param.dtype), timesteps[picked],
                None if context is None else context[picked].to(net_param.dtype), hint,
                y=None if y is None else y[picked].to(net_param.dtype),
            )
            if on_call is not None:
                on_call()
            if len(residuals) != len(control.scales):
                raise ControlNetFileError(f"{len(residuals)} residuals but {len(control.scales)} scales")
            if total is None:
                total = [torch.zeros((x.shape[0], *r.shape[1:]), dtype=r.dtype, device=r.device) for r in residuals]
            for buffer, residual, scale in zip(total, residuals, control.scales, strict=True):
                buffer.index_add_(0, picked, residual * scale)
        if native:
            if total is not None:
                if kwargs.get("control") is not None:
                    raise ControlNetFileError("the source UNet already carries a ControlNet of the host's own")
                kwargs["control"] = {"input": [], "middle": [total[-1]], "output": list(total[:-1])}
            return own_forward(x, timesteps, context=context, y=y, **kwargs)
        if total is None:
            return forward_with_control(unet, x, timesteps, context, y)
        return forward_with_control(unet, x, timesteps, context, y, residuals=[r[rows] for r in total], rows=rows)

    return forward


def expand_control_lora(cn: ControlNetFile, unet_state: Mapping[str, Tensor]) -> ControlNetFile:
    """A Stability control-LoRA made whole: the source UNet's own encoder weights, ``weight + up @ down`` where the
    file holds a low-rank pair, and the file's own tensors (hint encoder, zero convolutions, norms, biases) over
    them, as ComfyUI's and Forge's ``ControlLora`` do. Returns an ordinary ``kind == "controlnet"`` file."""
    if cn.kind != "control_lora":
        return cn
    tensors = {k: v for k, v in unet_state.items() if k.startswith(ENCODER_ROOTS)}
    file_tensors = {k: v for k, v in cn.tensors.items() if k != "lora_controlnet"}
    for key, value in file_tensors.items():
        if key.endswith(".up") or key.endswith(".down"):
            continue
        tensors[key] = value
    for key in [k for k in file_tensors if k.endswith(".up")]:
        stem = key[: -len(".up")]
        down = file_tensors.get(stem + ".down")
        base = unet_state.get(stem + ".weight")
        if down is None or base is None:
            raise ControlNetFileError(f"controlnet: {cn.name}: low-rank pair {stem} has no "
                                      f"{'down half' if down is None else 'weight in the source UNet'}")
        up = file_tensors[key]
        product = up.flatten(1).float() @ down.flatten(1).float()
        if product.numel() != base.numel():
            raise ControlNetFileError(f"controlnet: {cn.name} does not fit the source: {stem} up @ down is "
                                      f"{tuple(product.shape)}, the source weight {tuple(base.shape)}")
        tensors[stem + ".weight"] = (base.float() + product.reshape(base.shape)).to(base.dtype)
    whole = read_controlnet(tensors, cn.name)
    whole.layout = "control-lora"
    return whole
