"""A GPU probe for Delta Sampling's host-free engine, ready to run where a CUDA GPU is lent (no webui, no network).

Needs torch, einops and numpy, plus copies of ldm's and sgm's UNet sources (an A1111 install's
``repositories/stable-diffusion-stability-ai`` and ``repositories/generative-models``, or folders holding ``ldm/`` and
``sgm/``) passed with
``--unet-sources``: they are copied in beside a run, never committed. Real-size random SD1.5 (860 M) and SDXL (2.6 G)
UNets are built on the device; every phase writes JSON lines to ``--out`` as it ends, so a run cut short still reports.

Phases (about 2-4 minutes on an H100-class GPU; each checks the time left against ``--budget-s``):

1. identities in three precisions (fp16 under CUDA autocast as A1111's default, fp16 without autocast as
   ``--precision half`` and Forge, bf16): lambda 0 returns the target's tensor, a pair whose legs are one model gives
   a delta of exactly 0, a LoRA at weight 0 too, batched and separate legs agree, everything finite;
2. speed: the SDXL target at 1024x1024 (CFG batch 2) alone, and with an SD1.5 LoRA pair's legs at the target's latent
   size (factor 1) and pooled to SD1.5's native size (factor 2), both legs in one batched forward or two; a DS step
   over a target step, median of CUDA-event timings;
3. memory: peak allocated bytes of each configuration of phase 2.

``--dry-run`` runs phases 1-2 on *fake* CUDA (torch's FakeTensorMode: shapes, devices and dtypes without data or
time) on a CPU-only machine: tests/fakecuda checks the probe that way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

SD15 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
            num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
            transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
SDXL = dict(adm_in_channels=2816, num_classes="sequential", use_checkpoint=False, in_channels=4, out_channels=4,
            model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
            num_head_channels=64, use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
            spatial_transformer_attn_type="softmax", legacy=False, use_spatial_transformer=True)


# --- the UNet classes, as the webui runs them ---------------------------------------------------------------------


def import_unets(sources: list[Path]) -> tuple[type, type]:
    """ldm's and sgm's ``UNetModel`` from copies of their sources, importing only what the UNets need (``sgm``'s
    package ``__init__`` pulls in training code; omegaconf is only needed for a type test)."""
    for folder in sources:
        sys.path.insert(0, str(folder))
    try:
        import omegaconf.listconfig  # noqa: F401
    except ImportError:
        stub = types.ModuleType("omegaconf.listconfig")
        stub.ListConfig = type("ListConfig", (list,), {})
        sys.modules.setdefault("omegaconf", types.ModuleType("omegaconf"))
        sys.modules["omegaconf.listconfig"] = stub
    for name in ("sgm", "sgm.modules", "sgm.modules.diffusionmodules"):
        if name not in sys.modules:
            found = next((f / name.replace(".", "/") for f in sources if (f / name.replace(".", "/")).is_dir()), None)
            if found is not None:
                package = types.ModuleType(name)
                package.__path__ = [str(found)]
                sys.modules[name] = package
    if "sgm.util" not in sys.modules:
        try:
            import sgm.util  # noqa: F401
        except ImportError:  # fsspec/safetensors/PIL missing: the UNet needs two helpers of it
            util = types.ModuleType("sgm.util")
            util.exists = lambda x: x is not None
            util.default = lambda val, d: val if val is not None else (d() if callable(d) else d)
            sys.modules["sgm.util"] = util
    import ldm.modules.diffusionmodules.openaimodel as ldm_unet
    import sgm.modules.diffusionmodules.openaimodel as sgm_unet

    return ldm_unet.UNetModel, sgm_unet.UNetModel


def webui_patches(dtype: torch.dtype) -> None:
    """What the webui does to every ldm/sgm UNet: the timestep embedding cast to the UNet's dtype
    (``sd_hijack_unet``), and ldm's attention replaced by SDPA (ldm's own computes softmax in fp32 and fails in fp16
    without autocast; the webui always replaces it)."""
    import ldm.modules.attention as ldm_attention
    import ldm.modules.diffusionmodules.openaimodel as ldm_unet
    import sgm.modules.diffusionmodules.openaimodel as sgm_unet
    from einops import rearrange

    for module in (ldm_unet, sgm_unet):
        original = getattr(module.timestep_embedding, "__wrapped__", module.timestep_embedding)

        def cast(timesteps, *args, _original=original, **kwargs):
            return _original(timesteps, *args, **kwargs).to(dtype)

        cast.__wrapped__ = original
        module.timestep_embedding = cast

    def sdpa_forward(self, x, context=None, mask=None):
        q = self.to_q(x)
        context = x if context is None else context
        k, v = self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        return self.to_out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))

    ldm_attention.CrossAttention.forward = sdpa_forward


def build(cls: type, config: dict, device: str, dtype: torch.dtype, *, init: bool = True) -> torch.nn.Module:
    """A UNet in ``dtype`` on ``device``; ``init``: random weights (std 0.02) for a real run."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    if init:
        with torch.no_grad():
            for p in unet.parameters():
                p.normal_(0, 0.02)
    return unet.eval().requires_grad_(False)


def x0_denoiser(unet: torch.nn.Module, context: torch.Tensor, y: torch.Tensor | None = None):
    """k-diffusion's CompVisDenoiser in a few lines: x0 from an eps UNet at a k-diffusion sigma."""
    from lib_delta.timesteps import DiscreteSchedule

    schedule = DiscreteSchedule()
    dtype = next(unet.parameters()).dtype

    def denoise(x, sigma):
        c_in = (sigma**2 + 1) ** -0.5
        kwargs = {} if y is None else {"y": y[: x.shape[0]]}
        eps = unet((x * c_in.view(-1, 1, 1, 1)).to(dtype), schedule.sigma_to_t(sigma), context[: x.shape[0]],
                   **kwargs)
        return x - sigma.view(-1, 1, 1, 1) * eps.to(x.dtype)

    return denoise


def lora_for(unet: torch.nn.Module, rank: int = 8, to_fake=None) -> tuple[torch.nn.Module, object]:
    """``(root, network)``: a kohya LoRA file over every attention projection of an SD1.5 ``unet``, parsed against
    ``root`` (the UNet under ldm's module paths). A file's tensors are real CPU tensors; ``to_fake`` (dry run) makes
    them fake ones."""
    from lib_delta.lora import parse_network
    from lib_delta.lora_keys import compvis_to_kohya

    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.diffusion_model = unet
    real = contextlib.nullcontext()
    if to_fake is not None:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        real = unset_fake_temporarily()
    with real:
        generator = torch.Generator().manual_seed(0)
        sd = {}
        for path, module in unet.named_modules():
            if isinstance(module, torch.nn.Linear) and any(p in path for p in ("to_q", "to_k", "to_v", "to_out.0")):
                key = compvis_to_kohya("model.diffusion_model." + path, "sd1")
                sd[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.01
                sd[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.01
                sd[f"{key}.alpha"] = torch.tensor(float(rank))
        network = parse_network(sd, "sd1", model=root, name="probe")
    if to_fake is not None:
        for delta in network.deltas():
            delta.parts = {k: to_fake(v) for k, v in delta.parts.items()}
    return root, network


# --- the probe ------------------------------------------------------------------------------------------------------


class Probe:
    def __init__(self, out: Path | None, budget_s: float, dry_run: bool) -> None:
        self.out, self.budget_s, self.dry_run = out, budget_s, dry_run
        self.started = time.monotonic()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def emit(self, **record) -> None:
        record["elapsed_s"] = round(time.monotonic() - self.started, 1)
        line = json.dumps(record, default=str)
        print(line, flush=True)
        if self.out is not None:
            with open(self.out / "gpu_probe.jsonl", "a") as f:
                f.write(line + "\n")

    def time_ms(self, fn, warmup: int = 3, runs: int = 10) -> float | None:
        if self.dry_run:
            fn()
            return None
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            if self.left() < 30:
                break
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return round(statistics.median(times), 2) if times else None


def legs_for(sd15, context, runtime, batched: bool):
    """The LoRA pair's legs: both in one batched forward (base rows, then adapted rows with the LoRA) or two."""
    base = x0_denoiser(sd15, context)

    def legs(x, sigma):
        if batched:
            with runtime.scoped("rows_from", x.shape[0]):
                out = base(torch.cat([x, x]), torch.cat([sigma, sigma]))
            return out[: x.shape[0]], out[x.shape[0]:]
        with runtime.scoped("off"):
            d_base = base(x, sigma)
        with runtime.scoped("all"):
            return d_base, base(x, sigma)

    return legs


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    ldm_cls, sgm_cls = import_unets([Path(p) for p in args.unet_sources])
    from lib_delta import delta as delta_module
    from lib_delta.delta import delta_denoised, source_delta
    from lib_delta.latent import LatentMap
    from lib_delta.lora import RuntimeLora

    probe = Probe(Path(args.out) if args.out else None, args.budget_s, args.dry_run)
    if probe.out is not None:
        probe.out.mkdir(parents=True, exist_ok=True)
    fake = contextlib.nullcontext()
    to_fake = None
    if args.dry_run:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake, to_fake = mode, mode.from_tensor
        delta_module.check_finite = lambda tensor, what: None  # fake tensors hold no values
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        probe.emit(phase=0, torch=torch.__version__, device=torch.cuda.get_device_name(),
                   capability=torch.cuda.get_device_capability(), cuda=torch.version.cuda)

    # 1: identities in three precisions
    for name, dtype, autocast in (("fp16 autocast", torch.float16, True), ("fp16", torch.float16, False),
                                  ("bf16", torch.bfloat16, False)):
        if probe.left() < 60:
            break
        webui_patches(dtype)
        with fake, torch.no_grad(), (torch.autocast("cuda", dtype=torch.float16) if autocast and not args.dry_run
                                     else contextlib.nullcontext()):
            sd15 = build(ldm_cls, {**SD15, "use_fp16": dtype == torch.float16, "use_bf16": dtype == torch.bfloat16},
                         "cuda", dtype, init=not args.dry_run)
            root, network = lora_for(sd15, to_fake=to_fake)
            runtime = RuntimeLora(root, [(network, 0.8)])
            context = torch.randn(2, 77, 768, device="cuda", dtype=dtype)
            x = torch.randn(1, 4, 64, 64, device="cuda")
            sigma = torch.full((1,), 3.0, device="cuda")
            base = x0_denoiser(sd15, context)
            target = base(x, sigma)
            record = {"phase": 1, "precision": name}
            record["lambda_0_is_target"] = delta_denoised(x, sigma, target, base, base, scale=0.0, source="sd1",
                                                          target="sd1") is target
            d_same = source_delta(x, sigma, lambda a, s, base=base: (base(a, s), base(a, s)),
                                  LatentMap.between("sd1", "sd1"))
            batched = source_delta(x, sigma, legs_for(sd15, context, runtime, True), LatentMap.between("sd1", "sd1"))
            separate = source_delta(x, sigma, legs_for(sd15, context, runtime, False),
                                    LatentMap.between("sd1", "sd1"))
            runtime.remove()
            weightless = RuntimeLora(root, [(network, 0.0)])
            d_zero = source_delta(x, sigma, legs_for(sd15, context, weightless, False),
                                  LatentMap.between("sd1", "sd1"))
            weightless.remove()
            record.update(devices=sorted({str(t.device) for t in (target, batched, separate, d_zero)}),
                          dtypes=sorted({str(t.dtype) for t in (target, batched, separate)}))
            if not args.dry_run:
                record.update(same_model_delta_max=float(d_same.abs().max()), lora_weight_0_delta_max=float(
                    d_zero.abs().max()), batched_vs_separate_max=float((batched - separate).abs().max()),
                    lora_delta_mean=float(batched.abs().mean()),
                    finite=bool(torch.isfinite(batched).all() and torch.isfinite(target).all()))
            probe.emit(**record)
            del sd15, root, network, runtime
        if not args.dry_run:
            torch.cuda.empty_cache()

    # 2-3: speed and memory at SDXL 1024x1024 with SD1.5 LoRA legs
    if probe.left() > 90:
        webui_patches(torch.float16)
        with fake, torch.no_grad():
            sdxl = build(sgm_cls, SDXL, "cuda", torch.float16, init=not args.dry_run)
            sd15 = build(ldm_cls, {**SD15, "use_fp16": True}, "cuda", torch.float16, init=not args.dry_run)
            root, network = lora_for(sd15, to_fake=to_fake)
            runtime = RuntimeLora(root, [(network, 0.8)])
            x = torch.randn(2, 4, 128, 128, device="cuda")  # CFG: cond + uncond rows of one image
            sigma = torch.full((2,), 5.0, device="cuda")
            target = x0_denoiser(sdxl, torch.randn(2, 77, 2048, device="cuda", dtype=torch.float16),
                                 torch.randn(2, 2816, device="cuda", dtype=torch.float16))
            context15 = torch.randn(4, 77, 768, device="cuda", dtype=torch.float16)
            latent_map = LatentMap.between("sdxl", "sd1")
            configs = {"target alone": lambda: target(x, sigma)}
            for factor in (1, 2):
                for batched in (True, False):
                    legs = legs_for(sd15, context15, runtime, batched)
                    configs[f"DS factor {factor} {'batched' if batched else 'separate'}"] = (
                        lambda legs=legs, factor=factor: target(x, sigma) + 0.5 * source_delta(
                            x, sigma, legs, latent_map, factor=factor))
            results = {}
            for label, fn in configs.items():
                if probe.left() < 45:
                    break
                if not args.dry_run:
                    torch.cuda.reset_peak_memory_stats()
                ms = probe.time_ms(fn)
                peak = None if args.dry_run else torch.cuda.max_memory_allocated()
                results[label] = ms
                probe.emit(phase=2, config=label, step_ms=ms, peak_bytes=peak,
                           ratio_to_target=None if ms is None or not results.get("target alone") else round(
                               ms / results["target alone"], 3))
            runtime.remove()
    probe.emit(phase="done", seconds=round(time.monotonic() - probe.started, 1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet-sources", nargs="+", required=True,
                        help="folders holding ldm/ and sgm/ (e.g. an A1111 install's repositories/<name>)")
    parser.add_argument("--out", help="folder for gpu_probe.jsonl")
    parser.add_argument("--budget-s", type=float, default=360.0)
    parser.add_argument("--dry-run", action="store_true", help="fake CUDA on a CPU-only machine: no timings")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
