"""A ControlNet for a source UNet, built from that UNet's own class, and the source UNet run with its residuals.

Host-free in the sense of the engine: no webui imports. It works on any ldm/sgm ``UNetModel`` instance (the classes the
webui builds its checkpoints from) and reads two functions from the module that defines the UNet's class, as that
class's own ``forward`` does: ``timestep_embedding`` and ``th`` (the webui replaces both with patched versions, and the
source legs must get the same ones). Groundwork for ControlNet on the adapted leg (issue 10); not wired into the legs.

* :func:`build_controlnet`: a fresh instance of the source UNet's class with the source's constructor arguments
  (on the meta device), minus its decoder, plus the hint encoder, the zero convolutions and the middle output
  convolution, loaded strictly from a :class:`~lib_delta.controlnet_files.ControlNetFile`. Heads, linear projections,
  depths and attention code are the source's by construction.
* :func:`controlnet_residuals`: the ControlNet's forward: one residual per input block plus the middle one.
* :func:`forward_with_control`: the UNet's own forward (``UNetModel.forward`` re-stated with the instance's modules),
  with residual ``i`` added to the skip of input block ``i`` as the decoder pops it and the last one after the middle
  block; optionally to a slice of batch rows only. Without residuals it is the UNet's forward, operation for operation.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .controlnet_files import ControlNetFile, ControlNetFileError, check_against_unet

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
) -> ControlNet:
    """The ControlNet of ``cn`` for ``unet`` (built with ``unet_kwargs``); raises :class:`ControlNetFileError` naming
    the first key or shape of the file that does not fit."""
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
    net.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in cn.tensors.items()}, strict=True,
                        assign=True)
    return net.eval().requires_grad_(False)


def controlnet_residuals(
    net: ControlNet, x: Tensor, timesteps: Tensor, context: Tensor, hint: Tensor, *, y: Tensor | None = None,
) -> list[Tensor]:
    """The residuals for one batch: ``hint`` is (B, C, 8H, 8W) in [0, 1] for ``x`` of (B, 4, H, W)."""
    unet_module = _module_of(net.unet_module)
    emb = net.time_embed(unet_module.timestep_embedding(timesteps, net.model_channels, repeat_only=False))
    if net.has_label_emb:
        if y is None:
            raise ControlNetFileError("this ControlNet has a label embedding (SDXL) and needs the vector conditioning")
        emb = emb + net.label_emb(y)
    guided = net.input_hint_block(hint, emb, context)
    h = x
    out = []
    for index, (block, zero_conv) in enumerate(zip(net.input_blocks, net.zero_convs, strict=True)):
        h = block(h, emb, context)
        if index == 0:
            h = h + guided  # the hint enters once, right after the input convolution
        out.append(zero_conv(h, emb, context))
    h = net.middle_block(h, emb, context)
    out.append(net.middle_block_out(h, emb, context))
    return out


def forward_with_control(
    unet: nn.Module, x: Tensor, timesteps: Tensor, context: Tensor | None = None, y: Tensor | None = None, *,
    residuals: Sequence[Tensor] | None = None, rows: slice | None = None,
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


def _add(h: Tensor, residual: Tensor, rows: slice | None) -> Tensor:
    if rows is None:
        return h + residual.to(h.dtype)
    out = h.clone()
    out[rows] = out[rows] + residual.to(h.dtype)
    return out
