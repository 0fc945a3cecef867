"""The LyCORIS module types beyond LoRA/LoHa/LoKr/full: norm, IA3, OFT (kohya, LyCORIS, BOFT), GLoRA, the weight bias.

Each expected weight is written out here from the webui v1.10.1 formulas (``extensions-builtin/Lora/network_*.py``,
``network.finalize_updown``, ``networks.network_apply_weights``), with loops and explicit index arithmetic rather
than the reshapes the implementation uses, and checked in merge mode (text encoders), in runtime mode (the shared
UNet, forward hooks) and, where the webui fails on a layer, as a counted skip.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib_delta.lora import LoraError, RuntimeLora, dense_delta, merge, parse_network
from lib_delta.lora_keys import compvis_to_kohya

from test_lora import build as build_tree

U = "model.diffusion_model."
DT = torch.float64
RES_NORM = U + "input_blocks.1.0.in_layers.0"  # GroupNorm
TF_NORM = U + "input_blocks.1.1.transformer_blocks.0.norm1"  # LayerNorm
TO_K = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_k"
FF_OUT = U + "input_blocks.1.1.transformer_blocks.0.ff.net.2"
RES_CONV = U + "input_blocks.1.0.in_layers.2"
PROJ_IN = U + "input_blocks.1.1.proj_in"
OC = "cond_stage_model.model.transformer.resblocks.0."


def build(spec):
    """``test_lora.build`` (the module tree at real paths, random weights), with 1-D parameters moved near 1 so that
    norm layers scale like trained ones."""
    root = build_tree(spec)
    with torch.no_grad():
        for p in root.parameters():
            if p.ndim == 1:
                p.add_(1.0)
    return root


def rand(*shape, seed=1, std=1.0):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed)) * std


def key(path, family="sd1"):
    return compvis_to_kohya(path, family)


def model_with(*paths):
    modules = {
        RES_NORM: nn.GroupNorm(2, 8),
        TF_NORM: nn.LayerNorm(8),
        TO_K: nn.Linear(8, 8, bias=False),
        FF_OUT: nn.Linear(8, 6),
        RES_CONV: nn.Conv2d(8, 8, 3, padding=1),
        PROJ_IN: nn.Conv2d(8, 8, 1),
    }
    return build({p: modules[p] for p in paths})


def weight_of(model, path):
    return model.get_submodule(path).weight.detach().clone()


def check_merged_and_runtime(model, path, sd, expected_w, expected_b=None, *, multiplier=0.8, x=None):
    """Merging gives exactly ``expected_w``/``expected_b``; the runtime hook gives the output of a module carrying
    them; both leave the model as it was."""
    net = parse_network(sd, "sd1", model=model, name="file")
    assert not net.not_applied, net.skipped_keys
    module = model.get_submodule(path)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    x = rand(3, module.weight.shape[-1] if isinstance(module, nn.Linear) else 8, seed=99) if x is None else x
    with torch.no_grad(), merge(model, [(net, multiplier)]):
        torch.testing.assert_close(module.weight, expected_w, rtol=1e-12, atol=1e-12)
        if expected_b is not None:
            torch.testing.assert_close(module.bias, expected_b, rtol=1e-12, atol=1e-12)
        merged_out = module(x)
    with torch.no_grad(), RuntimeLora(model, [(net, multiplier)]) as runtime:
        runtime.set_all()
        runtime_out = module(x)
        runtime.set_rows_from(1)
        split_out = module(x)
        runtime.set_off()
        base_out = module(x)
    torch.testing.assert_close(runtime_out, merged_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(split_out[1:], merged_out[1:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(split_out[:1], base_out[:1], rtol=0, atol=0)
    assert (merged_out - base_out).abs().max() > 1e-3
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


# --- norm -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "x_shape"), [(RES_NORM, (3, 8, 4, 4)), (TF_NORM, (3, 5, 8))])
def test_norm_module_on_group_and_layer_norm(path, x_shape):
    model = model_with(path)
    w_norm, b_norm = rand(8, seed=2), rand(8, seed=3)
    sd = {f"{key(path)}.w_norm": w_norm, f"{key(path)}.b_norm": b_norm, f"{key(path)}.alpha": torch.tensor(4.0)}
    module = model.get_submodule(path)
    # updown = w_norm · scale (no rank, so alpha is unused: scale 1) · multiplier; ex_bias = b_norm · multiplier
    expected_w = module.weight.detach() + 0.8 * w_norm
    expected_b = module.bias.detach() + 0.8 * b_norm
    check_merged_and_runtime(model, path, sd, expected_w, expected_b, x=rand(*x_shape, seed=5))


def test_norm_scale_key_applies_to_weight_not_bias():
    model = model_with(RES_NORM)
    w_norm, b_norm = rand(8, seed=2), rand(8, seed=3)
    sd = {f"{key(RES_NORM)}.w_norm": w_norm, f"{key(RES_NORM)}.b_norm": b_norm, f"{key(RES_NORM)}.scale":
          torch.tensor(0.25)}
    module = model.get_submodule(RES_NORM)
    check_merged_and_runtime(model, RES_NORM, sd, module.weight.detach() + 0.8 * 0.25 * w_norm,
                             module.bias.detach() + 0.8 * b_norm, x=rand(3, 8, 4, 4, seed=5))


def test_full_and_norm_mixed_in_one_file():
    model = model_with(FF_OUT, RES_NORM)
    diff, diff_b = rand(6, 8, seed=4), rand(6, seed=5)
    w_norm, b_norm = rand(8, seed=6), rand(8, seed=7)
    sd = {f"{key(FF_OUT)}.diff": diff, f"{key(FF_OUT)}.diff_b": diff_b,
          f"{key(RES_NORM)}.w_norm": w_norm, f"{key(RES_NORM)}.b_norm": b_norm}
    net = parse_network(sd, "sd1", model=model)
    assert net.kinds() == {"full diff": 1, "norm": 1} and net.matched_keys == 4
    ff, norm = model.get_submodule(FF_OUT), model.get_submodule(RES_NORM)
    with torch.no_grad():
        w_ff, b_ff, w_n, b_n = ff.weight.clone(), ff.bias.clone(), norm.weight.clone(), norm.bias.clone()
        with merge(model, [(net, 0.5)]):
            torch.testing.assert_close(ff.weight, w_ff + 0.5 * diff)
            torch.testing.assert_close(ff.bias, b_ff + 0.5 * diff_b)
            torch.testing.assert_close(norm.weight, w_n + 0.5 * w_norm)
            torch.testing.assert_close(norm.bias, b_n + 0.5 * b_norm)


# --- IA3 ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_linear(on_input):
    model = model_with(FF_OUT)
    n = 8 if on_input else 6
    w = rand(n, seed=8)
    sd = {f"{key(FF_OUT)}.weight": w, f"{key(FF_OUT)}.on_input": torch.tensor(on_input),
          f"{key(FF_OUT)}.alpha": torch.tensor(3.0)}
    weight = weight_of(model, FF_OUT)
    expected = weight.clone()
    for o in range(6):
        for i in range(8):
            expected[o, i] += 0.8 * weight[o, i] * (w[i] if on_input else w[o])
    check_merged_and_runtime(model, FF_OUT, sd, expected)


def test_ia3_and_glora_on_a_convolution_are_skipped_like_the_webui():
    # The webui's IA3/GLoRA calc_updown cannot broadcast/multiply a 4-D weight: it logs a RuntimeError at debug level
    # and leaves the layer alone. DS leaves it alone too, and says so.
    model = model_with(RES_CONV, FF_OUT, PROJ_IN)
    sd = {f"{key(RES_CONV)}.weight": rand(8, seed=1), f"{key(RES_CONV)}.on_input": torch.tensor(False),
          f"{key(FF_OUT)}.weight": rand(6, seed=2), f"{key(FF_OUT)}.on_input": torch.tensor(False)}
    sd |= glora_sd(PROJ_IN, 8, 8, 2)
    net = parse_network(sd, "sd1", model=model, name="ia3-conv")
    assert list(net.modules) == [FF_OUT]
    assert len(net.not_applied) == 7
    assert all("cannot apply" in reason for reason in net.skipped_keys.values())
    assert "ia3-conv: 2 of 9 keys applied (1 modules: IA3 1); not applied: 7 (" in net.summary()


# --- GLoRA ----------------------------------------------------------------------------------------------------------


def glora_sd(path, out_f, in_f, rank, *, seed=20, family="sd1"):
    k = key(path, family)
    return {f"{k}.a1.weight": rand(rank, in_f, seed=seed), f"{k}.a2.weight": rand(in_f, rank, seed=seed + 1),
            f"{k}.b1.weight": rand(rank, in_f, seed=seed + 2), f"{k}.b2.weight": rand(out_f, rank, seed=seed + 3),
            f"{k}.alpha": torch.tensor(float(rank))}


def test_glora_linear():
    model = model_with(FF_OUT)
    sd = glora_sd(FF_OUT, 6, 8, 2)
    k = key(FF_OUT)
    a1, a2, b1, b2 = (sd[f"{k}.{n}.weight"] for n in ("a1", "a2", "b1", "b2"))
    weight = weight_of(model, FF_OUT)
    # updown = b2 b1 + (W a2) a1; GLoRA has no rank in the webui, so alpha is not a scale
    expected = weight + 0.8 * (b2 @ b1 + weight @ a2 @ a1)
    check_merged_and_runtime(model, FF_OUT, sd, expected)


def test_glora_shape_misfit_names_the_factors():
    sd = glora_sd(FF_OUT, 6, 7, 2)
    with pytest.raises(LoraError, match=r"GLoRA factors a1 \(2, 7\).*shape \(6, 8\)"):
        parse_network(sd, "sd1", model=model_with(FF_OUT))


# --- OFT ------------------------------------------------------------------------------------------------------------


def cayley(q):
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.inverse(eye - q)


def oft_expected(weight, rotations, multiplier, rescale=None):
    """W' = W + m·(R_blockᵀ W - W) with block k acting on rows k·b .. k·b + b - 1 (the webui's einsum
    ``k n m, k n ... -> k m ...``), then an optional per-row rescale before the difference."""
    rows = weight.reshape(weight.shape[0], -1)
    merged = torch.zeros_like(rows)
    size = rotations.shape[-1]
    for k in range(rotations.shape[0]):
        for m in range(size):
            for n in range(size):
                merged[k * size + m] += rotations[k, n, m] * rows[k * size + n]
    if rescale is not None:
        merged = merged * rescale.reshape(-1, 1)
    return (rows + multiplier * (merged - rows)).reshape(weight.shape)


@pytest.mark.parametrize("path", [FF_OUT, RES_CONV])
def test_oft_kohya_blocks_without_constraint(path):
    model = model_with(path)
    out = 6 if path == FF_OUT else 8
    blocks = rand(2, out // 2, out // 2, seed=30, std=0.2)
    sd = {f"{key(path)}.oft_blocks": blocks, f"{key(path)}.scale": torch.tensor(9.0)}  # OFT ignores scale
    q = blocks - blocks.transpose(1, 2)
    expected = oft_expected(weight_of(model, path), torch.stack([cayley(b) for b in q]), 0.8)
    x = rand(3, 8, 4, 4, seed=5) if path == RES_CONV else None
    check_merged_and_runtime(model, path, sd, expected, x=x)


def test_oft_constraint_clamps_the_skew_norm():
    model = model_with(FF_OUT)
    blocks = rand(3, 2, 2, seed=31)
    alpha = float(torch.tensor(0.01))  # the value a float32 alpha in a file holds
    sd = {f"{key(FF_OUT)}.oft_blocks": blocks, f"{key(FF_OUT)}.alpha": torch.tensor(alpha)}
    q = blocks - blocks.transpose(1, 2)
    norm = q.flatten().norm()
    limit = alpha * 6
    assert norm > limit
    q = q * ((limit + 1e-8) / (norm + 1e-8))
    expected = oft_expected(weight_of(model, FF_OUT), torch.stack([cayley(b) for b in q]), 0.8)
    check_merged_and_runtime(model, FF_OUT, sd, expected)


def test_oft_lycoris_diag_is_the_rotation_itself_and_rescale():
    model = model_with(FF_OUT)
    r = rand(2, 3, 3, seed=32, std=0.5) + torch.eye(3, dtype=DT)
    rescale = rand(6, 1, seed=33, std=0.1) + 1
    sd = {f"{key(FF_OUT)}.oft_diag": r, f"{key(FF_OUT)}.rescale": rescale, f"{key(FF_OUT)}.alpha": torch.tensor(5.0)}
    expected = oft_expected(weight_of(model, FF_OUT), r, 0.8, rescale)
    check_merged_and_runtime(model, FF_OUT, sd, expected)


def butterfly_permutation(n, group, inner):
    """Row index map of einops ``(c g k) -> (c k g)``: new row (c, k, g) takes old row (c, g, k)."""
    perm = []
    for c in range(n // (group * inner)):
        for k in range(inner):
            for g in range(group):
                perm.append(c * group * inner + g * inner + k)
    return torch.tensor(perm)


def test_boft_butterfly_factors():
    model = model_with(TO_K)  # 8 outputs: 4 blocks of size 2, two butterfly factors
    blocks = rand(2, 4, 2, 2, seed=34, std=0.3)
    sd = {f"{key(TO_K)}.oft_blocks": blocks}
    q = blocks - blocks.transpose(-1, -2)
    rotations = torch.stack([torch.stack([cayley(b) for b in level]) for level in q])
    weight = weight_of(model, TO_K)
    current = weight.clone()
    for i in range(2):
        perm = butterfly_permutation(8, 2, 2**i)
        permuted = current[perm]
        rotated = torch.zeros_like(permuted)
        for d in range(4):
            # einsum "b i j, b j ... -> b i ...": R (not its transpose) on each block of the permuted rows
            rotated[2 * d : 2 * d + 2] = rotations[i, d] @ permuted[2 * d : 2 * d + 2]
        current = torch.empty_like(rotated)
        current[perm] = rotated
    expected = weight + 0.8 * (current - weight)
    check_merged_and_runtime(model, TO_K, sd, expected)


def test_oft_blocks_that_do_not_tile_the_outputs_are_a_misfit():
    with pytest.raises(LoraError, match=r"OFT blocks of shape \(4, 2, 2\)"):
        parse_network({f"{key(FF_OUT)}.oft_blocks": rand(4, 2, 2)}, "sd1", model=model_with(FF_OUT))


def test_kohya_oft_unet_prefix_names_compvis_paths():
    model = model_with(FF_OUT)
    name = "oft_unet_" + FF_OUT[len("model.diffusion_model."):].replace(".", "_")
    net = parse_network({f"{name}.oft_blocks": rand(2, 3, 3)}, "sdxl", model=model)
    assert list(net.modules) == [FF_OUT] and net.kinds() == {"OFT": 1}


# --- OpenCLIP attention in_proj slices --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ia3", "glora", "oft"])
def test_weight_dependent_types_on_in_proj_slices(kind):
    model = build({OC + "attn": nn.MultiheadAttention(8, 2)})
    attn = model.get_submodule(OC + "attn")
    w_in = attn.in_proj_weight.detach().clone()
    sd, expected = {}, w_in.clone()
    for i, s in enumerate("qkv"):
        k = key(f"{OC}attn.{s}_proj", "sd2")
        rows = slice(8 * i, 8 * i + 8)
        w = w_in[rows]
        if kind == "ia3":
            v = rand(8, seed=40 + i)
            sd |= {f"{k}.weight": v, f"{k}.on_input": torch.tensor(True)}
            expected[rows] = w + 0.5 * w * v[None, :]
        elif kind == "glora":
            part = glora_sd(f"{OC}attn.{s}_proj", 8, 8, 2, seed=40 + 10 * i, family="sd2")
            sd |= part
            a1, a2, b1, b2 = (part[f"{k}.{n}.weight"] for n in ("a1", "a2", "b1", "b2"))
            expected[rows] = w + 0.5 * (b2 @ b1 + w @ a2 @ a1)
        else:
            blocks = rand(2, 4, 4, seed=40 + i, std=0.2)
            sd[f"{k}.oft_blocks"] = blocks
            expected[rows] = oft_expected(w, torch.stack([cayley(b) for b in blocks - blocks.transpose(1, 2)]), 0.5)
    out_k = key(OC + "attn.out_proj", "sd2")
    sd |= {f"{out_k}.diff": rand(8, 8, seed=49)}
    net = parse_network(sd, "sd2", model=model)
    assert not net.not_applied
    with torch.no_grad(), merge(model, [(net, 0.5)]):
        torch.testing.assert_close(attn.in_proj_weight, expected)
    assert torch.equal(attn.in_proj_weight, w_in)


def test_incomplete_attention_sets_are_skipped_like_the_webui():
    # The webui applies q/k/v/out of an nn.MultiheadAttention only when all four are in the file.
    model = build({OC + "attn": nn.MultiheadAttention(8, 2), OC + "mlp.c_fc": nn.Linear(8, 16)})
    sd = {f"{key(f'{OC}attn.{s}_proj', 'sd2')}.diff": rand(8, 8, seed=i) for i, s in enumerate("qkv")}
    sd[f"{key(OC + 'mlp.c_fc', 'sd2')}.diff"] = rand(16, 8)
    net = parse_network(sd, "sd2", model=model)
    assert list(net.modules) == [OC + "mlp.c_fc"]
    assert len(net.skipped_keys) == 3
    assert all("all four" in reason for reason in net.skipped_keys.values())


# --- several networks on one module, the weight bias ----------------------------------------------------------------


def test_networks_apply_in_order_when_a_delta_depends_on_the_weight():
    # networks.network_apply_weights: each network's calc_updown gets the weight with the earlier ones added.
    model = model_with(FF_OUT)
    k = key(FF_OUT)
    lora = parse_network({f"{k}.lora_up.weight": rand(6, 2, seed=60), f"{k}.lora_down.weight": rand(2, 8, seed=61)},
                         "sd1", model=model, name="lora")
    v = rand(6, seed=62)
    ia3 = parse_network({f"{k}.weight": v, f"{k}.on_input": torch.tensor(False)}, "sd1", model=model, name="ia3")
    up, down = rand(6, 2, seed=60), rand(2, 8, seed=61)
    weight = weight_of(model, FF_OUT)
    after_lora = weight + 0.7 * up @ down
    lora_then_ia3 = after_lora + 0.9 * after_lora * v[:, None]
    ia3_then_lora = weight + 0.9 * weight * v[:, None] + 0.7 * up @ down
    assert (lora_then_ia3 - ia3_then_lora).abs().max() > 1e-3
    module = model.get_submodule(FF_OUT)
    x = rand(4, 8, seed=63)
    for networks, expected in (([(lora, 0.7), (ia3, 0.9)], lora_then_ia3), ([(ia3, 0.9), (lora, 0.7)], ia3_then_lora)):
        with torch.no_grad(), merge(model, networks):
            torch.testing.assert_close(module.weight, expected)
            merged_out = module(x)
        with torch.no_grad(), RuntimeLora(model, networks) as runtime:
            runtime.set_all()
            torch.testing.assert_close(module(x), merged_out)
            torch.testing.assert_close(F.linear(x, expected, module.bias), merged_out)


def test_weight_bias_part_is_added_to_the_unscaled_updown():
    # network.finalize_updown: updown = (updown.reshape(bias.shape) + bias).reshape(output_shape), then · scale.
    model = model_with(FF_OUT)
    k = key(FF_OUT)
    up, down, bias = rand(6, 2, seed=70), rand(2, 8, seed=71), rand(6, 8, seed=72)
    sd = {f"{k}.lora_up.weight": up, f"{k}.lora_down.weight": down, f"{k}.alpha": torch.tensor(1.0),
          f"{k}.bias": bias}
    expected = weight_of(model, FF_OUT) + 0.8 * 0.5 * (up @ down + bias)
    check_merged_and_runtime(model, FF_OUT, sd, expected)


# --- fp8 storage ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp16_copy", [False, True])
def test_weight_dependent_delta_on_fp8_weights(fp16_copy):
    """The webui's fp8 storage: torch cannot promote float8 types, so a weight-dependent delta (IA3) is built from the
    weight upcast to float32; with the webui's "cache fp16 weight for LoRA" copy it is built from that copy, as the
    webui's own LoRA code builds it. Under CPU autocast (the webui's fp8 path) the runtime hook then runs."""
    model = model_with(FF_OUT)
    module = model.get_submodule(FF_OUT)
    module.float()
    if fp16_copy:
        module.fp16_weight = module.weight.detach().clone().half()
    module.to(torch.float8_e4m3fn)
    w = rand(6, seed=8).float()
    sd = {f"{key(FF_OUT)}.weight": w, f"{key(FF_OUT)}.on_input": torch.tensor(False),
          f"{key(FF_OUT)}.alpha": torch.tensor(3.0)}
    net = parse_network(sd, "sd1", model=model, name="file")
    (delta,) = net.modules[FF_OUT]
    source = module.fp16_weight.float() if fp16_copy else module.weight.float()
    dw, _ = dense_delta(module, [(delta, 0.8)], torch.device("cpu"), torch.float32)
    torch.testing.assert_close(dw, 0.8 * source * w[:, None], rtol=1e-6, atol=1e-6)
    x = rand(3, 8, seed=99).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), RuntimeLora(model, [(net, 0.8)]) as runtime:
        runtime.set_all()
        got = module(x)
        runtime.set_off()
        base = module(x)
    want = F.linear(x, dw)
    torch.testing.assert_close((got.float() - base.float()), want, rtol=0.05, atol=0.05)


def test_runtime_lora_drops_its_device_copies_and_keeps_its_hooks():
    """After a model moves (a --medvram visit ends), the factor copies made for the device it left are dropped; the
    next forward makes them again and gives the same output."""
    model = model_with(TO_K)
    sd = {f"{key(TO_K)}.lora_down.weight": rand(2, 8, seed=3), f"{key(TO_K)}.lora_up.weight": rand(8, 2, seed=4)}
    net = parse_network(sd, "sd1", model=model, name="file")
    module = model.get_submodule(TO_K)
    x = rand(3, 8, seed=5)
    with torch.no_grad(), RuntimeLora(model, [(net, 0.8)]) as runtime:
        runtime.set_all()
        first = module(x)
        (delta,) = net.modules[TO_K]
        assert delta._cache
        runtime.clear_device_copies()
        assert not delta._cache
        torch.testing.assert_close(module(x), first, rtol=0, atol=0)
