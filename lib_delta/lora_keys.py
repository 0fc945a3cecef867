"""Kohya/LyCORIS key names <-> module paths of the (unhijacked) ldm/sgm Stable Diffusion models.

Host-free: only the standard library. The rules reproduce the A1111 WebUI's Lora extension (v1.10.1,
``networks.convert_diffusers_name_to_compvis`` and the fallbacks in ``networks.load_network``) so that a file maps onto
the same layers here as it does in the webui. Names are resolved against a set of real module names, because an
underscore-joined name (``diffusion_model_input_blocks_1_1_proj_in``) cannot be split back into dots unambiguously.

Module paths are full dotted paths in the LatentDiffusion / DiffusionEngine object:

* SD1: UNet ``model.diffusion_model.*``, text encoder ``cond_stage_model.transformer.text_model.*``;
* SD2: UNet likewise, text encoder ``cond_stage_model.model.transformer.resblocks.N.*`` (OpenCLIP);
* SDXL: UNet likewise, ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L) and
  ``conditioner.embedders.1.model.transformer.resblocks.N.*`` (OpenCLIP bigG).

OpenCLIP attention is an ``nn.MultiheadAttention`` whose q/k/v are slices of ``in_proj_weight``; keys for them map to
the attention module plus a slice name ``"q"``, ``"k"`` or ``"v"``. The webui's ``.wrapped`` text-encoder wrappers are
accepted in real module names (``cond_stage_model.wrapped.transformer...``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from .errors import DeltaSamplingError

__all__ = [
    "FAMILIES",
    "LORA_FAMILIES",
    "SLICES",
    "LoraError",
    "LoraMisfitError",
    "ModuleNameIndex",
    "check_family",
    "compvis_to_kohya",
    "diffusers_to_compvis",
    "kohya_to_module",
    "layers_named_per_family",
    "standard_module_paths",
    "webui_layer_name",
]

FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")  # the UNet families, with a standard full-size layout
# MMDiT families (SD3, SD3.5 M/L): kohya names every layer ``lora_unet_<its path, dots as underscores>`` and sizes
# vary by model, so keys resolve against the real module names only, never against a standard layout
MMDIT_FAMILIES: tuple[str, ...] = ("sd3",)
LORA_FAMILIES: tuple[str, ...] = (*FAMILIES, *MMDIT_FAMILIES)
SLICES: tuple[str, ...] = ("q", "k", "v")

UNET_PREFIX = "model.diffusion_model."


class LoraError(DeltaSamplingError, ValueError):
    """A LoRA/LyCORIS file cannot be mapped or applied; the message names the key, module or shapes involved."""


class LoraMisfitError(LoraError):
    """A delta's shape does not fit the layer its key names (typically: a file made for another model family)."""


def check_family(family: str) -> str:
    """Return ``family`` if it is one of :data:`LORA_FAMILIES`, else raise :class:`LoraError`."""
    if family not in LORA_FAMILIES:
        raise LoraError(f"unknown model family {family!r}; expected one of {', '.join(LORA_FAMILIES)}")
    return family


# --- the webui's diffusers -> compvis conversion -------------------------------------------------------------------

_RESNET_TO_COMPVIS = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}
# Dotted forms of the renamed resnet parts (the last underscore of "in_layers_2" is a path separator).
_COMPVIS_TO_RESNET = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "in_layers.0": "norm1",
    "out_layers.0": "norm2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}

_RE_CONV_IN = re.compile(r"lora_unet_conv_in(.*)")
_RE_CONV_OUT = re.compile(r"lora_unet_conv_out(.*)")
_RE_TIME = re.compile(r"lora_unet_time_embedding_linear_(\d+)(.*)")
_RE_DOWN = re.compile(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")
_RE_MID = re.compile(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")
_RE_UP = re.compile(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")
_RE_DOWNSAMPLE = re.compile(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv")
_RE_UPSAMPLE = re.compile(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")
_RE_TE = re.compile(r"lora_te_text_model_encoder_layers_(\d+)_(.+)")
_RE_TE2 = re.compile(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")
_RE_X_PROJ = re.compile(r"(.*)_([qkv])_proj$")


def _suffix(kind: str, suffix: str) -> str:
    return _RESNET_TO_COMPVIS.get(suffix, suffix) if kind == "resnets" else suffix


def _openclip_suffix(rest: str) -> str:
    # The webui renames only the first matching CLIP-L part; the three cases are exclusive in practice.
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def diffusers_to_compvis(key: str, is_sd2: bool) -> str:
    """The webui's ``convert_diffusers_name_to_compvis``: a kohya module key -> webui layer name (underscored).

    Assumes two res blocks per UNet level, exactly like the webui. Returns ``key`` unchanged when no rule applies.
    """
    if m := _RE_CONV_IN.match(key):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := _RE_CONV_OUT.match(key):
        return f"diffusion_model_out_2{m[1]}"
    if m := _RE_TIME.match(key):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := _RE_DOWN.match(key):
        block, kind, index, suffix = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_input_blocks_{1 + block * 3 + index}_{1 if kind == 'attentions' else 0}_" + _suffix(
            kind, suffix
        )
    if m := _RE_MID.match(key):
        kind, index, suffix = m[1], int(m[2]), m[3]
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else index * 2}_{_suffix(kind, suffix)}"
    if m := _RE_UP.match(key):
        block, kind, index, suffix = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_output_blocks_{block * 3 + index}_{1 if kind == 'attentions' else 0}_" + _suffix(
            kind, suffix
        )
    if m := _RE_DOWNSAMPLE.match(key):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := _RE_UPSAMPLE.match(key):
        block = int(m[1])
        return f"diffusion_model_output_blocks_{2 + block * 3}_{2 if block > 0 else 1}_conv"
    if m := _RE_TE.match(key):
        if is_sd2:
            return f"model_transformer_resblocks_{m[1]}_{_openclip_suffix(m[2])}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := _RE_TE2.match(key):
        return f"1_model_transformer_resblocks_{m[1]}_{_openclip_suffix(m[2])}"
    return key


# --- real module names -> webui layer names ------------------------------------------------------------------------

_RE_SDXL_EMBEDDER = re.compile(r"conditioner\.embedders\.(\d+)\.(?:wrapped\.)?(.+)")
_RE_LDM_COND = re.compile(r"cond_stage_model\.(?:wrapped\.)?(.+)")


def webui_layer_name(path: str, family: str) -> str | None:
    """The webui's ``network_layer_name`` for the module at dotted ``path``, or None for modules it never names.

    UNet modules are named relative to ``sd_model.model``; text encoder modules relative to the (unwrapped) encoder,
    with an ``"{i}_"`` prefix for SDXL embedder i.
    """
    if path.startswith(UNET_PREFIX):
        return path[len("model.") :].replace(".", "_")
    if family == "sdxl":
        if m := _RE_SDXL_EMBEDDER.fullmatch(path):
            return f"{m[1]}_{m[2].replace('.', '_')}"
        return None
    if m := _RE_LDM_COND.fullmatch(path):
        return m[1].replace(".", "_")
    return None


class ModuleNameIndex:
    """Webui layer name -> real dotted module path, for one model (built once, used for every key of a file)."""

    def __init__(self, module_names: Iterable[str], family: str) -> None:
        self.family = check_family(family)
        self._paths: dict[str, str] = {}
        for path in module_names:
            name = webui_layer_name(path, family)
            # First wins: a hijacked model lists no unwrapped twin, so collisions do not occur in real layouts.
            if name is not None:
                self._paths.setdefault(name, path)

    def get(self, layer_name: str) -> str | None:
        """The dotted path whose webui name is ``layer_name``, or None."""
        return self._paths.get(layer_name)

    def __len__(self) -> int:
        return len(self._paths)


def kohya_to_module(
    key: str, family: str, module_names: Iterable[str] | ModuleNameIndex | None = None
) -> tuple[str, str | None] | None:
    """Map a kohya/LyCORIS module key to ``(dotted module path, q/k/v slice or None)``, or None if nothing matches.

    ``key`` may be a full state-dict key; everything from the first dot on is ignored. ``module_names`` are the real
    module names of the model (``model.named_modules()`` names, or a prebuilt :class:`ModuleNameIndex`); without them
    the standard full-size layout of ``family`` (:func:`standard_module_paths`) is used.
    """
    family = check_family(family)
    if isinstance(module_names, ModuleNameIndex):
        index = module_names
        if index.family != family:
            raise LoraError(f"module index was built for family {index.family!r}, not {family!r}")
    elif module_names is None:
        _require_standard_layout(family)
        index = _standard_index(family)
    else:
        index = ModuleNameIndex(module_names, family)

    base = key.partition(".")[0]
    if family in MMDIT_FAMILIES:  # kohya's only rule for them: lora_unet_ + the path with underscores
        path = index.get(base.replace("lora_unet", "diffusion_model", 1)) if base.startswith("lora_unet_") else None
        return (path, None) if path is not None else None
    name = diffusers_to_compvis(base, family == "sd2")
    if (path := index.get(name)) is not None:
        return path, None
    # OpenCLIP attention: q/k/v are slices of the MultiheadAttention's in_proj, not modules of their own.
    if (m := _RE_X_PROJ.match(name)) and (path := index.get(m[1])) is not None:
        return path, m[2]
    # Fallbacks, in the webui's order: SDXL files already use compvis block names; CLIP-L files may say "te1".
    if "lora_unet" in base:
        path = index.get(base.replace("lora_unet", "diffusion_model"))
    elif "lora_te1_text_model" in base:
        path = index.get(base.replace("lora_te1_text_model", "0_transformer_text_model"))
        if path is None:
            path = index.get(base.replace("lora_te1_text_model", "transformer_text_model"))
    elif "oft_unet" in base:  # kohya's OFT names UNet modules by their compvis paths under this prefix
        path = index.get(base.replace("oft_unet", "diffusion_model"))
    return (path, None) if path is not None else None


def layers_named_per_family(keys: Iterable[str]) -> dict[str, int]:
    """How many distinct module keys of ``keys`` name a layer of each family's full-size standard layout: tells a
    file made for another family from one whose keys name nothing at all."""
    modules = {key.partition(".")[0] for key in keys}
    return {family: sum(1 for m in modules if kohya_to_module(m, family) is not None) for family in FAMILIES}


# --- module path -> kohya key (the inverse, for fixtures and reports) ----------------------------------------------

_RE_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)(?:\.(\d+))?\.(.+)")
_RE_OPENCLIP = re.compile(r"model\.transformer\.resblocks\.(\d+)\.(.+)")
_OPENCLIP_TO_KOHYA = {
    "attn.q_proj": "self_attn_q_proj",
    "attn.k_proj": "self_attn_k_proj",
    "attn.v_proj": "self_attn_v_proj",
    "attn.out_proj": "self_attn_out_proj",
    "mlp.c_fc": "mlp_fc1",
    "mlp.c_proj": "mlp_fc2",
}


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def _unet_to_diffusers(rest: str) -> str | None:
    """Inverse of the webui arithmetic for an SD1/SD2 UNet path relative to ``diffusion_model``."""
    if rest == "input_blocks.0.0":
        return "lora_unet_conv_in"
    if rest == "out.2":
        return "lora_unet_conv_out"
    if rest in ("time_embed.0", "time_embed.2"):
        return f"lora_unet_time_embedding_linear_{int(rest[-1]) // 2 + 1}"
    m = _RE_BLOCK.fullmatch(rest)
    if m is None:
        return None
    kind_name, number, suffix = m[1], int(m[2]), m[4]
    if kind_name == "middle_block":
        # middle_block.{0,1,2}.<suffix>: one index only (resnet, transformer, resnet).
        if m[3] is not None:
            return None
        if number == 1:
            return f"lora_unet_mid_block_attentions_0_{_underscored(suffix)}"
        resnet = _COMPVIS_TO_RESNET.get(suffix, suffix)
        return f"lora_unet_mid_block_resnets_{number // 2}_{_underscored(resnet)}" if number in (0, 2) else None
    if m[3] is None:
        return None
    sub = int(m[3])
    if kind_name == "input_blocks":
        if number >= 3 and number % 3 == 0 and sub == 0 and suffix == "op":
            return f"lora_unet_down_blocks_{number // 3 - 1}_downsamplers_0_conv"
        block, index = divmod(number - 1, 3)
        if number < 1 or index > 1 or sub > 1:
            return None
        head = f"lora_unet_down_blocks_{block}"
    else:
        block, index = divmod(number, 3)
        if index == 2 and suffix == "conv" and sub == (2 if block > 0 else 1):
            return f"lora_unet_up_blocks_{block}_upsamplers_0_conv"
        if sub > 1:
            return None
        head = f"lora_unet_up_blocks_{block}"
    if sub == 1:
        return f"{head}_attentions_{index}_{_underscored(suffix)}"
    return f"{head}_resnets_{index}_{_underscored(_COMPVIS_TO_RESNET.get(suffix, suffix))}"


def _openclip_to_kohya(rest: str, prefix: str) -> str | None:
    m = _RE_OPENCLIP.fullmatch(rest)
    if m is None or m[2] not in _OPENCLIP_TO_KOHYA:
        return None
    return f"{prefix}_text_model_encoder_layers_{m[1]}_{_OPENCLIP_TO_KOHYA[m[2]]}"


_SDXL_TE1 = "conditioner.embedders.0.transformer.text_model."


def compvis_to_kohya(module_path: str, family: str) -> str:
    """The kohya module key a trainer writes for ``module_path`` (inverse of :func:`kohya_to_module`).

    SD1/SD2 UNet paths get diffusers-style names, SDXL UNet paths ``lora_unet_<compvis underscored>``; text encoders
    get ``lora_te_`` (SD1/SD2) or ``lora_te1_``/``lora_te2_`` (SDXL) names. An OpenCLIP q/k/v slice is written as the
    pseudo-path ``...attn.q_proj``. Raises :class:`LoraError` for paths no kohya name exists for.
    """
    family = check_family(family)
    path = module_path.replace(".wrapped.", ".")
    result: str | None = None
    if path.startswith(UNET_PREFIX):
        rest = path[len(UNET_PREFIX) :]
        result = f"lora_unet_{_underscored(rest)}" if family == "sdxl" else _unet_to_diffusers(rest)
    elif family == "sdxl":
        if path.startswith(_SDXL_TE1):
            result = "lora_te1_text_model_" + _underscored(path[len(_SDXL_TE1) :])
        elif path.startswith("conditioner.embedders.1."):
            result = _openclip_to_kohya(path[len("conditioner.embedders.1.") :], "lora_te2")
    elif family == "sd1" and path.startswith("cond_stage_model.transformer.text_model."):
        result = "lora_te_text_model_" + _underscored(path[len("cond_stage_model.transformer.text_model.") :])
    elif family == "sd2" and path.startswith("cond_stage_model."):
        result = _openclip_to_kohya(path[len("cond_stage_model.") :], "lora_te")
    if result is None:
        raise LoraError(f"no kohya key name is known for module {module_path!r} of a {family} model")
    return result


# --- standard full-size layouts ------------------------------------------------------------------------------------


def _resblock(out: dict[str, str], prefix: str, ch_in: int, ch_out: int) -> None:
    out[f"{prefix}.in_layers.2"] = "conv"
    out[f"{prefix}.emb_layers.1"] = "linear"
    out[f"{prefix}.out_layers.3"] = "conv"
    if ch_in != ch_out:
        out[f"{prefix}.skip_connection"] = "conv"


def _transformer(out: dict[str, str], prefix: str, depth: int, linear_proj: bool) -> None:
    proj = "linear" if linear_proj else "conv"
    out[f"{prefix}.proj_in"] = proj
    for block in range(depth):
        for attn in ("attn1", "attn2"):
            for part in ("to_q", "to_k", "to_v", "to_out.0"):
                out[f"{prefix}.transformer_blocks.{block}.{attn}.{part}"] = "linear"
        out[f"{prefix}.transformer_blocks.{block}.ff.net.0.proj"] = "linear"
        out[f"{prefix}.transformer_blocks.{block}.ff.net.2"] = "linear"
    out[f"{prefix}.proj_out"] = proj


def _unet(
    out: dict[str, str], mults: tuple[int, ...], depths: tuple[int, ...], *, mid_depth: int, linear: bool, adm: bool
) -> None:
    # Mirrors the construction loop of ldm/sgm openaimodel.UNetModel (num_res_blocks = 2, model_channels = 320).
    p, base, res_blocks = UNET_PREFIX, 320, 2
    out[f"{p}time_embed.0"] = out[f"{p}time_embed.2"] = "linear"
    if adm:
        out[f"{p}label_emb.0.0"] = out[f"{p}label_emb.0.2"] = "linear"
    out[f"{p}input_blocks.0.0"] = "conv"
    ch, skips, idx = base, [base], 1
    for level, mult in enumerate(mults):
        for _ in range(res_blocks):
            _resblock(out, f"{p}input_blocks.{idx}.0", ch, base * mult)
            ch = base * mult
            if depths[level]:
                _transformer(out, f"{p}input_blocks.{idx}.1", depths[level], linear)
            skips.append(ch)
            idx += 1
        if level != len(mults) - 1:
            out[f"{p}input_blocks.{idx}.0.op"] = "conv"
            skips.append(ch)
            idx += 1
    _resblock(out, f"{p}middle_block.0", ch, ch)
    _transformer(out, f"{p}middle_block.1", mid_depth, linear)
    _resblock(out, f"{p}middle_block.2", ch, ch)
    idx = 0
    for level, mult in reversed(list(enumerate(mults))):
        for i in range(res_blocks + 1):
            _resblock(out, f"{p}output_blocks.{idx}.0", ch + skips.pop(), base * mult)
            ch, sub = base * mult, 1
            if depths[level]:
                _transformer(out, f"{p}output_blocks.{idx}.1", depths[level], linear)
                sub = 2
            if level and i == res_blocks:
                out[f"{p}output_blocks.{idx}.{sub}.conv"] = "conv"
            idx += 1
    out[f"{p}out.2"] = "conv"


_CLIP_L_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def _clip_l(out: dict[str, str], prefix: str, layers: int = 12) -> None:
    for i in range(layers):
        for part in _CLIP_L_PARTS:
            out[f"{prefix}transformer.text_model.encoder.layers.{i}.{part}"] = "linear"


def _openclip(out: dict[str, str], prefix: str, layers: int) -> None:
    for i in range(layers):
        block = f"{prefix}model.transformer.resblocks.{i}"
        out[f"{block}.attn"] = "mha"
        for part in ("attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
            out[f"{block}.{part}"] = "linear"


@functools.cache
def _standard_layout(family: str) -> tuple[tuple[str, str], ...]:
    out: dict[str, str] = {}
    if family == "sdxl":
        _unet(out, (1, 2, 4), (0, 2, 10), mid_depth=10, linear=True, adm=True)
        _clip_l(out, "conditioner.embedders.0.")
        _openclip(out, "conditioner.embedders.1.", 32)
    else:
        _unet(out, (1, 2, 4, 4), (1, 1, 1, 0), mid_depth=1, linear=family == "sd2", adm=False)
        if family == "sd1":
            _clip_l(out, "cond_stage_model.")
        else:
            _openclip(out, "cond_stage_model.", 24)
    return tuple(out.items())


def standard_module_paths(family: str) -> dict[str, str]:
    """LoRA-targetable modules of the full-size ``family`` model: dotted path -> ``"linear"``, ``"conv"`` or ``"mha"``.

    Derived from the ldm/sgm constructors (SD1.5 / SD2.x / SDXL base configs), no torch needed.
    """
    _require_standard_layout(check_family(family))
    return dict(_standard_layout(family))


def _require_standard_layout(family: str) -> None:
    if family not in FAMILIES:
        raise LoraError(f"{family} models have no standard layout here (their sizes vary by model): resolve LoRA keys "
                        "against the model's own module names")


@functools.cache
def _standard_index(family: str) -> ModuleNameIndex:
    return ModuleNameIndex((path for path, _ in _standard_layout(family)), family)
