"""What an IP-Adapter unit costs: the image encoder per reference image, and the image tokens per denoiser call
relative to the legs' forward, measured in one run at the real shapes, printed as ratios.

    <webui venv python> -m bench.ip_adapter_cost [--threads N]    (from the project root; needs WEBUI_DIR's ldm)

Builds a random real-size CLIP ViT-H/14 (lib_delta's tower) and times one 224 x 224 encode; builds ldm's SD1.5 UNet
(random, fp32) and times the legs' batched forward (4 rows: base cond/uncond, adapted cond/uncond) at 512 x 512
(latent 64 x 64) without a unit, with a plain unit (4 tokens) and with a plus-sized unit (16 tokens) on the adapted
rows, through :func:`lib_delta.ip_adapter.image_prompt_forwards`. Medians of ``--repeats``; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _random_(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 1 / max(p[0].numel(), 1) ** 0.5 if p.ndim >= 2 else 0.02)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    webui = Path(os.environ.get("WEBUI_DIR", "~/stable-diffusion-webui")).expanduser()
    sys.path.insert(0, str(webui / "repositories" / "stable-diffusion-stability-ai"))

    from lib_delta.clip_vision import ClipVision, ClipVisionConfig
    from lib_delta.ip_adapter import (
        ImagePrompt,
        IPAdapter,
        IPAdapterFile,
        attn2_layers,
        image_attention,
        image_prompt_forwards,
    )

    vit_h = ClipVisionConfig(hidden=1280, layers=32, intermediate=5120, patch=14, image_size=224, projection=1024)
    tower = ClipVision(vit_h).eval()
    _random_(tower)
    pixels = torch.randn(1, 3, 224, 224)
    tower.encode(pixels)  # warm-up
    encode = _median_seconds(lambda: tower.encode(pixels), args.repeats)

    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                     num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=768, legacy=False).eval()
    x, t = torch.randn(4, 4, 64, 64), torch.full((4,), 500.0)
    context = torch.randn(4, 77, 768)
    paths = attn2_layers(unet)

    def shapes(tokens: int) -> IPAdapterFile:  # ip-adapter_sd15's shapes (plain), or 16 tokens, over this UNet
        layers = {2 * n + 1: (torch.zeros(unet.get_submodule(p).to_k.weight.shape),) * 2 for n, p in enumerate(paths)}
        proj = {"proj.weight": torch.zeros(tokens * 768, 1024), "norm.weight": torch.zeros(768)}
        return IPAdapterFile("bench", proj, layers, "plain")

    def prompts(tokens: int) -> list[ImagePrompt]:
        adapter = IPAdapter(shapes(tokens), paths).eval()
        _random_(adapter)
        return [ImagePrompt(adapter, 1.0, torch.randn(1, tokens, 768), torch.randn(1, tokens, 768))]

    rows, uncond = torch.tensor([2, 3]), torch.tensor([False, True])

    def forward(with_prompts):
        with torch.no_grad(), image_prompt_forwards(unet, with_prompts, rows, uncond):
            unet(x, t, context)

    # the inputs each cross-attention layer sees (recorded in one forward): the image term alone is timed on them
    seen: dict[str, torch.Tensor] = {}

    def record(path: str):
        def hook(_module: torch.nn.Module, args: tuple) -> None:  # returns None: the call's inputs stay as they are
            seen.setdefault(path, args[0][2:].clone())
        return hook

    hooks = [unet.get_submodule(p).register_forward_pre_hook(record(p)) for p in paths]
    forward([])  # also the warm-up
    for hook in hooks:
        hook.remove()

    def image_terms(prompt: ImagePrompt) -> None:
        with torch.no_grad():
            for index, path in enumerate(paths):
                layer = unet.get_submodule(path)
                term = image_attention(layer, layer.to_q(seen[path]), torch.cat([prompt.cond, prompt.uncond]),
                                       prompt.adapter.to_k_ip[index], prompt.adapter.to_v_ip[index])
                torch.nn.functional.linear(term, layer.to_out[0].weight)

    results = {"plain": [], "4 tokens": prompts(4), "16 tokens": prompts(16)}
    seconds = {name: _median_seconds(lambda p=p: forward(p), args.repeats) for name, p in results.items()}
    alone = {name: _median_seconds(lambda p=p: image_terms(p[0]), max(args.repeats, 5))
             for name, p in results.items() if p}
    base = seconds["plain"]
    print(f"threads {args.threads}, repeats {args.repeats}")
    print(f"| ViT-H/14 encode, one 224 x 224 image | {encode:.2f} s | {encode / base:.2f} x one legs' forward |")
    print(f"| legs' forward, SD1.5 UNet, 4 rows at 64 x 64 latent | {base:.2f} s | 1 |")
    for name in ("4 tokens", "16 tokens"):
        print(f"| the same with a unit of {name} on the 2 adapted rows | {seconds[name]:.2f} s | "
              f"{seconds[name] / base:.3f} |")
        print(f"| the unit's image term alone ({name}, 2 rows, all 16 layers: q, K/V, attention, W_out) | "
              f"{alone[name]:.3f} s | {alone[name] / base:.4f} |")


if __name__ == "__main__":
    main()
