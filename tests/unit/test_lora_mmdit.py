"""Diffusers-format SD3 LoRAs rewritten onto the MMDiT's fused layers: the rewritten delta is exactly the stacked
per-projection deltas (to float precision), through the same parse and runtime path kohya files take."""

import pytest
import torch
from torch import nn

from lib_delta.lora import RuntimeLora, parse_network
from lib_delta.lora_mmdit import diffusers_mmdit_module, is_diffusers_mmdit, rewrite_diffusers_mmdit

H = 8  # hidden size of the toy transformer


def lora(out_features, in_features, rank, seed, alpha=None):
    g = torch.Generator().manual_seed(seed)
    parts = {"lora_A.weight": torch.randn(rank, in_features, generator=g),
             "lora_B.weight": torch.randn(out_features, rank, generator=g)}
    if alpha is not None:
        parts["alpha"] = torch.tensor(float(alpha))
    return parts


def delta(parts):
    scale = float(parts["alpha"]) / parts["lora_A.weight"].shape[0] if "alpha" in parts else 1.0
    return scale * parts["lora_B.weight"] @ parts["lora_A.weight"]


def as_file(prefix, modules):
    return {f"{prefix}{name}.{part}": t for name, parts in modules.items() for part, t in parts.items()}


def fused_delta(rewritten, path):
    key = "lora_unet_" + path.replace(".", "_")
    down, up = rewritten[f"{key}.lora_down.weight"], rewritten[f"{key}.lora_up.weight"]
    return float(rewritten[f"{key}.alpha"]) / down.shape[0] * up @ down


@pytest.mark.parametrize("prefix", ["transformer.", "base_model.model."])
def test_q_k_v_loras_become_one_exact_lora_on_the_fused_qkv(prefix):
    parts = {p: lora(H, H, rank, seed, alpha) for p, rank, seed, alpha in
             (("q", 2, 1, None), ("k", 3, 2, 1.5), ("v", 2, 3, 4.0))}
    file = as_file(prefix, {f"transformer_blocks.0.attn.to_{p}": v for p, v in parts.items()})
    got = fused_delta(rewrite_diffusers_mmdit(file, last_block=1), "joint_blocks.0.x_block.attn.qkv")
    want = torch.cat([delta(parts[p]) for p in "qkv"])
    assert torch.allclose(got, want, atol=1e-5)


def test_a_missing_projection_gives_zero_rows_and_context_projections_go_to_the_context_block():
    parts = lora(H, H, 2, 5)
    file = as_file("transformer.", {"transformer_blocks.1.attn.add_k_proj": parts})
    got = fused_delta(rewrite_diffusers_mmdit(file, last_block=1), "joint_blocks.1.context_block.attn.qkv")
    assert torch.count_nonzero(got[:H]) == 0 and torch.count_nonzero(got[2 * H:]) == 0
    assert torch.allclose(got[H:2 * H], delta(parts), atol=1e-5)


def test_the_last_blocks_context_modulation_and_norm_out_swap_their_halves():
    parts = lora(2 * H, H, 2, 7)
    file = as_file("transformer.", {"transformer_blocks.1.norm1_context.linear": parts, "norm_out.linear": parts,
                                    "transformer_blocks.0.norm1_context.linear": parts})
    rewritten = rewrite_diffusers_mmdit(file, last_block=1)
    swapped = torch.cat(delta(parts).chunk(2)[::-1])
    assert torch.allclose(fused_delta(rewritten, "joint_blocks.1.context_block.adaLN_modulation.1"), swapped)
    assert torch.allclose(fused_delta(rewritten, "final_layer.adaLN_modulation.1"), swapped)
    assert torch.allclose(fused_delta(rewritten, "joint_blocks.0.context_block.adaLN_modulation.1"), delta(parts))


def test_names_of_the_map():
    assert diffusers_mmdit_module("lora_transformer_transformer_blocks_3_attn2_to_v", 5) == (
        "joint_blocks.3.x_block.attn2.qkv", 2, False)
    assert diffusers_mmdit_module("transformer.transformer_blocks.0.ff_context.net.0.proj", 5) == (
        "joint_blocks.0.context_block.mlp.fc1", None, False)
    assert diffusers_mmdit_module("lora_transformer_time_text_embed_text_embedder_linear_1", 5) == (
        "y_embedder.mlp.0", None, False)
    assert diffusers_mmdit_module("transformer.transformer_blocks.0.attn.norm_q", 5) is None
    assert diffusers_mmdit_module("lora_unet_joint_blocks_0_x_block_attn_qkv", 5) is None  # kohya: not rewritten
    assert is_diffusers_mmdit(["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"])
    assert not is_diffusers_mmdit(["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"])


def test_other_keys_pass_unchanged():
    file = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(1),
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, H)}  # no lora_B: incomplete
    rewritten = rewrite_diffusers_mmdit(file, last_block=0)
    assert set(rewritten) == set(file)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(H, 3 * H)
        self.attn.proj = nn.Linear(H, H)


def test_the_rewritten_file_runs_through_parse_and_runtime_lora_as_the_stacked_deltas():
    torch.manual_seed(0)
    model = nn.Module()
    model.model = nn.Module()
    model.model.diffusion_model = nn.Module()
    model.model.diffusion_model.joint_blocks = nn.ModuleList([nn.Module()])
    block = model.model.diffusion_model.joint_blocks[0]
    block.x_block = _Block()
    parts = {p: lora(H, H, 2, seed) for p, seed in (("q", 11), ("k", 12), ("v", 13))}
    out_parts = lora(H, H, 2, 14, alpha=1.0)
    file = as_file("transformer.", {**{f"transformer_blocks.0.attn.to_{p}": v for p, v in parts.items()},
                                    "transformer_blocks.0.attn.to_out.0": out_parts})
    net = parse_network(rewrite_diffusers_mmdit(file, last_block=0), "sd3", model=model)
    assert net.matched_keys == 2 * 3 and not net.unmatched_keys
    x = torch.randn(2, 5, H)
    qkv, proj = block.x_block.attn.qkv, block.x_block.attn.proj
    want_qkv = x @ (qkv.weight + 0.7 * torch.cat([delta(parts[p]) for p in "qkv"])).T + qkv.bias
    want_proj = x @ (proj.weight + 0.7 * delta(out_parts)).T + proj.bias
    with RuntimeLora(model.model, [(net, 0.7)], root="model") as runtime, runtime.scoped("all", None):
        assert torch.allclose(qkv(x), want_qkv, atol=1e-5) and torch.allclose(proj(x), want_proj, atol=1e-5)
