"""Source legs at a coarser grid (``source_resolution``) in the real webui.

``native`` needs a target larger than the source family's trained area (SD1: >= 80% of 4 x 512² for k = 2), so one
test runs the tiny SD1 checkpoints at 1024 x 832 with few steps; the others use the explicit factor 2 at small sizes.
Which factor each pass used is read from ``/delta-sampling/v1/status`` (``last_generation.pooling_factors``).
"""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from test_delta_sampling import assert_only_the_masked_square_changed
from webui_harness import image_array, image_from_b64, mean_abs_diff

pytestmark = pytest.mark.webui

PROMPT = "a (red:1.2) apple on a wooden table"


def ds(**fields) -> dict:
    return {"delta sampling": {"args": [{"enabled": True, **fields}]}}


def infotext(res: dict, index: int = 0) -> str:
    return json.loads(res["info"])["infotexts"][index]


def factors(webui) -> list[int]:
    return webui.get("/delta-sampling/v1/status").json()["last_generation"]["pooling_factors"]


def same_bytes(a: str, b: str) -> bool:
    return image_array(a).tobytes() == image_array(b).tobytes()


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_native_on_a_large_target_runs_at_half_the_grid_and_changes_the_image(webui):
    # The one test at a size where `native` pools (SD1 legs at 512 x 416 for a 1024 x 832 target): about 45 s a
    # request for the tiny models on one CPU thread (the target's attention and VAE at full size): 1 step, 2 requests.
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    size = dict(width=1024, height=832, steps=1)

    def generate(**extra):
        r = webui.post("/sdapi/v1/txt2img", json=webui.payload("tiny-sd1-a", PROMPT, **size, **extra), timeout=900)
        assert r.status_code == 200, r.text[:500]
        return r.json()

    native = generate(alwayson_scripts=ds(scale=1.0, source=a, adapted=b, source_resolution="native"))
    assert factors(webui) == [2]
    assert "Delta source resolution: native" in infotext(native)
    assert image_array(native["images"][0]).shape[:2] == (832, 1024)
    off = generate()["images"][0]
    assert mean_abs_diff(native["images"][0], off) > 1, "native legs changed nothing"


def test_target_setting_is_todays_behaviour_bitwise_and_lambda_zero_is_ds_off(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    off = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, width=128, height=128))["images"][0]
    zero = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, width=128, height=128, alwayson_scripts=ds(
        scale=0, source=a, adapted=b, source_resolution="2")))
    assert same_bytes(zero["images"][0], off)
    plain = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    target = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(
        scale=1.0, source=a, adapted=b, source_resolution="target")))
    assert same_bytes(plain["images"][0], target["images"][0])
    # native at 64 x 64 is factor 1 too (the target is far below SD1's 512²)
    native = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(
        scale=1.0, source=a, adapted=b, source_resolution="native")))
    assert factors(webui) == [1]
    assert same_bytes(plain["images"][0], native["images"][0])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_factor_two_with_a_batch_of_two(webui, family):
    a, b = (webui.models.title(f"tiny-{family}-a"), webui.models.title(f"tiny-{family}-b"))
    common = dict(width=128, height=128, batch_size=2, steps=4)
    pair = dict(scale=1.0, source=a, adapted=b)
    full = webui.txt2img(webui.payload(f"tiny-{family}-a", PROMPT, **common, alwayson_scripts=ds(**pair)))
    half = webui.txt2img(webui.payload(f"tiny-{family}-a", PROMPT, **common,
                                       alwayson_scripts=ds(**pair, source_resolution=2)))
    assert factors(webui) == [2]
    # the legs are conditioned on their own size (SDXL's size embedding): 128 px / 2
    assert webui.get("/delta-sampling/v1/status").json()["last_generation"]["legs_sizes"] == [[64, 64]]
    assert len(half["images"]) == 2 and "Delta source resolution: 2" in infotext(half, 1)
    off = webui.txt2img(webui.payload(f"tiny-{family}-a", PROMPT, **common))["images"]
    for i in range(2):
        assert mean_abs_diff(half["images"][i], off[i]) > 1
        assert not same_bytes(half["images"][i], full["images"][i])


def test_factor_two_img2img_and_hires(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    pair = dict(scale=1.0, source=a, adapted=b, source_resolution="2")
    init = webui.txt2img(webui.payload("tiny-sd1-a", "a house", width=128, height=128))["images"][0]
    common = dict(init_images=[init], denoising_strength=0.7, width=128, height=128, steps=5)
    off = webui.img2img(webui.payload("tiny-sd1-a", PROMPT, **common))["images"][0]
    res = webui.img2img(webui.payload("tiny-sd1-a", PROMPT, **common, alwayson_scripts=ds(**pair)))
    assert factors(webui) == [2]
    assert mean_abs_diff(res["images"][0], off) > 1

    hires = dict(enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.6, hr_second_pass_steps=3,
                 width=64, height=64)
    off = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, **hires))["images"][0]
    res = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, **hires, alwayson_scripts=ds(**pair)))
    # first pass 64² (an 8 x 8 latent: nothing smaller to pool to, so 1), hires pass 128² pooled by 2
    assert sorted(factors(webui)) == [1, 2]
    assert mean_abs_diff(res["images"][0], off) > 0.5


def test_factor_two_inpainting_changes_only_the_masked_area(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    init = image_from_b64(webui.txt2img(webui.payload("tiny-sd1-a", "a house", width=128, height=128))["images"][0])
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    common = dict(prompt=PROMPT, steps=5, init_images=[png_b64(init)], mask=png_b64(mask), denoising_strength=0.9,
                  inpainting_fill=1, inpaint_full_res=False, mask_blur=0, inpainting_mask_invert=0, width=128,
                  height=128)
    off = image_array(webui.img2img(webui.payload("tiny-sd1-inpaint", **common))["images"][0]).astype(int)
    res = webui.img2img(webui.payload("tiny-sd1-inpaint", **common, alwayson_scripts=ds(
        scale=2.0, source=a, adapted=b, source_resolution=2)))
    assert factors(webui) == [2]
    assert_only_the_masked_square_changed(res["images"][0], off, 32, 96, 8)


def test_odd_size_and_eps_sampler(webui):
    # 136 x 72 px = 17 x 9 latent cells: padded to 32 x 16, pooled to 16 x 8; DDIM takes the eps path
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    common = dict(width=136, height=72, sampler_name="DDIM", steps=4)
    off = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, **common))["images"][0]
    res = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, **common, alwayson_scripts=ds(
        scale=1.0, source=a, adapted=b, source_resolution=2)))
    assert factors(webui) == [2]
    assert image_array(res["images"][0]).shape[:2] == (72, 136)
    assert mean_abs_diff(res["images"][0], off) > 1


def test_xyz_axis_over_source_resolution(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    info = webui.get("/sdapi/v1/script-info").json()
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    axis_names = xyz["args"][0]["choices"]
    axis = axis_names.index("Delta source resolution")
    # axes with choices take their values from the dropdown list
    args = [axis, "", ["target", "2"], 0, "", [], 0, "", [], True, True, False, False, False, False, False, 0, False]
    res = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, width=128, height=128, script_name="x/y/z plot",
                                      script_args=args, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    images, texts = res["images"][1:], json.loads(res["info"])["infotexts"][1:]  # the grid comes first
    assert len(images) == 2
    assert ["Delta source resolution: 2" in t for t in texts] == [False, True]
    assert not same_bytes(images[0], images[1])
    # the "2" cell equals a plain request with factor 2 (no state leaks between cells)
    plain = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, width=128, height=128, alwayson_scripts=ds(
        scale=1.0, source=a, adapted=b, source_resolution="2")))
    assert same_bytes(plain["images"][0], images[1])
