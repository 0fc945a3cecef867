"""Generate the bench's mid-size random SD1-shaped checkpoints and a LoRA for them (runs in the webui's venv).

Reuses tests/webui/fixtures/make_tiny_models.py (its config builders, deterministic init, LoRA writer); only the
UNet is wider, so that model time dominates a generation. The text encoder stays the tiny fixtures' CLIP (its
directory is reused by absolute path). Usage::

    <webui venv python> bench/make_mid_model.py --webui-dir DIR --tiny-root FIXTURES --out OUT --unet-ch 128
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT_ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(PROJECT_ROOT, "tests", "webui", "fixtures"))

NAMES = (("bench-mid-sd1-a", 41), ("bench-mid-sd1-b", 42))
LORA_NAME = "bench-mid-sd1-lora"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--webui-dir", required=True)
    ap.add_argument("--tiny-root", required=True, help="the tiny fixtures' cache dir (its CLIP dir is reused)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--unet-ch", type=int, default=128)
    args = ap.parse_args()

    import make_tiny_models as mt

    mt.enter_webui(args.webui_dir)

    import safetensors.torch
    import torch
    import yaml

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with open(os.path.join(args.tiny_root, "manifest.json")) as f:
        tiny_manifest = json.load(f)
    # an own copy of the tiny CLIP files: the yamls name it by absolute path, and fixture dirs come and go
    clip_dir = os.path.join(os.path.abspath(args.out), "text_encoders", "clip-l-tiny")
    if not os.path.isdir(clip_dir):
        shutil.copytree(tiny_manifest["clip_dir"], clip_dir)
    mt.UNET_CH = args.unet_ch
    mt._patch_clip_loading()
    kohya_fn = mt.load_lora_keys(os.path.join(PROJECT_ROOT, "lib_delta", "lora_keys.py"))

    out = os.path.abspath(args.out)
    ckpt_dir, lora_dir = os.path.join(out, "Stable-diffusion"), os.path.join(out, "Lora")
    os.makedirs(ckpt_dir, exist_ok=True)
    os.makedirs(lora_dir, exist_ok=True)
    manifest = {"unet_ch": args.unet_ch, "checkpoints": [], "loras": []}
    model = None
    for name, seed in NAMES:
        conf = mt.sd1_config(clip_dir)
        model = mt.build(conf)
        for prefix, mod, role in mt.components(model):
            s = {"unet": seed, "te": seed + 100, "vae": mt.SEED_VAE_KL_F8}[role]
            mt.randomize(mod, s, prefix if role != "vae" else "first_stage_model")
        sd = mt.state_dict_for_save(model)
        path = os.path.join(ckpt_dir, name + ".safetensors")
        safetensors.torch.save_file(sd, path, metadata={"format": "pt", "delta_bench_model": name})
        with open(os.path.join(ckpt_dir, name + ".yaml"), "w") as f:
            yaml.safe_dump(conf, f, sort_keys=False)
        sha = mt.file_hashes(path)
        n_params = {role: sum(v.numel() for k, v in sd.items() if k.startswith(prefix + "."))
                    for prefix, _, role in mt.components(model)}
        manifest["checkpoints"].append({
            "name": name, "family": "sd1", "kind": "sd1", "seed": seed, "file": name + ".safetensors",
            "yaml": name + ".yaml", "sha256": sha, "shorthash": sha[:10], "title": f"{name}.safetensors [{sha[:10]}]",
            "bytes": os.path.getsize(path), "params": n_params, "parameterization": "eps", "inpainting": False,
            "vae_seed": mt.SEED_VAE_KL_F8,
        })
        print(f"wrote {name}: {os.path.getsize(path)} bytes, params {n_params}", flush=True)

    unet, te = mt.lora_targets(model, "sd1")

    def kohya(path: str) -> str:
        return kohya_fn(path, "sd1") if kohya_fn else mt.own_compvis_to_kohya(path, "sd1")

    targets = [(kohya(p), mt._shape_of(m, "x")) for p, m, kind in unet if kind == "attn"]
    targets += [(kohya(p), mt._shape_of(m, kind)) for p, m, kind in te]
    sd = mt.make_lora_file("lora", targets, 541, rank=8, scale=1.0)
    path = os.path.join(lora_dir, LORA_NAME + ".safetensors")
    safetensors.torch.save_file(sd, path, metadata={"ss_network_module": "networks.lora", "ss_output_name": LORA_NAME})
    mods = sorted({k.split(".", 1)[0] for k in sd})
    manifest["loras"].append({
        "name": LORA_NAME, "family": "sd1", "kind": "lora", "file": LORA_NAME + ".safetensors",
        "bytes": os.path.getsize(path), "expect_match": True, "module_keys": mods,
        "params": sum(v.numel() for v in sd.values()),
    })
    print(f"wrote {LORA_NAME}: {len(mods)} modules, {os.path.getsize(path)} bytes", flush=True)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
