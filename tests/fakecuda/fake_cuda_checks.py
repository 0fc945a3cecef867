"""The host-free engine on *fake* CUDA at real SD1.5 and SDXL sizes, fp16: device and dtype mistakes without a GPU.

Run by tests/fakecuda/test_fake_cuda.py with the A1111 webui's python (it has ldm's and sgm's dependencies); the UNet
classes are the webui's own (``repositories/``). torch's ``FakeTensorMode`` makes tensors that carry a device, a dtype
and a shape but no data: a "cuda" tensor works on this CPU-only machine, every operator checks its inputs' devices and
dtypes as on a GPU (``FakeTensorDeviceMismatchError`` for a CPU tensor meeting a CUDA one), and a 1024x1024 SDXL
forward costs seconds and no memory.

What runs (each check prints one JSON line; ``--plant`` plants a device mistake in the legs: a tensor made without
``device=``, which must make the run fail):

* SD1.5 (ldm UNet, 860 M parameters) and SDXL (sgm UNet, 2.6 G) built on fake CUDA in fp16;
* the legs (``lib_delta.delta.source_delta``) of an SD1.5 LoRA pair at SDXL's 1024x1024 latent, at full resolution and
  pooled to SD1.5's native size (factor 2), through the runtime LoRA (``RuntimeLora``: kohya-named LoRA on every
  attention projection), with a ControlNet unit whose network was built while its UNet sat on the CPU (as Forge's
  offload leaves it): ``controlled_forward`` must bring it to the legs' device;
* one Delta Sampling step on the SDXL target, and the reference samplers (Euler, Heun, DPM++ 2M, Euler a, DDIM) for
  two steps with the delta on SD1.5 at 512x512.

``Module.to`` is replaced by one that assigns new parameters (torch cannot swap fake ones). Two things the webui does
to every ldm/sgm UNet are done here too, as the webui does them: the timestep embedding is
cast to the UNet's dtype (``sd_hijack_unet``), and ldm's attention is the SDPA one (ldm's own computes ``softmax`` in
fp32 and fails in fp16 without autocast; the webui always replaces it). ``check_finite`` is a no-op under fake tensors
(it reads values, which fake tensors do not have).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

ROOT = Path(__file__).resolve().parents[2]

def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def controlnet_on_cpu(unet_cls, config):
    """A real-size ControlNet built while its UNet sits on the CPU (Forge's offload device)."""
    from bench.gpu_probe import build
    from lib_delta.controlnet import ControlNet

    body = build(unet_cls, config, "cpu", torch.float16, init=False)
    channels = [int(b[-1].out_channels if hasattr(b[-1], "out_channels") else b[0].out_channels)
                for b in body.input_blocks]
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cpu"):
            net = ControlNet(body, 3, channels, int(body.middle_block[-1].out_channels)).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(torch.float32)
    return net


def module_to_for_fake_tensors(self, *args, **kwargs):
    """``Module.to`` for fake parameters: torch swaps parameter tensors in place, which fails for fake ones (their
    mode keeps weak references to them); the same move by assigning new parameters and buffers."""
    for module in self.modules():
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(param.to(*args, **kwargs), requires_grad=False)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(*args, **kwargs)
    return self


def plant_device_mistake() -> None:
    """The planted mistake: the legs' pooled sample gets a tensor made without ``device=`` added to it."""
    from lib_delta import delta

    original = delta.pool_sample

    def pool_sample(x, sigma, factor, **rules):
        x, sigma = original(x, sigma, factor, **rules)
        return x + torch.zeros(x.shape[1:], dtype=x.dtype), sigma  # the mistake: no device=

    delta.pool_sample = pool_sample


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repositories", required=True)
    parser.add_argument("--plant", action="store_true")
    args = parser.parse_args()
    repos = Path(args.repositories)
    sys.path.insert(0, str(ROOT))
    from bench.gpu_probe import SD15, SDXL, build, import_unets, lora_for, webui_patches, x0_denoiser

    ldm_cls, sgm_cls = import_unets([repos / "stable-diffusion-stability-ai", repos / "generative-models"])

    from lib_delta import delta
    from lib_delta.controlnet import ActiveControl, controlled_forward
    from lib_delta.delta import pair_of, source_delta
    from lib_delta.latent import LatentMap
    from lib_delta.lora import RuntimeLora
    from lib_delta.samplers import (
        ddim_timesteps,
        karras_sigmas,
        sample_ddim,
        sample_dpmpp_2m,
        sample_euler,
        sample_euler_ancestral,
        sample_heun,
    )
    from lib_delta.timesteps import DiscreteSchedule

    webui_patches(torch.float16)
    delta.check_finite = lambda tensor, what: None  # reads values (see the module docstring)
    if args.plant:
        plant_device_mistake()
    torch.nn.Module.to = module_to_for_fake_tensors
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # real CPU schedules meet fake tensors; devices still checked
    started = time.perf_counter()
    with mode, torch.no_grad():
        sd15 = build(ldm_cls, {**SD15, "use_fp16": True}, "cuda", torch.float16, init=False)
        sdxl = build(sgm_cls, SDXL, "cuda", torch.float16, init=False)
        emit(check="build", sd15_params=sum(p.numel() for p in sd15.parameters()),
             sdxl_params=sum(p.numel() for p in sdxl.parameters()),
             devices=sorted({str(p.device) for m in (sd15, sdxl) for p in m.parameters()}),
             dtypes=sorted({str(p.dtype) for m in (sd15, sdxl) for p in m.parameters()}))

        root, network = lora_for(sd15, to_fake=mode.from_tensor)
        runtime = RuntimeLora(root, [(network, 0.8)])
        net = controlnet_on_cpu(ldm_cls, {**SD15, "use_fp16": True})
        context15 = torch.randn(4, 77, 768, device="cuda", dtype=torch.float16)
        context_xl = torch.randn(2, 77, 2048, device="cuda", dtype=torch.float16)
        y_xl = torch.randn(2, 2816, device="cuda", dtype=torch.float16)
        base = x0_denoiser(sd15, context15)

        def adapted(x, sigma):
            with runtime.scoped("all"):
                control = ActiveControl(net, torch.rand(1, 3, x.shape[-2] * 8, x.shape[-1] * 8, device="cuda"),
                                        [1.0] * 13)
                rows = torch.arange(x.shape[0], device="cuda")
                sd15.forward = controlled_forward(sd15, [control], rows, rows)
                try:
                    return base(x, sigma)
                finally:
                    del sd15.forward

        legs = pair_of(base, adapted)
        latent_map = LatentMap.between("sdxl", "sd1")
        x = torch.randn(2, 4, 128, 128, device="cuda")  # SDXL at 1024x1024
        sigma = torch.full((2,), 7.0, device="cuda")
        for factor in (1, 2):
            d = source_delta(x, sigma, legs, latent_map, factor=factor)
            emit(check=f"legs sd1.5 LoRA + ControlNet on an SDXL 1024 latent, factor {factor}", shape=list(d.shape),
                 device=str(d.device), dtype=str(d.dtype), controlnet_device=str(next(net.parameters()).device))
        target = x0_denoiser(sdxl, context_xl, y_xl)
        d_final = target(x, sigma) + 0.5 * source_delta(x, sigma, legs, latent_map, factor=2)
        emit(check="one DS step on the SDXL target", shape=list(d_final.shape), device=str(d_final.device),
             dtype=str(d_final.dtype))

        def ds_model(x, sigma):
            return base(x, sigma) + 0.5 * source_delta(x, sigma, legs, LatentMap.between("sd1", "sd1"))

        x512 = torch.randn(2, 4, 64, 64, device="cuda")
        fake_schedule = DiscreteSchedule()

        def eps_model(x_t, t):
            with mode:
                sigma_t = fake_schedule.t_to_sigma(t).to(x_t.dtype)
                a = fake_schedule.alpha_cumprod_at(t).to(x_t.dtype).view(-1, 1, 1, 1)
                x_ve = x_t / a.sqrt()
                return (x_ve - ds_model(x_ve, sigma_t)) / sigma_t.view(-1, 1, 1, 1)

        def in_mode(x, sigma):
            with mode:
                return ds_model(x, sigma)

    # The samplers' loops read their schedules (real CPU tensors, as on a GPU) to branch: they run outside the fake
    # mode; every tensor they hand the model is made from x (fake CUDA), and the model runs inside the mode.
    with torch.no_grad():
        sigmas, timesteps = karras_sigmas(2), ddim_timesteps(2)
        generator = torch.Generator().manual_seed(0)
        for name, run in (("euler", lambda: sample_euler(in_mode, x512, sigmas)),
                          ("heun", lambda: sample_heun(in_mode, x512, sigmas)),
                          ("dpmpp_2m", lambda: sample_dpmpp_2m(in_mode, x512, sigmas)),
                          ("euler_ancestral", lambda: sample_euler_ancestral(in_mode, x512, sigmas, generator)),
                          ("ddim", lambda: sample_ddim(eps_model, x512, timesteps, DiscreteSchedule()))):
            out = run()
            emit(check=f"sampler {name}", shape=list(out.shape), device=str(out.device), dtype=str(out.dtype))
    emit(check="done", seconds=round(time.perf_counter() - started, 1), lora_modules=len(network.modules))
    return 0


if __name__ == "__main__":
    sys.exit(main())
