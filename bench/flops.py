"""FLOP count of Delta Sampling's source legs on the real SD1.5 / SD2 / SDXL UNets: ``python -m bench.flops``.

Builds the real-size UNets from the webui's own model code and official configs on torch's ``meta`` device (no
weights, nothing downloaded), counts one batch-1 forward with ``torch.utils.flop_counter.FlopCounterMode`` and prints
DS's cost relative to the target alone (CFG on the target: 2 forwards; CFG on each of the two source legs: 4 more;
``cond_only``: 2 more). The legs' grid follows the project's rule (``lib_delta.resolution``). Runs in the webui's venv
(``WEBUI_PYTHON``): started from another python it re-runs itself there; without a webui it says so and exits 0.
Method and results: bench/FLOPS.md, written by ``python -m bench.flops --markdown bench/FLOPS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parent
for _p in (PROJECT_ROOT, PROJECT_ROOT / "tests" / "webui", PROJECT_ROOT / "tests" / "webui" / "fixtures"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import webui_harness as h  # noqa: E402

CHILD_ENV = "DELTA_FLOPS_IN_WEBUI"
LATENT_SCALE = 8  # pixels per latent cell (every SD family)
TOKENS = 77
ATTENTION_OPS = ("bmm", "baddbmm", "scaled_dot_product", "flash_attention", "efficient_attention")


@dataclass(frozen=True)
class Family:
    name: str            # "sd1" | "sd2" | "sdxl" (lib_delta.resolution's family names)
    label: str
    config: str          # relative to the webui's root
    key: str             # the UNet's entry under model.params
    context_dim: int
    adm_dim: int | None  # SDXL's vector conditioning (y)


FAMILIES = {
    "sd1": Family("sd1", "SD1.5", "configs/v1-inference.yaml", "unet_config", 768, None),
    "sd2": Family("sd2", "SD2 (768-v)", "repositories/stable-diffusion-stability-ai/configs/stable-diffusion/"
                  "v2-inference-v.yaml", "unet_config", 1024, None),
    "sdxl": Family("sdxl", "SDXL", "repositories/generative-models/configs/inference/sd_xl_base.yaml",
                   "network_config", 2048, 2816),
}


@dataclass(frozen=True)
class Scenario:
    source: str   # family of the source legs
    target: str   # family of the target
    pixels: int   # square image side in pixels


SCENARIOS = (Scenario("sd1", "sdxl", 1024), Scenario("sd2", "sdxl", 1024), Scenario("sd1", "sd2", 768))
SETTINGS = ("target", "native", "2")
GOAL = ("sd1", "sdxl", 1024, "native", 1.5)  # the goal: SD1.5 -> SDXL at 1024², native, <= 1.5x


# --- environment ---------------------------------------------------------------------------------------------------


def missing_reason() -> str | None:
    """One line saying why the count cannot run, or None."""
    repos = h.WEBUI_DIR / "repositories"
    if not (repos / "stable-diffusion-stability-ai" / "ldm").is_dir():
        return f"no webui with repositories/stable-diffusion-stability-ai (ldm) at WEBUI_DIR={h.WEBUI_DIR}"
    if not (repos / "generative-models" / "sgm").is_dir():
        return f"no repositories/generative-models (sgm) in the webui at WEBUI_DIR={h.WEBUI_DIR}"
    if not in_webui_python() and not h.WEBUI_PYTHON.exists():
        return f"webui python not found: WEBUI_PYTHON={h.WEBUI_PYTHON}"
    return None


def in_webui_python() -> bool:
    """Whether this process can import the webui's model code (its venv, or a re-run started by this module)."""
    if os.environ.get(CHILD_ENV) == "1":
        return True
    with contextlib.suppress(OSError):
        return Path(sys.prefix).resolve() == h.WEBUI_PYTHON.parent.parent.resolve()
    return False


def rerun_in_webui(argv: list[str]) -> int:
    env = h.webui_subprocess_env()
    env[CHILD_ENV] = "1"
    cmd = [str(h.WEBUI_PYTHON), "-m", "bench.flops", *argv]
    return subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, check=False).returncode


# --- counting ------------------------------------------------------------------------------------------------------


def unet_params(family: Family) -> tuple[str, dict[str, Any]]:
    """The UNet's class path and constructor arguments from the official config, made meta-friendly."""
    import yaml

    with open(h.WEBUI_DIR / family.config) as f:
        conf = yaml.safe_load(f)["model"]["params"][family.key]
    params = dict(conf["params"])
    params["use_checkpoint"] = False  # gradient checkpointing: training only
    params.pop("use_fp16", None)      # SD2's config: fp16 weights; meta tensors keep fp32 (FLOPs do not depend on it)
    if "spatial_transformer_attn_type" in params:
        params["spatial_transformer_attn_type"] = "softmax"  # sgm: plain attention, not xformers
    return conf["target"], params


def build_unet(family: Family) -> Any:
    import torch

    target, params = unet_params(family)
    module, name = target.rsplit(".", 1)
    # sgm prints every transformer it builds, ldm/sgm print a line on import without xformers; timm & co. warn
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if module.startswith("ldm."):
            importlib.import_module("ldm.modules.attention").XFORMERS_IS_AVAILBLE = False  # plain CrossAttention
        cls = getattr(importlib.import_module(module), name)
        with torch.device("meta"):
            return cls(**params).eval()


def _attention_hook(store: list[int]) -> Any:
    """Forward hook on an attention module: the analytic MACs of q k^T and softmax(.) v (2 b n m inner)."""

    def hook(module: Any, args: tuple, kwargs: dict, _out: Any) -> None:
        x = args[0]
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        m = x.shape[1] if context is None else context.shape[1]
        store.append(2 * x.shape[0] * x.shape[1] * m * module.to_q.out_features)

    return hook


def count_forward(unet: Any, family: Family, latent: int) -> dict[str, Any]:
    """MACs of one batch-1 forward at ``latent`` x ``latent`` cells, by op, with the attention cross-check."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    kw: dict[str, Any] = {"context": torch.zeros(1, TOKENS, family.context_dim, device="meta")}
    if family.adm_dim:
        kw["y"] = torch.zeros(1, family.adm_dim, device="meta")
    x = torch.zeros(1, 4, latent, latent, device="meta")
    t = torch.zeros(1, device="meta")
    expected: list[int] = []
    handles = [mod.register_forward_hook(_attention_hook(expected), with_kwargs=True) for mod in unet.modules()
               if all(hasattr(mod, a) for a in ("to_q", "to_k", "to_v", "to_out"))]
    counter = FlopCounterMode(display=False)
    try:
        with warnings.catch_warnings(), torch.no_grad(), counter:
            warnings.simplefilter("ignore")  # sgm's deprecated sdp_kernel context, autocast on a CPU build
            unet(x, t, **kw)
    finally:
        for handle in handles:
            handle.remove()
    by_op = {str(op).removeprefix("aten."): n // 2 for op, n in counter.get_flop_counts()["Global"].items()}
    attention = sum(n for op, n in by_op.items() if any(a in op for a in ATTENTION_OPS))
    analytic = sum(expected)
    total = sum(by_op.values())
    added = max(0, analytic - attention)  # attention the counter did not see (an op without a FLOP formula)
    return {"latent": latent, "macs": total + added, "by_op": by_op, "attention_counted": attention,
            "attention_analytic": analytic, "attention_added": added, "attention_modules": len(handles)}


def needed_sizes() -> dict[str, set[int]]:
    """Every (family, latent size) the scenarios need: the targets' grids and the legs' grids for every setting."""
    sizes: dict[str, set[int]] = {name: set() for name in FAMILIES}
    for sc in SCENARIOS:
        latent = sc.pixels // LATENT_SCALE
        sizes[sc.target].add(latent)
        for setting in SETTINGS:
            sizes[sc.source].add(legs_latent(sc, setting)[1])
    return sizes


def legs_latent(sc: Scenario, setting: str) -> tuple[int, int]:
    """(pooling factor, legs' latent side) by the project's rule."""
    from lib_delta.resolution import pooled_size, pooling_factor

    k = pooling_factor(setting, sc.pixels, sc.pixels, sc.source)
    latent = sc.pixels // LATENT_SCALE
    return k, (latent if k == 1 else pooled_size(latent, k))


def measure() -> dict[str, Any]:
    """Count every needed (family, size); returns {"forwards": {family: {latent: count}}, "seconds": ...}."""
    import make_tiny_models as mt

    mt.enter_webui(str(h.WEBUI_DIR))
    import torch

    started = time.perf_counter()
    forwards: dict[str, dict[int, dict[str, Any]]] = {}
    for name, latents in needed_sizes().items():
        family = FAMILIES[name]
        unet = build_unet(family)
        params = sum(p.numel() for p in unet.parameters())
        forwards[name] = {lat: dict(count_forward(unet, family, lat), params=params) for lat in sorted(latents)}
        del unet
    return {"forwards": forwards, "seconds": time.perf_counter() - started, "torch": torch.__version__}


# --- tables --------------------------------------------------------------------------------------------------------


def ds_rows(forwards: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """DS cost / target alone per scenario and legs' setting: (2T + 4S) / 2T, and cond_only (2T + 2S) / 2T."""
    rows = []
    for sc in SCENARIOS:
        t = forwards[sc.target][sc.pixels // LATENT_SCALE]["macs"]
        seen: dict[tuple[int, int], dict[str, Any]] = {}
        for setting in SETTINGS:
            k, latent = legs_latent(sc, setting)
            if (k, latent) in seen:  # e.g. native = target when k = 1: one row naming both
                seen[(k, latent)]["settings"].append(setting)
                continue
            s = forwards[sc.source][latent]["macs"]
            row = {"scenario": sc, "settings": [setting], "k": k, "legs_latent": latent, "T": t, "S": s,
                   "cfg": (2 * t + 4 * s) / (2 * t), "cond_only": (2 * t + 2 * s) / (2 * t)}
            seen[(k, latent)] = row
            rows.append(row)
    return rows


def _tmac(n: float) -> str:
    return f"{n / 1e12:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    fw = results["forwards"]
    model_rows = []
    for name, by_latent in fw.items():
        for lat, c in by_latent.items():
            ops = c["by_op"]
            conv = ops.get("convolution", 0)
            linear = ops.get("mm", 0) + ops.get("addmm", 0)
            attn = c["attention_counted"] + c["attention_added"]
            model_rows.append([FAMILIES[name].label, f"{lat}² ({lat * LATENT_SCALE}² px)", _tmac(c["macs"]),
                               f"{conv / c['macs']:.0%}", f"{linear / c['macs']:.0%}", f"{attn / c['macs']:.0%}"])
    ds = []
    for r in ds_rows(fw):
        sc = r["scenario"]
        goal = ""
        if (sc.source, sc.target, sc.pixels, "native") == GOAL[:4] and "native" in r["settings"]:
            goal = f"≤ {GOAL[4]}×: {'met' if r['cfg'] <= GOAL[4] else '**not met**'}"
        ds.append([f"{FAMILIES[sc.source].label} → {FAMILIES[sc.target].label} at {sc.pixels}²",
                   " = ".join(f"`{s}`" for s in r["settings"]), str(r["k"]), f"{r['legs_latent']}²",
                   _tmac(r["T"]), _tmac(r["S"]), f"{r['cfg']:.2f}×", f"{r['cond_only']:.2f}×", goal])
    head = ["Model", "Latent (pixels)", "TMAC / forward", "conv", "linear", "attention"]
    head_ds = ["Source → target", "`source_resolution`", "k", "Legs' latent", "T (TMAC)", "S (TMAC)",
               "DS / target, CFG on legs (2T+4S)/2T", "`cond_only` (2T+2S)/2T", "Goal"]
    return ("One UNet forward, batch 1, 77 tokens (MAC = FLOP / 2, TMAC = 10¹² MAC):\n\n" + _table(head, model_rows)
            + "\n\nDS cost relative to the target alone, UNet forwards only (target with CFG = 2 forwards of T; "
            "two source legs, each with CFG = 4 forwards of S):\n\n" + _table(head_ds, ds) + "\n")


def checks(results: dict[str, Any]) -> list[str]:
    """Per counted forward: parameters, MACs by aten op, the attention cross-check."""
    lines = []
    for name, by_latent in results["forwards"].items():
        for lat, c in by_latent.items():
            ops = ", ".join(f"`{op}` {n / 1e12:.3f}" for op, n in sorted(c["by_op"].items()))
            note = (f"equal ({c['attention_modules']} attention modules)" if not c["attention_added"]
                    else f"**{_tmac(c['attention_added'])} TMAC missing, added analytically**")
            lines.append(f"{FAMILIES[name].label} {lat}²: {c['params'] / 1e6:.0f} M parameters; TMAC by op: {ops}; "
                         f"attention counted {_tmac(c['attention_counted'])} vs analytic "
                         f"{_tmac(c['attention_analytic'])}: {note}")
    return lines


METHOD = """\
* **Models**: the real UNets, built from the webui's own model code (`ldm...openaimodel.UNetModel` for SD1.5 and SD2,
  `sgm...openaimodel.UNetModel` for SDXL) and the official configs (`configs/v1-inference.yaml`,
  `stable-diffusion-stability-ai/configs/stable-diffusion/v2-inference-v.yaml`,
  `generative-models/configs/inference/sd_xl_base.yaml`) on torch's `meta` device: real shapes and parameter counts,
  no weights, no arithmetic. Gradient checkpointing off, plain softmax attention (no xformers). Other attention
  backends (SDP, flash, sub-quadratic) do the same matrix products in a forward, so the count holds for them too.
* **Counting**: `torch.utils.flop_counter.FlopCounterMode` around one batch-1 forward: x (1, 4, h, w), timesteps (1,),
  context (1, 77, 768 / 1024 / 2048), SDXL's y (1, 2816). It counts the matmul-like aten ops: `convolution`,
  `mm` / `addmm` (linear layers) and `bmm` (attention: ldm's `einsum` and the math path of
  `scaled_dot_product_attention` on `meta` both reach `bmm`). CUDA's fused SDPA ops have formulas, but CPU's
  `_scaled_dot_product_flash_attention_for_cpu` has none (real CPU tensors would count attention as 0), hence a
  cross-check: forward hooks on every attention module compute q·kᵀ + softmax·v analytically (2·b·n·m·inner MACs);
  the counted attention equals it at every size below (a shortfall would be added and flagged). MAC = FLOP / 2.
* **Not counted**: element-wise and normalisation ops (GroupNorm, LayerNorm, SiLU, GELU, softmax, residual adds),
  which FlopCounterMode has no formula for: a few % of the FLOPs, but memory-bound, so their share of *time* is
  larger and scales with the activations (like the convolutions). Text encoders and VAE (once per image) and DS's own
  pooling, upsampling and combine (O(latent) per step) are outside the UNet and not counted either.
* **DS accounting**, per denoiser step: the target with CFG is 2 forwards of T (the webui batches cond + uncond;
  FLOPs are linear in the batch); the two source legs (base, adapted) with their own CFG are 4 forwards of S, so
  DS / target = (2T + 4S) / 2T. `cond_only` runs the legs on the positive prompt only: (2T + 2S) / 2T. `batch_legs`
  batches the legs into one forward with the same FLOPs; `reuse_steps` = r divides the legs' share by r. The legs'
  grid follows `lib_delta.resolution`: k = `pooling_factor(source_resolution, W, H, source family)`, legs' latent =
  `pooled_size(latent, k)`. `native` at 1024² for an SD2 source (768²) and at 768² for SD1.5 → SD2 gives k = 1
  (the pooled area would fall below 0.8 of the native area), so those rows show the explicit factor `2` instead.
* **FLOPs are not time**: a 64² leg keeps a GPU less busy than a 128² forward, and memory-bound ops weigh more
  there, so the measured time ratio of `native` is expected somewhat above its FLOP ratio.
"""


def markdown(results: dict[str, Any]) -> str:
    """The whole bench/FLOPS.md: method, tables, per-op counts."""
    return ("# FLOP count of Delta Sampling's cost (real UNet shapes, no weights)\n\n"
            f"Generated by `python -m bench.flops --markdown bench/FLOPS.md` (torch {results['torch']} in the webui's "
            f"venv, {results['seconds']:.0f} s on a CPU; nothing is computed on `meta`). Goal (SD1.5 → SDXL at 1024², "
            f"`native`): ≤ {GOAL[4]}×.\n\n## Method\n\n" + METHOD + "\n## Results\n\n" + render(results)
            + "\n## Counted ops\n\n" + "\n".join(f"* {line}" for line in checks(results)) + "\n")


# --- command -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m bench.flops", description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                    help="also write method + tables as markdown to PATH (bench/FLOPS.md)")
    args = ap.parse_args(argv)
    reason = missing_reason()
    if reason:
        print(f"bench.flops skipped: {reason}")
        return 0
    if not in_webui_python():  # the child runs in the project root: hand it an absolute path
        return rerun_in_webui(["--markdown", str(args.markdown.resolve())] if args.markdown else [])
    results = measure()
    table = render(results)
    print(table)
    print("\n".join(checks(results)))
    print(f"\ntorch {results['torch']}, {results['seconds']:.1f} s")
    if args.markdown:
        args.markdown.write_text(markdown(results))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
