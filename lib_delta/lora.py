"""LoRA / LyCORIS deltas for the source pair: parse a loaded state dict, then merge it or switch it at runtime.

Host-free (torch + stdlib). The maths reproduces the A1111 WebUI Lora extension (v1.10.1: ``network.py``,
``network_{lora,hada,ia3,lokr,full,norm,glora,oft}.py``, ``lyco_helpers.py``, and ``networks.py``'s apply order)
without using it: the webui's machinery is bound to the user's model and to global state, while the source pair needs
its own copy.

* :func:`parse_network` groups the keys of one file per target module and picks the module type in the webui's order
  (LoRA/LoCon incl. the CP ``lora_mid`` form, LoHa, IA3, LoKr, full diff, norm, GLoRA, OFT/BOFT in the kohya and both
  LyCORIS layouts; optional DoRA ``dora_scale``). Keys it does not apply are counted, never dropped silently.
* :class:`ModuleDelta` computes the full-size ``ΔW`` (``delta_weight``) or adds the delta inside a forward
  (``forward_delta``; plain LoRA stays low-rank there).
* :func:`merge` adds ``ΔW`` in place and restores the saved originals exactly (text encoders, MHA in_proj slices).
* :class:`RuntimeLora` hooks the target modules so base and adapted legs share one set of weights; with
  ``set_rows_from(k)`` only batch rows ``k:`` get the delta, so both legs run in one batched UNet forward.

Scale: ``scale`` key if present, else ``alpha / rank`` if both exist, else 1 — rank being the LoRA ``lora_down`` rows,
LoHa ``hada_w1_b`` rows, LoKr ``lokr_w1_b``/``lokr_w2_b`` rows (none for full LoKr factors, full diff, IA3, norm and
GLoRA, so alpha is ignored there, as in the webui; OFT always uses 1) — times the caller's multiplier. Bias deltas
(``diff_b``, ``b_norm``) take the multiplier only. With several networks on one module each delta is computed from the
weight with the earlier ones added, as the webui applies them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lora_keys import FAMILIES, SLICES, LoraError, LoraMisfitError, ModuleNameIndex, check_family, kohya_to_module

__all__ = [
    "FAMILIES",
    "LoraError",
    "LoraMisfitError",
    "LoraNetwork",
    "MergedLora",
    "ModuleDelta",
    "RuntimeLora",
    "merge",
    "parse_network",
]

NetworksWithWeights = Sequence[tuple["LoraNetwork", float]]

# Parts each module type reads, as the webui's ``network_*.py`` read them. Parts outside these (and the common ones)
# are ignored by the webui too; DS reports them as skipped.
_KIND_PARTS: dict[str, frozenset[str]] = {
    "lora": frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight"}),
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    "ia3": frozenset({"weight", "on_input"}),
    "lokr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "full": frozenset({"diff", "diff_b"}),
    "norm": frozenset({"w_norm", "b_norm"}),
    "glora": frozenset({"a1.weight", "a2.weight", "b1.weight", "b2.weight"}),
    "oft": frozenset({"oft_blocks", "oft_diag", "rescale"}),
}
_COMMON_PARTS = frozenset({"alpha", "scale", "dora_scale", "bias"})
KIND_NAMES = {"lora": "LoRA", "loha": "LoHa", "ia3": "IA3", "lokr": "LoKr", "full": "full diff", "norm": "norm",
              "glora": "GLoRA", "oft": "OFT"}
# ΔW of these depends on the weight it is added to (the webui passes the current weight to calc_updown).
_WEIGHT_DEPENDENT = frozenset({"ia3", "glora", "oft"})
# Where a module type puts its bias delta (``ex_bias``; scaled by the multiplier only).
_BIAS_PART = {"full": "diff_b", "norm": "b_norm"}
_NORMS = (nn.GroupNorm, nn.LayerNorm)
_LINEAR_TYPES: list[type] = [nn.Linear]


def register_linear_type(cls: type) -> None:
    """Treat ``cls`` as a Linear layer (weight (out, in), ``F.linear`` semantics): a host whose layers are not
    ``nn.Linear`` subclasses (Forge's ``ForgeOperations.Linear``) registers its class once at start-up."""
    if cls not in _LINEAR_TYPES:
        _LINEAR_TYPES.append(cls)


def _linear_or_conv() -> tuple[type, ...]:
    return (*_LINEAR_TYPES, nn.Conv2d)


def _detect_kind(parts: Mapping[str, Tensor]) -> str | None:
    """Module type for one group of parts: the first of the webui's ``module_types`` whose ``create_module`` accepts
    them (same order, same required parts); None if none does."""
    if ("lora_up.weight" in parts and "lora_down.weight" in parts) or (
        "lora_A.weight" in parts and "lora_B.weight" in parts
    ):
        return "lora"
    if all(p in parts for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        return "loha"
    if "weight" in parts:
        return "ia3"
    has_1 = "lokr_w1" in parts or ("lokr_w1_a" in parts and "lokr_w1_b" in parts)
    has_2 = "lokr_w2" in parts or ("lokr_w2_a" in parts and "lokr_w2_b" in parts)
    if has_1 and has_2:
        return "lokr"
    if "diff" in parts:
        return "full"
    if "w_norm" in parts and "b_norm" in parts:
        return "norm"
    if all(p in parts for p in ("a1.weight", "a2.weight", "alpha", "b1.weight", "b2.weight")):
        return "glora"
    if "oft_blocks" in parts or "oft_diag" in parts:
        return "oft"
    return None


_REQUIRED_PARTS = {
    "norm": ("w_norm", "b_norm"),
    "GLoRA": ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"),
    "LoHa": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "LoRA": ("lora_up.weight", "lora_down.weight"),
}


def _near_miss(parts: Mapping[str, Tensor]) -> str:
    """``": it looks like an incomplete <type> module (missing ...)"`` when the parts are a known type's minus some."""
    for kind, required in _REQUIRED_PARTS.items():
        present = [p for p in required if p in parts]
        if present and len(present) < len(required):
            missing = ", ".join(p for p in required if p not in parts)
            return f": it looks like an incomplete {kind} module (missing {missing})"
    if any(p.startswith("lokr_") for p in parts):
        return ": it looks like an incomplete LoKr module (it needs lokr_w1 or lokr_w1_a/b, and lokr_w2 or lokr_w2_a/b)"
    return ""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Deltas are built in at least fp32: an fp16 product of factors loses more than the final rounding does.
    if dtype.is_floating_point and dtype.itemsize == 1:
        return torch.float32  # fp8 storage (torch refuses to promote float8 types)
    return torch.promote_types(dtype, torch.float32)


def _prod(shape: Iterable[int]) -> int:
    return math.prod(shape)


def _cp(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """Tucker/CP rebuild (LyCORIS ``make_weight_cp``): ``t`` (r, r, k, k), ``wa`` (r, out), ``wb`` (r, in)."""
    return torch.einsum("i j k l, i r, j s -> r s k l", t, wa, wb)


def _conv(module: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv2d`` with ``module``'s geometry, including non-zero padding modes (the webui's tiling sets circular)."""
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return F.conv2d(x, weight, bias, module.stride, 0, module.dilation)
    return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation)


def _as_2d(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _as_1x1(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1, 1, 1)


def _regroup(t: Tensor, outer: int, inner: int) -> Tensor:
    """einops ``(c g k) ... -> (c k g) ...`` with ``g = outer``, ``k = inner`` (BOFT's butterfly permutation)."""
    rest = t.shape[1:]
    return t.reshape(-1, outer, inner, *rest).transpose(1, 2).reshape(t.shape[0], *rest)


def _module_delta_output(module: nn.Module, x: Tensor, dw: Tensor, db: Tensor | None) -> Tensor:
    """``module(x)`` with weight ``W + dw`` and bias ``b + db``, minus ``module(x)``, for an affine-in-weight module."""
    if isinstance(module, nn.Conv2d):
        return _conv(module, x, dw, db)
    if isinstance(module, nn.GroupNorm):
        # GroupNorm is n(x)·W + b: the difference is n(x)·ΔW + Δb (ldm's GroupNorm32 normalises in float32).
        cd = _compute_dtype(x.dtype)
        return F.group_norm(x.to(cd), module.num_groups, dw.to(cd), None if db is None else db.to(cd), module.eps)
    if isinstance(module, nn.LayerNorm):
        cd = _compute_dtype(x.dtype)
        return F.layer_norm(
            x.to(cd), module.normalized_shape, dw.to(cd), None if db is None else db.to(cd), module.eps
        )
    return F.linear(x, dw, db)


class ModuleDelta:
    """The delta one file holds for one module (or one q/k/v slice of an ``nn.MultiheadAttention``).

    ``kind`` is one of :data:`KIND_NAMES` (``"lora"``, ``"loha"``, ``"ia3"``, ``"lokr"``, ``"full"``, ``"norm"``,
    ``"glora"``, ``"oft"``); ``parts`` keeps the file's tensors under their part names (``lora_A``/``lora_B`` are
    renamed to ``lora_down``/``lora_up``); ``scale`` is the webui's ``calc_scale()``. IA3, GLoRA, OFT and DoRA deltas
    depend on the weight they are added to (``weight_dependent``). Device/dtype copies made during forwards are cached;
    :meth:`clear_cache` drops them.
    """

    def __init__(
        self, *, key: str, path: str, slice_name: str | None, kind: str, parts: dict[str, Tensor], network: str = ""
    ) -> None:
        self.key = key
        self.path = path
        self.slice = slice_name
        self.kind = kind
        self.network = network
        self.parts = parts
        self.dora_scale: Tensor | None = parts.get("dora_scale")
        self.bias_part: Tensor | None = parts.get("bias")
        self.alpha: float | None = self._scalar("alpha")
        scale = self._scalar("scale")
        self.rank: int | None = self._rank()
        if kind == "oft":
            self.scale = 1.0  # the webui's OFT sets scale = 1 (its alpha is the norm constraint, not a scale)
        elif scale is not None:
            self.scale = scale
        elif self.alpha is not None and self.rank is not None:
            self.scale = self.alpha / self.rank
        else:
            self.scale = 1.0
        self.on_input = False
        if kind == "ia3":
            on_input = parts.get("on_input")
            if on_input is None:
                raise self._bad("an IA3 module needs an on_input part (the webui cannot load it without one either)")
            self.on_input = bool(on_input.reshape(-1)[0].item())
        self.raw_shape: tuple[int, ...] | None = self._raw_shape()
        self._cache: dict[tuple, object] = {}

    def __repr__(self) -> str:
        where = f"{self.path}[{self.slice}]" if self.slice else self.path
        return f"ModuleDelta({self.kind}, {self.key!r} -> {where}, scale={self.scale:g})"

    @property
    def weight_dependent(self) -> bool:
        """True when ΔW depends on the weight it is added to (IA3, GLoRA, OFT, anything with DoRA)."""
        return self.kind in _WEIGHT_DEPENDENT or self.dora_scale is not None

    # --- construction helpers ---------------------------------------------------------------------------------------

    def _scalar(self, part: str) -> float | None:
        t = self.parts.get(part)
        if t is None:
            return None
        if t.numel() != 1:
            raise LoraError(f"{self.key}.{part}: expected a single number, got a tensor of shape {tuple(t.shape)}")
        return float(t.item())

    def _rank(self) -> int | None:
        p = self.parts
        if self.kind == "lora":
            return int(p["lora_down.weight"].shape[0])
        if self.kind == "loha":
            return int(p["hada_w1_b"].shape[0])
        if self.kind == "lokr":
            # As in the webui: w2_b's rows win over w1_b's; with two full factors there is no rank (alpha unused).
            if "lokr_w2_b" in p:
                return int(p["lokr_w2_b"].shape[0])
            if "lokr_w1_b" in p:
                return int(p["lokr_w1_b"].shape[0])
        # IA3, full, norm and GLoRA have no rank in the webui (dim None): their alpha is not used.
        return None

    def _bad(self, message: str, error: type[LoraError] = LoraError) -> LoraError:
        return error(f"{self.key} ({KIND_NAMES.get(self.kind, self.kind)}): {message}")

    def _misfit(self, message: str) -> LoraError:
        return self._bad(message, LoraMisfitError)

    def _raw_shape(self) -> tuple[int, ...] | None:
        """Shape of the unreshaped ΔW of weight-independent types, from the factor shapes only (cheap enough to
        validate a whole file); None for the weight-dependent types, whose ΔW has the weight's shape."""
        p = self.parts
        if self.kind == "lora":
            up, down, mid = p["lora_up.weight"], p["lora_down.weight"], p.get("lora_mid.weight")
            inner = mid.shape[0] if mid is not None else down.shape[0]
            if _prod(up.shape[1:]) != inner:
                raise self._bad(f"lora_up {tuple(up.shape)} does not match rank {inner}")
            if mid is not None:
                if mid.ndim != 4 or mid.shape[1] != down.shape[0]:
                    raise self._bad(f"lora_mid {tuple(mid.shape)} does not match lora_down {tuple(down.shape)}")
                return (up.shape[0], _prod(down.shape[1:]), *mid.shape[2:])
            return (up.shape[0], *down.shape[1:])
        if self.kind == "loha":
            first = self._hada_shape("1")
            second = self._hada_shape("2")
            if _prod(first) != _prod(second):
                raise self._bad(f"hada_w1 product {first} and hada_w2 product {second} differ in size")
            return first
        if self.kind == "lokr":
            w1, w2 = self._lokr_shape("1"), self._lokr_shape("2")
            if len(w2) == 4:
                return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
            return (w1[0] * w2[0], w1[1] * _prod(w2[1:]))
        if self.kind == "full":
            return tuple(p["diff"].shape)
        if self.kind == "norm":
            return tuple(p["w_norm"].shape)
        if self.kind == "oft":
            blocks = p.get("oft_blocks", p.get("oft_diag"))
            assert blocks is not None
            if blocks.ndim not in (3, 4) or blocks.shape[-1] != blocks.shape[-2]:
                raise self._bad(f"OFT blocks must be (blocks, size, size) or BOFT (m, blocks, size, size); got "
                                f"{tuple(blocks.shape)}")
            if "oft_diag" in p and blocks.ndim == 4:
                raise self._bad("a 4-D oft_diag (BOFT in the old LyCORIS layout) is not readable by the webui either")
        return None

    def _hada_shape(self, i: str) -> tuple[int, ...]:
        a, b, t = self.parts[f"hada_w{i}_a"], self.parts[f"hada_w{i}_b"], self.parts.get(f"hada_t{i}")
        if t is not None:
            return (a.shape[1], b.shape[1], *t.shape[2:])
        if a.shape[1] != b.shape[0]:
            raise self._bad(f"hada_w{i}_a {tuple(a.shape)} and hada_w{i}_b {tuple(b.shape)} cannot be multiplied")
        return (a.shape[0], _prod(b.shape[1:]))

    def _lokr_shape(self, i: str) -> tuple[int, ...]:
        full = self.parts.get(f"lokr_w{i}")
        if full is not None:
            return tuple(full.shape)
        a, b, t = self.parts[f"lokr_w{i}_a"], self.parts[f"lokr_w{i}_b"], self.parts.get(f"lokr_t{i}")
        if t is not None:
            return (a.shape[1], b.shape[1], *t.shape[2:])
        return (a.shape[0], b.shape[1])

    # --- targets ----------------------------------------------------------------------------------------------------

    def target_weight(self, module: nn.Module) -> Tensor:
        """The weight this delta changes: ``module.weight``, or the q/k/v block of an MHA's ``in_proj_weight``.

        Raises :class:`LoraError` for modules the webui's Lora extension does not patch (it applies networks to
        Linear, Conv2d, GroupNorm, LayerNorm and MultiheadAttention only)."""
        if self.slice is not None:
            if not isinstance(module, nn.MultiheadAttention) or module.in_proj_weight is None:
                raise self._bad(
                    f"a {self.slice}_proj slice needs an nn.MultiheadAttention with in_proj_weight at "
                    f"{self.path}, found {type(module).__name__}"
                )
            d = module.embed_dim
            i = SLICES.index(self.slice)
            return module.in_proj_weight[i * d : (i + 1) * d]
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise self._bad(f"grouped convolution at {self.path} is not supported")
        if isinstance(module, _NORMS):
            if module.weight is None:
                raise self._bad(f"{type(module).__name__} {self.path} has no learnable weight to change")
            return module.weight
        if not isinstance(module, _linear_or_conv()):
            raise self._bad(
                f"module {self.path} is a {type(module).__name__}; the webui applies networks to Linear, Conv2d, "
                "GroupNorm, LayerNorm and MultiheadAttention q/k/v slices only"
            )
        # The webui's fp8 storage with "cache fp16 weight for LoRA": its LoRA code reads the fp16 copy, not q(W)
        fp16_weight = getattr(module, "fp16_weight", None)
        return module.weight if fp16_weight is None else fp16_weight.to(module.weight.device)

    def webui_skips(self, module: nn.Module) -> str | None:
        """Why the webui fails to apply this delta to ``module`` and skips the layer (a ``RuntimeError`` it logs at
        debug level), or None when it applies it. DS skips those layers too, and reports them."""
        weight = self.target_weight(module)
        if self.kind in ("ia3", "glora") and weight.ndim != 2:
            return f"the webui cannot apply a {KIND_NAMES[self.kind]} module to a {weight.ndim}-D weight (it skips it)"
        if self.weight_dependent and weight.ndim == 4 and weight.shape[1] == 9:
            return "the webui cannot apply a weight-dependent module to a 9-channel inpainting input (it skips it)"
        return None

    def check(self, module: nn.Module) -> None:
        """Raise :class:`LoraError` naming the key and both shapes if this delta cannot apply to ``module``."""
        weight = self.target_weight(module)
        self._fit_shape(tuple(weight.shape))
        bias_name = _BIAS_PART.get(self.kind)
        ex_bias = self.parts.get(bias_name) if bias_name else None
        if ex_bias is not None and ex_bias.numel() != weight.shape[0]:
            raise self._misfit(
                f"{bias_name} of shape {tuple(ex_bias.shape)} does not fit {self.path} with {weight.shape[0]} outputs"
            )

    def _fit_shape(self, shape: tuple[int, ...]) -> str:
        """How ΔW fits a weight of ``shape``: ``"reshape"``, or ``"pad"`` for a 4-channel delta on a 9-channel inpaint
        conv (the webui zero-pads those); raises on a mismatch."""
        where = f"{self.path} ({self.slice} slice)" if self.slice else self.path
        if self.raw_shape is None:
            self._fit_weight_dependent(shape, where)
            how = "reshape"
        else:
            raw = self.raw_shape
            if _prod(raw) == _prod(shape) and raw[0] == shape[0]:
                how = "reshape"
            elif len(shape) == 4 and shape[1] == 9 and _prod(raw) * 9 == _prod(shape) * 4 and raw[0] == shape[0]:
                how = "pad"
            else:
                raise self._misfit(f"delta of shape {raw} does not fit the weight of {where}, shape {shape}")
        raw_numel = _prod(shape if how == "reshape" or self.raw_shape is None else self.raw_shape)
        if self.bias_part is not None and self.bias_part.numel() != raw_numel:
            raise self._misfit(f"bias part of shape {tuple(self.bias_part.shape)} does not fit the weight of {where}")
        return how

    def _fit_weight_dependent(self, shape: tuple[int, ...], where: str) -> None:
        p = self.parts
        misfit = self._misfit
        if self.kind == "ia3":
            w = p["weight"]
            n = shape[1] if self.on_input else shape[0]
            if len(shape) < 2 or w.numel() != n:
                side = "inputs" if self.on_input else "outputs"
                raise misfit(f"IA3 weight of shape {tuple(w.shape)} does not fit the {side} of {where}, shape {shape}")
        elif self.kind == "glora":
            a1, a2, b1, b2 = (p[f"{n}.weight"] for n in ("a1", "a2", "b1", "b2"))
            if len(shape) == 2:
                ok = (a2.ndim == a1.ndim == b1.ndim == b2.ndim == 2 and a2.shape[0] == shape[1]
                      and a2.shape[1] == a1.shape[0] and a1.shape[1] == shape[1]
                      and b2.shape[0] == shape[0] and b2.shape[1] == b1.shape[0] and b1.shape[1] == shape[1])
                if not ok:
                    raise misfit(f"GLoRA factors a1 {tuple(a1.shape)}, a2 {tuple(a2.shape)}, b1 {tuple(b1.shape)}, "
                                 f"b2 {tuple(b2.shape)} do not fit the weight of {where}, shape {shape}")
        elif self.kind == "oft":
            blocks = p.get("oft_blocks", p.get("oft_diag"))
            assert blocks is not None
            out_dim = shape[0]
            if blocks.ndim == 4:
                m, n, b = blocks.shape[0], blocks.shape[1], blocks.shape[2]
                ok = n * b == out_dim and b % 2 == 0 and all(out_dim % (b * 2**i) == 0 for i in range(m))
            else:  # (blocks, size, size), both layouts: the blocks tile the outputs
                ok = blocks.shape[0] * blocks.shape[1] == out_dim
            if not ok:
                raise misfit(f"OFT blocks of shape {tuple(blocks.shape)} do not fit the weight of {where}, shape "
                             f"{shape}")
            rescale = p.get("rescale")
            if rescale is not None and rescale.numel() != out_dim:
                raise misfit(f"OFT rescale of shape {tuple(rescale.shape)} does not fit {out_dim} outputs of {where}")

    # --- full-size delta --------------------------------------------------------------------------------------------

    def _raw(self, weight: Tensor) -> Tensor:
        """The webui's ``updown`` before ``finalize_updown``, in ``weight``'s dtype and device."""
        device, dtype = weight.device, weight.dtype
        p = {k: v.to(device=device, dtype=dtype) for k, v in self.parts.items() if k not in _COMMON_PARTS}
        if self.kind == "lora":
            up, down, mid = _as_2d(p["lora_up.weight"]), _as_2d(p["lora_down.weight"]), p.get("lora_mid.weight")
            if mid is not None:
                return torch.einsum("n m k l, i n, m j -> i j k l", mid, up, down)
            return up @ down
        if self.kind == "loha":
            assert self.raw_shape is not None
            return self._hada(p, "1").reshape(self.raw_shape) * self._hada(p, "2").reshape(self.raw_shape)
        if self.kind == "lokr":
            w1, w2 = self._lokr(p, "1"), self._lokr(p, "2")
            if w2.ndim == 4:
                w1 = w1[:, :, None, None]
            return torch.kron(w1, w2.contiguous())
        if self.kind == "full":
            return p["diff"]
        if self.kind == "norm":
            return p["w_norm"]
        if self.kind == "ia3":
            w = p["weight"].reshape(-1)
            return weight * (w if self.on_input else w.reshape(-1, 1))
        if self.kind == "glora":
            return p["b2.weight"] @ p["b1.weight"] + (weight @ p["a2.weight"]) @ p["a1.weight"]
        return self._oft_merged(weight, p) - weight

    def _oft_merged(self, weight: Tensor, p: dict[str, Tensor]) -> Tensor:
        """The webui's ``NetworkModuleOFT``: rotate the weight's output rows blockwise (OFT) or by butterfly
        factors (BOFT), then rescale. kohya / new LyCORIS ``oft_blocks`` hold a skew part Q (R = (I + Q)(I - Q)^-1,
        its norm clamped to ``alpha * out_dim`` when alpha is set); old LyCORIS ``oft_diag`` holds R itself."""
        out_dim = weight.shape[0]
        if "oft_blocks" in p:
            blocks = p["oft_blocks"]
            q = blocks - blocks.transpose(-1, -2)
            constraint = (self.alpha or 0.0) * out_dim
            if constraint != 0:
                norm_q = torch.norm(q.flatten())
                q = q * ((torch.clamp(norm_q, max=constraint) + 1e-8) / (norm_q + 1e-8))
            eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
            r = torch.matmul(eye + q, torch.linalg.inv(eye - q))
        else:
            r = p["oft_diag"]
        rest = weight.shape[1:]
        if r.ndim == 3:
            blocks_n, size = (r.shape[0], r.shape[1])
            merged = torch.einsum("k n m, k n ... -> k m ...", r, weight.reshape(blocks_n, size, *rest))
            merged = merged.reshape(weight.shape)
        else:
            size = r.shape[2]
            merged = weight
            for i in range(r.shape[0]):
                inner = 2**i * (size // 2)
                merged = _regroup(merged, 2, inner)
                merged = torch.einsum("b i j, b j ... -> b i ...", r[i], merged.reshape(-1, size, *rest))
                merged = _regroup(merged.reshape(weight.shape), inner, 2)
        rescale = p.get("rescale")
        if rescale is not None:
            merged = rescale.reshape(-1, *[1] * (weight.ndim - 1)) * merged
        return merged

    @staticmethod
    def _hada(p: dict[str, Tensor], i: str) -> Tensor:
        a, b, t = p[f"hada_w{i}_a"], p[f"hada_w{i}_b"], p.get(f"hada_t{i}")
        return _cp(t, a, b) if t is not None else a @ _as_2d(b)

    @staticmethod
    def _lokr(p: dict[str, Tensor], i: str) -> Tensor:
        if f"lokr_w{i}" in p:
            return p[f"lokr_w{i}"]
        a, b, t = p[f"lokr_w{i}_a"], p[f"lokr_w{i}_b"], p.get(f"lokr_t{i}")
        return _cp(t, a, b) if t is not None else a @ b

    def delta_weight(self, weight: Tensor, multiplier: float = 1.0) -> Tensor:
        """Full-size ``ΔW`` for ``weight`` (the module weight or MHA slice it targets, as it is now), scaled by
        ``scale`` and ``multiplier``, in ``weight``'s dtype and device: the webui's ``calc_updown`` and
        ``finalize_updown``. IA3, GLoRA, OFT and DoRA need the real weight: their delta depends on it."""
        shape = tuple(weight.shape)
        how = self._fit_shape(shape)
        dtype = _compute_dtype(weight.dtype)
        current = weight.detach().to(dtype)
        raw = self._raw(current)
        if self.bias_part is not None:
            # finalize_updown's "bias": an additive term on the unscaled updown (LyCORIS' weight bias).
            raw = raw.reshape(self.bias_part.shape) + self.bias_part.to(device=raw.device, dtype=dtype)
        if how == "reshape":
            delta = raw.reshape(shape)
        else:
            delta = F.pad(raw.reshape(shape[0], 4, *shape[2:]), (0, 0, 0, 0, 0, 5))
        delta = delta * self.scale
        if self.dora_scale is not None:
            delta = self._dora(delta, current)
        return (delta * multiplier).to(weight.dtype)
    def _dora(self, delta: Tensor, weight: Tensor) -> Tensor:
        # The webui's apply_weight_decompose: renormalise W + ΔW per input column to dora_scale, return the difference.
        merged = weight + delta
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (weight.ndim - 1)).transpose(0, 1)
        assert self.dora_scale is not None
        result = merged * (self.dora_scale.to(weight) / norm) - weight
        if result.shape != weight.shape:
            raise self._misfit(f"dora_scale of shape {tuple(self.dora_scale.shape)} does not fit weight {weight.shape}")
        return result

    def delta_bias(self, weight: Tensor, multiplier: float = 1.0) -> Tensor | None:
        """Bias delta (full diff ``diff_b``, norm ``b_norm``; times ``multiplier`` only, as in the webui) in
        ``weight``'s dtype/device; None for types that have none."""
        name = _BIAS_PART.get(self.kind)
        ex_bias = self.parts.get(name) if name else None
        if ex_bias is None:
            return None
        return (ex_bias.to(device=weight.device, dtype=_compute_dtype(weight.dtype)).reshape(-1) * multiplier).to(
            weight.dtype
        )

    # --- functional forward -----------------------------------------------------------------------------------------

    def forward_delta(self, module: nn.Module, x: Tensor, multiplier: float = 1.0) -> Tensor:
        """``Δy`` to add to ``module(x)``: ``x ΔWᵀ (+ Δb)`` for Linear, the matching convolution for Conv2d,
        ``n(x)·ΔW + Δb`` for GroupNorm/LayerNorm (``n`` the plain normalisation).

        Plain LoRA/LoCon runs low-rank (``up(mid(down(x)))``, no ``ΔW`` built); other types build ``ΔW`` once per
        device/dtype/multiplier (from the module's weight as it is then) and cache it.
        """
        if isinstance(module, nn.MultiheadAttention) or self.slice is not None:
            raise self._bad(
                f"{self.path} is an nn.MultiheadAttention: its delta is not additive on the output; merge it instead"
            )
        if (
            self.kind == "lora"
            and self.dora_scale is None
            and self.bias_part is None
            and isinstance(module, _linear_or_conv())
        ):
            return self._lora_forward(module, x, multiplier)
        ckey = ("dense", x.device, x.dtype, multiplier)
        cached = self._cache.get(ckey)
        if cached is None:
            cached = dense_delta(module, [(self, multiplier)], x.device, x.dtype)
            self._cache[ckey] = cached
        dw, db = cached  # type: ignore[misc]
        return _module_delta_output(module, x, dw, db)

    def _lora_factors(self, conv: bool, device: torch.device, dtype: torch.dtype, multiplier: float) -> tuple:
        ckey = ("lora", conv, device, dtype, multiplier)
        cached = self._cache.get(ckey)
        if cached is None:
            cd = _compute_dtype(dtype)
            up = self.parts["lora_up.weight"].to(device=device, dtype=cd) * (self.scale * multiplier)
            down = self.parts["lora_down.weight"].to(device=device, dtype=cd)
            mid = self.parts.get("lora_mid.weight")
            if conv:
                down = down if down.ndim == 4 else _as_1x1(down)
                cached = (_as_1x1(up).to(dtype), down.to(dtype), None if mid is None else mid.to(device, dtype))
            else:
                cached = (_as_2d(up).to(dtype), _as_2d(down).to(dtype), None)
            self._cache[ckey] = cached
        return cached

    def _lora_forward(self, module: nn.Module, x: Tensor, multiplier: float) -> Tensor:
        conv = isinstance(module, nn.Conv2d)
        up, down, mid = self._lora_factors(conv, x.device, x.dtype, multiplier)
        if not conv:
            return F.linear(F.linear(x, down), up)
        if down.shape[1] != x.shape[1]:
            # 4-channel LoRA on a 9-channel inpaint conv: the webui zero-pads ΔW, i.e. reads channels 0..3 only.
            x = x[:, : down.shape[1]]
        # CP form: 1x1 down, the module's kxk geometry in mid, 1x1 up; else down carries the module's geometry.
        h = _conv(module, x, down) if mid is None else _conv(module, F.conv2d(x, down), mid)
        return F.conv2d(h, up)

    def clear_cache(self) -> None:
        """Drop the device/dtype copies made by :meth:`forward_delta`."""
        self._cache.clear()


def dense_delta(
    module: nn.Module, deltas: Sequence[tuple[ModuleDelta, float]], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """``(ΔW, Δb)`` of several deltas on one (non-MHA) module, applied one after another as the webui does: each
    delta's ``calc_updown`` sees the weight with the earlier ones already added (this matters for IA3, GLoRA, OFT and
    DoRA). Built from the module's current weight, in at least fp32, returned in ``dtype`` on ``device``."""
    weight = deltas[0][0].target_weight(module)
    original = weight.detach().to(device=device, dtype=_compute_dtype(weight.dtype))
    current = original
    steps: list[Tensor] = []
    bias_total: Tensor | None = None
    for delta, multiplier in deltas:
        steps.append(delta.delta_weight(current, multiplier))
        current = current + steps[-1]
        db = delta.delta_bias(current, multiplier)
        if db is not None:
            bias_total = db if bias_total is None else bias_total + db
    # one delta: its ΔW as it is; several: the difference they made together (not the sum of their steps' roundings)
    dw = steps[0] if len(steps) == 1 else current - original
    return dw.to(dtype), None if bias_total is None else bias_total.to(dtype)


@dataclass
class LoraNetwork:
    """One parsed LoRA/LyCORIS file.

    ``modules`` maps a dotted module path to its deltas (an MHA can hold q, k and v slices); ``matched_keys`` counts the
    state-dict keys that ended up in a delta; ``unmatched_keys`` lists keys whose module name matched nothing in the
    model; ``skipped_keys`` maps keys that matched a module but are not applied to the reason.
    """

    name: str
    family: str
    modules: dict[str, list[ModuleDelta]] = field(default_factory=dict)
    matched_keys: int = 0
    unmatched_keys: list[str] = field(default_factory=list)
    skipped_keys: dict[str, str] = field(default_factory=dict)

    @property
    def total_keys(self) -> int:
        """All keys of the file."""
        return self.matched_keys + len(self.unmatched_keys) + len(self.skipped_keys)

    def deltas(self) -> Iterator[ModuleDelta]:
        """Every :class:`ModuleDelta` of the file."""
        for items in self.modules.values():
            yield from items

    @property
    def not_applied(self) -> list[str]:
        """Keys of the file that change nothing: no matching layer, or skipped (see ``skipped_keys``), in file order
        of the two lists."""
        return [*self.unmatched_keys, *self.skipped_keys]

    def kinds(self) -> dict[str, int]:
        """Module type name -> number of modules of that type, e.g. ``{"LoRA": 120, "norm": 12}``."""
        out: dict[str, int] = {}
        for delta in self.deltas():
            name = KIND_NAMES[delta.kind]
            out[name] = out.get(name, 0) + 1
        return out

    def skipped_text(self, first: int = 3) -> str:
        """``"<count> (<first names>, ...)"`` for the infotext and the status line; ``""`` when every key applies."""
        keys = self.not_applied
        if not keys:
            return ""
        names = ", ".join(keys[:first]) + (", ..." if len(keys) > first else "")
        return f"{len(keys)} ({names})"

    def summary(self) -> str:
        """One line for logs and the UI, e.g. ``"style: 264 of 264 keys applied (132 modules: LoRA 132)"``, then
        the keys that are not applied, with their count and the first few names."""
        kinds = ", ".join(f"{name} {count}" for name, count in self.kinds().items())
        text = (f"{self.name}: {self.matched_keys} of {self.total_keys} keys applied ({len(self.modules)} modules"
                f"{': ' + kinds if kinds else ''})")
        if self.not_applied:
            text += f"; not applied: {self.skipped_text()}"
            if self.skipped_keys:
                reasons = sorted(set(self.skipped_keys.values()))
                text += f"; why: {reasons[0]}" + (f" (and {len(reasons) - 1} more reasons)" if len(reasons) > 1 else "")
        return text

    def clear_cache(self) -> None:
        """Drop cached device copies of all deltas."""
        for delta in self.deltas():
            delta.clear_cache()


def _check_tensor(key: str, value: object, network: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise LoraError(f"{network}: key {key} holds a {type(value).__name__}, not a tensor")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise LoraError(f"{network}: key {key} contains non-finite values (NaN or infinity); the file is damaged")
    return value


def parse_network(
    state_dict: Mapping[str, Tensor],
    family: str,
    *,
    name: str = "network",
    model: nn.Module | None = None,
    module_names: Iterable[str] | None = None,
) -> LoraNetwork:
    """Group a loaded LoRA/LyCORIS state dict into per-module deltas for a ``family`` model.

    Module names come from ``model`` (recommended: the deltas are then also checked against the real modules and a
    misfit raises :class:`LoraError` naming the key and both shapes), else from ``module_names``, else from the
    family's standard layout. Keys that match no module go to ``unmatched_keys``; keys the webui's Lora extension
    would not apply either go to ``skipped_keys`` with the reason: bundled embeddings, parts a module type does not
    read, modules it does not patch, layers where its own apply fails (IA3/GLoRA on convolutions), and
    MultiheadAttention q/k/v/out sets it only applies whole. A group of parts that no module type accepts raises
    :class:`LoraError` (the webui refuses such a file too), as do non-finite tensors.
    """
    family = check_family(family)
    named: dict[str, nn.Module] | None = None
    if model is not None:
        named = dict(model.named_modules())
        index = ModuleNameIndex(named, family)
    elif module_names is not None:
        index = ModuleNameIndex(module_names, family)
    else:
        index = None
    net = LoraNetwork(name=name, family=family)
    groups: dict[str, tuple[tuple[str, str | None], dict[str, Tensor], list[str]]] = {}
    resolved: dict[str, tuple[str, str | None] | None] = {}
    for key, value in state_dict.items():
        tensor = _check_tensor(key, value, name)
        module_key, _, part = key.partition(".")
        if module_key == "bundle_emb":
            net.skipped_keys[key] = "bundled textual-inversion embedding (not applied to the source models)"
            continue
        if module_key not in resolved:
            resolved[module_key] = kohya_to_module(module_key, family, index) if part else None
        target = resolved[module_key]
        if target is None:
            net.unmatched_keys.append(key)
            continue
        group = groups.setdefault(module_key, (target, {}, []))
        group[1][part] = tensor
        group[2].append(key)

    accepted: list[tuple[ModuleDelta, list[str]]] = []
    for module_key, ((path, slice_name), parts, keys) in groups.items():
        kind = _detect_kind(parts)
        if kind is None:
            raise LoraError(
                f"{name}: module {module_key} has the parts {', '.join(sorted(parts))}, which no module type accepts "
                f"({', '.join(KIND_NAMES.values())}){_near_miss(parts)}; the webui cannot load this file either"
            )
        if "lora_A.weight" in parts:
            parts["lora_down.weight"] = parts.pop("lora_A.weight")
            parts["lora_up.weight"] = parts.pop("lora_B.weight")
        used = _KIND_PARTS[kind] | _COMMON_PARTS
        for part in [p for p in parts if p not in used]:
            del parts[part]
            net.skipped_keys[f"{module_key}.{part}"] = f"part {part!r} is not read by a {KIND_NAMES[kind]} module"
        delta = ModuleDelta(key=module_key, path=path, slice_name=slice_name, kind=kind, parts=parts, network=name)
        if named is not None:
            module = named[path]
            try:
                reason = delta.webui_skips(module)
            except LoraError as exc:
                reason = str(exc)
            if reason is not None:
                for key in keys:
                    net.skipped_keys.setdefault(key, reason)
                continue
            delta.check(module)
        accepted.append((delta, [key for key in keys if key not in net.skipped_keys]))

    whole_mha = _whole_attention_sets(accepted, named)
    for delta, keys in accepted:
        if named is not None and not whole_mha(delta):
            for key in keys:
                net.skipped_keys.setdefault(
                    key, "the webui applies a MultiheadAttention's q/k/v/out_proj deltas only when all four are there"
                )
            continue
        net.modules.setdefault(delta.path, []).append(delta)
        net.matched_keys += len(keys)
    return net


def _whole_attention_sets(
    accepted: list[tuple[ModuleDelta, list[str]]], named: Mapping[str, nn.Module] | None
) -> Callable[[ModuleDelta], bool]:
    """A predicate: False for deltas of an incomplete MultiheadAttention set (the webui applies q, k, v and out_proj
    of an nn.MultiheadAttention together or not at all: the out_proj Linear is never called on its own)."""
    if named is None:
        return lambda delta: True
    slices: dict[str, set[str]] = {}
    plain: set[str] = set()
    for delta, _ in accepted:
        if delta.slice is not None:
            slices.setdefault(delta.path, set()).add(delta.slice)
        else:
            plain.add(delta.path)
    attention = {path for path, module in named.items() if isinstance(module, nn.MultiheadAttention)}
    complete = {path for path in attention if slices.get(path) == set(SLICES) and f"{path}.out_proj" in plain}

    def whole(delta: ModuleDelta) -> bool:
        if delta.slice is not None:
            return delta.path in complete
        owner, _, last = delta.path.rpartition(".")
        if last == "out_proj" and owner in attention:
            return owner in complete
        return True

    return whole


# --- application ---------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_multiplier(multiplier: float) -> float:
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not math.isfinite(multiplier):
        raise LoraError(f"LoRA multiplier must be a finite number; got {multiplier!r}")
    return float(multiplier)


def _targets(
    model: nn.Module, networks: NetworksWithWeights, root: str
) -> dict[str, tuple[nn.Module, list[tuple[ModuleDelta, float]]]]:
    """Group the deltas of all networks by module, resolving paths relative to ``root`` (``model``'s own path)."""
    prefix = f"{root}." if root else ""
    out: dict[str, tuple[nn.Module, list[tuple[ModuleDelta, float]]]] = {}
    for net, raw_multiplier in networks:
        if not isinstance(net, LoraNetwork):
            raise LoraError(f"expected (LoraNetwork, multiplier) pairs, got a {type(net).__name__}")
        multiplier = _check_multiplier(raw_multiplier)
        if multiplier == 0:
            continue
        for path, deltas in net.modules.items():
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix) :]
            if rel not in out:
                try:
                    module = model.get_submodule(rel)
                except AttributeError:
                    raise LoraError(f"{net.name}: module {path} is not in the model") from None
                out[rel] = (module, [])
            for delta in deltas:
                delta.check(out[rel][0])
                out[rel][1].append((delta, multiplier))
    return out


class MergedLora:
    """Networks merged into a model's weights in place; :meth:`restore` (or leaving the ``with`` block) puts back the
    saved originals bit for bit. Meant for the text encoders, which run once per generation."""

    def __init__(
        self,
        model: nn.Module,
        networks: NetworksWithWeights,
        *,
        root: str = "",
        backup_device: torch.device | str | None = None,
    ) -> None:
        self._saved: list[tuple[nn.Module, str, Tensor | None]] = []
        self._restored = False
        targets = _targets(model, networks, root)
        self.num_modules = len(targets)
        try:
            with torch.no_grad():
                for module, deltas in targets.values():
                    self._merge_module(module, deltas, backup_device)
        except BaseException:
            self.restore()
            raise

    def _save(self, owner: nn.Module, name: str, backup_device: torch.device | str | None) -> Tensor | None:
        value = getattr(owner, name)
        if value is None:
            saved = None
        elif backup_device is None:
            saved = value.detach().clone()
        else:
            saved = value.detach().to(backup_device, copy=True)
        self._saved.append((owner, name, saved))
        return value

    def _merge_module(
        self, module: nn.Module, deltas: list[tuple[ModuleDelta, float]], backup_device: torch.device | str | None
    ) -> None:
        is_mha = isinstance(module, nn.MultiheadAttention)
        weight_name, bias_name = ("in_proj_weight", "in_proj_bias") if is_mha else ("weight", "bias")
        weight = self._save(module, weight_name, backup_device)
        assert weight is not None
        bias = self._save(module, bias_name, backup_device)
        merged = weight.detach().to(_compute_dtype(weight.dtype), copy=True)
        bias_delta: Tensor | None = None
        for delta, multiplier in deltas:
            if delta.slice is not None:
                d = module.embed_dim
                rows = slice(SLICES.index(delta.slice) * d, (SLICES.index(delta.slice) + 1) * d)
            else:
                rows = slice(None)
            merged[rows] += delta.delta_weight(merged[rows], multiplier)
            db = delta.delta_bias(merged, multiplier)
            if db is not None:
                if bias_delta is None:
                    bias_delta = torch.zeros(weight.shape[0], device=weight.device, dtype=merged.dtype)
                bias_delta[rows] += db
        weight.copy_(merged.to(weight.dtype))
        if bias_delta is not None:
            if bias is None:
                # Restored to None by restore(); the webui likewise creates a bias for a full diff with diff_b.
                setattr(module, bias_name, nn.Parameter(bias_delta.to(weight.dtype), requires_grad=False))
            else:
                bias.copy_((bias.to(bias_delta.dtype) + bias_delta).to(bias.dtype))

    def restore(self) -> None:
        """Put every saved weight and bias back exactly (idempotent)."""
        if self._restored:
            return
        with torch.no_grad():
            for owner, name, saved in reversed(self._saved):
                if saved is None:
                    setattr(owner, name, None)
                else:
                    getattr(owner, name).copy_(saved)
        self._saved.clear()
        self._restored = True

    def __enter__(self) -> MergedLora:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def merge(
    model: nn.Module,
    networks: NetworksWithWeights,
    *,
    root: str = "",
    backup_device: torch.device | str | None = None,
) -> MergedLora:
    """Add every ``(network, multiplier)``'s ``ΔW`` into ``model`` in place; returns the handle that restores it.

    ``root`` is ``model``'s dotted path inside the full model the networks were parsed for (``""`` when ``model`` is
    that model; e.g. ``"cond_stage_model"`` to merge only into the text encoder); deltas outside it are left out.
    Originals are kept on ``backup_device`` (default: their own device) and copied back by ``restore()``.
    """
    return MergedLora(model, networks, root=root, backup_device=backup_device)


class RuntimeLora:
    """Switchable LoRA on a model via forward hooks; the base weights stay untouched.

    Modes: ``"off"`` (base output; the hooks return at once), ``"all"`` (adapted for the whole batch), ``"rows_from"``
    (the delta only for batch rows ``split:`` of dim 0, so ``[base rows; adapted rows]`` runs as one batched forward).
    Targets must be Linear, Conv2d, GroupNorm or LayerNorm (ldm/sgm UNets put the batch on dim 0 for all of them; a
    norm layer's delta is ``n(x)·ΔW + Δb``, exact because it is affine in its weight); text-encoder attention
    (nn.MultiheadAttention) is refused, use :func:`merge` there. Given the full ``batch`` size, ``rows_from`` also
    handles modules that see the batch expanded image-major (e.g. the webui's Hypertile splits each image into tiles
    along dim 0): a module seeing ``n * batch`` rows gets the delta from row ``n * split`` on. ``remove()`` (or
    leaving the ``with`` block) takes the hooks off and leaves the model exactly as before.
    """

    MODES = ("off", "all", "rows_from")

    def __init__(self, model: nn.Module, networks: NetworksWithWeights, *, root: str = "") -> None:
        self._mode = "off"
        self._split = 0
        self._batch: int | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._deltas: list[ModuleDelta] = []
        self._caches: list[dict] = []
        targets = _targets(model, networks, root)
        for rel, (module, _) in targets.items():
            if not isinstance(module, (*_linear_or_conv(), *_NORMS)):
                raise LoraError(
                    f"runtime LoRA supports Linear, Conv2d, GroupNorm and LayerNorm modules only; "
                    f"{root + '.' if root else ''}{rel} is a {type(module).__name__} (merge text encoders instead)"
                )
        for module, deltas in targets.values():
            self._handles.append(module.register_forward_hook(self._make_hook(deltas)))
            self._deltas.extend(d for d, _ in deltas)

    def _make_hook(
        self, deltas: list[tuple[ModuleDelta, float]]
    ) -> Callable[[nn.Module, tuple, Tensor], Tensor | None]:
        # Several deltas on one module where one depends on the weight: the webui adds them one after another, each
        # seeing the weight with the earlier ones in, so their sum is built once as one dense ΔW (cached per
        # device/dtype, dropped by remove()).
        combined = len(deltas) > 1 and any(delta.weight_dependent for delta, _ in deltas)
        cache: dict[tuple, tuple[Tensor, Tensor | None]] = {}
        self._caches.append(cache)

        def delta_output(module: nn.Module, x: Tensor) -> Tensor:
            if combined:
                ckey = (x.device, x.dtype)
                if ckey not in cache:
                    cache[ckey] = dense_delta(module, deltas, x.device, x.dtype)
                return _module_delta_output(module, x, *cache[ckey])
            total = deltas[0][0].forward_delta(module, x, deltas[0][1])
            for delta, multiplier in deltas[1:]:
                total = total + delta.forward_delta(module, x, multiplier)
            return total

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            mode = self._mode
            if mode == "off":
                return None
            x = args[0]
            if mode == "all":
                return output + delta_output(module, x).to(output.dtype)
            split, batch, rows_seen = self._split, self._batch, x.shape[0]
            if batch is not None and rows_seen != batch:
                if rows_seen % batch:
                    raise LoraError(
                        f"rows_from: a hooked module saw {rows_seen} rows, not a multiple of the batch {batch}"
                    )
                split *= rows_seen // batch
            if split >= rows_seen:
                return None
            total = delta_output(module, x[split:]).to(output.dtype)
            if torch.is_grad_enabled() and output.requires_grad:
                return torch.cat([output[:split], output[split:] + total])
            # The output is a fresh tensor of the module's own op: adding in place saves a full-size copy.
            output[split:] += total
            return output

        return hook

    @property
    def mode(self) -> str:
        """``"off"``, ``"all"`` or ``"rows_from"``."""
        return self._mode

    @property
    def split(self) -> int:
        """First adapted row in ``"rows_from"`` mode."""
        return self._split

    @property
    def num_modules(self) -> int:
        """Number of hooked modules (0 after :meth:`remove`)."""
        return len(self._handles)

    @property
    def batch(self) -> int | None:
        """Full batch size given to ``rows_from`` (None: rows are taken as they come)."""
        return self._batch

    def set_mode(self, mode: str, split: int | None = None, batch: int | None = None) -> None:
        """Switch to ``mode``. ``"rows_from"`` needs ``split`` (a non-negative int) and optionally ``batch``, the
        full batch size (positive int), to recognise image-major expanded batches."""
        if mode not in self.MODES:
            raise LoraError(f"unknown runtime LoRA mode {mode!r}; expected one of {', '.join(self.MODES)}")
        if mode == "rows_from":
            if not _is_int(split) or split < 0:
                raise LoraError(f"rows_from needs a non-negative integer split row; got {split!r}")
            if batch is not None and (not _is_int(batch) or batch < 1):
                raise LoraError(f"rows_from batch must be a positive integer or None; got {batch!r}")
            self._split, self._batch = split, batch
        elif split is not None or batch is not None:
            raise LoraError(f"split and batch are only meaningful for mode 'rows_from', not {mode!r}")
        self._mode = mode

    def set_off(self) -> None:
        """Base output for every row."""
        self.set_mode("off")

    def set_all(self) -> None:
        """Adapted output for every row."""
        self.set_mode("all")

    def set_rows_from(self, split: int, batch: int | None = None) -> None:
        """Base output for rows ``:split``, adapted for rows ``split:`` (batch dim 0); ``batch``: see the class doc."""
        self.set_mode("rows_from", split, batch)

    @contextlib.contextmanager
    def scoped(self, mode: str, split: int | None = None, batch: int | None = None) -> Iterator[RuntimeLora]:
        """Use ``mode`` inside the ``with`` block, then return to the previous mode."""
        previous = (self._mode, self._split, self._batch)
        self.set_mode(mode, split, batch)
        try:
            yield self
        finally:
            self._mode, self._split, self._batch = previous

    def remove(self) -> None:
        """Take all hooks off and drop cached device copies (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear_device_copies()
        self._deltas.clear()
        self._caches.clear()
        self._mode = "off"

    def clear_device_copies(self) -> None:
        """Drop the factor and delta copies made for the devices the forwards ran on, hooks kept: after the model
        moves (``--medvram``/``--lowvram`` visits), copies on the device it left would otherwise stay there."""
        for delta in self._deltas:
            delta.clear_cache()
        for cache in self._caches:
            cache.clear()

    def __enter__(self) -> RuntimeLora:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
