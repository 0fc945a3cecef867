"""ControlNet units: settings, residual scales, windows, control maps, and the controlled forward on a toy UNet.

The toy UNet below has the attribute layout of ldm's ``UNetModel`` (time_embed, input_blocks, middle_block,
output_blocks, out; this module provides ``timestep_embedding`` and ``th`` as ldm's module does), so
:func:`lib_delta.controlnet.controlled_forward` runs on it exactly as on the real one; the real-UNet invariants are in
tests/webui/test_delta_controlnet_core.py.
"""

from __future__ import annotations

import base64
import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lib_delta import DeltaParams, ParamError
from lib_delta.control_units import (
    UNIT_FIELDS,
    ControlStack,
    ControlUnit,
    Moment,
    decode_image,
    fit,
    forge_soft_middle,
    parse_unit,
    parse_units,
    pixel_perfect_resolution,
    preprocess,
    residual_scales,
    soft_injection_table,
    unit_from_infotext,
)
from lib_delta.controlnet import ActiveControl, ControlNet, controlled_forward, forward_with_control
from lib_delta.params import UNIT_INFOTEXT_KEYS

th = torch  # what ldm's module calls ``th`` (forward_with_control reads it from the UNet class's module)


def timestep_embedding(timesteps, dim, repeat_only=False):
    half = dim // 2
    freqs = torch.exp(-torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- settings ------------------------------------------------------------------------------------------------------


def test_unit_fields_use_sd_webui_controlnet_names_and_aliases():
    names = [f.name for f in UNIT_FIELDS]
    assert names[:3] == ["enabled", "model", "image"]
    assert {"module", "weight", "guidance_start", "guidance_end", "control_mode", "resize_mode", "pixel_perfect",
            "processor_res", "threshold_a", "threshold_b"} <= set(names)
    unit = parse_unit({"model": "cn", "module": "invert (from white bg & black line)", "control_mode": 2,
                       "resize_mode": 0})
    assert (unit.module, unit.control_mode, unit.resize_mode) == ("invert", "ControlNet is more important",
                                                                  "Just Resize")
    assert parse_unit({"model": "cn", "enabled": False}) is None


@pytest.mark.parametrize(("fields", "message"), [
    ({"model": ""}, "model: choose"),
    ({"model": "a,b"}, "must not contain ','"),
    ({"model": "cn", "weight": 2.5}, "weight: 2.5 is above the maximum 2"),
    ({"model": "cn", "weight": float("nan")}, "finite"),
    ({"model": "cn", "weight": "1"}, "weight: expected a number"),
    ({"model": "cn", "guidance_start": 0.6, "guidance_end": 0.4}, "before guidance_start"),
    ({"model": "cn", "module": "canny", "threshold_a": 200, "threshold_b": 100}, "threshold_a 200"),
    ({"model": "cn", "control_mode": "Loud"}, "control_mode: expected one of"),
    ({"model": "cn", "processor_res": 100.5}, "whole number"),
    ({"model": "cn", "image": 5}, "image: expected base64"),
    ({"model": "cn", "strength": 1}, "unknown unit field 'strength'"),
])
def test_bad_unit_fields_are_named(fields, message):
    with pytest.raises(ParamError, match=message.replace("(", r"\(")) as info:
        parse_units([fields])
    assert info.value.field == "controlnet[0]"


def test_params_carry_units_through_every_form():
    units = [{"model": "cn-a", "image": "aGk=", "weight": 0.5, "control_mode": "My prompt is more important"},
             {"model": "cn-b", "enabled": False}, {"model": "cn-c", "module": "canny", "guidance_end": 0.5}]
    p = DeltaParams.create(enabled=True, source="base", controlnet=units)
    assert [u.model for u in p.controlnet] == ["cn-a", "cn-c"]  # a disabled unit is dropped
    assert p.controlnet[0].image == "aGk="
    # positional (API form: a list in the last slot) and named forms agree
    assert DeltaParams.from_positional(p.positional()) == p
    assert DeltaParams.from_api([p.as_dict()]) == p
    # the UI form: the other settings, then every tab's fields flat; a tab that is off holds anything
    plain = p.positional()[:-1]
    flat = []
    for unit in (p.controlnet[0], None, p.controlnet[1]):
        values = {"enabled": False, "model": None, "image": None} if unit is None else {"enabled": True,
                                                                                        **unit.as_dict()}
        flat += [values.get(f.name, f.default) for f in UNIT_FIELDS]
    assert DeltaParams.from_positional([*plain, *flat]) == p
    with pytest.raises(ParamError, match="per ControlNet unit"):
        DeltaParams.from_positional([*plain, *flat, 1])
    # a ControlNet unit alone makes an adapted leg
    assert DeltaParams.create(enabled=True, source="base", controlnet=units[:1]).effective
    # infotext: one key per unit, without the image; it parses back
    entries = p.infotext()
    assert entries[UNIT_INFOTEXT_KEYS[0]].startswith("Model: cn-a, Module: none, Threshold A: 100")
    assert "Control Mode: My prompt is more important" in entries[UNIT_INFOTEXT_KEYS[0]]
    back = DeltaParams.from_infotext({**entries, "Delta sampling": "True"})
    assert back.controlnet == p.controlnet
    # the schema lists the unit fields
    schema = DeltaParams.json_schema()["properties"]["controlnet"]
    assert set(schema["items"]["properties"]) == {f.name for f in UNIT_FIELDS}


def test_unit_infotext_with_a_hashed_model_title_parses_back():
    unit = ControlUnit("cn", weight=1.25, guidance_start=0.1, pixel_perfect=True, resize_mode="Resize and Fill")
    text = unit.infotext("cn [0123456789]")
    assert "Model: cn [0123456789]" in text and "Pixel Perfect: True" in text
    back = unit_from_infotext(text)
    assert back.model == "cn [0123456789]"
    assert back == ControlUnit("cn [0123456789]", weight=1.25, guidance_start=0.1, pixel_perfect=True,
                               resize_mode="Resize and Fill")


# --- scales and windows --------------------------------------------------------------------------------------------


def test_soft_injection_table_and_the_sdxl_rule():
    table = soft_injection_table(13)
    assert table[-1] == 1.0 and table[0] == pytest.approx(0.825 ** 12)
    assert all(a < b for a, b in itertools.pairwise(table))
    # SDXL (10 residuals): the first 10 entries of the SD1 table, so its middle residual gets 0.825^3
    assert soft_injection_table(10) == table[:10]
    assert soft_injection_table(10)[-1] == pytest.approx(0.825 ** 3)
    assert residual_scales(ControlUnit("cn", weight=0.5), 13) == [0.5] * 13
    prompt = residual_scales(ControlUnit("cn", weight=0.5, control_mode="My prompt is more important"), 13)
    assert prompt == pytest.approx([0.5 * s for s in table])
    assert residual_scales(ControlUnit("cn", control_mode="ControlNet is more important"), 10) == table[:10]
    # Forge fixes the middle factor by family: the same as the table for the real counts (13 / 10), not for others
    assert soft_injection_table(13, forge_soft_middle("sd1")) == table
    assert soft_injection_table(10, forge_soft_middle("sdxl")) == pytest.approx(table[:10])
    assert soft_injection_table(5, forge_soft_middle("sd1")) == [*table[:4], 1.0]
    assert residual_scales(ControlUnit("cn", weight=0.5, control_mode="My prompt is more important"), 5,
                           soft_middle=1.0)[-1] == 0.5


def test_window_is_a_step_fraction_inclusive_at_both_ends_and_weight_zero_is_off():
    unit = ControlUnit("cn", guidance_start=0.25, guidance_end=0.5)
    assert [unit.active_at(Moment(step / 4)) for step in range(4)] == [False, True, True, False]
    assert not ControlUnit("cn", weight=0.0).active_at(Moment(0.0))


# --- control maps --------------------------------------------------------------------------------------------------


def test_decode_image_forms():
    array = np.zeros((6, 8, 3), dtype=np.uint8)
    array[2:4, 3:6] = (255, 10, 20)
    assert np.array_equal(decode_image(png(array)), array)
    assert np.array_equal(decode_image("data:image/png;base64," + png(array)), array)
    assert np.array_equal(decode_image({"image": array, "mask": None}), array)
    rgba = np.dstack([array, np.full((6, 8), 255, np.uint8)])
    assert np.array_equal(decode_image(rgba), array)
    assert decode_image(array[:, :, 0]).shape == (6, 8, 3)
    for bad, message in (("%%%", "not a base64-encoded"), (base64.b64encode(b"text").decode(), "not a base64"),
                         (None, "no control image"), (np.zeros((2, 2, 5)), "expected an")):
        with pytest.raises(ParamError, match=message):
            decode_image(bad)


def test_resize_modes():
    image = np.zeros((40, 80, 3), dtype=np.uint8)  # 2:1
    image[:, :40] = 255  # left half white
    stretched = fit(image, 64, 64, "Just Resize")
    assert stretched.shape == (64, 64, 3) and stretched[:, :30].min() == 255 and stretched[:, 34:].max() == 0
    cropped = fit(image, 64, 64, "Crop and Resize")  # scaled to 128x64, centre 64 columns: half white, half black
    assert cropped.shape == (64, 64, 3) and cropped[:, :30].min() == 255 and cropped[:, 34:].max() == 0
    filled = fit(image, 64, 64, "Resize and Fill")  # scaled to 64x32, padded top and bottom with black
    assert filled.shape == (64, 64, 3) and filled[:15].max() == 0 and filled[49:].max() == 0
    assert filled[20:44, :30].min() == 255
    # binary maps stay binary after resizing (no grey edge halo)
    assert set(np.unique(fit(image, 50, 30, "Just Resize"))) == {0, 255}
    assert np.array_equal(fit(image, 80, 40, "Crop and Resize"), image)  # same size: the map enters untouched


def test_preprocessors_and_pixel_perfect():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[16:48, 16:48] = 200
    assert preprocess(ControlUnit("cn"), image, 64, 64) is image
    assert np.array_equal(preprocess(ControlUnit("cn", module="invert"), image, 64, 64), 255 - image)
    edges = preprocess(ControlUnit("cn", module="canny", processor_res=64), image, 64, 64)
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[32, 32].max() == 0 and edges[14:18, 30].max() == 255  # an edge on the border, none inside
    bigger = preprocess(ControlUnit("cn", module="canny", processor_res=128), image, 64, 64)
    assert bigger.shape == (128, 128, 3)
    # pixel perfect: the resolution at which the map comes out at the generation's size
    wide = np.zeros((100, 200, 3), dtype=np.uint8)
    assert pixel_perfect_resolution(wide, 512, 512, "Crop and Resize") == 512
    assert pixel_perfect_resolution(wide, 512, 512, "Resize and Fill") == 256
    perfect = preprocess(ControlUnit("cn", module="canny", pixel_perfect=True), image, 96, 96)
    assert perfect.shape == (96, 96, 3)


# --- the controlled forward on a toy UNet ---------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, ctx: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(8, cout)
        self.ctx = nn.Linear(ctx, cout)

    def forward(self, h, emb, context):
        return torch.tanh(self.conv(h) + self.emb(emb)[:, :, None, None] + self.ctx(context.mean(1))[:, :, None, None])


class ToyUNet(nn.Module):
    """ldm's UNetModel layout at toy size: 3 input blocks, a middle block, 3 output blocks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model_channels, self.num_classes, self.dtype = 8, None, torch.float32
        self.time_embed = nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8))
        self.input_blocks = nn.ModuleList([_Block(4, 8), _Block(8, 8), _Block(8, 8)])
        self.middle_block = _Block(8, 8)
        self.output_blocks = nn.ModuleList([_Block(16, 8) for _ in range(3)])
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x, timesteps=None, context=None, y=None):
        return forward_with_control(self, x, timesteps, context, y)


ToyUNet.__module__ = __name__


def _toy_controlnet(unet: ToyUNet, seed: int) -> ControlNet:
    net = ControlNet(unet, 3, [8, 8, 8], 8)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in [*net.input_hint_block, *net.zero_convs, net.middle_block_out]:
            for p in module.parameters():
                p.normal_(0, 0.3)
    return net.requires_grad_(False)


def _batch():
    torch.manual_seed(1)
    # rows: base cond, base uncond, adapted cond, adapted uncond
    x = torch.randn(4, 4, 8, 8)
    t = torch.tensor([500.0, 500.0, 500.0, 500.0])
    context = torch.randn(4, 5, 6)
    hint = torch.rand(1, 3, 64, 64)
    return x, t, context, hint


@torch.no_grad()
def test_controlled_forward_rows_modes_and_sums():
    unet = ToyUNet().requires_grad_(False)
    x, t, context, hint = _batch()
    plain = unet(x, t, context)
    rows, cond_rows = torch.tensor([2, 3]), torch.tensor([2])
    net_a, net_b = _toy_controlnet(unet, 2), _toy_controlnet(unet, 3)
    scales = [1.0] * 4

    balanced = controlled_forward(unet, [ActiveControl(net_a, hint, scales)], rows, cond_rows)(x, t, context)
    assert torch.equal(balanced[:2], plain[:2])  # the base rows: the UNet's own forward, bit for bit
    assert (balanced[2:] - plain[2:]).abs().max() > 1e-3  # the unit steers both adapted rows
    # "ControlNet is more important": the adapted uncond row stays untouched, bit for bit
    cond_only = controlled_forward(unet, [ActiveControl(net_a, hint, scales, cond_rows_only=True)], rows,
                                   cond_rows)(x, t, context)
    assert torch.equal(cond_only[[0, 1, 3]], plain[[0, 1, 3]])
    assert torch.allclose(cond_only[2], balanced[2], atol=1e-6)
    # no active unit: the UNet's own forward
    assert torch.equal(controlled_forward(unet, [], rows, cond_rows)(x, t, context), plain)
    # two units sum index-wise: the same as one set of residuals that is their scaled sum
    from lib_delta.controlnet import controlnet_residuals

    soft = soft_injection_table(4)
    calls = []
    both = controlled_forward(unet, [ActiveControl(net_a, hint, scales), ActiveControl(net_b, hint, soft)], rows,
                              cond_rows, on_call=lambda: calls.append(1))(x, t, context)
    assert len(calls) == 2
    hint2 = hint.expand(2, -1, -1, -1)
    res_a = controlnet_residuals(net_a, x[2:], t[2:], context[2:], hint2)
    res_b = controlnet_residuals(net_b, x[2:], t[2:], context[2:], hint2)
    summed = [a + s * b for a, b, s in zip(res_a, res_b, soft, strict=True)]
    expected = forward_with_control(unet, x, t, context, residuals=summed, rows=rows)
    assert torch.allclose(both, expected, atol=1e-6)
    assert torch.equal(both[:2], plain[:2])


@torch.no_grad()
def test_control_stack_runs_only_active_units_and_makes_each_hint_once():
    unet = ToyUNet()
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[8:24, 8:24] = 255
    units = [ControlUnit("a", guidance_end=0.5), ControlUnit("b", weight=0.0), ControlUnit("c", module="invert",
                                                                                           guidance_start=0.5)]
    stack = ControlStack([(u, _toy_controlnet(unet, i), image) for i, u in enumerate(units)])
    early = stack.active(Moment(0.0), 64, 64)
    late = stack.active(Moment(0.75), 64, 64)
    assert [c.net for c in early] == [stack.entries[0][1]] and [c.net for c in late] == [stack.entries[2][1]]
    assert early[0].hint.shape == (1, 3, 64, 64) and early[0].hint.max() == 1.0
    assert torch.equal(late[0].hint, 1 - stack.hint(0, 64, 64))  # invert
    assert stack.active(Moment(0.0), 64, 64)[0].hint is early[0].hint  # cached per size
    assert stack.hint(0, 128, 64).shape == (1, 3, 64, 128)
    assert stack.any_active(Moment(0.0)) and not ControlStack(stack.entries[1:2]).any_active(Moment(0.0))
