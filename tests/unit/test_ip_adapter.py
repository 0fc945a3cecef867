"""IP-Adapter maths and files without a host: the layer map, the injected attention, windows, uncond tokens, files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lib_delta.clip_vision import ClipVision, ClipVisionConfig, read_clip_vision
from lib_delta.control_units import ControlStack, ControlUnit, Moment, parse_unit
from lib_delta.ip_adapter import (
    ImagePrompt,
    IPAdapterFileError,
    attn2_layers,
    build_ip_adapter,
    image_prompt_forwards,
    is_ip_adapter,
    read_ip_adapter,
    uncond_tokens,
)

# --- a UNet skeleton with ldm's module paths ----------------------------------------------------------------------


class Attention(nn.Module):
    """ldm's CrossAttention, plainly written (softmax(q k^T / sqrt(d)) v per head, then to_out)."""

    def __init__(self, inner: int, ctx: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(inner, inner, bias=False)
        self.to_k = nn.Linear(ctx, inner, bias=False)
        self.to_v = nn.Linear(ctx, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, inner), nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None):
        return self.to_out(attend(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


def attend(q, k, v, heads):
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, inner)


class Block(nn.Module):
    def __init__(self, inner, ctx, heads):
        super().__init__()
        self.attn1 = Attention(inner, inner, heads)
        self.attn2 = Attention(inner, ctx, heads)


class SpatialTransformer(nn.Module):
    def __init__(self, inner, ctx, depth, heads=8):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(Block(inner, ctx, heads) for _ in range(depth))


def skeleton(layout: dict[str, list[tuple[int, int, int]]], ctx: int) -> nn.Module:
    """A UNet whose blocks i hold [a stand-in ResBlock, SpatialTransformer] where ``layout`` lists (index, inner,
    depth), as ldm's and sgm's ``TimestepEmbedSequential`` blocks do."""
    unet = nn.Module()
    for root, count in (("input_blocks", 12), ("output_blocks", 12)):
        blocks = nn.ModuleList(nn.Sequential(nn.Identity()) for _ in range(count))
        for index, inner, depth in layout[root]:
            blocks[index] = nn.Sequential(nn.Identity(), SpatialTransformer(inner, ctx, depth))
        setattr(unet, root, blocks)
    (_, inner, depth), = layout["middle_block"]
    unet.middle_block = nn.Sequential(nn.Identity(), SpatialTransformer(inner, ctx, depth), nn.Identity())
    return unet


SD15 = {"input_blocks": [(1, 320, 1), (2, 320, 1), (4, 640, 1), (5, 640, 1), (7, 1280, 1), (8, 1280, 1)],
        "output_blocks": [(i, c, 1) for i, c in zip(range(3, 12), [1280] * 3 + [640] * 3 + [320] * 3, strict=True)],
        "middle_block": [(1, 1280, 1)]}
SDXL = {"input_blocks": [(4, 640, 2), (5, 640, 2), (7, 1280, 10), (8, 1280, 10)],
        "output_blocks": [(0, 1280, 10), (1, 1280, 10), (2, 1280, 10), (3, 640, 2), (4, 640, 2), (5, 640, 2)],
        "middle_block": [(1, 1280, 10)]}


def _path(root: str, index: int | None, t: int) -> str:
    return f"{root}.{'' if index is None else f'{index}.'}1.transformer_blocks.{t}.attn2"


def test_sd15_layer_map_is_the_hosts_order():
    with torch.device("meta"):
        unet = skeleton(SD15, 768)
    paths = attn2_layers(unet)
    assert len(paths) == 16
    # the facts' table: N = 2n+1; 1,3 input 1,2; 5,7 input 4,5; 9,11 input 7,8; 13..17 output 3-5; 19..23 output 6-8;
    # 25..29 output 9-11; 31 middle
    expected = ([_path("input_blocks", i, 0) for i in (1, 2, 4, 5, 7, 8)]
                + [_path("output_blocks", i, 0) for i in range(3, 12)] + [_path("middle_block", None, 0)])
    assert paths == expected
    by_number = {2 * n + 1: p for n, p in enumerate(paths)}
    assert by_number[13] == "output_blocks.3.1.transformer_blocks.0.attn2"
    assert by_number[31] == "middle_block.1.transformer_blocks.0.attn2"
    widths = [unet.get_submodule(p).to_k.weight.shape[0] for p in paths]
    assert widths == [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]


def test_sdxl_layer_map_is_the_hosts_order():
    with torch.device("meta"):
        unet = skeleton(SDXL, 2048)
    paths = attn2_layers(unet)
    assert len(paths) == 70
    by_number = {2 * n + 1: p for n, p in enumerate(paths)}
    assert by_number[1] == _path("input_blocks", 4, 0) and by_number[3] == _path("input_blocks", 4, 1)
    assert by_number[5] == _path("input_blocks", 5, 0)
    assert by_number[9] == _path("input_blocks", 7, 0) and by_number[27] == _path("input_blocks", 7, 9)
    assert by_number[29] == _path("input_blocks", 8, 0)
    assert by_number[49] == _path("output_blocks", 0, 0) and by_number[69] == _path("output_blocks", 1, 0)
    assert by_number[89] == _path("output_blocks", 2, 0) and by_number[109] == _path("output_blocks", 3, 0)
    assert by_number[113] == _path("output_blocks", 4, 0) and by_number[117] == _path("output_blocks", 5, 0)
    assert by_number[121] == _path("middle_block", None, 0) and by_number[139] == _path("middle_block", None, 9)


# --- tiny files ----------------------------------------------------------------------------------------------------

TINY = {"input_blocks": [(1, 16, 1), (4, 32, 2)], "output_blocks": [(3, 32, 1), (9, 16, 1)],
        "middle_block": [(1, 32, 1)]}
CTX, WIDTH, HEADS = 12, 10, 8


def tiny_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    unet = skeleton({k: [(i, c, d) for i, c, d in v] for k, v in TINY.items()}, CTX)
    for module in unet.modules():
        if isinstance(module, SpatialTransformer):
            for block in module.transformer_blocks:
                block.attn2.heads = 4
    return unet.eval()


def plain_file(unet: nn.Module, tokens: int = 4, width: int = WIDTH, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"image_proj.proj.weight": torch.randn(tokens * CTX, width, generator=g) / width ** 0.5,
           "image_proj.proj.bias": torch.randn(tokens * CTX, generator=g) * 0.1,
           "image_proj.norm.weight": 1 + 0.1 * torch.randn(CTX, generator=g),
           "image_proj.norm.bias": 0.1 * torch.randn(CTX, generator=g)}
    for n, path in enumerate(attn2_layers(unet)):
        shape = unet.get_submodule(path).to_k.weight.shape
        out[f"ip_adapter.{2 * n + 1}.to_k_ip.weight"] = torch.randn(*shape, generator=g) / CTX ** 0.5
        out[f"ip_adapter.{2 * n + 1}.to_v_ip.weight"] = torch.randn(*shape, generator=g) / CTX ** 0.5
    return out


def plus_file(unet: nn.Module, hidden: int = 24, dim: int = 64, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=g) / s[-1] ** 0.5

    proj = {"latents": rn(1, 16, dim), "proj_in.weight": rn(dim, hidden), "proj_in.bias": rn(dim),
            "proj_out.weight": rn(CTX, dim), "proj_out.bias": rn(CTX), "norm_out.weight": torch.ones(CTX),
            "norm_out.bias": torch.zeros(CTX)}
    for i in range(2):
        a, f = f"layers.{i}.0.", f"layers.{i}.1."
        proj |= {a + "norm1.weight": torch.ones(dim), a + "norm1.bias": torch.zeros(dim),
                 a + "norm2.weight": torch.ones(dim), a + "norm2.bias": torch.zeros(dim),
                 a + "to_q.weight": rn(dim, dim), a + "to_kv.weight": rn(2 * dim, dim),
                 a + "to_out.weight": rn(dim, dim),
                 f + "0.weight": torch.ones(dim), f + "0.bias": torch.zeros(dim), f + "1.weight": rn(4 * dim, dim),
                 f + "3.weight": rn(dim, 4 * dim)}
    layers = {k: v for k, v in plain_file(unet, seed=seed).items() if k.startswith("ip_adapter.")}
    return {**{f"image_proj.{k}": v for k, v in proj.items()}, **layers}


def test_flat_and_nested_files_read_alike_and_variants_are_detected():
    unet = tiny_unet()
    flat = plain_file(unet)
    nested = {"image_proj": {k[11:]: v for k, v in flat.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[11:]: v for k, v in flat.items() if k.startswith("ip_adapter.")}}
    assert is_ip_adapter(flat) and is_ip_adapter(nested) and not is_ip_adapter({"x.weight": torch.zeros(1)})
    a, b = read_ip_adapter(flat, "f"), read_ip_adapter(nested, "n")
    assert (a.variant, a.tokens, a.context_dim, a.clip_width) == ("plain", 4, CTX, WIDTH)
    assert list(a.layers) == list(b.layers) == [1, 3, 5, 7, 9, 11]
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a.layers.values(), b.layers.values(), strict=True))
    plus = read_ip_adapter(plus_file(unet), "p")
    assert (plus.variant, plus.tokens, plus.clip_width, plus.clip_input) == ("plus", 16, 24, "hidden_states")
    full = dict(flat) | {"image_proj.proj.3.weight": torch.ones(CTX)}
    full = {k: v for k, v in full.items() if k not in ("image_proj.proj.weight", "image_proj.norm.weight")}
    assert read_ip_adapter(full, "full").variant == "full"


def test_faceid_and_mismatched_files_are_refused_naming_the_problem():
    unet = tiny_unet()
    flat = plain_file(unet)
    with pytest.raises(IPAdapterFileError, match=r"FaceID.*insightface"):
        read_ip_adapter(flat | {"ip_adapter.0.to_q_lora.down.weight": torch.zeros(4, 4)}, "x")
    with pytest.raises(IPAdapterFileError, match="FaceID"):
        read_ip_adapter(flat, "ip-adapter-faceid_sd15")
    other = tiny_unet()
    other.input_blocks[4][1].transformer_blocks[1].attn2 = Attention(32, 20, 4)  # another context width there
    with pytest.raises(IPAdapterFileError, match=r"does not fit src.*ip_adapter\.5\.to_k_ip\.weight is \(32, 12\).*"
                                                  r"input_blocks\.4\.1\.transformer_blocks\.1\.attn2\.to_k"):
        build_ip_adapter(other, read_ip_adapter(flat, "f"), source="src")
    fewer = {k: v for k, v in flat.items() if not k.startswith(("ip_adapter.11.",))}
    with pytest.raises(IPAdapterFileError, match=r"5 layers.*6 cross-attention layers"):
        build_ip_adapter(unet, read_ip_adapter(fewer, "f"), source="src")


# --- the injected attention ----------------------------------------------------------------------------------------


def test_injected_attention_is_the_formula_on_the_adapted_rows_only():
    unet = tiny_unet()
    adapter_a = build_ip_adapter(unet, read_ip_adapter(plain_file(unet, seed=1), "a"), source="s")
    adapter_b = build_ip_adapter(unet, read_ip_adapter(plain_file(unet, seed=5), "b"), source="s")
    g = torch.Generator().manual_seed(3)
    tok = {name: (torch.randn(1, 4, CTX, generator=g), torch.randn(1, 4, CTX, generator=g)) for name in "ab"}
    prompts = [ImagePrompt(adapter_a, 0.7, *tok["a"]), ImagePrompt(adapter_b, 1.3, *tok["b"])]
    path = attn2_layers(unet)[2]
    layer = unet.get_submodule(path)
    x = torch.randn(4, 9, 32, generator=g)
    ctx = torch.randn(4, 5, CTX, generator=g)
    own = layer(x, ctx)
    rows = torch.tensor([1, 2, 3])  # row 0 is a base row
    uncond = torch.tensor([False, True, False])  # rows 1, 3 cond; row 2 uncond
    with image_prompt_forwards(unet, prompts, rows, uncond):
        out = layer(x, ctx)
    assert "forward" not in layer.__dict__  # taken off again
    assert torch.equal(out[0], own[0])
    index = 2  # the layer's position in the map
    for row, is_uncond in zip(rows.tolist(), uncond.tolist(), strict=True):
        q = layer.to_q(x[row:row + 1])
        text = attend(q, layer.to_k(ctx[row:row + 1]), layer.to_v(ctx[row:row + 1]), layer.heads)
        total = text
        for p in prompts:
            t = p.uncond if is_uncond else p.cond
            total = total + p.weight * attend(q, p.adapter.to_k_ip[index](t), p.adapter.to_v_ip[index](t), layer.heads)
        torch.testing.assert_close(out[row], layer.to_out(total)[0], rtol=1e-5, atol=1e-6)


def test_weight_zero_and_outside_the_window_leave_the_forward_bitwise_alone():
    unet = tiny_unet()
    adapter = build_ip_adapter(unet, read_ip_adapter(plain_file(unet), "a"), source="s")
    layer = unet.get_submodule(attn2_layers(unet)[0])
    x, ctx = torch.randn(2, 6, 16), torch.randn(2, 5, CTX)
    own = layer(x, ctx)
    cond = torch.randn(1, 4, CTX)
    with image_prompt_forwards(unet, [ImagePrompt(adapter, 0.0, cond, cond)], torch.tensor([0, 1]),
                               torch.tensor([False, True])):
        assert "forward" not in layer.__dict__
        assert torch.equal(layer(x, ctx), own)
    unit = parse_unit({"model": "ip", "module": "ip-adapter_clip_h", "guidance_start": 0.5})
    stack = ControlStack([(unit, adapter, None)])
    stack.set_tokens(0, cond, cond)
    assert stack.image_prompts(Moment(0.25)) == [] and not stack.any_active(Moment(0.25))
    assert len(stack.image_prompts(Moment(0.5))) == 1 and stack.active(Moment(0.5), 64, 64) == []
    with image_prompt_forwards(unet, stack.image_prompts(Moment(0.25)), torch.tensor([0, 1]),
                               torch.tensor([False, True])):
        assert torch.equal(layer(x, ctx), own)


def test_windows_follow_each_hosts_clock():
    unit = ControlUnit("cn", guidance_start=0.25, guidance_end=0.75)
    # A1111 (sd-webui-controlnet): the webui's step fraction, which lags one step; inclusive at both ends
    fractions = [max(k - 1, 0) / 4 for k in range(4)]  # 4 Euler steps: 0, 0, .25, .5
    assert [unit.active_at(Moment(f)) for f in fractions] == [False, False, True, True]
    # Forge: sigma against percent_to_sigma(start), percent_to_sigma(end)
    edges = {0.25: 10.0, 0.75: 1.0}
    assert [unit.active_at(Moment(0, s, edges.__getitem__)) for s in (14.6, 10.0, 3.0, 1.0, 0.9)] == [
        False, True, True, True, False]
    assert not ControlUnit("cn", weight=0.0).active_at(Moment(0.5))


def test_uncond_tokens_per_variant():
    unet = tiny_unet()
    plain = build_ip_adapter(unet, read_ip_adapter(plain_file(unet), "a"), source="s")
    embeds = torch.randn(1, WIDTH)
    torch.testing.assert_close(uncond_tokens(plain, image_embeds=embeds), plain.tokens(torch.zeros(1, WIDTH)))
    assert not torch.equal(uncond_tokens(plain, image_embeds=embeds), plain.tokens(embeds))
    plus = build_ip_adapter(unet, read_ip_adapter(plus_file(unet), "p"), source="s")
    black, shipped = torch.randn(1, 7, 24), torch.randn(1, 7, 24)
    assert torch.equal(uncond_tokens(plus, black_hidden=black), plus.tokens(black))
    assert torch.equal(uncond_tokens(plus, black_hidden=black, fixed_hidden=shipped), plus.tokens(shipped))
    fixed = torch.randn(1, 16, CTX)
    assert uncond_tokens(plus, black_hidden=black, fixed_tokens=fixed) is fixed
    assert plus.tokens(black).shape == (1, 16, CTX)


def test_units_take_ip_adapter_encoders_and_the_hosts_names():
    assert parse_unit({"model": "m", "module": "CLIP-ViT-H (IPAdapter)"}).module == "ip-adapter_clip_h"
    assert parse_unit({"model": "m", "module": "ip-adapter_clip_sdxl"}).module == "ip-adapter_clip_g"
    assert parse_unit({"model": "m", "module": "ip-adapter_clip_sd15"}).is_image_prompt
    assert not parse_unit({"model": "m", "module": "canny"}).is_image_prompt


# --- the CLIP vision tower -----------------------------------------------------------------------------------------


def test_clip_vision_reads_its_shapes_and_refuses_other_layouts():
    config = ClipVisionConfig(hidden=32, layers=2, intermediate=64, patch=4, image_size=16, projection=24)
    torch.manual_seed(0)
    model = ClipVision(config)
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    state = model.state_dict()
    loaded = read_clip_vision(state | {"vision_model.embeddings.position_ids": torch.arange(17)[None]}, "t")
    assert loaded.config == config
    pixels = torch.randn(1, 3, 16, 16)
    embeds, hidden = loaded.encode(pixels)
    assert embeds.shape == (1, 24) and hidden.shape == (1, 17, 32)
    torch.testing.assert_close(embeds, model.encode(pixels)[0])
    with pytest.raises(ValueError, match=r"lacks vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight"):
        read_clip_vision({k: v for k, v in state.items() if k != "vision_model.encoder.layers.1.mlp.fc2.weight"}, "t")
    with pytest.raises(ValueError, match="open_clip"):
        read_clip_vision({"visual.conv1.weight": torch.zeros(1)}, "t")


def test_each_hosts_preprocessing():
    from lib_delta.clip_vision import CLIP_MEAN, CLIP_STD, pixels_a1111, pixels_forge

    square = np.full((32, 32, 3), 128, dtype=np.uint8)
    expected = (128 / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    for make in (pixels_a1111, pixels_forge):
        got = make(square, 32)
        assert got.shape == (1, 3, 32, 32)
        np.testing.assert_allclose(got[0, :, 0, 0].numpy(), expected, rtol=1e-6)
    wide = np.zeros((32, 64, 3), dtype=np.uint8)
    wide[:, 16:48] = 255  # a white centre square between black side bands
    assert pixels_forge(wide, 32)[0, 0].min() > 1.5  # centre-cropped: all white
    assert pixels_a1111(wide, 32)[0, 0].min() < 0  # squashed: the bands stay


def test_several_reference_images_average_their_tokens():
    """sd-webui-controlnet's rule for a unit with several images: the mean of the images' cond and uncond tokens."""
    from lib_delta.control_units import parse_unit
    from lib_delta.webui.image_prompts import TokenMaker

    config = ClipVisionConfig(hidden=32, layers=2, intermediate=32, patch=4, image_size=16, projection=WIDTH)
    torch.manual_seed(0)
    tower = ClipVision(config).eval()
    for p in tower.parameters():
        nn.init.normal_(p, std=0.2)
    unet = tiny_unet()
    rng = np.random.default_rng(0)
    first, second = (rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2))
    for adapter in (build_ip_adapter(unet, read_ip_adapter(plain_file(unet), "a"), source="s"),
                    build_ip_adapter(unet, read_ip_adapter(plus_file(unet, hidden=32), "p"), source="s")):
        maker = TokenMaker(forge=True)
        one, two = maker.tokens(adapter, tower, first), maker.tokens(adapter, tower, second)
        both = maker.tokens(adapter, tower, [first, second])
        for side in (0, 1):
            torch.testing.assert_close(both[side], (one[side] + two[side]) / 2)
        assert maker.runs == (2 if adapter.variant == "plain" else 3)  # each image once (+ the black image for plus)
    unit = parse_unit({"model": "m", "module": "ip-adapter_clip_h", "image": [{"image": "a"}, {"image": "b"}]})
    assert len(unit.image) == 2
    with pytest.raises(ValueError, match="list of"):
        parse_unit({"model": "m", "image": ["a", "b"]})
