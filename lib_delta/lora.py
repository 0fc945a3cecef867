"""LoRA / LyCORIS deltas for the source pair: parse a loaded state dict, then merge it or switch it at runtime.

Host-free (torch + stdlib). The maths reproduces the A1111 WebUI Lora extension (v1.10.1: ``network_lora.py``,
``network_hada.py``, ``network_lokr.py``, ``network_full.py``, ``lyco_helpers.py``) without using it: the webui's
machinery is bound to the user's model and to global state, while the source pair needs its own copy.

* :func:`parse_network` groups the keys of one file per target module and picks the module type (LoRA/LoCon incl. the
  CP ``lora_mid`` form, LoHa, LoKr, full diff; optional DoRA ``dora_scale``).
* :class:`ModuleDelta` computes the full-size ``ΔW`` (``delta_weight``) or adds the delta inside a forward
  (``forward_delta``; plain LoRA stays low-rank there).
* :func:`merge` adds ``ΔW`` in place and restores the saved originals exactly (text encoders, MHA in_proj slices).
* :class:`RuntimeLora` hooks the target modules so base and adapted legs share one set of weights; with
  ``set_rows_from(k)`` only batch rows ``k:`` get the delta, so both legs run in one batched UNet forward.

Scale: ``scale`` key if present, else ``alpha / rank`` if both exist, else 1 — rank being the LoRA ``lora_down`` rows,
LoHa ``hada_w1_b`` rows, LoKr ``lokr_w1_b``/``lokr_w2_b`` rows (none for full LoKr factors or full diff, so alpha is
ignored there, as in the webui) — times the caller's multiplier.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lora_keys import FAMILIES, SLICES, LoraError, ModuleNameIndex, check_family, kohya_to_module

__all__ = [
    "FAMILIES",
    "LoraError",
    "LoraNetwork",
    "MergedLora",
    "ModuleDelta",
    "RuntimeLora",
    "merge",
    "parse_network",
]

NetworksWithWeights = Sequence[tuple["LoraNetwork", float]]

_KIND_PARTS: dict[str, frozenset[str]] = {
    "lora": frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight"}),
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    "lokr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "full": frozenset({"diff", "diff_b"}),
}
_COMMON_PARTS = frozenset({"alpha", "scale", "dora_scale"})


def _detect_kind(parts: Mapping[str, Tensor]) -> str:
    """Module type for one group of parts, tried in the webui's ``module_types`` order."""
    if "lora_up.weight" in parts and "lora_down.weight" in parts:
        return "lora"
    if "lora_A.weight" in parts and "lora_B.weight" in parts:
        return "lora"
    if all(p in parts for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        return "loha"
    if "weight" in parts:
        return "IA3"
    has_1 = "lokr_w1" in parts or ("lokr_w1_a" in parts and "lokr_w1_b" in parts)
    has_2 = "lokr_w2" in parts or ("lokr_w2_a" in parts and "lokr_w2_b" in parts)
    if has_1 and has_2:
        return "lokr"
    if "diff" in parts:
        return "full"
    if "w_norm" in parts or "b_norm" in parts:
        return "norm"
    if all(p in parts for p in ("a1.weight", "a2.weight", "b1.weight", "b2.weight")):
        return "GLoRA"
    if "oft_blocks" in parts or "oft_diag" in parts:
        return "OFT"
    return "unknown"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Deltas are built in at least fp32: an fp16 product of factors loses more than the final rounding does.
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


class ModuleDelta:
    """The delta one file holds for one module (or one q/k/v slice of an ``nn.MultiheadAttention``).

    ``kind`` is ``"lora"``, ``"loha"``, ``"lokr"`` or ``"full"``; ``parts`` keeps the file's tensors under their part
    names (``lora_A``/``lora_B`` are renamed to ``lora_down``/``lora_up``); ``scale`` is the webui's ``calc_scale()``.
    Device/dtype copies made during forwards are cached; :meth:`clear_cache` drops them.
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
        self.alpha: float | None = self._scalar("alpha")
        scale = self._scalar("scale")
        self.rank: int | None = self._rank()
        if scale is not None:
            self.scale = scale
        elif self.alpha is not None and self.rank is not None:
            self.scale = self.alpha / self.rank
        else:
            self.scale = 1.0
        self.raw_shape: tuple[int, ...] = self._raw_shape()
        self._cache: dict[tuple, object] = {}

    def __repr__(self) -> str:
        where = f"{self.path}[{self.slice}]" if self.slice else self.path
        return f"ModuleDelta({self.kind}, {self.key!r} -> {where}, scale={self.scale:g})"

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
        return None

    def _bad(self, message: str) -> LoraError:
        return LoraError(f"{self.key} ({self.kind}): {message}")

    def _raw_shape(self) -> tuple[int, ...]:
        """Shape of the unreshaped ΔW, from the factor shapes only (cheap enough to validate a whole file)."""
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
        return tuple(p["diff"].shape)

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
        """The weight this delta changes: ``module.weight``, or the q/k/v block of an MHA's ``in_proj_weight``."""
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
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise self._bad(
                f"module {self.path} is a {type(module).__name__}; only Linear, Conv2d and "
                "MultiheadAttention q/k/v slices are supported"
            )
        return module.weight

    def check(self, module: nn.Module) -> None:
        """Raise :class:`LoraError` naming the key and both shapes if this delta cannot apply to ``module``."""
        weight = self.target_weight(module)
        self._fit_shape(tuple(weight.shape))
        diff_b = self.parts.get("diff_b")
        if diff_b is not None and diff_b.numel() != weight.shape[0]:
            raise self._bad(
                f"diff_b of shape {tuple(diff_b.shape)} does not fit {self.path} with {weight.shape[0]} outputs"
            )

    def _fit_shape(self, shape: tuple[int, ...]) -> str:
        """How the raw ΔW fits ``shape``: ``"reshape"``, or ``"pad"`` for a 4-channel delta on a 9-channel inpaint
        conv (the webui zero-pads those); raises on a mismatch."""
        raw = self.raw_shape
        if _prod(raw) == _prod(shape) and raw[0] == shape[0]:
            return "reshape"
        if len(shape) == 4 and shape[1] == 9 and _prod(raw) * 9 == _prod(shape) * 4 and raw[0] == shape[0]:
            return "pad"
        where = f"{self.path} ({self.slice} slice)" if self.slice else self.path
        raise self._bad(f"delta of shape {raw} does not fit the weight of {where}, shape {shape}")

    # --- full-size delta --------------------------------------------------------------------------------------------

    def _raw(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        p = {k: v.to(device=device, dtype=dtype) for k, v in self.parts.items() if k not in _COMMON_PARTS}
        if self.kind == "lora":
            up, down, mid = _as_2d(p["lora_up.weight"]), _as_2d(p["lora_down.weight"]), p.get("lora_mid.weight")
            if mid is not None:
                return torch.einsum("n m k l, i n, m j -> i j k l", mid, up, down)
            return up @ down
        if self.kind == "loha":
            return self._hada(p, "1").reshape(self.raw_shape) * self._hada(p, "2").reshape(self.raw_shape)
        if self.kind == "lokr":
            w1, w2 = self._lokr(p, "1"), self._lokr(p, "2")
            if w2.ndim == 4:
                w1 = w1[:, :, None, None]
            return torch.kron(w1, w2.contiguous())
        return p["diff"]

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
        """Full-size ``ΔW`` for ``weight`` (the module weight or MHA slice it targets), scaled by ``scale`` and
        ``multiplier``, in ``weight``'s dtype and device. DoRA needs the real weight: its delta depends on it."""
        shape = tuple(weight.shape)
        how = self._fit_shape(shape)
        dtype = _compute_dtype(weight.dtype)
        raw = self._raw(weight.device, dtype)
        delta = (
            raw.reshape(shape) if how == "reshape" else F.pad(raw.reshape(shape[0], 4, *shape[2:]), (0, 0, 0, 0, 0, 5))
        )
        delta = delta * self.scale
        if self.dora_scale is not None:
            delta = self._dora(delta, weight.to(dtype))
        return (delta * multiplier).to(weight.dtype)

    def _dora(self, delta: Tensor, weight: Tensor) -> Tensor:
        # The webui's apply_weight_decompose: renormalise W + ΔW per input column to dora_scale, return the difference.
        merged = weight + delta
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (weight.ndim - 1)).transpose(0, 1)
        assert self.dora_scale is not None
        result = merged * (self.dora_scale.to(weight) / norm) - weight
        if result.shape != weight.shape:
            raise self._bad(f"dora_scale of shape {tuple(self.dora_scale.shape)} does not fit weight {weight.shape}")
        return result

    def delta_bias(self, weight: Tensor, multiplier: float = 1.0) -> Tensor | None:
        """Bias delta (full diff ``diff_b``, times ``multiplier`` only, as in the webui) in ``weight``'s dtype/device;
        None for types that have none."""
        diff_b = self.parts.get("diff_b")
        if diff_b is None:
            return None
        return (diff_b.to(device=weight.device, dtype=_compute_dtype(weight.dtype)).reshape(-1) * multiplier).to(
            weight.dtype
        )

    # --- functional forward -----------------------------------------------------------------------------------------

    def forward_delta(self, module: nn.Module, x: Tensor, multiplier: float = 1.0) -> Tensor:
        """``Δy`` to add to ``module(x)``: ``x ΔWᵀ (+ Δb)`` for Linear, the matching convolution for Conv2d.

        Plain LoRA/LoCon runs low-rank (``up(mid(down(x)))``, no ``ΔW`` built); other types build ``ΔW`` once per
        device/dtype/multiplier and cache it.
        """
        if isinstance(module, nn.MultiheadAttention) or self.slice is not None:
            raise self._bad(
                f"{self.path} is an nn.MultiheadAttention: its delta is not additive on the output; merge it instead"
            )
        weight = self.target_weight(module)
        if self.kind == "lora" and self.dora_scale is None:
            return self._lora_forward(module, x, multiplier)
        ckey = ("dense", x.device, x.dtype, multiplier)
        cached = self._cache.get(ckey)
        if cached is None:
            # Build in the weight's device and at least fp32, then store in the activation dtype used at runtime.
            w = self.delta_weight(weight.detach().to(device=x.device, dtype=_compute_dtype(weight.dtype)), multiplier)
            b = self.delta_bias(w, multiplier)
            cached = (w.to(x.dtype), None if b is None else b.to(x.dtype))
            self._cache[ckey] = cached
        dw, db = cached  # type: ignore[misc]
        if isinstance(module, nn.Conv2d):
            return _conv(module, x, dw, db)
        return F.linear(x, dw, db)

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

    def summary(self) -> str:
        """One line for logs and the UI, e.g. ``"style: 264 of 264 keys matched (132 modules)"``."""
        text = f"{self.name}: {self.matched_keys} of {self.total_keys} keys matched ({len(self.modules)} modules)"
        if self.skipped_keys:
            text += f", {len(self.skipped_keys)} skipped"
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
    family's standard layout. Keys that match no module go to ``unmatched_keys``; bundled embeddings and unsupported
    module types (IA3, norm, GLoRA, OFT) go to ``skipped_keys``. Non-finite tensors raise :class:`LoraError`.
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

    for module_key, ((path, slice_name), parts, keys) in groups.items():
        kind = _detect_kind(parts)
        if kind not in _KIND_PARTS:
            for key in keys:
                net.skipped_keys[key] = f"module type {kind} is not supported"
            continue
        if "lora_A.weight" in parts:
            parts["lora_down.weight"] = parts.pop("lora_A.weight")
            parts["lora_up.weight"] = parts.pop("lora_B.weight")
        used = _KIND_PARTS[kind] | _COMMON_PARTS
        for part in [p for p in parts if p not in used]:
            del parts[part]
            net.skipped_keys[f"{module_key}.{part}"] = f"part {part!r} is not used by a {kind} module"
        delta = ModuleDelta(key=module_key, path=path, slice_name=slice_name, kind=kind, parts=parts, network=name)
        if named is not None:
            module = named[path]
            try:
                delta.target_weight(module)
            except LoraError as exc:
                for key in keys:
                    net.skipped_keys.setdefault(key, str(exc))
                continue
            delta.check(module)
        net.modules.setdefault(path, []).append(delta)
        net.matched_keys += len(parts)
    return net


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
    Targets must be Linear or Conv2d (ldm/sgm UNets put the batch on dim 0 for all of them); text-encoder attention
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
        targets = _targets(model, networks, root)
        for rel, (module, _) in targets.items():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise LoraError(
                    f"runtime LoRA supports Linear and Conv2d modules only; {root + '.' if root else ''}"
                    f"{rel} is a {type(module).__name__} (merge text encoders instead)"
                )
        for module, deltas in targets.values():
            self._handles.append(module.register_forward_hook(self._make_hook(deltas)))
            self._deltas.extend(d for d, _ in deltas)

    def _make_hook(
        self, deltas: list[tuple[ModuleDelta, float]]
    ) -> Callable[[nn.Module, tuple, Tensor], Tensor | None]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            mode = self._mode
            if mode == "off":
                return None
            x = args[0]
            if mode == "all":
                for delta, multiplier in deltas:
                    output = output + delta.forward_delta(module, x, multiplier).to(output.dtype)
                return output
            split, batch, rows_seen = self._split, self._batch, x.shape[0]
            if batch is not None and rows_seen != batch:
                if rows_seen % batch:
                    raise LoraError(
                        f"rows_from: a hooked module saw {rows_seen} rows, not a multiple of the batch {batch}"
                    )
                split *= rows_seen // batch
            if split >= rows_seen:
                return None
            rows = x[split:]
            total = deltas[0][0].forward_delta(module, rows, deltas[0][1])
            for delta, multiplier in deltas[1:]:
                total = total + delta.forward_delta(module, rows, multiplier)
            total = total.to(output.dtype)
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
        for delta in self._deltas:
            delta.clear_cache()
        self._deltas.clear()
        self._mode = "off"

    def __enter__(self) -> RuntimeLora:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
