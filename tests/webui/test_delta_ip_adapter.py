"""IP-Adapter units on the adapted leg, in the real webui, over HTTP.

Fixtures: IP-Adapter files over the tiny "-a" UNets' cross-attention layers (plain, plus and full-face for SD1; plain
and plus for SDXL; flat .safetensors and a nested .bin) and two tiny CLIP vision towers, ``clip_h.pth`` and
``clip_g.pth``, in models/clip_vision (make_tiny_models.py). The oracle is the direct path ("delta test direct
controlnet"): the same unit applied to the target model itself with lib_delta's image attention, pinned to the formula
by tests/unit/test_ip_adapter.py. With target = source base = A and adapted = A + unit, DS at lambda 1 must give the
direct image.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from PIL import Image, ImageDraw

from test_delta_controlnet import (
    assert_idle_units_change_nothing,
    control_image,
    direct,
    img2img_with_units,
    unit_infotext,
    unit_weight_grid,
)
from test_delta_sampling import assert_same_image, ds, infotext, png_b64
from webui_harness import WEBUI_PYTHON, image_array, mean_abs_diff

pytestmark = pytest.mark.webui

CHECKPOINT = {"sd1": "tiny-sd1-a", "sdxl": "tiny-sdxl-a"}


def reference_image(size: int = 48, hue: int = 0) -> str:
    img = Image.new("RGB", (size, size), (30, 90 + hue, 160))
    draw = ImageDraw.Draw(img)
    draw.ellipse([4, 6, size - 8, size - 4], fill=(220, 180 - hue, 40))
    draw.rectangle([size // 3, size // 4, size // 2, size - 6], fill=(10, 10, 10))
    return png_b64(img)


def ip_unit(model: str = "tiny-sd1-ip", **over) -> dict:
    return {"model": model, "module": "ip-adapter_clip_h", "image": reference_image(), **over}


def status(webui) -> dict:
    return webui.get("/delta-sampling/v1/status").json()


def same_bytes(a: dict, b: dict) -> bool:
    return image_array(a["images"][0]).tobytes() == image_array(b["images"][0]).tobytes()


@pytest.mark.parametrize(("model", "extra"), [
    ("tiny-sd1-ip", {}), ("tiny-sd1-ip-plus", {}), ("tiny-sd1-ip-full", {}),
    ("tiny-sd1-ip-nested", {"weight": 0.6, "guidance_start": 0.25, "guidance_end": 0.75}),
    ("tiny-sdxl-ip", {}), ("tiny-sdxl-ip-plus", {"module": "ip-adapter-auto"}),
    ("tiny-sd1-ip-plus", {"image": [{"image": reference_image()}, {"image": reference_image(hue=80)}]}),
])
def test_unit_on_the_adapted_leg_equals_the_unit_applied_directly(webui, model, extra):
    family = "sdxl" if "sdxl" in model else "sd1"
    ckpt = CHECKPOINT[family]
    units = [ip_unit(model, **extra)]
    plain = webui.txt2img(webui.payload(ckpt))
    direct_image = webui.txt2img(webui.payload(ckpt, alwayson_scripts=direct(units)))
    windowed = "guidance_start" in extra
    # 4 steps; the webui's step fraction at the 4 calls is 0, 0, .25, .5: [.25, .75] holds 2 of them
    assert f"Direct IP-Adapter calls: {2 if windowed else 4}" in infotext(direct_image)
    res = webui.txt2img(webui.payload(ckpt, alwayson_scripts=ds(scale=1.0, source=webui.models.title(ckpt),
                                                                  controlnet=units)))
    gen = status(webui)["last_generation"]
    effect = mean_abs_diff(direct_image["images"][0], plain["images"][0])
    assert effect > (0.3 if windowed else 1.0), f"the unit should visibly change the image (mean {effect:.3f})"
    assert_same_image(res["images"][0], direct_image["images"][0], model)
    assert gen["source_calls"] == (2 if windowed else 4) and gen["image_encoder_runs"] >= 1, gen
    text = infotext(res)
    assert f"Model: {model} [" in text and f"Module: {extra.get('module', 'ip-adapter_clip_h')}" in text, text


def test_lambda_zero_weight_zero_and_outside_the_window_change_nothing(webui):
    assert_idle_units_change_nothing(webui, ip_unit)


def test_ip_adapter_and_controlnet_units_combine_with_a_lora_pair(webui):
    a = webui.models.title("tiny-sd1-a")
    units = [ip_unit(weight=0.8), {"model": "tiny-sd1-cn", "image": control_image(), "guidance_end": 0.5}]
    direct_image = webui.txt2img(webui.payload("tiny-sd1-a", alwayson_scripts=direct(units)))
    res = webui.txt2img(webui.payload("tiny-sd1-a", alwayson_scripts=ds(scale=1.0, source=a, controlnet=units)))
    assert_same_image(res["images"][0], direct_image["images"][0], "IP-Adapter + ControlNet")
    text = infotext(res)
    first, second = (unit_infotext(text, i) for i in (1, 2))
    assert "tiny-sd1-ip [" in first and "Module: ip-adapter_clip_h" in first, first
    assert "tiny-sd1-cn [" in second and "Module: none" in second, second


def test_ip_adapters_steer_a_target_of_another_family(webui):
    sd1 = webui.models.title("tiny-sd1-a")
    plain = webui.txt2img(webui.payload("tiny-sdxl-a"))
    res = webui.txt2img(webui.payload("tiny-sdxl-a", alwayson_scripts=ds(scale=1.0, source=sd1,
                                                                       controlnet=[ip_unit()])))
    effect = mean_abs_diff(res["images"][0], plain["images"][0])
    assert effect > 0.5, f"the SD1 IP-Adapter should change the SDXL image (mean {effect:.3f})"
    other = webui.txt2img(webui.payload("tiny-sdxl-a", alwayson_scripts=ds(
        scale=1.0, source=sd1, controlnet=[ip_unit(image=reference_image(hue=80))])))
    assert not same_bytes(res, other), "another reference image must give another image"
    # and the reverse: an SDXL IP-Adapter through an SDXL pair steers an SD1 target
    sdxl = webui.models.title("tiny-sdxl-a")
    plain_sd1 = webui.txt2img(webui.payload("tiny-sd1-a"))
    res_sd1 = webui.txt2img(webui.payload("tiny-sd1-a", alwayson_scripts=ds(scale=1.0, source=sdxl,
                                                                          controlnet=[ip_unit("tiny-sdxl-ip")])))
    effect = mean_abs_diff(res_sd1["images"][0], plain_sd1["images"][0])
    assert effect > 0.5, f"the SDXL IP-Adapter should change the SD1 image (mean {effect:.3f})"
    s = status(webui)
    assert s["encoders"] and s["encoders"][0]["bytes"] > 0
    assert s["total_bytes"] >= sum(m["bytes"] for m in s["models"]) + s["encoders"][0]["bytes"]


def test_bad_ip_adapter_inputs_are_http_errors_naming_the_problem_and_the_next_request_works(webui):
    a = webui.models.title("tiny-sd1-a")
    cases = [
        (ip_unit("tiny-sdxl-ip"), 422, "does not fit tiny-sd1-a.safetensors (sd1)"),
        (ip_unit("tiny-sd1-ip-face"), 422, "FaceID"),
        (ip_unit("tiny-sd1-ip-damaged"), 422, "cannot read ControlNet file"),
        (ip_unit("tiny-sd1-ip-bigg"), 422, "gives 48: pick the encoder"),  # a ViT-bigG adapter on ViT-H
        (ip_unit(module="canny"), 422, "is an IP-Adapter; its module is the image encoder"),
        ({"model": "tiny-sd1-cn", "image": reference_image(), "module": "ip-adapter_clip_h"}, 422,
         "is an IP-Adapter image encoder, but tiny-sd1-cn is a ControlNet"),
        (ip_unit(image=None), 422, "has no control image"),
        ({"model": "tiny-sd1-cn", "image": [{"image": reference_image()}] * 2}, 422,
         "is a ControlNet, which takes one control image"),
    ]
    for bad, code, message in cases:
        offset = webui.log_offset()
        r = webui.post("/sdapi/v1/txt2img", json=webui.payload("tiny-sd1-a", alwayson_scripts=ds(
            scale=1.0, source=a, controlnet=[bad])))
        assert r.status_code == code, (message, r.status_code, r.text[:500])
        assert message in r.json()["errors"], r.text[:500]
        assert "Traceback" not in webui.log_since(offset), message
    wrong = webui.post("/sdapi/v1/txt2img", json=webui.payload("tiny-sd1-a", alwayson_scripts=ds(
        scale=1.0, source=a, controlnet=[ip_unit("tiny-sdxl-ip")]))).json()["errors"]
    assert "tiny-sdxl-ip" in wrong and "ip_adapter.1.to_k_ip.weight" in wrong, wrong  # the first tensor not fitting

    # a missing encoder: a 404 naming the files and the folders searched
    vision = webui.data_dir / "models" / "clip_vision"
    hidden = webui.data_dir / "models" / "clip_vision.hidden"
    os.rename(vision, hidden)
    try:
        webui.post("/delta-sampling/v1/unload")
        r = webui.post("/sdapi/v1/txt2img", json=webui.payload("tiny-sd1-a", alwayson_scripts=ds(
            scale=1.0, source=a, controlnet=[ip_unit()])))
        assert r.status_code == 404, r.text[:500]
        assert "clip_h.pth" in r.json()["errors"] and "image encoder is missing" in r.json()["errors"], r.text
    finally:
        os.rename(hidden, vision)
    ok = webui.txt2img(webui.payload("tiny-sd1-a", alwayson_scripts=ds(scale=1.0, source=a, controlnet=[ip_unit()])))
    assert "Module: ip-adapter_clip_h" in infotext(ok)


def test_img2img_unit_takes_the_init_image_its_infotext_pastes_back_and_xyz_sweeps_the_weight(webui):
    a = webui.models.title("tiny-sd1-a")
    units = [{"model": "tiny-sd1-ip", "module": "ip-adapter_clip_h", "weight": 0.7, "guidance_end": 0.8}]
    base, res, direct_image = img2img_with_units(webui, reference_image(64), units)
    assert_same_image(res["images"][0], direct_image["images"][0], "img2img, init image as the reference")
    text = infotext(res)
    line = unit_infotext(text)
    assert "Weight: 0.7" in line and "Guidance End: 0.8" in line and "tiny-sd1-ip [" in line, line
    again = webui.img2img({**base, "infotext": text})  # the infotext holds no image: the init image again
    assert same_bytes(again, res)

    grid = unit_weight_grid(webui, "0, 0.7", [ip_unit(guidance_end=0.8)])
    plain = webui.txt2img(webui.payload("tiny-sd1-a"))
    one = webui.txt2img(webui.payload("tiny-sd1-a", alwayson_scripts=ds(
        scale=1.0, source=a, controlnet=[ip_unit(weight=0.7, guidance_end=0.8)])))
    assert image_array(grid["images"][1]).tobytes() == image_array(plain["images"][0]).tobytes()
    assert image_array(grid["images"][2]).tobytes() == image_array(one["images"][0]).tobytes()


def test_clip_vision_tower_equals_transformers(webui, tiny_models):
    """DS's tower against transformers' CLIPVisionModelWithProjection (the webui's own 4.30) on the tiny ViT-H file:
    the same image_embeds and hidden_states[-2]."""
    script = r"""
import json, sys, torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
sys.path.insert(0, sys.argv[2])
from lib_delta.clip_vision import read_clip_vision
sd = torch.load(sys.argv[1], map_location="cpu")
ours = read_clip_vision(sd, "clip_h")
c = ours.config
hf = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=c.hidden, intermediate_size=c.intermediate,
    num_hidden_layers=c.layers, num_attention_heads=c.heads, patch_size=c.patch, image_size=c.image_size,
    projection_dim=c.projection, hidden_act="gelu", layer_norm_eps=1e-5)).eval()
missing, unexpected = hf.load_state_dict(sd, strict=False)
pixels = torch.randn(2, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out = hf(pixel_values=pixels, output_hidden_states=True)
embeds, hidden = ours.encode(pixels)
print(json.dumps({"missing": missing, "unexpected": unexpected,
                  "embeds": (embeds - out.image_embeds).abs().max().item(),
                  "hidden": (hidden - out.hidden_states[-2]).abs().max().item(),
                  "scale": out.hidden_states[-2].abs().max().item()}))
"""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([str(WEBUI_PYTHON), "-c", script, str(tiny_models.root / "clip_vision" / "clip_h.pth"), root],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert found["missing"] == [] and found["unexpected"] == [], found
    assert found["embeds"] < 1e-5 and found["hidden"] < 1e-5 * max(1.0, found["scale"]), found
