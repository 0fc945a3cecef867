"""Smoke tests of the real-webui tier: the webui serves, the tiny fixtures are loadable and discriminative.

These do not exercise Delta Sampling itself; they prove the harness (fixtures, webui process, HTTP, browser) so
extension tests can rely on it.
"""

from __future__ import annotations

import json
import time

import pytest

from webui_harness import image_array, image_from_b64, mean_abs_diff

pytestmark = pytest.mark.webui

FAMILIES = {"sd1": ("tiny-sd1-a", "tiny-sd1-b"), "sd2": ("tiny-sd2v-a", "tiny-sd2v-b"),
            "sdxl": ("tiny-sdxl-a", "tiny-sdxl-b")}
PROMPTS = ("a red apple on a table", "a blue car in the snow")
# mean absolute pixel difference (0..255) that counts as "visibly different"; measured values are 15-75
VISIBLE = 5.0


def test_webui_serves_fixtures(webui, tiny_models):
    titles = {m["title"] for m in webui.get("/sdapi/v1/sd-models").json()}
    assert {c.title for c in tiny_models.checkpoints.values()} <= titles
    loras = {lo["name"] for lo in webui.get("/sdapi/v1/loras").json()}
    assert set(tiny_models.loras) <= loras
    opts = webui.get("/sdapi/v1/options").json()
    assert opts["live_previews_enable"] is False
    assert opts["sd_model_checkpoint"] == webui.default_checkpoint
    assert webui.alive()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_txt2img_each_family_is_discriminative(webui, family):
    a, b = FAMILIES[family]
    images = {}
    for ckpt in (a, b):
        for prompt in PROMPTS:
            res = webui.txt2img(webui.payload(ckpt, prompt))
            info = json.loads(res["info"])
            assert info["sd_model_name"] == ckpt
            assert info["sd_model_hash"] == webui.models.ckpt(ckpt).shorthash
            arr = image_array(res["images"][0])
            assert arr.shape == (64, 64, 3)
            assert arr.std() > 10, "flat image: the tiny model produces no structure"
            images[ckpt, prompt] = res["images"][0]
    # checkpoints differ, prompts differ
    for prompt in PROMPTS:
        assert mean_abs_diff(images[a, prompt], images[b, prompt]) > VISIBLE
    for ckpt in (a, b):
        assert mean_abs_diff(images[ckpt, PROMPTS[0]], images[ckpt, PROMPTS[1]]) > VISIBLE
    # and the same request is reproducible exactly
    again = webui.txt2img(webui.payload(a, PROMPTS[0]))
    assert mean_abs_diff(again["images"][0], images[a, PROMPTS[0]]) == 0.0


def test_inpainting_checkpoint_img2img(webui, tiny_models):
    import base64
    import io

    from PIL import Image

    def b64(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    init = image_from_b64(webui.txt2img(webui.payload("tiny-sd1-a"))["images"][0])
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    payload = webui.payload("tiny-sd1-inpaint", init_images=[b64(init)], mask=b64(mask), denoising_strength=0.9,
                            inpainting_fill=1, inpaint_full_res=False, mask_blur=0)
    res = webui.img2img(payload)
    assert json.loads(res["info"])["sd_model_name"] == "tiny-sd1-inpaint"
    out = image_array(res["images"][0]).astype(int)
    src = image_array(b64(init)).astype(int)
    inside = abs(out[20:44, 20:44] - src[20:44, 20:44]).mean()
    outside = abs(out[:8] - src[:8]).mean()
    assert inside > VISIBLE
    assert outside < 1.0


@pytest.mark.parametrize("kind", ["lora", "locon", "loha", "lokr", "nomatch"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_tags_apply(webui, tiny_models, family, kind):
    ckpt = FAMILIES[family][0]
    lora = tiny_models.lora(family, kind)
    base = webui.txt2img(webui.payload(ckpt, PROMPTS[0]))["images"][0]
    offset = webui.log_offset()
    res = webui.txt2img(webui.payload(ckpt, f"{PROMPTS[0]} {lora.tag(1.0)}"))
    log = webui.log_since(offset)
    assert "networks with errors" not in log.lower()
    assert "Traceback" not in log

    match = webui.get(f"/delta-test/lora-match/{lora.name}").json()
    assert match["checkpoint"] == tiny_models.title(ckpt)
    assert match["file_modules"] == len(lora.module_keys)
    diff = mean_abs_diff(base, res["images"][0])
    if lora.expect_match:
        assert match["unmatched"] == [], f"keys the webui could not place: {match['unmatched'][:5]}"
        assert diff > VISIBLE
        info = json.loads(res["info"])
        assert lora.name in info["infotexts"][0]  # "Lora hashes: ..." names it
    else:
        assert match["matched_modules"] == 0
        assert diff == 0.0


def test_webuiapi_client_matches_requests(webui, tiny_models):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=webui.port, sampler="Euler", steps=4)
    ckpt = tiny_models.ckpt("tiny-sd2v-a")
    res = api.txt2img(prompt=PROMPTS[1], negative_prompt="", width=64, height=64, steps=4, sampler_name="Euler",
                      scheduler="Automatic", cfg_scale=5.0, seed=1234,
                      override_settings={"sd_model_checkpoint": ckpt.title})
    assert res.image.size == (64, 64)
    assert res.info["sd_model_name"] == ckpt.name
    ref = webui.txt2img(webui.payload(ckpt.name, PROMPTS[1]))["images"][0]
    import numpy as np

    assert np.array_equal(np.asarray(res.image.convert("RGB")), image_array(ref))


def test_browser_txt2img_page(webui, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    t0 = time.monotonic()
    browser.get(webui.url)
    button = WebDriverWait(browser, 90).until(ec.visibility_of_element_located((By.ID, "txt2img_generate")))
    assert button.text.strip() == "Generate"
    assert browser.find_element(By.ID, "txt2img_prompt").is_displayed()
    assert time.monotonic() - t0 < 90
