"""Diffusers-format SD3 / SD3.5 LoRA files, rewritten onto the MMDiT's own (fused) layers as kohya keys.

Host-free (torch + stdlib). Diffusers and PEFT name the SD3 transformer's layers by the diffusers model
(``transformer.transformer_blocks.N.attn.to_q.lora_A.weight``; OneTrainer writes the same names underscored after
``lora_transformer_``), where the MMDiT the hosts run fuses q, k and v into one ``qkv`` Linear. The names map as
ComfyUI's ``mmdit_to_diffusers`` maps the weights (and SD3.5 M's second attention, ``attn2``, as its first). A LoRA on
``to_q``, ``to_k`` and ``to_v`` becomes one LoRA on ``qkv`` whose down matrix stacks the three and whose up matrix is
block-diagonal, so ``up @ down`` is exactly the three deltas stacked (rank the sum of theirs; a missing one gives zero
rows). Two layers order their halves the other way round (the last block's ``norm1_context`` and ``norm_out``: scale
before shift in diffusers): their up rows are swapped back. Each part's own scale (``alpha / rank``, else 1) is folded
into its up matrix; the rewritten modules carry ``alpha = rank``, a scale of 1.

Forge refuses such files on SD3 (its diffusers map for SD3 is commented out); the hosts' kohya names
(``lora_unet_joint_blocks_…``) go through :mod:`lib_delta.lora_keys` unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["diffusers_mmdit_module", "is_diffusers_mmdit", "rewrite_diffusers_mmdit"]

_QKV = ("q", "k", "v")
# diffusers module in transformer_blocks.N -> (MMDiT module in joint_blocks.N, index of the q/k/v slice or None)
_BLOCK: dict[str, tuple[str, int | None]] = {
    **{f"attn.to_{p}": ("x_block.attn.qkv", i) for i, p in enumerate(_QKV)},
    **{f"attn.add_{p}_proj": ("context_block.attn.qkv", i) for i, p in enumerate(_QKV)},
    **{f"attn2.to_{p}": ("x_block.attn2.qkv", i) for i, p in enumerate(_QKV)},
    "attn.to_out.0": ("x_block.attn.proj", None),
    "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None),
    "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
    "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
}
_BASIC: dict[str, str] = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.")
_UNDERSCORED = "lora_transformer_"
_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_down.weight": "down", "lora_up.weight": "up",
          "alpha": "alpha"}
_RE_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")


def _underscored_names() -> dict[str, str]:
    """``transformer_blocks_N_attn_to_q`` style names of the map's modules -> their dotted form (N kept as ``{}``)."""
    names = {f"transformer_blocks_{{}}_{k.replace('.', '_')}": f"transformer_blocks.{{}}.{k}" for k in _BLOCK}
    names.update({k.replace(".", "_"): k for k in _BASIC})
    return names


_UNDERSCORED_NAMES = _underscored_names()
_RE_UNDERSCORED_BLOCK = re.compile(r"transformer_blocks_(\d+)_(.+)")


def _dotted(module: str) -> str | None:
    """A diffusers module name in its dotted form (prefix removed), or None when it is not one."""
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix):]
    if module.startswith(_UNDERSCORED):
        rest = module[len(_UNDERSCORED):]
        if m := _RE_UNDERSCORED_BLOCK.fullmatch(rest):
            dotted = _UNDERSCORED_NAMES.get(f"transformer_blocks_{{}}_{m[2]}")
            return dotted.format(m[1]) if dotted else None
        return _UNDERSCORED_NAMES.get(rest)
    return None


def diffusers_mmdit_module(module: str, last_block: int) -> tuple[str, int | None, bool] | None:
    """``(MMDiT module path, q/k/v slice index or None, halves swapped)`` for a diffusers module name of an SD3
    transformer whose last joint block is ``last_block``; None for names outside the map."""
    dotted = _dotted(module)
    if dotted is None:
        return None
    if dotted in _BASIC:
        return _BASIC[dotted], None, dotted == "norm_out.linear"
    m = _RE_BLOCK.fullmatch(dotted)
    if m is None or m[2] not in _BLOCK:
        return None
    path, index = _BLOCK[m[2]]
    block = int(m[1])
    swapped = m[2] == "norm1_context.linear" and block == last_block
    return f"joint_blocks.{block}.{path}", index, swapped


def _split(key: str) -> tuple[str, str] | None:
    for part in _PARTS:
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    return None


def is_diffusers_mmdit(keys: Mapping[str, object] | list[str]) -> bool:
    """Whether a LoRA file names SD3 transformer layers the diffusers way."""
    return any((split := _split(k)) is not None and diffusers_mmdit_module(split[0], 0) is not None for k in keys)


def _scaled_up(parts: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    down, up = parts["down"].float(), parts["up"].float()
    scale = float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0
    return down, up * scale


def rewrite_diffusers_mmdit(state_dict: Mapping[str, Tensor], last_block: int) -> dict[str, Tensor]:
    """``state_dict`` with its diffusers-named SD3 LoRA modules rewritten as kohya ``lora_unet_`` modules on the
    MMDiT's layers (q/k/v merged into the fused ``qkv``); every other key is passed on unchanged (kohya names,
    text-encoder keys, parts other than a plain LoRA's), to be matched or reported as the file's other keys are."""
    out: dict[str, Tensor] = {}
    modules: dict[str, dict[str, Tensor]] = {}
    originals: dict[str, dict[str, Tensor]] = {}  # the file's own keys, for modules left as they are
    targets: dict[str, tuple[str, int | None, bool]] = {}
    for key, value in state_dict.items():
        split = _split(key)
        target = diffusers_mmdit_module(split[0], last_block) if split else None
        if target is None:
            out[key] = value
            continue
        modules.setdefault(split[0], {})[_PARTS[split[1]]] = value
        originals.setdefault(split[0], {})[key] = value
        targets[split[0]] = target
    fused: dict[str, dict[int | None, tuple[Tensor, Tensor]]] = {}
    for module, parts in modules.items():
        path, index, swapped = targets[module]
        if "down" not in parts or "up" not in parts:  # an incomplete LoRA: reported as not applied, as any other
            out.update(originals[module])
            continue
        down, up = _scaled_up(parts)
        if swapped:
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        fused.setdefault(path, {})[index] = (down, up)
    for path, pieces in fused.items():
        key = "lora_unet_" + path.replace(".", "_")
        if None in pieces:
            down, up = pieces[None]
        else:
            width = next(iter(pieces.values()))[1].shape[0]  # each slice's rows: the hidden size
            down = torch.cat([pieces[i][0] for i in sorted(pieces)])
            up = torch.zeros(3 * width, down.shape[0], dtype=down.dtype)
            column = 0
            for i in sorted(pieces):
                piece_up = pieces[i][1]
                up[i * width:(i + 1) * width, column:column + piece_up.shape[1]] = piece_up
                column += piece_up.shape[1]
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    return out
