"""Prompt LoRA tags of another family in a real Forge: carried by DS as in the A1111 tier
(tests/webui/test_delta_prompt_loras.py), and without a base set, the image Forge makes itself (it drops the file)."""

from __future__ import annotations

import pytest
from test_delta_prompt_loras import carry_settings, host_stripped

from test_delta_sampling import ds, infotext
from webui_harness import image_array, mean_abs_diff

pytestmark = pytest.mark.forge

PROMPT = "a red apple on a table"
VISIBLE = 1.0


def same_bytes(a: str, b: str) -> bool:
    return image_array(a).tobytes() == image_array(b).tobytes()


def explicit(forge, source: str, loras: list[tuple[str, float]]) -> dict:
    return ds(scale=1.0, source=forge.models.title(source), source_resolution="target",
              loras=[{"name": n, "weight": w} for n, w in loras])


def sd1_carried(forge) -> dict:
    """The explicit request a carried ``<lora:forge-sd15-lora:0.8>`` must equal (base forge-sd15-a)."""
    return explicit(forge, "forge-sd15-a", [("forge-sd15-lora", 0.8)])


@pytest.mark.parametrize(("target", "source", "lora"), [("forge-sdxl-a", "forge-sd15-a", "forge-sd15-lora"),
                                                        ("forge-sd15-a", "forge-sdxl-a", "forge-sdxl-lora")])
def test_a_prompt_lora_of_another_family_equals_the_explicit_request(forge, target, source, lora):
    family = "sd1" if source == "forge-sd15-a" else "sdxl"
    prompt = f"{PROMPT} <lora:{lora}:0.8>"
    with carry_settings(forge, **{f"delta_sampling_carry_base_{family}": forge.models.title(source)}):
        offset = forge.log_offset()
        carried = forge.txt2img(forge.payload(target, prompt, steps=4))
        log = forge.log_since(offset)
        want = forge.txt2img(forge.payload(target, host_stripped(prompt), steps=4,
                                           alwayson_scripts=explicit(forge, source, [(lora, 0.8)])))
    plain = forge.txt2img(forge.payload(target, host_stripped(prompt), steps=4))
    assert same_bytes(carried["images"][0], want["images"][0])
    assert mean_abs_diff(carried["images"][0], plain["images"][0]) > VISIBLE
    assert f'Delta carried LoRAs: "{lora}:0.8 [' in infotext(carried)
    assert "LoRA version mismatch" not in log, log  # withheld: Forge never saw the tag


def test_without_a_base_the_image_is_forges_own_and_the_infotext_says_it_dropped_the_lora(forge):
    prompt = f"{PROMPT} <lora:forge-sd15-lora:0.8>"
    with carry_settings(forge):
        offset = forge.log_offset()
        res = forge.txt2img(forge.payload("forge-sdxl-a", prompt, steps=4))
        log = forge.log_since(offset)
    plain = forge.txt2img(forge.payload("forge-sdxl-a", host_stripped(prompt), steps=4))
    assert same_bytes(res["images"][0], plain["images"][0])  # Forge drops a LoRA of another family
    assert "LoRA version mismatch" in log, log
    note = ("forge-sd15-lora is an SD1 LoRA: Forge drops it ('LoRA version mismatch'); set Settings > Delta Sampling > "
            "SD1 source base to carry it with Delta Sampling")
    assert f'Delta LoRA note: "{note}"' in infotext(res), infotext(res)
    assert log.count(note) == 1, log


def test_accordion_and_carried_loras_together_on_forge(forge):
    prompt = f"{PROMPT} <lora:forge-sd15-lora:0.8>"
    with carry_settings(forge):
        carried = forge.txt2img(forge.payload("forge-sdxl-a", prompt, steps=4, alwayson_scripts=explicit(
            forge, "forge-sd15-a", [("forge-sd15-locon", 0.5)])))
        want = forge.txt2img(forge.payload("forge-sdxl-a", host_stripped(prompt), steps=4, alwayson_scripts=explicit(
            forge, "forge-sd15-a", [("forge-sd15-locon", 0.5), ("forge-sd15-lora", 0.8)])))
    assert same_bytes(carried["images"][0], want["images"][0])


def test_forges_own_lora_in_the_same_prompt_and_the_pasted_prompt(forge):
    prompt = f"{PROMPT} <lora:forge-sd15-lora:0.8><lora:forge-sdxl-lora:0.7>"
    with carry_settings(forge, delta_sampling_carry_base_sd1=forge.models.title("forge-sd15-a")):
        carried = forge.txt2img(forge.payload("forge-sdxl-a", prompt, steps=4))
        want = forge.txt2img(forge.payload("forge-sdxl-a", f"{PROMPT} <lora:forge-sdxl-lora:0.7>", steps=4,
                                           alwayson_scripts=sd1_carried(forge)))
        # Forge's API cannot take an "infotext" field (its apply_infotext fails on pydantic 2 list types, without DS
        # too): the paste is the infotext's prompt, tags and all, which must carry the same LoRA again
        text = infotext(carried)
        again = forge.txt2img(forge.payload("forge-sdxl-a", text.split("\n")[0], steps=4))
    without_sdxl_lora = forge.txt2img(forge.payload("forge-sdxl-a", host_stripped(prompt), steps=4,
                                                    alwayson_scripts=sd1_carried(forge)))
    assert same_bytes(carried["images"][0], want["images"][0])
    assert mean_abs_diff(carried["images"][0], without_sdxl_lora["images"][0]) > VISIBLE  # Forge applied its own
    assert same_bytes(again["images"][0], carried["images"][0]) and infotext(again) == text


def test_batches_and_hires_on_forge(forge):
    matrix = dict(script_name="prompt matrix", script_args=[False, False, "positive", "comma", 0], steps=4)
    prompt = f"{PROMPT}|<lora:forge-sd15-lora:0.8>"
    hires = dict(steps=4, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6,
                 hr_second_pass_steps=3, hr_cfg=5.0, hr_additional_modules=["Use same choices"])
    tagged = f"{PROMPT} <lora:forge-sd15-lora:0.8>"
    with carry_settings(forge, delta_sampling_carry_base_sd1=forge.models.title("forge-sd15-a")):
        r = forge.post("/sdapi/v1/txt2img", json=forge.payload("forge-sdxl-a", prompt, batch_size=2, **matrix))
        assert r.status_code == 422 and "image 1: none; image 2: forge-sd15-lora:0.8" in r.json()["detail"], r.text
        res = forge.txt2img(forge.payload("forge-sdxl-a", prompt, batch_size=1, **matrix))
        want = forge.txt2img(forge.payload("forge-sdxl-a", f"{PROMPT}, ", steps=4, alwayson_scripts=sd1_carried(forge)))
        carried_hires = forge.txt2img(forge.payload("forge-sdxl-a", tagged, **hires))
        passes = forge.get("/delta-sampling/v1/status").json()["last_generation"]["passes"]
        want_hires = forge.txt2img(forge.payload("forge-sdxl-a", host_stripped(tagged), **hires,
                                                 alwayson_scripts=sd1_carried(forge)))
    plain = forge.txt2img(forge.payload("forge-sdxl-a", PROMPT, steps=4))
    assert len(res["images"]) == 3
    assert same_bytes(res["images"][1], plain["images"][0]) and same_bytes(res["images"][2], want["images"][0])
    assert passes == 2 and same_bytes(carried_hires["images"][0], want_hires["images"][0])
