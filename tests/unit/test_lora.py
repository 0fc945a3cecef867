"""LoRA/LyCORIS maths, merging and runtime switching, on tiny modules at the real ldm/sgm module paths.

Every ΔW is checked against its formula written out here independently (einsum/explicit Kronecker), with the webui's
scale convention: alpha / rank (rank = LoRA down rows, LoHa w1_b rows, LoKr w2_b/w1_b rows; none for full factors).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib_delta.lora import LoraError, LoraNetwork, ModuleDelta, RuntimeLora, merge, parse_network
from lib_delta.lora_keys import compvis_to_kohya

U = "model.diffusion_model."
DT = torch.float64

# --- tiny models with real paths -----------------------------------------------------------------------------------


def build(spec):
    """An nn.Module tree whose dotted paths are exactly the keys of ``spec``."""
    root = nn.Module()
    for path, module in spec.items():
        parent = root
        *heads, last = path.split(".")
        for head in heads:
            if head not in parent._modules:
                parent.add_module(head, nn.Module())
            parent = parent._modules[head]
        parent.add_module(last, module)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in root.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return root.to(DT)


CONV_IN = U + "input_blocks.0.0"
RES_CONV = U + "input_blocks.1.0.in_layers.2"
DOWN_OP = U + "input_blocks.3.0.op"
PROJ_IN = U + "input_blocks.1.1.proj_in"
TO_Q = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
FF_OUT = U + "input_blocks.1.1.transformer_blocks.0.ff.net.2"
EMB = U + "input_blocks.1.0.emb_layers.1"
TE_Q = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj"


def sd1_model():
    return build(
        {
            CONV_IN: nn.Conv2d(4, 8, 3, padding=1),
            RES_CONV: nn.Conv2d(8, 8, 3, padding=1),
            EMB: nn.Linear(6, 8),
            DOWN_OP: nn.Conv2d(8, 8, 3, stride=2, padding=1),
            PROJ_IN: nn.Conv2d(8, 8, 1),
            TO_Q: nn.Linear(8, 8, bias=False),
            FF_OUT: nn.Linear(8, 5),
            TE_Q: nn.Linear(8, 8),
        }
    )


def run_unet(model, x, emb):
    """A forward through every UNet target (shapes only matter, not ldm's exact wiring)."""
    m = model.get_submodule
    h = m(CONV_IN)(x)
    h = m(RES_CONV)(h) + m(EMB)(emb)[:, :, None, None]
    h = m(PROJ_IN)(m(DOWN_OP)(h))
    tokens = h.flatten(2).transpose(1, 2)
    return m(FF_OUT)(torch.tanh(m(TO_Q)(tokens)))


def rand(*shape, seed=1):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def key(path, family="sd1"):
    return compvis_to_kohya(path, family)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, saved):
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(now[k], v), k
        assert now[k].dtype == v.dtype


def single_delta(sd, model, family="sd1"):
    net = parse_network(sd, family, model=model)
    assert not net.unmatched_keys and not net.skipped_keys, (net.unmatched_keys, net.skipped_keys)
    (deltas,) = net.modules.values()
    (delta,) = deltas
    return net, delta


# --- module types: ΔW against independent formulas -----------------------------------------------------------------


def lora_linear_sd(path, out_f, in_f, rank, *, alpha=None, seed=1, names=("lora_up", "lora_down"), family="sd1"):
    k = key(path, family)
    sd = {
        f"{k}.{names[0]}.weight": rand(out_f, rank, seed=seed),
        f"{k}.{names[1]}.weight": rand(rank, in_f, seed=seed + 1),
    }
    if alpha is not None:
        sd[f"{k}.alpha"] = torch.tensor(alpha)
    return sd


@pytest.mark.parametrize("multiplier", [1.0, 0.7, -1.5])
def test_lora_linear(multiplier):
    model = sd1_model()
    sd = lora_linear_sd(TO_Q, 8, 8, 4, alpha=2.0)
    net, delta = single_delta(sd, model)
    up, down = sd[f"{key(TO_Q)}.lora_up.weight"], sd[f"{key(TO_Q)}.lora_down.weight"]
    expected = up @ down * (2.0 / 4) * multiplier
    assert delta.kind == "lora" and delta.rank == 4 and delta.scale == 0.5
    assert net.matched_keys == 3 and net.total_keys == 3
    w = model.get_submodule(TO_Q).weight
    torch.testing.assert_close(delta.delta_weight(w, multiplier), expected, rtol=0, atol=1e-12)
    x = rand(3, 7, 8, seed=5)
    torch.testing.assert_close(delta.forward_delta(model.get_submodule(TO_Q), x, multiplier), x @ expected.T)


def test_lora_a_b_naming_and_no_alpha():
    model = sd1_model()
    sd = lora_linear_sd(FF_OUT, 5, 8, 3, names=("lora_B", "lora_A"))
    _, delta = single_delta(sd, model)
    expected = sd[f"{key(FF_OUT)}.lora_B.weight"] @ sd[f"{key(FF_OUT)}.lora_A.weight"]  # no alpha: scale 1
    assert delta.scale == 1.0
    torch.testing.assert_close(delta.delta_weight(model.get_submodule(FF_OUT).weight), expected)


def test_scale_key_overrides_alpha():
    model = sd1_model()
    sd = lora_linear_sd(TO_Q, 8, 8, 4, alpha=2.0)
    sd[f"{key(TO_Q)}.scale"] = torch.tensor(0.125)
    _, delta = single_delta(sd, model)
    assert delta.scale == 0.125


def conv_ref(module, x, weight, bias=None):
    return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation)


@pytest.mark.parametrize("path", [RES_CONV, DOWN_OP])
def test_locon_3x3(path):
    model = sd1_model()
    k = key(path)
    sd = {f"{k}.lora_down.weight": rand(3, 8, 3, 3), f"{k}.lora_up.weight": rand(8, 3, 1, 1, seed=2)}
    sd[f"{k}.alpha"] = torch.tensor(1.5)
    _, delta = single_delta(sd, model)
    expected = torch.einsum("or,rikl->oikl", sd[f"{k}.lora_up.weight"][:, :, 0, 0], sd[f"{k}.lora_down.weight"])
    expected = expected * 1.5 / 3
    module = model.get_submodule(path)
    torch.testing.assert_close(delta.delta_weight(module.weight), expected)
    x = rand(2, 8, 6, 6, seed=3)
    torch.testing.assert_close(delta.forward_delta(module, x, 0.5), conv_ref(module, x, 0.5 * expected))


def test_lora_1x1_conv_with_2d_factors():
    model = sd1_model()
    k = key(PROJ_IN)
    sd = {f"{k}.lora_down.weight": rand(2, 8), f"{k}.lora_up.weight": rand(8, 2, seed=2)}
    _, delta = single_delta(sd, model)
    module = model.get_submodule(PROJ_IN)
    expected = (sd[f"{k}.lora_up.weight"] @ sd[f"{k}.lora_down.weight"])[:, :, None, None]
    torch.testing.assert_close(delta.delta_weight(module.weight), expected)
    x = rand(2, 8, 4, 4, seed=3)
    torch.testing.assert_close(delta.forward_delta(module, x), conv_ref(module, x, expected))


def test_lora_mid_cp_conv():
    model = sd1_model()
    k = key(RES_CONV)
    down, mid, up = rand(4, 8, 1, 1), rand(4, 4, 3, 3, seed=2), rand(8, 4, 1, 1, seed=3)
    sd = {f"{k}.lora_down.weight": down, f"{k}.lora_mid.weight": mid, f"{k}.lora_up.weight": up}
    sd[f"{k}.alpha"] = torch.tensor(2.0)
    _, delta = single_delta(sd, model)
    expected = torch.einsum("on,nmkl,mi->oikl", up[:, :, 0, 0], mid, down[:, :, 0, 0]) * (2.0 / 4)
    module = model.get_submodule(RES_CONV)
    torch.testing.assert_close(delta.delta_weight(module.weight), expected)
    x = rand(2, 8, 5, 5, seed=4)
    torch.testing.assert_close(delta.forward_delta(module, x), conv_ref(module, x, expected))


def test_loha_linear_and_conv():
    model = sd1_model()
    k = key(TO_Q)
    parts = {"hada_w1_a": rand(8, 2), "hada_w1_b": rand(2, 8, seed=2), "hada_w2_a": rand(8, 2, seed=3)}
    parts["hada_w2_b"] = rand(2, 8, seed=4)
    sd = {f"{k}.{p}": t for p, t in parts.items()} | {f"{k}.alpha": torch.tensor(1.0)}
    _, delta = single_delta(sd, model)
    expected = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"]) * (1.0 / 2)
    torch.testing.assert_close(delta.delta_weight(model.get_submodule(TO_Q).weight, 2.0), 2.0 * expected)

    kc = key(RES_CONV)
    conv = {"hada_w1_a": rand(8, 3), "hada_w1_b": rand(3, 72, seed=2), "hada_w2_a": rand(8, 3, seed=3)}
    conv["hada_w2_b"] = rand(3, 72, seed=4)
    _, delta = single_delta({f"{kc}.{p}": t for p, t in conv.items()}, model)
    expected = ((conv["hada_w1_a"] @ conv["hada_w1_b"]) * (conv["hada_w2_a"] @ conv["hada_w2_b"])).reshape(8, 8, 3, 3)
    module = model.get_submodule(RES_CONV)
    torch.testing.assert_close(delta.delta_weight(module.weight), expected)
    x = rand(1, 8, 5, 5, seed=6)
    torch.testing.assert_close(delta.forward_delta(module, x), conv_ref(module, x, expected))


def test_loha_tucker():
    model = sd1_model()
    k = key(RES_CONV)
    r = 3
    parts = {
        "hada_w1_a": rand(r, 8),
        "hada_w1_b": rand(r, 8, seed=2),
        "hada_t1": rand(r, r, 3, 3, seed=3),
        "hada_w2_a": rand(r, 8, seed=4),
        "hada_w2_b": rand(r, 8, seed=5),
        "hada_t2": rand(r, r, 3, 3, seed=6),
    }
    sd = {f"{k}.{p}": t for p, t in parts.items()} | {f"{k}.alpha": torch.tensor(6.0)}
    _, delta = single_delta(sd, model)

    def tucker(t, a, b):  # ΔW[o, i, k, l] = Σ_pq t[p, q, k, l] a[p, o] b[q, i]
        out = torch.zeros(8, 8, 3, 3, dtype=DT)
        for p in range(r):
            for q in range(r):
                out += t[p, q][None, None] * torch.outer(a[p], b[q])[:, :, None, None]
        return out

    expected = tucker(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"])
    expected = expected * tucker(parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"]) * (6.0 / r)
    torch.testing.assert_close(delta.delta_weight(model.get_submodule(RES_CONV).weight), expected)


def kron(a, b):
    """Explicit Kronecker product of 2-D a and 2-D/4-D b: block (i, j) is a[i, j] * b."""
    rows, cols = a.shape[0] * b.shape[0], a.shape[1] * b.shape[1]
    out = torch.zeros(rows, cols, *b.shape[2:], dtype=DT)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i * b.shape[0] : (i + 1) * b.shape[0], j * b.shape[1] : (j + 1) * b.shape[1]] = a[i, j] * b
    return out


def test_lokr_full_factors_ignore_alpha():
    model = sd1_model()
    k = key(TO_Q)
    w1, w2 = rand(2, 4), rand(4, 2, seed=2)
    sd = {f"{k}.lokr_w1": w1, f"{k}.lokr_w2": w2, f"{k}.alpha": torch.tensor(3.0)}
    _, delta = single_delta(sd, model)
    assert delta.rank is None and delta.scale == 1.0  # as in the webui: no rank, alpha unused
    torch.testing.assert_close(delta.delta_weight(model.get_submodule(TO_Q).weight), kron(w1, w2))


def test_lokr_factorised():
    model = sd1_model()
    k = key(FF_OUT)  # 5 x 8
    w1a, w1b, w2 = rand(5, 2), rand(2, 2, seed=2), rand(1, 4, seed=3)
    sd = {f"{k}.lokr_w1_a": w1a, f"{k}.lokr_w1_b": w1b, f"{k}.lokr_w2": w2, f"{k}.alpha": torch.tensor(1.0)}
    _, delta = single_delta(sd, model)
    assert delta.rank == 2
    expected = kron(w1a @ w1b, w2) * 0.5
    torch.testing.assert_close(delta.delta_weight(model.get_submodule(FF_OUT).weight), expected)

    k = key(TO_Q)
    w1, w2a, w2b = rand(2, 2), rand(4, 3, seed=2), rand(3, 4, seed=3)
    sd = {f"{k}.lokr_w1": w1, f"{k}.lokr_w2_a": w2a, f"{k}.lokr_w2_b": w2b, f"{k}.alpha": torch.tensor(1.5)}
    _, delta = single_delta(sd, model)
    assert delta.rank == 3
    expected = kron(w1, w2a @ w2b) * 0.5
    module = model.get_submodule(TO_Q)
    torch.testing.assert_close(delta.delta_weight(module.weight), expected)
    x = rand(2, 3, 8, seed=9)
    torch.testing.assert_close(delta.forward_delta(module, x), x @ expected.T)


def test_lokr_conv_4d_factor():
    model = sd1_model()
    k = key(RES_CONV)
    w1, w2 = rand(2, 4), rand(4, 2, 3, 3, seed=2)
    _, delta = single_delta({f"{k}.lokr_w1": w1, f"{k}.lokr_w2": w2}, model)
    module = model.get_submodule(RES_CONV)
    expected = kron(w1, w2)
    torch.testing.assert_close(delta.delta_weight(module.weight), expected)
    x = rand(1, 8, 4, 4, seed=3)
    torch.testing.assert_close(delta.forward_delta(module, x, 0.3), conv_ref(module, x, 0.3 * expected))


def test_full_diff_with_bias():
    model = sd1_model()
    k = key(FF_OUT)
    diff, diff_b = rand(5, 8), rand(5, seed=2)
    _, delta = single_delta({f"{k}.diff": diff, f"{k}.diff_b": diff_b, f"{k}.alpha": torch.tensor(9.0)}, model)
    module = model.get_submodule(FF_OUT)
    torch.testing.assert_close(delta.delta_weight(module.weight, 0.5), 0.5 * diff)  # alpha has no rank to divide
    torch.testing.assert_close(delta.delta_bias(module.weight, 0.5), 0.5 * diff_b)
    x = rand(2, 3, 8, seed=4)
    torch.testing.assert_close(delta.forward_delta(module, x, 0.5), 0.5 * (x @ diff.T + diff_b))


def test_dora_matches_webui_formula():
    model = sd1_model()
    sd = lora_linear_sd(FF_OUT, 5, 8, 2, alpha=1.0)
    dora = rand(1, 8, seed=7).abs() + 0.5
    sd[f"{key(FF_OUT)}.dora_scale"] = dora
    _, delta = single_delta(sd, model)
    module = model.get_submodule(FF_OUT)
    w = module.weight.detach()
    d = sd[f"{key(FF_OUT)}.lora_up.weight"] @ sd[f"{key(FF_OUT)}.lora_down.weight"] * 0.5
    merged = w + d
    column_norm = merged.norm(dim=0, keepdim=True)  # per input column, shape (1, in)
    expected = 0.8 * (merged * dora / column_norm - w)
    torch.testing.assert_close(delta.delta_weight(w, 0.8), expected)
    x = rand(2, 8, seed=3)
    torch.testing.assert_close(delta.forward_delta(module, x, 0.8), x @ expected.T)


def test_inpaint_9_channel_conv_is_zero_padded():
    model = build({CONV_IN: nn.Conv2d(9, 8, 3, padding=1)})
    k = key(CONV_IN)
    sd = {f"{k}.lora_down.weight": rand(2, 4, 3, 3), f"{k}.lora_up.weight": rand(8, 2, 1, 1, seed=2)}
    _, delta = single_delta(sd, model)
    module = model.get_submodule(CONV_IN)
    dw = delta.delta_weight(module.weight)
    expected4 = torch.einsum("or,rikl->oikl", sd[f"{k}.lora_up.weight"][:, :, 0, 0], sd[f"{k}.lora_down.weight"])
    assert dw.shape == (8, 9, 3, 3)
    torch.testing.assert_close(dw[:, :4], expected4)
    assert not dw[:, 4:].any()
    x = rand(1, 9, 5, 5, seed=3)
    torch.testing.assert_close(delta.forward_delta(module, x), conv_ref(module, x, dw))


def test_circular_padding_is_respected():
    conv = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
    model = build({RES_CONV: conv})
    k = key(RES_CONV)
    sd = {f"{k}.lora_down.weight": rand(2, 8, 3, 3), f"{k}.lora_up.weight": rand(8, 2, 1, 1, seed=2)}
    _, delta = single_delta(sd, model)
    x = rand(1, 8, 5, 5, seed=3)
    dw = delta.delta_weight(conv.weight)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), dw)
    torch.testing.assert_close(delta.forward_delta(conv, x), expected)


# --- runtime hooks vs merged weights -------------------------------------------------------------------------------


def mixed_networks():
    """Three files covering LoRA, LoCon, LoRA+mid, LoHa, LoKr and full diff over the tiny UNet (+ a TE key)."""
    a = lora_linear_sd(TO_Q, 8, 8, 4, alpha=2.0) | lora_linear_sd(TE_Q, 8, 8, 2, seed=11)
    a |= {
        f"{key(RES_CONV)}.lora_down.weight": rand(3, 8, 3, 3, seed=3),
        f"{key(RES_CONV)}.lora_up.weight": rand(8, 3, 1, 1, seed=4),
    }
    a |= {
        f"{key(DOWN_OP)}.lora_down.weight": rand(2, 8, 1, 1, seed=5),
        f"{key(DOWN_OP)}.lora_mid.weight": rand(2, 2, 3, 3, seed=6),
    }
    a[f"{key(DOWN_OP)}.lora_up.weight"] = rand(8, 2, 1, 1, seed=7)
    b = {f"{key(FF_OUT)}.hada_w1_a": rand(5, 2), f"{key(FF_OUT)}.hada_w1_b": rand(2, 8, seed=2)}
    b |= {f"{key(FF_OUT)}.hada_w2_a": rand(5, 2, seed=3), f"{key(FF_OUT)}.hada_w2_b": rand(2, 8, seed=4)}
    b |= {f"{key(CONV_IN)}.lokr_w1": rand(2, 2, seed=5), f"{key(CONV_IN)}.lokr_w2": rand(4, 2, 3, 3, seed=6)}
    c = {f"{key(EMB)}.diff": rand(8, 6, seed=8), f"{key(EMB)}.diff_b": rand(8, seed=9)}
    c |= lora_linear_sd(TO_Q, 8, 8, 2, alpha=4.0, seed=20)  # a second file on the same module
    return a, b, c


@pytest.fixture
def setup():
    model = sd1_model()
    a, b, c = (parse_network(sd, "sd1", name=n, model=model) for sd, n in zip(mixed_networks(), "abc", strict=True))
    nets = [(a, 0.8), (b, 1.0), (c, -0.6)]
    x, emb = rand(6, 4, 8, 8, seed=30), rand(6, 6, seed=31)
    return model, nets, x, emb


def test_runtime_modes_match_merged_and_base(setup):
    model, nets, x, emb = setup
    saved = state(model)
    with torch.no_grad():
        base = run_unet(model, x, emb)
        with merge(model, nets):
            merged = run_unet(model, x, emb)
        assert_same_state(model, saved)
        assert (merged - base).abs().max() > 1e-2  # the networks do something

        rt = RuntimeLora(model.model, nets, root="model")  # the UNet only; the TE key is outside the root
        assert rt.num_modules == 6 and rt.mode == "off"
        assert torch.equal(run_unet(model, x, emb), base)  # off: bitwise base
        rt.set_all()
        torch.testing.assert_close(run_unet(model, x, emb), merged, rtol=1e-10, atol=1e-10)
        for split in (0, 2, 5, 6, 9):
            rt.set_rows_from(split)
            expected = torch.cat([base[:split], merged[split:]])
            torch.testing.assert_close(run_unet(model, x, emb), expected, rtol=1e-10, atol=1e-10)
            if split >= 6:
                assert torch.equal(run_unet(model, x, emb), base)
        with rt.scoped("off"):
            assert torch.equal(run_unet(model, x, emb), base)
        assert rt.mode == "rows_from" and rt.split == 9
        rt.remove()
        rt.remove()  # idempotent
    assert rt.num_modules == 0
    assert torch.equal(run_unet(model, x, emb), base)
    assert_same_state(model, saved)
    assert all(not m._forward_hooks for m in model.modules())


def test_rows_from_equals_two_separate_forwards(setup):
    model, nets, _, _ = setup
    x_base, x_adapt = rand(2, 4, 8, 8, seed=40), rand(3, 4, 8, 8, seed=41)
    e_base, e_adapt = rand(2, 6, seed=42), rand(3, 6, seed=43)
    with torch.no_grad():
        base = run_unet(model, x_base, e_base)
        with merge(model.model, nets, root="model"):
            adapted = run_unet(model, x_adapt, e_adapt)
        with RuntimeLora(model.model, nets, root="model") as rt:
            rt.set_rows_from(2)
            both = run_unet(model, torch.cat([x_base, x_adapt]), torch.cat([e_base, e_adapt]))
    torch.testing.assert_close(both, torch.cat([base, adapted]), rtol=1e-10, atol=1e-10)
    assert all(not m._forward_hooks for m in model.modules())


def test_rows_from_with_autograd(setup):
    model, nets, x, emb = setup
    with RuntimeLora(model.model, nets, root="model") as rt:
        rt.set_all()
        with torch.no_grad():
            merged = run_unet(model, x, emb)
        rt.set_off()
        with torch.no_grad():
            base = run_unet(model, x, emb)
        rt.set_rows_from(3)
        out = run_unet(model, x.requires_grad_(), emb)
        out.sum().backward()  # the out-of-place path keeps autograd intact
    torch.testing.assert_close(out.detach(), torch.cat([base[:3], merged[3:]]), rtol=1e-10, atol=1e-10)
    assert x.grad is not None


def test_runtime_in_half_precision_follows_activation_dtype():
    model = sd1_model()
    net = parse_network(lora_linear_sd(TO_Q, 8, 8, 4, alpha=2.0), "sd1", model=model)
    layer = model.get_submodule(TO_Q).to(torch.bfloat16)
    x = rand(2, 8).to(torch.bfloat16)
    with RuntimeLora(model, [(net, 1.0)]) as rt:
        rt.set_all()
        out = layer(x)
    assert out.dtype == torch.bfloat16
    with torch.no_grad(), merge(model, [(net, 1.0)]):
        merged = layer(x)
    torch.testing.assert_close(out, merged, rtol=2e-2, atol=2e-2)


# --- merge / restore ------------------------------------------------------------------------------------------------

OC = "cond_stage_model.model.transformer.resblocks.0."
XL = "conditioner.embedders.1.model.transformer.resblocks.0."


@pytest.mark.parametrize(("family", "prefix"), [("sd2", OC), ("sdxl", XL)])
def test_merge_mha_slices_restores_bitwise(family, prefix):
    model = build(
        {
            prefix + "attn": nn.MultiheadAttention(8, 2),
            prefix + "mlp.c_fc": nn.Linear(8, 16),
            prefix + "mlp.c_proj": nn.Linear(16, 8),
        }
    )
    sd = {}
    for i, s in enumerate("qkv"):
        sd |= lora_linear_sd(f"{prefix}attn.{s}_proj", 8, 8, 2, alpha=1.0, seed=10 * i + 1, family=family)
    k_q = compvis_to_kohya(f"{prefix}attn.q_proj", family)
    out_k = compvis_to_kohya(prefix + "attn.out_proj", family)
    sd |= {f"{out_k}.diff": rand(8, 8, seed=50), f"{out_k}.diff_b": rand(8, seed=51)}
    fc_k = compvis_to_kohya(prefix + "mlp.c_fc", family)
    sd |= {f"{fc_k}.lokr_w1": rand(4, 2, seed=52), f"{fc_k}.lokr_w2": rand(4, 4, seed=53)}
    sd[f"{k_q}.diff_b"] = rand(8, seed=54)  # ignored part of a LoRA module: reported, not applied
    net = parse_network(sd, family, model=model, name="te")
    assert not net.unmatched_keys
    assert list(net.skipped_keys) == [f"{k_q}.diff_b"]
    assert sorted(d.slice or "-" for d in net.modules[prefix + "attn"]) == ["k", "q", "v"]
    attn = model.get_submodule(prefix + "attn")
    saved = state(model)
    w_in = attn.in_proj_weight.detach().clone()
    with torch.no_grad(), merge(model, [(net, 0.5)]) as handle:
        for i, s in enumerate("qkv"):
            k = compvis_to_kohya(f"{prefix}attn.{s}_proj", family)
            up, down = sd[f"{k}.lora_up.weight"], sd[f"{k}.lora_down.weight"]
            expected = w_in[i * 8 : (i + 1) * 8] + 0.5 * (up @ down) / 2
            torch.testing.assert_close(attn.in_proj_weight[i * 8 : (i + 1) * 8], expected)
        torch.testing.assert_close(
            attn.out_proj.weight, saved[prefix + "attn.out_proj.weight"] + 0.5 * sd[f"{out_k}.diff"]
        )
        torch.testing.assert_close(
            attn.out_proj.bias, saved[prefix + "attn.out_proj.bias"] + 0.5 * sd[f"{out_k}.diff_b"]
        )
        fc = model.get_submodule(prefix + "mlp.c_fc")
        expected_fc = saved[prefix + "mlp.c_fc.weight"] + 0.5 * kron(sd[f"{fc_k}.lokr_w1"], sd[f"{fc_k}.lokr_w2"])
        torch.testing.assert_close(fc.weight, expected_fc)
        seq = rand(5, 1, 8)
        adapted, _ = attn(seq, seq, seq)
    assert_same_state(model, saved)
    handle.restore()  # idempotent
    assert_same_state(model, saved)
    base, _ = attn(seq, seq, seq)
    assert (adapted - base).abs().max() > 1e-3


def test_merge_fp16_and_created_bias_restore_exactly():
    model = build({EMB: nn.Linear(6, 8, bias=False), TO_Q: nn.Linear(8, 8)}).half()
    k = key(EMB)
    sd = {f"{k}.diff": rand(8, 6).half(), f"{k}.diff_b": rand(8, seed=2).half()}
    sd |= lora_linear_sd(TO_Q, 8, 8, 4, alpha=4.0)
    net = parse_network(sd, "sd1", model=model)
    emb, q = model.get_submodule(EMB), model.get_submodule(TO_Q)
    saved = state(model)
    with torch.no_grad(), merge(model, [(net, 1.0)], backup_device="cpu"):
        assert emb.bias is not None and emb.bias.dtype == torch.float16
        torch.testing.assert_close(emb.bias, sd[f"{k}.diff_b"])
        # ΔW built in fp32 and the sum rounded to fp16 once (not W + fp16(ΔW), which rounds twice)
        up, down = sd[f"{key(TO_Q)}.lora_up.weight"].float(), sd[f"{key(TO_Q)}.lora_down.weight"].float()
        assert torch.equal(q.weight, (saved[TO_Q + ".weight"].float() + up @ down).half())
    assert emb.bias is None
    assert_same_state(model, saved)


def test_merge_failure_leaves_model_untouched():
    model = sd1_model()
    good = parse_network(lora_linear_sd(TO_Q, 8, 8, 4), "sd1", model=model)
    bad = parse_network(lora_linear_sd(FF_OUT, 5, 8, 2), "sd1")  # parsed without the model: not shape-checked
    bad.modules[FF_OUT][0].raw_shape = (5, 9)
    saved = state(model)
    with pytest.raises(LoraError, match=r"shape \(5, 9\).*shape \(5, 8\)"):
        merge(model, [(good, 1.0), (bad, 1.0)])
    assert_same_state(model, saved)


# --- parsing, reporting, errors ------------------------------------------------------------------------------------


def test_sdxl_file_on_sd1_model_matches_nothing():
    model = sd1_model()
    sd = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": rand(8, 2),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": rand(2, 8),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0),
        "no_dot_at_all": torch.tensor(1.0),
    }
    net = parse_network(sd, "sd1", model=model, name="xl_style")
    assert net.matched_keys == 0 and not net.modules
    assert net.unmatched_keys == list(sd)
    assert net.summary() == (
        "xl_style: 0 of 4 keys applied (0 modules); not applied: 4 "
        "(lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight, "
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight, "
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha, ...)"
    )


def test_parse_against_standard_layout_without_model():
    sd = lora_linear_sd(U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k", 640, 768, 2)
    sd |= {"lora_te_text_model_encoder_layers_11_mlp_fc2.diff": rand(768, 3072)}
    net = parse_network(sd, "sd1", name="full-size")
    assert net.matched_keys == 3 and not net.unmatched_keys
    assert set(net.modules) == {
        U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2",
    }


def test_bundled_embeddings_and_unread_parts_are_skipped_and_counted():
    model = sd1_model()
    sd = lora_linear_sd(TO_Q, 8, 8, 4, alpha=2.0)
    sd["bundle_emb.myword.string_to_param.*"] = rand(1, 8)
    sd[f"{key(TO_Q)}.hada_t1"] = rand(2, 2, 1, 1)  # a part the webui's LoRA module does not read
    net = parse_network(sd, "sd1", model=model, name="emb")
    assert net.matched_keys == 3 and not net.unmatched_keys
    assert "embedding" in net.skipped_keys["bundle_emb.myword.string_to_param.*"]
    assert "not read by a LoRA module" in net.skipped_keys[f"{key(TO_Q)}.hada_t1"]
    assert net.skipped_text() == f"2 (bundle_emb.myword.string_to_param.*, {key(TO_Q)}.hada_t1)"
    assert net.summary().startswith("emb: 3 of 5 keys applied (1 modules: LoRA 1); not applied: 2 (")


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({"lokr_w1": (2, 2)}, "no module type accepts.*incomplete LoKr"),
        ({"w_norm": (8,)}, "no module type accepts.*incomplete norm module .missing b_norm"),
        ({"a1.weight": (2, 8), "a2.weight": (8, 2), "b1.weight": (2, 8), "b2.weight": (8, 2)},
         "incomplete GLoRA module .missing alpha"),
        ({"oft_rotation": (2, 2)}, r"oft_rotation, which no module type accepts \(LoRA, LoHa, IA3.*\); the webui"),
        ({"weight": (8,)}, "IA3.*on_input"),
    ],
)
def test_parts_no_module_type_accepts_are_an_error_naming_the_module(parts, message):
    sd = {f"{key(TO_Q)}.{p}": rand(*shape) for p, shape in parts.items()}
    with pytest.raises(LoraError, match=message) as info:
        parse_network(sd, "sd1", model=sd1_model(), name="odd")
    assert key(TO_Q) in str(info.value)


def test_modules_the_webui_does_not_patch_are_skipped():
    emb = U + "label_emb.0"
    model = build({emb: nn.Embedding(4, 8)})
    sd = {f"{compvis_to_kohya_sdxl_like(emb)}.diff": rand(4, 8)}
    net = parse_network(sd, "sdxl", model=model)
    assert "Embedding" in net.skipped_keys[next(iter(sd))]


def compvis_to_kohya_sdxl_like(path):
    return "lora_unet_" + path[len(U):].replace(".", "_")


def test_non_finite_values_are_rejected():
    sd = lora_linear_sd(TO_Q, 8, 8, 4)
    sd[f"{key(TO_Q)}.lora_up.weight"][0, 0] = math.nan
    with pytest.raises(LoraError, match=r"bad_file: key .*to_q\.lora_up\.weight contains non-finite"):
        parse_network(sd, "sd1", name="bad_file")
    sd = lora_linear_sd(TO_Q, 8, 8, 4)
    sd[f"{key(TO_Q)}.alpha"] = torch.tensor(math.inf)
    with pytest.raises(LoraError, match="non-finite"):
        parse_network(sd, "sd1")


def test_shape_mismatch_names_key_and_shapes():
    model = sd1_model()
    sd = lora_linear_sd(TO_Q, 8, 16, 4)  # trained for a 16-wide input (another family)
    with pytest.raises(
        LoraError,
        match=r"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.*"
        r"\(8, 16\).*shape \(8, 8\)",
    ):
        parse_network(sd, "sd1", model=model)
    sd = lora_linear_sd(TO_Q, 8, 8, 4)
    sd[f"{key(TO_Q)}.lora_up.weight"] = rand(8, 3)
    with pytest.raises(LoraError, match=r"lora_up \(8, 3\) does not match rank 4"):
        parse_network(sd, "sd1")


def test_misc_errors():
    model = sd1_model()
    net = parse_network(lora_linear_sd(TO_Q, 8, 8, 4), "sd1", model=model)
    with pytest.raises(LoraError, match="unknown model family 'sd15'"):
        parse_network({}, "sd15")
    with pytest.raises(LoraError, match="not a tensor"):
        parse_network({"x.alpha": 1.0}, "sd1")
    with pytest.raises(LoraError, match="finite number"):
        merge(model, [(net, math.nan)])
    with pytest.raises(LoraError, match="LoraNetwork"):
        RuntimeLora(model, [("file.safetensors", 1.0)])
    with pytest.raises(LoraError, match="is not in the model"):
        RuntimeLora(build({FF_OUT: nn.Linear(8, 5)}), [(net, 1.0)])
    with RuntimeLora(model, [(net, 1.0)]) as rt:
        with pytest.raises(LoraError, match="unknown runtime LoRA mode"):
            rt.set_mode("half")
        with pytest.raises(LoraError, match="non-negative integer"):
            rt.set_rows_from(-1)
        with pytest.raises(LoraError, match="only meaningful"):
            rt.set_mode("all", 3)
    alpha = lora_linear_sd(TO_Q, 8, 8, 4)
    alpha[f"{key(TO_Q)}.alpha"] = torch.ones(2)
    with pytest.raises(LoraError, match="single number"):
        parse_network(alpha, "sd1")


def test_runtime_refuses_multihead_attention():
    model = build({OC + "attn": nn.MultiheadAttention(8, 2)})
    sd = {}
    for i, part in enumerate(("q_proj", "k_proj", "v_proj", "out_proj")):
        sd |= lora_linear_sd(f"{OC}attn.{part}", 8, 8, 2, family="sd2", seed=10 * i + 1)
    net = parse_network(sd, "sd2", model=model)
    with pytest.raises(LoraError, match=r"Conv2d, GroupNorm and LayerNorm modules only.*MultiheadAttention"):
        RuntimeLora(model, [(net, 1.0)])
    delta = net.modules[OC + "attn"][0]
    with pytest.raises(LoraError, match="merge it instead"):
        delta.forward_delta(model.get_submodule(OC + "attn"), rand(3, 1, 8))
    assert all(not m._forward_hooks for m in model.modules())


def test_zero_multiplier_and_repr():
    model = sd1_model()
    net = parse_network(lora_linear_sd(TO_Q, 8, 8, 4), "sd1", model=model)
    with RuntimeLora(model, [(net, 0.0)]) as rt:
        assert rt.num_modules == 0
    assert isinstance(net, LoraNetwork)
    (delta,) = net.modules[TO_Q]
    assert isinstance(delta, ModuleDelta) and "attn1_to_q" in repr(delta)


def test_rows_from_with_image_major_expanded_batch():
    # Hypertile-style: 3 images, each split into 4 tiles along dim 0, image-major.
    model = sd1_model()
    net = parse_network(lora_linear_sd(TO_Q, 8, 8, 4, alpha=2.0), "sd1", model=model)
    layer = model.get_submodule(TO_Q)
    tiles = rand(12, 5, 8)
    with torch.no_grad():
        base = layer(tiles)
        with merge(model, [(net, 1.0)]):
            merged = layer(tiles)
        with RuntimeLora(model, [(net, 1.0)]) as rt:
            rt.set_rows_from(1, batch=3)
            assert rt.batch == 3
            torch.testing.assert_close(layer(tiles), torch.cat([base[:4], merged[4:]]), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(layer(tiles[:3]), torch.cat([base[:1], merged[1:3]]), rtol=1e-10, atol=1e-10)
            rt.set_rows_from(1, batch=5)
            with pytest.raises(LoraError, match="saw 12 rows, not a multiple of the batch 5"):
                layer(tiles)
            with pytest.raises(LoraError, match="positive integer"):
                rt.set_rows_from(1, batch=0)
