"""IP-Adapters on the adapted leg: their files, the image tokens, and the extra attention on the adapted rows.

Host-free (torch). An IP-Adapter adds, at every cross-attention layer (``attn2``) of the UNet, an attention of the same
queries over a handful of *image tokens* made from a CLIP vision embedding of a reference image:

    out = to_out( Attn(q, k_text, v_text) + w · Attn(q, to_k_ip(T), to_v_ip(T)) )

with cond rows attending to the reference's tokens and uncond rows to the variant's uncond tokens. ``to_out`` is
affine, so this is the layer's own output plus ``w · W_out · Attn(q, k_ip, v_ip)``: the host's own attention (its
kernel, its precision) stays untouched and the image term is added to the adapted rows only
(:func:`image_prompt_forwards`).

* :func:`read_ip_adapter`: nested (``.bin``) or flat (``.safetensors``) files; the variant detected from the keys as
  both hosts do (``proj.3`` full-face, ``latents`` plus, else plain); FaceID and other face-model variants refused.
* :func:`attn2_layers`: the UNet's cross-attention layers in the order the files number them (``ip_adapter.{2n+1}``):
  input blocks, then output blocks, then the middle block, each block's transformer blocks in order.
* :func:`build_ip_adapter`: the projection model and the per-layer K/V projections, checked against a source UNet
  (family and every layer's shape; the error names the first tensor that does not fit).
* :class:`ImagePrompt`: one unit's tokens (cond and uncond) and weight; :func:`uncond_tokens` the variants' rules.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .controlnet_files import CONTEXT_DIM_FAMILY
from .errors import DeltaSamplingError


class IPAdapterFileError(DeltaSamplingError, ValueError):
    """An IP-Adapter file cannot be used: unreadable, a face-model variant, or made for another family or encoder."""

    http_status = 422


def is_ip_adapter(state_dict: Mapping[str, object]) -> bool:
    """An IP-Adapter file, nested or flat (sd-webui-controlnet's test: image_proj and ip_adapter keys)."""
    keys = list(state_dict)
    if "ip_adapter" in state_dict and "image_proj" in state_dict:
        return True
    return any(k.startswith("image_proj.") for k in keys) and any(k.startswith("ip_adapter.") for k in keys)


@dataclass
class IPAdapterFile:
    """An IP-Adapter's tensors, regrouped: the image projection's and each layer's (to_k_ip, to_v_ip)."""

    name: str
    image_proj: dict[str, Tensor]
    layers: dict[int, tuple[Tensor, Tensor]]  # the file's processor number N (odd) -> (to_k_ip, to_v_ip) weights
    variant: str  # plain | plus | full

    @property
    def context_dim(self) -> int:
        return int(next(iter(self.layers.values()))[0].shape[1])

    @property
    def family(self) -> str:
        return CONTEXT_DIM_FAMILY.get(self.context_dim, f"context width {self.context_dim}")

    @property
    def clip_input(self) -> str:
        """What the projection reads: the encoder's ``image_embeds`` (plain) or its penultimate hidden states."""
        return "image_embeds" if self.variant == "plain" else "hidden_states"

    @property
    def clip_width(self) -> int:
        """The encoder width the projection takes (projection dim for plain, hidden width otherwise)."""
        p = self.image_proj
        if self.variant == "plain":
            return int(p["proj.weight"].shape[1])
        if self.variant == "full":
            return int(p["proj.0.weight"].shape[1])
        return int(p["proj_in.weight"].shape[1])

    @property
    def tokens(self) -> int:
        if self.variant == "plain":
            return int(self.image_proj["proj.weight"].shape[0]) // self.context_dim
        if self.variant == "plus":
            return int(self.image_proj["latents"].shape[1])
        return -1  # full-face: one per encoder token


def _regroup(state_dict: Mapping[str, object], name: str) -> tuple[dict, dict]:
    if "ip_adapter" in state_dict and "image_proj" in state_dict:
        return dict(state_dict["image_proj"]), dict(state_dict["ip_adapter"])  # type: ignore[arg-type]
    proj, layers = {}, {}
    for key, value in state_dict.items():
        if key.startswith("image_proj."):
            proj[key[len("image_proj."):]] = value
        elif key.startswith("ip_adapter."):
            layers[key[len("ip_adapter."):]] = value
    if not proj or not layers:
        raise IPAdapterFileError(f"ip-adapter: {name} has no image_proj/ip_adapter tensors: not an IP-Adapter")
    return proj, layers


def read_ip_adapter(state_dict: Mapping[str, object], name: str) -> IPAdapterFile:
    proj, raw_layers = _regroup(state_dict, name)
    face = ("0.to_q_lora.down.weight" in raw_layers or "perceiver_resampler.proj_in.weight" in proj
            or ("proj.2.weight" in proj and "proj.3.weight" not in proj) or "faceid" in name.lower())
    if face:
        raise IPAdapterFileError(
            f"ip-adapter: {name} is a FaceID IP-Adapter: it needs a face embedding from insightface's face-analysis "
            "models, which neither host ships and which cannot be downloaded here; use a plain, plus or full-face "
            "IP-Adapter")
    layers: dict[int, tuple[Tensor, Tensor]] = {}
    for key, value in raw_layers.items():
        number, _, rest = key.partition(".")
        if rest not in ("to_k_ip.weight", "to_v_ip.weight") or not number.isdigit():
            raise IPAdapterFileError(f"ip-adapter: {name}: unexpected tensor ip_adapter.{key}")
        if not isinstance(value, Tensor) or value.ndim != 2:
            raise IPAdapterFileError(f"ip-adapter: {name}: ip_adapter.{key} is not a matrix")
        k, v = layers.get(int(number), (None, None))
        layers[int(number)] = (value, v) if rest.startswith("to_k") else (k, value)
    for number, (k, v) in sorted(layers.items()):
        if k is None or v is None:
            raise IPAdapterFileError(f"ip-adapter: {name}: layer {number} lacks its to_{'k' if k is None else 'v'}_ip")
    if "proj.3.weight" in proj:
        variant = "full"
    elif "latents" in proj:
        variant = "plus"
    elif "proj.weight" in proj and "norm.weight" in proj:
        variant = "plain"
    else:
        raise IPAdapterFileError(f"ip-adapter: {name}: unknown image projection (keys {sorted(proj)[:4]})")
    out = IPAdapterFile(name, {k: v for k, v in proj.items() if isinstance(v, Tensor)}, dict(sorted(layers.items())),
                        variant)
    widths = {int(k.shape[1]) for k, _ in out.layers.values()}
    if len(widths) != 1:
        raise IPAdapterFileError(f"ip-adapter: {name}: its layers read contexts of widths {sorted(widths)}")
    return out


# --- image projections (tencent-ailab/IP-Adapter's, which both hosts copy) -------------------------------------------


class ImageProjModel(nn.Module):
    def __init__(self, clip_width: int, context_dim: int, tokens: int) -> None:
        super().__init__()
        self.tokens, self.context_dim = tokens, context_dim
        self.proj = nn.Linear(clip_width, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        return self.norm(self.proj(embeds).reshape(-1, self.tokens, self.context_dim))


class MLPProjModel(nn.Module):
    def __init__(self, clip_width: int, context_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(clip_width, clip_width), nn.GELU(), nn.Linear(clip_width, context_dim),
                                  nn.LayerNorm(context_dim))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden)


class _PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int = 64) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, length, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1).type(q.dtype)
        return self.to_out((weight @ v).permute(0, 2, 1, 3).reshape(b, length, -1))


class Resampler(nn.Module):
    """The plus variants' perceiver: ``latents`` queries attending to the projected hidden states (64-wide heads)."""

    def __init__(self, dim: int, depth: int, queries: int, *, clip_width: int, context_dim: int, ff: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.empty(1, queries, dim))
        self.proj_in = nn.Linear(clip_width, dim)
        self.proj_out = nn.Linear(dim, context_dim)
        self.norm_out = nn.LayerNorm(context_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([_PerceiverAttention(dim, dim // 64),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff, bias=False), nn.GELU(),
                                         nn.Linear(ff, dim, bias=False))])
            for _ in range(depth))

    def forward(self, hidden: Tensor) -> Tensor:
        latents = self.latents.repeat(hidden.shape[0], 1, 1)
        x = self.proj_in(hidden)
        for attn, ff in self.layers:  # type: ignore[misc]
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def _projection(f: IPAdapterFile) -> nn.Module:
    p, ctx = f.image_proj, f.context_dim
    if f.variant == "plain":
        return ImageProjModel(f.clip_width, ctx, f.tokens)
    if f.variant == "full":
        return MLPProjModel(f.clip_width, ctx)
    dim = int(p["latents"].shape[2])
    depth = 1 + max(int(k.split(".")[1]) for k in p if k.startswith("layers."))
    return Resampler(dim, depth, f.tokens, clip_width=f.clip_width, context_dim=ctx,
                     ff=int(p["layers.0.1.1.weight"].shape[0]))


# --- the UNet's cross-attention layers -----------------------------------------------------------------------------


def attn2_layers(unet: nn.Module) -> list[str]:
    """Module paths of the UNet's cross-attention layers in IP-Adapter order: every input block, then every output
    block, then the middle block; inside a block its transformer blocks in order (diffusers' ``attn_processors``
    order, which both hosts hard-code as block ids)."""
    out = []
    for root in ("input_blocks", "output_blocks", "middle_block"):
        container = getattr(unet, root)
        for path, module in container.named_modules(prefix=root):
            if path.endswith(".attn2") and hasattr(module, "to_k"):
                out.append(path)
    return out


class IPAdapter(nn.Module):
    """An IP-Adapter built for one source UNet: the projection and, per cross-attention layer, its K/V."""

    def __init__(self, f: IPAdapterFile, layer_paths: Sequence[str]) -> None:
        super().__init__()
        self.name, self.variant, self.clip_input = f.name, f.variant, f.clip_input
        self.clip_width, self.family = f.clip_width, f.family
        self.layer_paths = list(layer_paths)
        self.image_proj = _projection(f)
        self.to_k_ip = nn.ModuleList(nn.Linear(int(k.shape[1]), int(k.shape[0]), bias=False)
                                     for k, _ in f.layers.values())
        self.to_v_ip = nn.ModuleList(nn.Linear(int(v.shape[1]), int(v.shape[0]), bias=False)
                                     for _, v in f.layers.values())

    @torch.no_grad()
    def tokens(self, encoder_output: Tensor) -> Tensor:
        """Image tokens (1, T, context) of one encoder output (``image_embeds`` or the penultimate hidden states)."""
        weight = next(self.image_proj.parameters())
        return self.image_proj(encoder_output.to(device=weight.device, dtype=weight.dtype))


def build_ip_adapter(unet: nn.Module, f: IPAdapterFile, *, source: str, source_family: str | None = None,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> IPAdapter:
    """``f`` for ``unet``: one (to_k_ip, to_v_ip) per cross-attention layer, numbered 1, 3, 5, ... in
    :func:`attn2_layers` order, each the shape of that layer's own to_k / to_v. Raises naming the file, the source and
    the first tensor that does not fit."""
    paths = attn2_layers(unet)
    where = f"ip-adapter: {f.name} ({f.family}) does not fit {source}" + (f" ({source_family})" if source_family
                                                                          else "")
    numbers = list(f.layers)
    if numbers != [2 * n + 1 for n in range(len(numbers))]:
        raise IPAdapterFileError(f"ip-adapter: {f.name}: its layers are numbered {numbers[:4]}..., not 1, 3, 5, ...")
    for n, path in enumerate(paths):
        layer = unet.get_submodule(path)
        if n >= len(numbers):
            raise IPAdapterFileError(f"{where}: the file has {len(numbers)} layers; {source} has {len(paths)} "
                                     f"cross-attention layers, the first without one is {path}")
        k, v = f.layers[numbers[n]]
        for tensor, own, name in ((k, layer.to_k.weight, "to_k"), (v, layer.to_v.weight, "to_v")):
            if tuple(tensor.shape) != tuple(own.shape):
                raise IPAdapterFileError(f"{where}: ip_adapter.{numbers[n]}.{name}_ip.weight is {tuple(tensor.shape)}, "
                                         f"the layer {path}.{name} is {tuple(own.shape)}")
    if len(numbers) > len(paths):
        raise IPAdapterFileError(f"{where}: the file has {len(numbers)} layers, {source} {len(paths)} cross-attention "
                                 f"layers (ip_adapter.{numbers[len(paths)]} has no layer)")
    with torch.device("meta"):
        adapter = IPAdapter(f, paths)
    state = {f"image_proj.{k}": v for k, v in f.image_proj.items()}
    for i, (k, v) in enumerate(f.layers.values()):
        state[f"to_k_ip.{i}.weight"], state[f"to_v_ip.{i}.weight"] = k, v
    expected = adapter.state_dict()
    for key in expected:
        if key not in state:
            raise IPAdapterFileError(f"ip-adapter: {f.name} lacks {key}")
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise IPAdapterFileError(f"ip-adapter: {f.name}: {key} is {tuple(state[key].shape)}, its {f.variant} "
                                     f"projection needs {tuple(expected[key].shape)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise IPAdapterFileError(f"ip-adapter: {f.name}: unexpected tensor {extra[0]} for a {f.variant} projection")
    adapter.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return adapter.eval().requires_grad_(False)


def check_encoder(adapter: IPAdapter, encoder_width: int, encoder_name: str, encoder_file: str) -> None:
    """The encoder's output width must be what the projection reads (``image_embeds`` or hidden width)."""
    if encoder_width != adapter.clip_width:
        what = "image_embeds" if adapter.clip_input == "image_embeds" else "hidden states"
        raise IPAdapterFileError(
            f"ip-adapter: {adapter.name} reads {what} of width {adapter.clip_width}, but the encoder {encoder_name} "
            f"({encoder_file}) gives {encoder_width}: pick the encoder the adapter was trained with")


# --- the uncond tokens ---------------------------------------------------------------------------------------------


def uncond_tokens(adapter: IPAdapter, *, image_embeds: Tensor | None = None, black_hidden: Tensor | None = None,
                  fixed_hidden: Tensor | None = None, fixed_tokens: Tensor | None = None) -> Tensor:
    """The tokens the uncond rows attend to. Plain: the projection of zeros (both hosts). Plus and full-face:
    ``fixed_tokens`` as they are (sd-webui-controlnet's SDXL plus), else the projection of ``fixed_hidden``
    (sd-webui-controlnet's shipped hidden states), else of ``black_hidden`` (the encoder's output for a black image:
    Forge's and ComfyUI's rule)."""
    if adapter.clip_input == "image_embeds":
        assert image_embeds is not None
        return adapter.tokens(torch.zeros_like(image_embeds))
    if fixed_tokens is not None:
        return fixed_tokens
    hidden = fixed_hidden if fixed_hidden is not None else black_hidden
    assert hidden is not None
    return adapter.tokens(hidden)


# --- the extra attention on the adapted rows -----------------------------------------------------------------------


@dataclass
class ImagePrompt:
    """One active unit at one call: its adapter, weight and tokens (each (1, T, context))."""

    adapter: IPAdapter
    weight: float
    cond: Tensor
    uncond: Tensor


def image_attention(layer: nn.Module, q: Tensor, tokens: Tensor, to_k: nn.Linear, to_v: nn.Linear) -> Tensor:
    """``Attn(q, to_k_ip(tokens), to_v_ip(tokens))`` per row, with ``q = layer.to_q(x)``, before ``to_out``:
    (B, N, inner)."""
    heads = int(layer.heads)
    b, n, _ = q.shape
    d = q.shape[-1] // heads
    k, v = to_k(tokens.to(to_k.weight.dtype)).to(q.dtype), to_v(tokens.to(to_v.weight.dtype)).to(q.dtype)
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, heads * d)


def _row_tokens(prompt: ImagePrompt, uncond_rows: Tensor, device: torch.device) -> Tensor:
    cond, uncond = prompt.cond.to(device), prompt.uncond.to(device)
    if cond.shape[1] != uncond.shape[1]:
        raise IPAdapterFileError(f"ip-adapter: {prompt.adapter.name}: {cond.shape[1]} cond tokens, "
                                 f"{uncond.shape[1]} uncond")
    mark = uncond_rows.to(device=device, dtype=torch.bool).view(-1, 1, 1)
    return torch.where(mark, uncond, cond)


@contextlib.contextmanager
def image_prompt_forwards(unet: nn.Module, prompts: Sequence[ImagePrompt], rows: Tensor,
                          uncond_rows: Tensor) -> Iterator[None]:
    """For the block: every cross-attention layer of ``unet`` adds the prompts' image attention to batch ``rows``
    (indices; ``uncond_rows`` says, per entry of ``rows``, whether it is an uncond row). The layer's own output is
    computed as before (bit for bit on every other row); the term ``Σ w · Attn(q, k_ip, v_ip)`` enters through
    ``to_out``'s matrix (``to_out`` is affine: ``to_out(a + b) = to_out(a) + W b``)."""
    prompts = [p for p in prompts if p.weight != 0]
    if not prompts or rows.numel() == 0:
        yield
        return
    paths = prompts[0].adapter.layer_paths
    for p in prompts[1:]:
        if p.adapter.layer_paths != paths:
            raise IPAdapterFileError("ip-adapter: two units were built for different UNets")
    installed = []
    row_tokens: dict[int, Tensor] = {}
    try:
        for index, path in enumerate(paths):
            layer = unet.get_submodule(path)
            assert "forward" not in layer.__dict__, f"{path}'s forward is already replaced"
            own = type(layer).forward.__get__(layer)

            def forward(x: Tensor, *args: object, _own=own, _layer=layer, _index=index, **kwargs: object) -> Tensor:
                out = _own(x, *args, **kwargs)
                picked = rows.to(x.device)
                q = _layer.to_q(x[picked])  # once per call, shared by the units
                total = None
                for i, prompt in enumerate(prompts):
                    if prompt.adapter.to_k_ip[_index].weight.device != x.device:
                        prompt.adapter.to(x.device)  # built where its UNet waited (Forge's offload device)
                    tokens = row_tokens.get(i)
                    if tokens is None or tokens.device != x.device:
                        tokens = row_tokens[i] = _row_tokens(prompt, uncond_rows, x.device)
                    term = image_attention(_layer, q, tokens, prompt.adapter.to_k_ip[_index],
                                           prompt.adapter.to_v_ip[_index]) * prompt.weight
                    total = term if total is None else total + term
                weight = _layer.to_out[0].weight  # no bias: the layer's own output has it already
                if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                    weight = weight.to(x.dtype)  # fp8 storage: computed in the activations' dtype, as the host does
                extra = F.linear(total.to(device=weight.device, dtype=weight.dtype), weight).to(out.dtype)
                out = out.clone()
                out[picked] = out[picked] + extra
                return out

            layer.forward = forward
            installed.append(layer)
        yield
    finally:
        for layer in installed:
            del layer.forward
