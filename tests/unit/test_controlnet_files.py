"""ControlNet file reading (groundwork for ControlNet on the adapted leg): every layout to the same ldm tensors, family
and type detection, refusals that name what a file is, and the shape check against the source UNet."""

import pytest
import torch

from lib_delta.controlnet_files import ControlNetFileError, check_against_unet, diffusers_to_ldm, read_controlnet

# A two-level encoder in ldm names, with each name's diffusers twin written out by hand (not derived by the code).
PAIRS = [
    ("time_embed.0.weight", "time_embedding.linear_1.weight", (16, 8)),
    ("time_embed.2.weight", "time_embedding.linear_2.weight", (16, 16)),
    ("input_blocks.0.0.weight", "conv_in.weight", (8, 4, 3, 3)),
    ("input_blocks.1.0.in_layers.0.weight", "down_blocks.0.resnets.0.norm1.weight", (8,)),
    ("input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight", (8, 8, 3, 3)),
    ("input_blocks.1.0.emb_layers.1.weight", "down_blocks.0.resnets.0.time_emb_proj.weight", (8, 16)),
    ("input_blocks.1.0.out_layers.0.weight", "down_blocks.0.resnets.0.norm2.weight", (8,)),
    ("input_blocks.1.0.out_layers.3.weight", "down_blocks.0.resnets.0.conv2.weight", (8, 8, 3, 3)),
    ("input_blocks.1.1.proj_in.weight", "down_blocks.0.attentions.0.proj_in.weight", (8, 8, 1, 1)),
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", (8, 768)),
    ("input_blocks.2.0.in_layers.2.weight", "down_blocks.0.resnets.1.conv1.weight", (8, 8, 3, 3)),
    ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight", (8, 8, 3, 3)),
    ("input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight", (16, 8, 1, 1)),
    ("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", (16, 768)),
    ("input_blocks.5.0.in_layers.2.weight", "down_blocks.1.resnets.1.conv1.weight", (16, 16, 3, 3)),
    ("middle_block.0.in_layers.2.weight", "mid_block.resnets.0.conv1.weight", (16, 16, 3, 3)),
    ("middle_block.1.proj_out.weight", "mid_block.attentions.0.proj_out.weight", (16, 16, 1, 1)),
    ("middle_block.2.out_layers.3.weight", "mid_block.resnets.1.conv2.weight", (16, 16, 3, 3)),
    ("input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight", (16, 3, 3, 3)),
    ("input_hint_block.2.weight", "controlnet_cond_embedding.blocks.0.weight", (16, 16, 3, 3)),
    ("input_hint_block.12.bias", "controlnet_cond_embedding.blocks.5.bias", (96,)),
    ("input_hint_block.14.weight", "controlnet_cond_embedding.conv_out.weight", (8, 256, 3, 3)),
    *[(f"zero_convs.{i}.0.weight", f"controlnet_down_blocks.{i}.weight", (c, c, 1, 1))
      for i, c in enumerate((8, 8, 8, 8, 16, 16))],
    ("middle_block_out.0.weight", "controlnet_mid_block.weight", (16, 16, 1, 1)),
]
SDXL_PAIR = ("label_emb.0.0.weight", "add_embedding.linear_1.weight", (16, 2816))


def ldm_tensors(pairs=PAIRS):
    g = torch.Generator().manual_seed(0)
    return {ldm: torch.randn(shape, generator=g) for ldm, _, shape in pairs}


def test_diffusers_names_map_to_ldm():
    for ldm, diffusers, _ in [*PAIRS, SDXL_PAIR]:
        assert diffusers_to_ldm(diffusers) == ldm, diffusers


def test_every_layout_reads_to_the_same_tensors():
    bare = ldm_tensors()
    prefixed = {f"control_model.{k}": v for k, v in bare.items()}
    prefixed["model.diffusion_model.out.2.weight"] = torch.zeros(4, 8, 3, 3)  # a training checkpoint's extra
    prefixed["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3, 8, 3, 3)
    diffusers = {d: bare[ldm] for ldm, d, _ in PAIRS}
    half = {k: v.half() for k, v in bare.items()}
    files = {layout: read_controlnet(sd, name=layout) for layout, sd in
             (("bare", bare), ("prefixed", prefixed), ("diffusers", diffusers), ("fp16", half))}
    assert [f.layout for f in files.values()] == ["ldm-bare", "ldm-prefixed", "diffusers", "ldm-bare"]
    assert files["prefixed"].dropped == ["model.diffusion_model.out.2.weight",
                                         "first_stage_model.decoder.conv_out.weight"]
    for f in files.values():
        assert f.tensors.keys() == bare.keys()
        assert (f.family, f.context_dim, f.hint_channels, f.residuals, f.kind) == ("sd1", 768, 3, 7, "controlnet")
        for key, value in bare.items():
            torch.testing.assert_close(f.tensors[key].float(), value, rtol=1e-3, atol=1e-3)
    assert files["fp16"].dtype == torch.float16 and files["bare"].dtype == torch.float32
    assert all(torch.equal(files["diffusers"].tensors[k], v) for k, v in bare.items())


def test_family_from_the_context_width():
    tensors = ldm_tensors()
    tensors["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(8, 2048)
    tensors["label_emb.0.0.weight"] = torch.zeros(16, 2816)
    cn = read_controlnet(tensors)
    assert (cn.family, cn.context_dim) == ("sdxl", 2048)


@pytest.mark.parametrize(
    ("extra", "what"),
    [
        ({"control_add_embedding.linear_1.bias": (4,)}, "ControlNet\\+\\+ union"),
        ({"lllite_unet_input_blocks_1_1_proj_in.conditioning1.0.weight": (4,)}, "ControlLLLite"),
        ({"image_proj.proj.weight": (4,)}, "IP-Adapter"),
        ({"difference": (1,)}, "difference"),
    ],
)
def test_other_kinds_are_refused_by_name(extra, what):
    sd = ldm_tensors() | {k: torch.zeros(s) for k, s in extra.items()}
    with pytest.raises(ControlNetFileError, match=f"my-file is (a|an) .*{what}.*not support it yet"):
        read_controlnet(sd, name="my-file")


def test_t2i_adapter_and_non_controlnets_are_refused():
    t2i = {"conv_in.weight": torch.zeros(8, 192, 3, 3), "body.0.block1.weight": torch.zeros(8, 8, 3, 3)}
    with pytest.raises(ControlNetFileError, match="t2i is a T2I-Adapter"):
        read_controlnet(t2i, name="t2i")
    with pytest.raises(ControlNetFileError, match=r"is not a ControlNet .*first keys: lora_unet_x"):
        read_controlnet({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, name="lora")
    with pytest.raises(ControlNetFileError, match="holds no tensors"):
        read_controlnet({}, name="empty")
    no_hint = {k: v for k, v in ldm_tensors().items() if not k.startswith("input_hint_block.0.")}
    with pytest.raises(ControlNetFileError, match=r"no input_hint_block\.0\.weight"):
        read_controlnet(no_hint)


def test_control_lora_is_recognised():
    sd = {"lora_controlnet": torch.tensor([]), "input_blocks.1.1.proj_in.up": torch.zeros(8, 2)}
    cn = read_controlnet(sd, name="sai_xl_canny_128lora")
    assert cn.kind == "control_lora" and cn.residuals == 0


def test_check_against_the_source_unet():
    cn = read_controlnet(ldm_tensors(), name="canny.safetensors")
    unet = {k: tuple(v.shape) for k, v in ldm_tensors().items() if not k.startswith(("zero_convs", "input_hint",
                                                                                      "middle_block_out"))}
    unet |= {"input_blocks.0.0.bias": (8,), "out.2.weight": (4, 8, 3, 3), "output_blocks.0.0.in_layers.0.weight": (32,)}
    check_against_unet(cn, unet, source="tiny-sd1-a", source_family="sd1")
    xl = dict(unet, **{"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 2048)})
    expected = (r"canny.safetensors \(made for sd1\) does not fit the sdxl source xl-base: "
                r"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight is \(8, 768\) in the file and \(8, 2048\) "
                r"in the source UNet")
    with pytest.raises(ControlNetFileError, match=expected):
        check_against_unet(cn, xl, source="xl-base", source_family="sdxl")
    deeper = dict(unet, **{"input_blocks.6.0.op.weight": (16, 16, 3, 3)})
    with pytest.raises(ControlNetFileError, match="has 6 zero convs but the sd1 source tiny has 7 input blocks"):
        check_against_unet(cn, deeper, source="tiny", source_family="sd1")
    missing = {k: s for k, s in unet.items() if k != "middle_block.1.proj_out.weight"}
    with pytest.raises(ControlNetFileError, match=r"middle_block\.1\.proj_out\.weight has no counterpart"):
        check_against_unet(cn, missing, source="tiny", source_family="sd1")


def test_control_lora_is_made_whole_from_the_source_weights():
    from lib_delta.controlnet import expand_control_lora

    unet = {k: v for k, v in ldm_tensors().items() if not k.startswith(("input_hint_block.", "zero_convs.",
                                                                        "middle_block_out."))}
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(8, 2, 1, 1, generator=g), torch.randn(2, 8, 3, 3, generator=g)
    lin_up, lin_down = torch.randn(16, 2, generator=g), torch.randn(2, 8, generator=g)
    norm = torch.randn(8, generator=g)
    control = {k: v for k, v in ldm_tensors().items() if k.startswith(("input_hint_block.", "zero_convs.",
                                                                       "middle_block_out."))}
    control.update({"lora_controlnet": torch.tensor([]),
                    "input_blocks.1.0.in_layers.2.up": up, "input_blocks.1.0.in_layers.2.down": down,
                    "time_embed.0.up": lin_up, "time_embed.0.down": lin_down,
                    "input_blocks.1.0.in_layers.0.weight": norm})  # a tensor of its own replaces the source's
    whole = expand_control_lora(read_controlnet(control, name="ctrl-lora"), unet)
    assert whole.kind == "controlnet" and whole.layout == "control-lora"
    conv = unet["input_blocks.1.0.in_layers.2.weight"] + (up.flatten(1) @ down.flatten(1)).reshape(8, 8, 3, 3)
    assert torch.equal(whole.tensors["input_blocks.1.0.in_layers.2.weight"], conv)
    assert torch.equal(whole.tensors["time_embed.0.weight"], unet["time_embed.0.weight"] + lin_up @ lin_down)
    assert torch.equal(whole.tensors["input_blocks.1.0.in_layers.0.weight"], norm)
    assert torch.equal(whole.tensors["middle_block.1.proj_out.weight"], unet["middle_block.1.proj_out.weight"])
    assert not any(k.endswith((".up", ".down")) or k == "lora_controlnet" for k in whole.tensors)
    # a pair whose weight the source lacks, or a half pair, is an error naming it
    with pytest.raises(ControlNetFileError, match=r"input_blocks\.9\.0\.in_layers\.2"):
        expand_control_lora(read_controlnet({**control, "input_blocks.9.0.in_layers.2.up": up,
                                             "input_blocks.9.0.in_layers.2.down": down}, name="x"), unet)
    with pytest.raises(ControlNetFileError, match="no down half"):
        expand_control_lora(read_controlnet({**control, "time_embed.2.up": lin_up}, name="x"), unet)
