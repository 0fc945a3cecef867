"""Prompt LoRA tags of another family, carried by Delta Sampling (Settings > Delta Sampling), in the real webui.

The judge is DS's own explicit request: an SD1 ``<lora:L:0.8>`` in an SDXL prompt, with the SD1 base set to A, must
give bit for bit the image of the accordion request (source A, L at 0.8 on the adapted leg, the carried LoRAs' lambda
and resolution) with the prompt as the host leaves it once it has stripped the tag. Where no base is set, the host
keeps the tag exactly as without DS (A1111 applies the parts whose names fit the target) and the infotext says so.
"""

from __future__ import annotations

import contextlib
import json
import re

import pytest
from PIL import Image

from test_delta_sampling import assert_only_the_masked_square_changed, ds, infotext, png_b64
from webui_harness import image_array, mean_abs_diff

pytestmark = pytest.mark.webui

PROMPT = "a [red:green:0.5] (apple:1.2) on a table"  # prompt editing and emphasis reach the legs as the target
DEFAULTS = {"delta_sampling_carry_base_sd1": "None", "delta_sampling_carry_base_sd2": "None",
            "delta_sampling_carry_base_sdxl": "None", "delta_sampling_carry_loras": True,
            "delta_sampling_carry_scale": 1.0, "delta_sampling_carry_resolution": "target"}
VISIBLE = 1.0  # mean levels a LoRA must change the image by, or the comparison proves nothing


@contextlib.contextmanager
def carry_settings(webui, **options):
    """Settings > Delta Sampling for the duration of a test (then back to the defaults)."""
    assert webui.post("/sdapi/v1/options", json={**DEFAULTS, **options}).status_code == 200
    try:
        yield
    finally:
        assert webui.post("/sdapi/v1/options", json=DEFAULTS).status_code == 200


def host_stripped(prompt: str) -> str:
    """The prompt as the host's tag parser leaves it (modules/extra_networks.parse_prompt)."""
    return re.sub(r"<(\w+):([^>]+)>", "", prompt)


def same_bytes(a: str, b: str) -> bool:
    return image_array(a).tobytes() == image_array(b).tobytes()


def explicit(webui, loras: list[tuple[str, float]], source: str = "tiny-sd1-a", **fields) -> dict:
    return ds(scale=fields.pop("scale", 1.0), source=webui.models.title(source),
              loras=[{"name": n, "weight": w} for n, w in loras], source_resolution=fields.pop("res", "target"),
              **fields)


def last_generation(webui) -> dict:
    return webui.get("/delta-sampling/v1/status").json()["last_generation"]


def test_an_sd1_prompt_lora_on_sdxl_equals_the_explicit_request_and_pastes_back(webui):
    sd1_lora = webui.models.lora("sd1").tag(0.8)
    prompt = f"{PROMPT} {sd1_lora}"
    with carry_settings(webui, delta_sampling_carry_base_sd1=webui.models.title("tiny-sd1-a")):
        offset = webui.log_offset()
        carried = webui.txt2img(webui.payload("tiny-sdxl-a", prompt))
        log = webui.log_since(offset)
        status = webui.get("/delta-sampling/v1/status").json()
        want = webui.txt2img(webui.payload("tiny-sdxl-a", host_stripped(prompt),
                                           alwayson_scripts=explicit(webui, [("tiny-sd1-lora", 0.8)])))
        plain = webui.txt2img(webui.payload("tiny-sdxl-a", host_stripped(prompt)))
        assert same_bytes(carried["images"][0], want["images"][0])
        assert mean_abs_diff(carried["images"][0], plain["images"][0]) > VISIBLE
        text = infotext(carried)
        assert text.startswith(prompt)  # the tag stays in the image's prompt
        assert 'Delta carried LoRAs: "tiny-sd1-lora:0.8 [' in text, text
        assert f"Delta carried base: {webui.models.title('tiny-sd1-a')}" in text, text
        assert 'Delta carried settings: "lambda 1, source resolution target"' in text, text
        assert "Delta sampling: True" not in text and "Lora hashes" not in text, text  # the host applied nothing
        assert log.count("carrying the prompt's SD1 LoRA(s) tiny-sd1-lora:0.8") == 1, log
        generation, said = status["last_generation"], status["prompt_loras"]
        assert generation["carried_loras"] == ["tiny-sd1-lora:0.8"] and generation["source_calls"] > 0
        assert said.startswith("carrying the prompt's SD1 LoRA(s) tiny-sd1-lora:0.8 onto base tiny-sd1-a"), said
        # PNG Info -> txt2img: the prompt (with its tag) comes back, and with it the same carried image
        payload = webui.payload("tiny-sdxl-a", infotext=text)
        del payload["prompt"]
        again = webui.txt2img(payload)
        assert infotext(again) == text
        assert same_bytes(again["images"][0], carried["images"][0])


def test_an_sdxl_lora_in_the_same_prompt_stays_the_hosts(webui):
    prompt = f"{PROMPT} {webui.models.lora('sd1').tag(0.8)}{webui.models.lora('sdxl').tag(0.7)}"
    host_part = f"{PROMPT} {webui.models.lora('sdxl').tag(0.7)}"
    with carry_settings(webui, delta_sampling_carry_base_sd1=webui.models.title("tiny-sd1-a")):
        carried = webui.txt2img(webui.payload("tiny-sdxl-a", prompt))
        want = webui.txt2img(webui.payload("tiny-sdxl-a", host_part,
                                           alwayson_scripts=explicit(webui, [("tiny-sd1-lora", 0.8)])))
        without_sdxl_lora = webui.txt2img(webui.payload("tiny-sdxl-a", f"{PROMPT} {webui.models.lora('sd1').tag(0.8)}"))
    assert same_bytes(carried["images"][0], want["images"][0])
    assert mean_abs_diff(carried["images"][0], without_sdxl_lora["images"][0]) > VISIBLE
    assert "Lora hashes: \"tiny-sdxl-lora: " in infotext(carried)  # the host's own LoRA, as the host applies it


def test_an_sdxl_prompt_lora_is_carried_onto_an_sd1_target(webui):
    prompt = f"{PROMPT} {webui.models.lora('sdxl').tag(0.8)}"
    with carry_settings(webui, delta_sampling_carry_base_sdxl=webui.models.title("tiny-sdxl-a"),
                        delta_sampling_carry_scale=1.5, delta_sampling_carry_resolution="native"):
        carried = webui.txt2img(webui.payload("tiny-sd1-a", prompt))
        want = webui.txt2img(webui.payload("tiny-sd1-a", host_stripped(prompt), alwayson_scripts=explicit(
            webui, [("tiny-sdxl-lora", 0.8)], source="tiny-sdxl-a", scale=1.5, res="native")))
    plain = webui.txt2img(webui.payload("tiny-sd1-a", host_stripped(prompt)))
    assert same_bytes(carried["images"][0], want["images"][0])
    assert mean_abs_diff(carried["images"][0], plain["images"][0]) > VISIBLE
    assert 'Delta carried settings: "lambda 1.5, source resolution native"' in infotext(carried)


def test_without_a_base_the_host_keeps_the_tag_and_the_infotext_says_what_it_did(webui):
    prompt = f"{PROMPT} {webui.models.lora('sd1').tag(0.8)}"
    with carry_settings(webui):
        offset = webui.log_offset()
        res = webui.txt2img(webui.payload("tiny-sdxl-a", prompt))
        log = webui.log_since(offset)
        said = webui.get("/delta-sampling/v1/status").json()["prompt_loras"]
    with carry_settings(webui, delta_sampling_carry_base_sd1=webui.models.title("tiny-sd1-a"),
                        delta_sampling_carry_loras=False):
        switched_off = webui.txt2img(webui.payload("tiny-sdxl-a", prompt))
    plain = webui.txt2img(webui.payload("tiny-sdxl-a", host_stripped(prompt)))
    text = infotext(res)
    # the host's own handling: its Lora extension activated the file (its hash in the infotext) and applied the
    # parts whose names fit SDXL, which changes the image; DS did not run
    assert 'Lora hashes: "tiny-sd1-lora: ' in text, text
    assert mean_abs_diff(res["images"][0], plain["images"][0]) > VISIBLE
    assert same_bytes(res["images"][0], switched_off["images"][0])
    note = ("tiny-sd1-lora is an SD1 LoRA: A1111 applies only the parts whose layer names fit this model, to unrelated "
            "layers; set Settings > Delta Sampling > SD1 source base to carry it with Delta Sampling")
    assert f'Delta LoRA note: "{note}"' in text, text
    assert log.count(note) == 1, log
    assert said == note, said
    assert "Delta carried" not in text and "Delta sampling: True" not in text
    assert "carrying is switched off" in infotext(switched_off)


def test_a_batch_with_different_tags_per_image_is_refused_and_batch_size_1_carries_each(webui):
    matrix = dict(script_name="prompt matrix", script_args=[False, False, "positive", "comma", 0])
    prompt = f"{PROMPT}|{webui.models.lora('sd1').tag(0.8)}"
    with carry_settings(webui, delta_sampling_carry_base_sd1=webui.models.title("tiny-sd1-a")):
        offset = webui.log_offset()
        r = webui.post("/sdapi/v1/txt2img", json=webui.payload("tiny-sdxl-a", prompt, batch_size=2, **matrix))
        assert r.status_code == 422, r.text[:500]
        detail = r.json()["detail"]
        assert "image 1: none; image 2: tiny-sd1-lora:0.8" in detail and "batch size 1" in detail, detail
        assert "Traceback" not in webui.log_since(offset)
        res = webui.txt2img(webui.payload("tiny-sdxl-a", prompt, batch_size=1, **matrix))
        second = f"{PROMPT}, {webui.models.lora('sd1').tag(0.8)}"
        want = webui.txt2img(webui.payload("tiny-sdxl-a", host_stripped(second),
                                           alwayson_scripts=explicit(webui, [("tiny-sd1-lora", 0.8)])))
    plain = webui.txt2img(webui.payload("tiny-sdxl-a", PROMPT))
    assert len(res["images"]) == 3  # the grid, then one image per prompt
    infotexts = json.loads(res["info"])["infotexts"][1:]
    assert same_bytes(res["images"][1], plain["images"][0]) and "Delta carried" not in infotexts[0]
    assert same_bytes(res["images"][2], want["images"][0]) and "Delta carried LoRAs" in infotexts[1]


def test_hires_carries_the_lora_in_both_passes(webui):
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6, hr_second_pass_steps=3)
    prompt = f"{PROMPT} {webui.models.lora('sd1').tag(0.8)}"
    with carry_settings(webui, delta_sampling_carry_base_sd1=webui.models.title("tiny-sd1-a")):
        carried = webui.txt2img(webui.payload("tiny-sdxl-a", prompt, **hires))
        assert last_generation(webui)["passes"] == 2
        want = webui.txt2img(webui.payload("tiny-sdxl-a", host_stripped(prompt), **hires,
                                           alwayson_scripts=explicit(webui, [("tiny-sd1-lora", 0.8)])))
        first_pass_only = webui.txt2img(webui.payload("tiny-sdxl-a", host_stripped(prompt), **hires,
                                                      alwayson_scripts=explicit(webui, [("tiny-sd1-lora", 0.8)],
                                                                                hires=False)))
    assert same_bytes(carried["images"][0], want["images"][0])
    # the delta in the hires pass is visible (measured: mean 0.62 levels from the first pass's delta alone)
    assert mean_abs_diff(carried["images"][0], first_pass_only["images"][0]) > 0.2


def test_accordion_loras_and_carried_loras_together_equal_the_request_with_both(webui):
    prompt = f"{PROMPT} {webui.models.lora('sd1').tag(0.8)}"
    accordion = explicit(webui, [("tiny-sd1-locon", 0.5)])
    with carry_settings(webui):  # no base needed: the accordion's pair is SD1
        carried = webui.txt2img(webui.payload("tiny-sdxl-a", prompt, alwayson_scripts=accordion))
        want = webui.txt2img(webui.payload("tiny-sdxl-a", host_stripped(prompt), alwayson_scripts=explicit(
            webui, [("tiny-sd1-locon", 0.5), ("tiny-sd1-lora", 0.8)])))
        accordion_only = webui.txt2img(webui.payload("tiny-sdxl-a", host_stripped(prompt), alwayson_scripts=accordion))
        assert same_bytes(carried["images"][0], want["images"][0])
        assert mean_abs_diff(carried["images"][0], accordion_only["images"][0]) > VISIBLE
        text = infotext(carried)
        # the accordion's own LoRA only (pasting the prompt carries the tag again)
        assert 'Delta LoRAs: "tiny-sd1-locon:0.5"' in text and 'Delta carried LoRAs: "tiny-sd1-lora:0.8 [' in text
        payload = webui.payload("tiny-sdxl-a", infotext=text)
        del payload["prompt"]
        again = webui.txt2img(payload)
        assert same_bytes(again["images"][0], carried["images"][0])


def test_img2img_and_inpainting_carry_the_prompt_lora(webui):
    init = webui.txt2img(webui.payload("tiny-sdxl-a", "a house"))["images"][0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    prompt = f"{PROMPT} {webui.models.lora('sd1').tag(0.8)}"
    i2i = dict(init_images=[init], denoising_strength=0.75)
    inpaint = dict(i2i, mask=png_b64(mask), denoising_strength=0.9, inpainting_fill=1, inpaint_full_res=False,
                   mask_blur=0, inpainting_mask_invert=0)
    with carry_settings(webui, delta_sampling_carry_base_sd1=webui.models.title("tiny-sd1-a")):
        webui.img2img(webui.payload("tiny-sdxl-a", prompt, **i2i))  # warm-up (test_delta_controlnet: first img2img)
        for what, fields in (("img2img", i2i), ("inpainting", inpaint)):
            carried = webui.img2img(webui.payload("tiny-sdxl-a", prompt, **fields))
            want = webui.img2img(webui.payload("tiny-sdxl-a", host_stripped(prompt), **fields,
                                               alwayson_scripts=explicit(webui, [("tiny-sd1-lora", 0.8)])))
            assert same_bytes(carried["images"][0], want["images"][0]), what
    plain = image_array(webui.img2img(webui.payload("tiny-sdxl-a", host_stripped(prompt), **inpaint))["images"][0])
    assert_only_the_masked_square_changed(carried["images"][0], plain.astype(int), 16, 48, 4)


def test_a_base_that_is_gone_is_refused_naming_the_setting(webui):
    with carry_settings(webui, delta_sampling_carry_base_sd1="no-such-model.safetensors"):
        r = webui.post("/sdapi/v1/txt2img", json=webui.payload("tiny-sdxl-a", f"{PROMPT} <lora:tiny-sd1-lora:0.8>"))
    assert r.status_code == 422, r.text[:500]
    assert r.json()["detail"].startswith("Settings > Delta Sampling > source base for SD1 prompt LoRAs: no checkpoint")


def test_a_tag_with_two_weights_is_refused_and_the_next_request_works(webui):
    with carry_settings(webui, delta_sampling_carry_base_sd1=webui.models.title("tiny-sd1-a")):
        offset = webui.log_offset()
        r = webui.post("/sdapi/v1/txt2img", json=webui.payload("tiny-sdxl-a", f"{PROMPT} <lora:tiny-sd1-lora:0.8:0.5>"))
        assert r.status_code == 422, r.text[:500]
        assert "text encoder 0.8 and the UNet 0.5" in r.json()["detail"]
        assert "Traceback" not in webui.log_since(offset)
        plain = webui.txt2img(webui.payload("tiny-sdxl-a", PROMPT))
    again = webui.txt2img(webui.payload("tiny-sdxl-a", PROMPT))
    assert same_bytes(plain["images"][0], again["images"][0])


def test_batch_count_and_prompt_search_replace_cells_each_carry_their_loras(webui):
    prompt = f"{PROMPT} {webui.models.lora('sd1').tag(0.8)}"
    info = webui.get("/sdapi/v1/script-info").json()
    names = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])["args"][0]["choices"]
    sr = [names.index("Prompt S/R"), "tiny-sd1-lora, tiny-sd1-locon", [], 0, "", [], 0, "", [],
          True, True, False, False, False, False, False, 0, False]
    with carry_settings(webui, delta_sampling_carry_base_sd1=webui.models.title("tiny-sd1-a")):
        counted = webui.txt2img(webui.payload("tiny-sdxl-a", prompt, n_iter=2))
        want = webui.txt2img(webui.payload("tiny-sdxl-a", host_stripped(prompt), n_iter=2,
                                           alwayson_scripts=explicit(webui, [("tiny-sd1-lora", 0.8)])))
        grid = webui.txt2img(webui.payload("tiny-sdxl-a", prompt, script_name="x/y/z plot", script_args=sr))
        locon = webui.txt2img(webui.payload("tiny-sdxl-a", host_stripped(prompt),
                                            alwayson_scripts=explicit(webui, [("tiny-sd1-locon", 0.8)])))
    assert len(counted["images"]) == 2  # one per batch (the API returns no grid for these)
    for got, expected in zip(counted["images"], want["images"], strict=True):
        assert same_bytes(got, expected)
    cells = grid["images"][1:]
    assert len(cells) == 2
    assert same_bytes(cells[0], want["images"][0]) and same_bytes(cells[1], locon["images"][0])
    texts = json.loads(grid["info"])["infotexts"][1:]
    assert 'Delta carried LoRAs: "tiny-sd1-lora:0.8 [' in texts[0] and '"tiny-sd1-locon:0.8 [' in texts[1]


def test_a_hires_prompt_that_carries_other_loras_is_refused(webui):
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6, hr_second_pass_steps=3)
    with carry_settings(webui, delta_sampling_carry_base_sd1=webui.models.title("tiny-sd1-a")):
        r = webui.post("/sdapi/v1/txt2img", json=webui.payload(
            "tiny-sdxl-a", f"{PROMPT} {webui.models.lora('sd1').tag(0.8)}", **hires, hr_prompt=PROMPT))
    assert r.status_code == 422, r.text[:500]
    assert "the hires prompt carries other LoRAs" in r.json()["detail"]
