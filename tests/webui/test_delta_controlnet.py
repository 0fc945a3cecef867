"""ControlNet units on the adapted leg, in the real webui, over HTTP.

The oracle is the direct path: the same units applied to the target model itself by the test-support script
"delta test direct controlnet" (``lib_delta.controlnet`` on the target's UNet, pinned to the UNet's own forward by
test_delta_controlnet_core.py). With target = source base = A and adapted = A + units, DS at lambda = 1 computes
D_A + (D_A+CN - D_A) = D_A+CN at every step, so its image must be the direct image.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from test_delta_sampling import assert_same_image, ds, infotext, max_diff, png_b64
from webui_harness import image_array, mean_abs_diff

pytestmark = pytest.mark.webui

CN = {"sd1": "tiny-sd1-cn", "sd2": "tiny-sd2-cn", "sdxl": "tiny-sdxl-cn"}
CHECKPOINT = {"sd1": "tiny-sd1-a", "sd2": "tiny-sd2v-a", "sdxl": "tiny-sdxl-a"}


def control_image(size: int = 64) -> str:
    """Base64 PNG: white shapes on black, so that canny has edges and the map is far from uniform."""
    img = Image.new("RGB", (size, size), "black")
    draw = ImageDraw.Draw(img)
    draw.rectangle([size // 8, size // 8, size // 2, size // 2], fill="white")
    draw.ellipse([size // 2, size // 3, size - 4, size - 6], fill=(200, 80, 30))
    return png_b64(img)


def unit(family: str = "sd1", **over) -> dict:
    return {"model": CN[family], "image": control_image(), **over}


def direct(units: list[dict]) -> dict:
    return {"delta test direct controlnet": {"args": [{"units": units}]}}


def last_generation(webui) -> dict:
    return webui.get("/delta-sampling/v1/status").json()["last_generation"]


@pytest.mark.parametrize(("family", "mode"), [("sd1", "Balanced"), ("sd1", "ControlNet is more important"),
                                              ("sd1", "My prompt is more important"), ("sd2", "Balanced"),
                                              ("sdxl", "Balanced")])
def test_unit_on_the_adapted_leg_equals_the_unit_applied_directly(webui, family, mode):
    ckpt = CHECKPOINT[family]
    a = webui.models.title(ckpt)
    units = [unit(family, control_mode=mode)]
    plain = webui.txt2img(webui.payload(ckpt))
    direct_image = webui.txt2img(webui.payload(ckpt, alwayson_scripts=direct(units)))
    assert "Direct ControlNet calls: 4" in infotext(direct_image)  # 4 steps, one batched call each
    res = webui.txt2img(webui.payload(ckpt, alwayson_scripts=ds(scale=1.0, source=a, controlnet=units)))
    gen = last_generation(webui)
    assert gen["controlnet_calls"] == 4 and gen["source_calls"] == 4, gen
    effect = mean_abs_diff(direct_image["images"][0], plain["images"][0])
    assert effect > 1.0, f"the unit should visibly change the image (mean {effect:.3f})"
    assert_same_image(res["images"][0], direct_image["images"][0], f"{family} {mode}")
    peak = max_diff(res["images"][0], direct_image["images"][0])
    print(f"{family} {mode}: effect {effect:.2f}, DS vs direct max {peak}")


def test_two_units_with_windows_and_hires_equal_the_direct_path(webui):
    a = webui.models.title("tiny-sd1-a")
    units = [unit(weight=0.7, guidance_end=0.5), unit(module="canny", weight=1.3, guidance_start=0.25,
                                                      control_mode="My prompt is more important")]
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
             "denoising_strength": 0.6}
    direct_image = webui.txt2img(webui.payload("tiny-sd1-a", alwayson_scripts=direct(units), **hires))
    res = webui.txt2img(webui.payload("tiny-sd1-a", alwayson_scripts=ds(scale=1.0, source=a, controlnet=units),
                                      **hires))
    assert_same_image(res["images"][0], direct_image["images"][0], "two units + hires")
    gen = last_generation(webui)
    assert gen["legs_sizes"] == [[64, 64], [96, 96]], gen  # the hint follows the hires pass's size
    # sd-webui-controlnet's clock, the webui's step fraction, lags one step: the first pass's 4 calls see 0, 0, .25,
    # .5 (unit 1 ends at .5: all 4; unit 2 starts at .25: 2), the hires pass's 2 calls 0, 0 (unit 1: 2, unit 2: 0)
    assert gen["controlnet_calls"] == 8, gen
    assert "Direct ControlNet calls: 8" in infotext(direct_image)


def assert_idle_units_change_nothing(webui, make_unit) -> None:
    """lambda 0 is DS off bit for bit; a unit (``make_unit(**fields)``) at weight 0, or whose window holds no step, is
    the pair without it, bit for bit, and never runs; adapted = base + an idle unit runs neither leg."""
    a = webui.models.title("tiny-sd1-a")
    lora = [{"name": "tiny-sd1-lora", "weight": 1.0}]
    off = webui.txt2img(webui.payload("tiny-sd1-a"))
    zero_lambda = webui.txt2img(webui.payload("tiny-sd1-a", alwayson_scripts=ds(scale=0.0, source=a,
                                                                              controlnet=[make_unit()])))
    assert image_array(zero_lambda["images"][0]).tobytes() == image_array(off["images"][0]).tobytes()

    pair = webui.txt2img(webui.payload("tiny-sd1-a", alwayson_scripts=ds(scale=1.0, source=a, loras=lora)))
    for idle in (make_unit(weight=0.0), make_unit(guidance_start=0.9)):
        res = webui.txt2img(webui.payload("tiny-sd1-a", alwayson_scripts=ds(scale=1.0, source=a, loras=lora,
                                                                          controlnet=[idle])))
        assert image_array(res["images"][0]).tobytes() == image_array(pair["images"][0]).tobytes(), idle
        gen = last_generation(webui)
        assert gen["controlnet_calls"] == 0 and gen["source_calls"] == 4, gen
    # Adapted = base + an idle unit: the delta is exactly 0, so the legs do not run either.
    res = webui.txt2img(webui.payload("tiny-sd1-a", alwayson_scripts=ds(scale=1.0, source=a,
                                                                      controlnet=[make_unit(guidance_start=0.9)])))
    assert image_array(res["images"][0]).tobytes() == image_array(off["images"][0]).tobytes()
    gen = last_generation(webui)
    assert (gen["controlnet_calls"], gen["source_calls"], gen["skipped_calls"]) == (0, 0, 4), gen


def test_lambda_zero_weight_zero_and_outside_the_window_change_nothing_and_run_nothing(webui):
    assert_idle_units_change_nothing(webui, unit)


def test_sd1_controlnet_steers_an_sdxl_target(webui):
    sd1 = webui.models.title("tiny-sd1-a")
    plain = webui.txt2img(webui.payload("tiny-sdxl-a"))
    res = webui.txt2img(webui.payload("tiny-sdxl-a", alwayson_scripts=ds(scale=1.0, source=sd1,
                                                                       controlnet=[unit(module="canny")])))
    pixels = image_array(res["images"][0]).astype(float)
    assert pixels.std() > 1.0 and np.isfinite(pixels).all()
    change = mean_abs_diff(res["images"][0], plain["images"][0])
    assert change > 1.0, change
    text = infotext(res)
    assert f"Delta source: {sd1}" in text and "Delta ControlNet 1: " in text and "Module: canny" in text
    assert last_generation(webui)["controlnet_calls"] == 4


def test_every_file_layout_and_a_control_lora_give_the_same_image(webui):
    a = webui.models.title("tiny-sd1-a")

    def run(model: str) -> str:
        res = webui.txt2img(webui.payload("tiny-sd1-a", alwayson_scripts=ds(scale=1.0, source=a,
                                                                          controlnet=[unit(model=model)])))
        return res["images"][0]

    prefixed = run("tiny-sd1-cn")
    for model in ("tiny-sd1-cn-bare", "tiny-sd1-cn-diffusers"):
        assert image_array(run(model)).tobytes() == image_array(prefixed).tobytes(), model
    assert max_diff(run("tiny-sd1-cn-fp16"), prefixed) <= 2
    # a control-LoRA is the source UNet's own encoder + up @ down: the whole network the generator wrote out (its
    # up @ down product was rounded by another process's matmul: within one pixel level)
    assert max_diff(run("tiny-sd1-cn-lora"), run("tiny-sd1-cn-lora-whole")) <= 1


def test_bad_controlnet_inputs_are_http_errors_naming_the_problem_and_the_next_request_works(webui):
    a = webui.models.title("tiny-sd1-a")
    cases = [
        (unit("sdxl"), "tiny-sdxl-cn"),  # another family's file: named, with the source and the first tensor
        (unit(model="tiny-t2i-adapter"), "is a T2I-Adapter"),
        (unit(model="tiny-union-cn"), "ControlNet++ union"),
        (unit(model="tiny-broken-cn"), "cannot read ControlNet file"),
        (unit(model="no-such-cn"), "no ControlNet named 'no-such-cn'"),
        (unit(image=None), "has no control image"),
        (unit(image="not base64!"), "not a base64-encoded"),
        (unit(weight=3), "weight: 3 is above the maximum 2"),
        (unit(strength=1), "unknown unit field 'strength'"),
        (unit(control_mode="Loud"), "control_mode: expected one of"),
    ]
    for bad, message in cases:
        offset = webui.log_offset()
        r = webui.post("/sdapi/v1/txt2img", json=webui.payload("tiny-sd1-a", alwayson_scripts=ds(
            scale=1.0, source=a, controlnet=[bad])))
        assert r.status_code == 422, (message, r.status_code, r.text[:500])
        assert message in r.json()["errors"], r.text[:500]
        assert "Traceback" not in webui.log_since(offset), message
    wrong = webui.post("/sdapi/v1/txt2img", json=webui.payload("tiny-sd1-a", alwayson_scripts=ds(
        scale=1.0, source=a, controlnet=[unit("sdxl")]))).json()["errors"]
    assert "tiny-sd1-a" in wrong and "does not fit the sd1 source" in wrong and "proj_in" in wrong, wrong
    ok = webui.txt2img(webui.payload("tiny-sd1-a", alwayson_scripts=ds(scale=1.0, source=a, controlnet=[unit()])))
    assert "Delta ControlNet 1: " in infotext(ok)


def test_img2img_unit_uses_the_init_image_and_its_infotext_pastes_back(webui):
    init = control_image()
    units = [{"model": "tiny-sd1-cn", "module": "invert", "weight": 0.8, "guidance_end": 0.8,
              "control_mode": "ControlNet is more important", "resize_mode": "Just Resize"}]
    base, res, direct_image = img2img_with_units(webui, init, units)
    assert_same_image(res["images"][0], direct_image["images"][0], "img2img, init image as the control image")
    text = infotext(res)
    line = unit_infotext(text)
    assert "Model: tiny-sd1-cn [" in line and "Control Mode: ControlNet is more important" in line, line
    again = webui.img2img({**base, "infotext": text})
    assert image_array(again["images"][0]).tobytes() == image_array(res["images"][0]).tobytes()


def img2img_with_units(webui, init: str, units: list[dict]) -> tuple[dict, dict, dict]:
    """(the img2img payload on tiny-sd1-a with ``init``, DS's response with ``units`` on the adapted leg of (A, A),
    the direct path's response), both from warm requests."""
    a = webui.models.title("tiny-sd1-a")
    base = webui.payload("tiny-sd1-a", init_images=[init], denoising_strength=0.75)
    # Warm-up. The first img2img request of a webui process differs from the next identical one by up to 12 levels,
    # without DS too (measured: plain, plain -> max 12), and so did the first img2img that also loads the source
    # (max 10); every later request repeats bit for bit. The comparison below is between warm requests.
    webui.img2img(base)
    webui.img2img({**base, "alwayson_scripts": ds(scale=1.0, source=a, controlnet=units)})
    res = webui.img2img({**base, "alwayson_scripts": ds(scale=1.0, source=a, controlnet=units)})
    return base, res, webui.img2img({**base, "alwayson_scripts": direct(units)})


def unit_infotext(text: str, index: int = 1) -> str:
    """Unit ``index``'s part of an infotext's last line (``ControlNet N: "Model: ..., ..."``)."""
    return next(x for x in text.rsplit("\n", maxsplit=1)[-1].split(", Delta ") if x.startswith(f"ControlNet {index}: "))


def unit_weight_grid(webui, values: str, units: list[dict]) -> dict:
    """An XYZ plot over "Delta ControlNet weight" (``values``) on tiny-sd1-a with ``units`` on the adapted leg of
    (A, A), lambda 1."""
    info = webui.get("/sdapi/v1/script-info").json()
    names = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])["args"][0]["choices"]
    assert {"Delta ControlNet weight", "Delta ControlNet start", "Delta ControlNet end"} <= set(names)
    payload = webui.payload("tiny-sd1-a", script_name="x/y/z plot",
                            script_args=[names.index("Delta ControlNet weight"), values, [], 0, "", [], 0, "", [],
                                         True, True, False, False, False, False, False, 0, False],
                            alwayson_scripts=ds(scale=1.0, source=webui.models.title("tiny-sd1-a"), controlnet=units))
    return webui.txt2img(payload)


def test_xyz_over_unit_weight_and_the_preprocess_route(webui):
    a = webui.models.title("tiny-sd1-a")
    res = unit_weight_grid(webui, "0, 1", [unit()])
    images = res["images"][1:]
    plain = webui.txt2img(webui.payload("tiny-sd1-a"))
    one = webui.txt2img(webui.payload("tiny-sd1-a", alwayson_scripts=ds(scale=1.0, source=a, controlnet=[unit()])))
    assert image_array(images[0]).tobytes() == image_array(plain["images"][0]).tobytes()
    assert image_array(images[1]).tobytes() == image_array(one["images"][0]).tobytes()
    texts = json.loads(res["info"])["infotexts"][1:]
    assert "Weight: 0," in texts[0] and "Weight: 1," in texts[1]

    r = webui.post("/delta-sampling/v1/controlnet/preprocess", json={"image": control_image(), "module": "canny",
                                                                         "processor_res": 64})
    assert r.status_code == 200, r.text
    edges = image_array(r.json()["image"])
    assert set(np.unique(edges)) == {0, 255} and edges.shape == (64, 64, 3)
    r = webui.post("/delta-sampling/v1/controlnet/preprocess",
                   json={"image": control_image(), "resize_mode": "Resize and Fill", "width": 128, "height": 64})
    assert r.json()["width"] == 128 and image_array(r.json()["image"])[:, :32].max() == 0  # padded with black
    bad = webui.post("/delta-sampling/v1/controlnet/preprocess", json={"image": "???", "module": "canny"})
    assert bad.status_code == 422 and "base64" in bad.json()["detail"]
    assert "tiny-sd1-cn" in webui.get("/delta-sampling/v1/controlnet/models").json()["models"]
