"""Kohya key names -> ldm/sgm module paths, checked against vectors worked out by hand from the webui's algorithm.

The expected compvis names below were derived from ``convert_diffusers_name_to_compvis`` in the A1111 WebUI v1.10.1
(``extensions-builtin/Lora/networks.py``): input block = 1 + 3*down_block + index, output block = 3*up_block + index,
sub-module 1 for attentions and 0 for resnets, middle block 1 for attentions and 2*index for resnets, downsampler of
down block n at input block 3 + 3n (``.0.op``), upsampler of up block n at output block 2 + 3n (``.1.conv`` for n = 0,
``.2.conv`` otherwise), resnet parts conv1/conv2/norm1/norm2/time_emb_proj/conv_shortcut renamed.
"""

import pytest

from lib_delta.lora_keys import (
    FAMILIES,
    LoraError,
    ModuleNameIndex,
    compvis_to_kohya,
    diffusers_to_compvis,
    kohya_to_module,
    layers_named_per_family,
    standard_module_paths,
)

U = "model.diffusion_model."
TE1 = "cond_stage_model.transformer.text_model.encoder.layers."
OC2 = "cond_stage_model.model.transformer.resblocks."
XL1 = "conditioner.embedders.0.transformer.text_model.encoder.layers."
XL2 = "conditioner.embedders.1.model.transformer.resblocks."


def _table(text):
    """Parse ``key`` / ``    PREFIX:path [slice]`` line pairs (``#`` lines are comments) into (key, (path, slice))."""
    prefixes = {"U": U, "TE1": TE1, "OC2": OC2, "XL1": XL1, "XL2": XL2}
    lines = [ln for ln in text.strip().splitlines() if not ln.strip().startswith("#")]
    out = []
    for key, target in zip(lines[::2], lines[1::2], strict=True):
        prefix, _, rest = target.strip().partition(":")
        path, _, slice_name = rest.partition(" ")
        out.append((key.strip(), (prefixes[prefix] + path, slice_name or None)))
    return out


SD1_VECTORS = _table(
    """
# attentions in down blocks
lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q
    U:input_blocks.1.1.transformer_blocks.0.attn1.to_q
lora_unet_down_blocks_0_attentions_1_proj_out
    U:input_blocks.2.1.proj_out
lora_unet_down_blocks_1_attentions_1_proj_in
    U:input_blocks.5.1.proj_in
lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_ff_net_0_proj
    U:input_blocks.7.1.transformer_blocks.0.ff.net.0.proj
lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_out_0
    U:input_blocks.8.1.transformer_blocks.0.attn2.to_out.0
# resnets with suffix renames
lora_unet_down_blocks_0_resnets_0_conv1
    U:input_blocks.1.0.in_layers.2
lora_unet_down_blocks_0_resnets_1_conv2
    U:input_blocks.2.0.out_layers.3
lora_unet_down_blocks_1_resnets_0_conv_shortcut
    U:input_blocks.4.0.skip_connection
lora_unet_down_blocks_2_resnets_0_time_emb_proj
    U:input_blocks.7.0.emb_layers.1
lora_unet_down_blocks_3_resnets_1_conv1
    U:input_blocks.11.0.in_layers.2
# down/upsamplers
lora_unet_down_blocks_0_downsamplers_0_conv
    U:input_blocks.3.0.op
lora_unet_down_blocks_1_downsamplers_0_conv
    U:input_blocks.6.0.op
lora_unet_down_blocks_2_downsamplers_0_conv
    U:input_blocks.9.0.op
lora_unet_up_blocks_0_upsamplers_0_conv
    U:output_blocks.2.1.conv
lora_unet_up_blocks_1_upsamplers_0_conv
    U:output_blocks.5.2.conv
lora_unet_up_blocks_2_upsamplers_0_conv
    U:output_blocks.8.2.conv
# mid block
lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k
    U:middle_block.1.transformer_blocks.0.attn2.to_k
lora_unet_mid_block_attentions_0_proj_in
    U:middle_block.1.proj_in
lora_unet_mid_block_resnets_0_time_emb_proj
    U:middle_block.0.emb_layers.1
lora_unet_mid_block_resnets_1_conv1
    U:middle_block.2.in_layers.2
# up blocks
lora_unet_up_blocks_0_resnets_2_conv1
    U:output_blocks.2.0.in_layers.2
lora_unet_up_blocks_0_resnets_0_conv_shortcut
    U:output_blocks.0.0.skip_connection
lora_unet_up_blocks_1_attentions_2_proj_out
    U:output_blocks.5.1.proj_out
lora_unet_up_blocks_2_resnets_1_conv2
    U:output_blocks.7.0.out_layers.3
lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0
    U:output_blocks.11.1.transformer_blocks.0.attn1.to_out.0
lora_unet_up_blocks_3_resnets_0_time_emb_proj
    U:output_blocks.9.0.emb_layers.1
# conv_in/out, time embedding
lora_unet_conv_in
    U:input_blocks.0.0
lora_unet_conv_out
    U:out.2
lora_unet_time_embedding_linear_1
    U:time_embed.0
lora_unet_time_embedding_linear_2
    U:time_embed.2
# compvis-named SD1 files (webui's lora_unet -> diffusion_model fallback)
lora_unet_input_blocks_1_1_proj_in
    U:input_blocks.1.1.proj_in
lora_unet_output_blocks_11_1_transformer_blocks_0_attn2_to_v
    U:output_blocks.11.1.transformer_blocks.0.attn2.to_v
# text encoder (CLIP-L), lora_te_ and the te1 fallback
lora_te_text_model_encoder_layers_0_self_attn_q_proj
    TE1:0.self_attn.q_proj
lora_te_text_model_encoder_layers_11_self_attn_out_proj
    TE1:11.self_attn.out_proj
lora_te_text_model_encoder_layers_5_mlp_fc1
    TE1:5.mlp.fc1
lora_te_text_model_encoder_layers_5_mlp_fc2
    TE1:5.mlp.fc2
lora_te1_text_model_encoder_layers_3_self_attn_v_proj
    TE1:3.self_attn.v_proj
"""
)

SD2_VECTORS = _table(
    """
lora_unet_down_blocks_1_attentions_0_proj_in
    U:input_blocks.4.1.proj_in
lora_unet_up_blocks_1_upsamplers_0_conv
    U:output_blocks.5.2.conv
lora_te_text_model_encoder_layers_0_self_attn_q_proj
    OC2:0.attn q
lora_te_text_model_encoder_layers_5_self_attn_k_proj
    OC2:5.attn k
lora_te_text_model_encoder_layers_23_self_attn_v_proj
    OC2:23.attn v
lora_te_text_model_encoder_layers_7_self_attn_out_proj
    OC2:7.attn.out_proj
lora_te_text_model_encoder_layers_7_mlp_fc1
    OC2:7.mlp.c_fc
lora_te_text_model_encoder_layers_23_mlp_fc2
    OC2:23.mlp.c_proj
"""
)

SDXL_VECTORS = _table(
    """
lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q
    U:input_blocks.4.1.transformer_blocks.0.attn1.to_q
lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2
    U:input_blocks.8.1.transformer_blocks.9.ff.net.2
lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0
    U:middle_block.1.transformer_blocks.9.attn2.to_out.0
lora_unet_middle_block_2_in_layers_2
    U:middle_block.2.in_layers.2
lora_unet_output_blocks_2_2_conv
    U:output_blocks.2.2.conv
lora_unet_output_blocks_5_1_proj_out
    U:output_blocks.5.1.proj_out
lora_unet_input_blocks_7_0_skip_connection
    U:input_blocks.7.0.skip_connection
lora_unet_label_emb_0_0
    U:label_emb.0.0
lora_unet_time_embed_2
    U:time_embed.2
# diffusers-named SDXL keys go through the same webui arithmetic
lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_v
    U:input_blocks.4.1.transformer_blocks.1.attn2.to_v
lora_unet_mid_block_resnets_1_time_emb_proj
    U:middle_block.2.emb_layers.1
# CLIP-L (te1) and OpenCLIP bigG (te2)
lora_te1_text_model_encoder_layers_0_self_attn_q_proj
    XL1:0.self_attn.q_proj
lora_te1_text_model_encoder_layers_11_mlp_fc2
    XL1:11.mlp.fc2
lora_te2_text_model_encoder_layers_0_self_attn_q_proj
    XL2:0.attn q
lora_te2_text_model_encoder_layers_31_self_attn_v_proj
    XL2:31.attn v
lora_te2_text_model_encoder_layers_12_self_attn_out_proj
    XL2:12.attn.out_proj
lora_te2_text_model_encoder_layers_12_mlp_fc1
    XL2:12.mlp.c_fc
lora_te2_text_model_encoder_layers_30_mlp_fc2
    XL2:30.mlp.c_proj
"""
)


@pytest.mark.parametrize(("key", "expected"), SD1_VECTORS)
def test_sd1_vectors(key, expected):
    assert kohya_to_module(key, "sd1") == expected
    # A full state-dict key maps like its module part.
    assert kohya_to_module(key + ".lora_up.weight", "sd1") == expected


@pytest.mark.parametrize(("key", "expected"), SD2_VECTORS)
def test_sd2_vectors(key, expected):
    assert kohya_to_module(key, "sd2") == expected


@pytest.mark.parametrize(("key", "expected"), SDXL_VECTORS)
def test_sdxl_vectors(key, expected):
    assert kohya_to_module(key, "sdxl") == expected


def test_raw_webui_conversion_strings():
    # The intermediate, underscored webui layer names (what network_layer_mapping is keyed by).
    assert diffusers_to_compvis("lora_unet_down_blocks_1_resnets_1_norm2", False) == (
        "diffusion_model_input_blocks_5_0_out_layers_0"
    )
    assert diffusers_to_compvis("lora_unet_up_blocks_2_resnets_2_norm1", False) == (
        "diffusion_model_output_blocks_8_0_in_layers_0"
    )
    assert diffusers_to_compvis("lora_te_text_model_encoder_layers_2_self_attn_q_proj", True) == (
        "model_transformer_resblocks_2_attn_q_proj"
    )
    assert diffusers_to_compvis("lora_te2_text_model_encoder_layers_2_mlp_fc1", False) == (
        "1_model_transformer_resblocks_2_mlp_c_fc"
    )
    assert diffusers_to_compvis("something_else", False) == "something_else"


@pytest.mark.parametrize(
    ("key", "family"),
    [
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "sd1"),  # SDXL TE2 key on SD1
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "sdxl"),  # the webui does not map these on SDXL
        ("lora_unet_down_blocks_3_attentions_0_proj_in", "sd1"),  # SD1's last level has no attention
        ("lora_unet_input_blocks_1_1_proj_in", "sdxl"),  # SDXL's first level has no attention
        ("lora_te_text_model_encoder_layers_12_mlp_fc1", "sd1"),  # CLIP-L has 12 layers
        ("bundle_emb", "sd1"),
    ],
)
def test_unmatched_keys(key, family):
    assert kohya_to_module(key, family) is None


def test_unknown_family_is_rejected():
    with pytest.raises(LoraError, match="unknown model family 'flux'"):
        kohya_to_module("lora_unet_conv_in", "flux")
    with pytest.raises(LoraError, match="unknown model family"):
        compvis_to_kohya(U + "input_blocks.0.0", "flux")


# --- an SD1 UNet layout written out by pattern, independently of the library's own layout --------------------------


def sd1_unet_paths():
    """Linear/Conv2d module paths of the SD1.5 UNet, from the structure of ldm's openaimodel (by hand)."""
    res = ["in_layers.2", "emb_layers.1", "out_layers.3"]
    block = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"]
    block += ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    attn = ["proj_in", "proj_out"] + [f"transformer_blocks.0.{p}" for p in block]
    paths = ["time_embed.0", "time_embed.2", "input_blocks.0.0", "out.2"]
    for n in (1, 2, 4, 5, 7, 8, 10, 11):  # res blocks of the 4 levels (3, 6, 9 are downsamplers)
        paths += [f"input_blocks.{n}.0.{p}" for p in res]
        if n in (4, 7):  # channel change 320->640, 640->1280
            paths.append(f"input_blocks.{n}.0.skip_connection")
        if n <= 8:  # levels 0..2 have attention
            paths += [f"input_blocks.{n}.1.{p}" for p in attn]
    paths += [f"input_blocks.{n}.0.op" for n in (3, 6, 9)]
    paths += [f"middle_block.{n}.{p}" for n in (0, 2) for p in res] + [f"middle_block.1.{p}" for p in attn]
    for n in range(12):  # every output res block concatenates a skip, so all have skip_connection
        paths += [f"output_blocks.{n}.0.{p}" for p in [*res, "skip_connection"]]
        if n >= 3:
            paths += [f"output_blocks.{n}.1.{p}" for p in attn]
    paths += ["output_blocks.2.1.conv", "output_blocks.5.2.conv", "output_blocks.8.2.conv"]
    return [U + p for p in paths]


def test_library_sd1_layout_matches_hand_written_one():
    library = {p for p in standard_module_paths("sd1") if p.startswith(U)}
    assert library == set(sd1_unet_paths())
    assert len(library) == 354 - 12 * 6  # 354 modules in all, 72 of them in the text encoder


def test_round_trip_hand_written_sd1_unet():
    paths = sd1_unet_paths()
    keys = [compvis_to_kohya(p, "sd1") for p in paths]
    assert all(k.startswith("lora_unet_") and "input_blocks" not in k for k in keys if "conv_in" not in k)
    assert len(set(keys)) == len(keys)
    index = ModuleNameIndex(paths, "sd1")
    for path, key in zip(paths, keys, strict=True):
        assert kohya_to_module(key, "sd1", index) == (path, None), key


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_standard_layouts(family):
    layout = standard_module_paths(family)
    seen = set()
    for path, kind in layout.items():
        pseudo = [(f"{path}.{s}_proj", s) for s in "qkv"] if kind == "mha" else [(path, None)]
        for module_path, slice_name in pseudo:
            key = compvis_to_kohya(module_path, family)
            seen.add(key)
            assert kohya_to_module(key, family) == (path, slice_name), key
    assert len(seen) == sum(3 if k == "mha" else 1 for k in layout.values())


def test_layout_sizes():
    xl = standard_module_paths("sdxl")
    # SDXL: 70 transformer blocks, 10 linears each; 32 OpenCLIP layers with one MHA and three linears.
    assert sum(p.endswith("attn1.to_q") for p in xl) == 70
    assert sum(k == "mha" for k in xl.values()) == 32
    assert sum(k == "mha" for k in standard_module_paths("sd2").values()) == 24
    assert standard_module_paths("sd2")[U + "input_blocks.1.1.proj_in"] == "linear"
    assert standard_module_paths("sd1")[U + "input_blocks.1.1.proj_in"] == "conv"


def test_kohya_names_of_text_encoders():
    assert compvis_to_kohya(TE1 + "4.self_attn.k_proj", "sd1") == "lora_te_text_model_encoder_layers_4_self_attn_k_proj"
    assert compvis_to_kohya(OC2 + "4.attn.q_proj", "sd2") == "lora_te_text_model_encoder_layers_4_self_attn_q_proj"
    assert compvis_to_kohya(OC2 + "4.mlp.c_proj", "sd2") == "lora_te_text_model_encoder_layers_4_mlp_fc2"
    assert compvis_to_kohya(XL1 + "1.mlp.fc1", "sdxl") == "lora_te1_text_model_encoder_layers_1_mlp_fc1"
    assert (
        compvis_to_kohya(XL2 + "1.attn.out_proj", "sdxl")
        == "lora_te2_text_model_encoder_layers_1_self_attn_" + "out_proj"
    )
    assert compvis_to_kohya(U + "input_blocks.4.1.proj_in", "sdxl") == "lora_unet_input_blocks_4_1_proj_in"


@pytest.mark.parametrize(
    ("path", "family"),
    [("first_stage_model.decoder.conv_in", "sd1"), (U + "label_emb.0.0", "sd1"), (OC2 + "0.ln_1", "sd2")],
)
def test_compvis_to_kohya_rejects_unnamed_paths(path, family):
    with pytest.raises(LoraError, match="no kohya key name"):
        compvis_to_kohya(path, family)


def test_attention_submodules_keep_their_names():
    # Inside an attention block every sub-module keeps its name, as a trainer would write it.
    assert compvis_to_kohya(U + "input_blocks.1.1.norm", "sd1") == "lora_unet_down_blocks_0_attentions_0_norm"


def test_real_module_names_including_webui_wrappers():
    # The webui's text-encoder wrappers put the original encoder under ".wrapped".
    names = [
        "cond_stage_model.wrapped.transformer.text_model.encoder.layers.0.self_attn.q_proj",
        U + "input_blocks.1.1.proj_in",
    ]
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_to_module(key, "sd1", names) == (names[0], None)
    xl = ["conditioner.embedders.1.wrapped.model.transformer.resblocks.0.attn"]
    assert kohya_to_module("lora_te2_text_model_encoder_layers_0_self_attn_k_proj", "sdxl", xl) == (xl[0], "k")
    # Names outside the model are not found even though the standard layout has them.
    assert kohya_to_module("lora_unet_conv_in", "sd1", names) is None


def test_index_family_mismatch():
    index = ModuleNameIndex([U + "input_blocks.0.0"], "sd1")
    assert len(index) == 1
    with pytest.raises(LoraError, match="built for family 'sd1'"):
        kohya_to_module("lora_unet_conv_in", "sdxl", index)


def test_layers_named_per_family_tells_another_family_from_nothing():
    sdxl = ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight",
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    counts = layers_named_per_family(sdxl)
    # the UNet key also names an SD1/SD2 layer by the webui's compvis fallback; the te2 key names SDXL only
    assert counts == {"sd1": 1, "sd2": 1, "sdxl": 2}
    sd1 = ["lora_unet_down_blocks_0_attentions_0_proj_in.alpha", "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"]
    counts = layers_named_per_family(sd1)
    assert counts["sd1"] == 2 and counts["sdxl"] < 2
    assert layers_named_per_family(["lora_unet_nothing_here.alpha", "junk"]) == {"sd1": 0, "sd2": 0, "sdxl": 0}


# --- MMDiT (SD3 / SD3.5): kohya's lora_unet_ + the path with underscores, resolved against the model's own names -----

MMDIT = [U + p for p in ("joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.qkv",
                         "joint_blocks.0.x_block.attn2.qkv", "joint_blocks.0.x_block.adaLN_modulation.1",
                         "joint_blocks.0.x_block.mlp.fc1", "x_embedder.proj", "t_embedder.mlp.0")]


@pytest.mark.parametrize(("key", "path"), [
    ("lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight", "joint_blocks.0.x_block.attn.qkv"),
    ("lora_unet_joint_blocks_0_context_block_attn_qkv", "joint_blocks.0.context_block.attn.qkv"),
    ("lora_unet_joint_blocks_0_x_block_attn2_qkv", "joint_blocks.0.x_block.attn2.qkv"),
    ("lora_unet_joint_blocks_0_x_block_adaLN_modulation_1", "joint_blocks.0.x_block.adaLN_modulation.1"),
    ("lora_unet_x_embedder_proj.alpha", "x_embedder.proj"),
    ("lora_unet_t_embedder_mlp_0", "t_embedder.mlp.0"),
])
def test_sd3_kohya_keys_name_the_mmdit_layers(key, path):
    assert kohya_to_module(key, "sd3", MMDIT) == (U + path, None)


@pytest.mark.parametrize("key", ["lora_unet_joint_blocks_1_x_block_attn_qkv",  # a block this model lacks (L on M)
                                 "lora_te1_text_model_encoder_layers_0_mlp_fc1",  # text encoders: not in the view
                                 "lora_unet_input_blocks_1_1_proj_in",  # a UNet layer
                                 "lora_unet_conv_in"])  # no UNet renaming rule applies to MMDiT names
def test_sd3_keys_of_other_layers_match_nothing(key):
    assert kohya_to_module(key, "sd3", MMDIT) is None


def test_sd3_has_no_standard_layout_and_stays_out_of_family_detection():
    with pytest.raises(LoraError, match="no standard layout"):
        kohya_to_module("lora_unet_joint_blocks_0_x_block_attn_qkv", "sd3")
    assert "sd3" not in FAMILIES  # prompt-tag detection compares the UNet families' layouts only
    assert layers_named_per_family(["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"]) == {
        "sd1": 0, "sd2": 0, "sdxl": 0}
