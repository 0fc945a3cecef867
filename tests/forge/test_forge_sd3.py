"""The SD3 family (SD3 Medium, SD3.5 M and L) in a real Forge: transfers within the family are exact, LoRAs on the
source legs equal Forge's own ``<lora>``, an SD3.5-L LoRA that Forge refuses on M is carried by DS, and pairs across
the 4 <-> 16-channel line are request errors naming both families.

The fixtures (fixtures/make_forge_sd3_models.py) are transformer-only checkpoints, like the official SD3.5 files; their
CLIP-L, CLIP-G, T5 stub and VAE are chosen once for this module's Forge in its "VAE / Text Encoder" option, and the
source engines get the same choice. This module runs its own Forge with these and the 4-channel fixtures.
"""

from __future__ import annotations

import numpy as np
import pytest

from forge_harness import API_AUTH, MISSING, combined, ensure_forge_models, ensure_forge_sd3_models, h, start_forge
from test_delta_sampling import assert_same_image, ds, infotext
from webui_harness import image_array, mean_abs_diff

pytestmark = pytest.mark.forge

PROMPT = "a red apple on a table"
VISIBLE = 1.0  # mean levels: an effect counts as visible above this


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    if MISSING:
        pytest.skip(MISSING)
    models = combined(ensure_forge_models(), ensure_forge_sd3_models())
    ui = start_forge(models, tmp_path_factory.mktemp("forge-sd3-data"), auth=API_AUTH)
    try:
        modules = [m["file"] for m in models.manifest["modules"]]
        r = ui.post("/sdapi/v1/options", json={"forge_additional_modules": modules})
        assert r.status_code == 200, r.text
        yield ui
    finally:
        h.stop_process(ui.process)


def sd3(forge, name: str, prompt: str = PROMPT, **over) -> dict:
    # Forge's "Automatic" scheduler ends SD3 at sigma 0 with a repeated step at 4 steps (a NaN image); "Simple" is
    # its own flow preset's
    over.setdefault("scheduler", "Simple")
    return forge.payload(name, prompt, **over)


def same_bytes(a: str, b: str) -> bool:
    return image_array(a).tobytes() == image_array(b).tobytes()


def pair(forge, source: str, adapted: str | None = None, **fields) -> dict:
    fields.setdefault("scale", 1.0)
    if adapted is not None:
        fields["adapted"] = forge.models.title(adapted)
    return ds(source=forge.models.title(source), **fields)


def test_lambda_0_and_an_adapted_leg_equal_to_the_base_are_ds_off_bitwise(forge):
    off = forge.txt2img(sd3(forge, "forge-sd3m-a"))["images"][0]
    for script in (pair(forge, "forge-sd3m-a", "forge-sd35m-a", scale=0.0),
                   pair(forge, "forge-sd35m-a", "forge-sd35m-a")):  # source = adapted = B leaves A unchanged
        res = forge.txt2img(sd3(forge, "forge-sd3m-a", alwayson_scripts=script))
        assert same_bytes(res["images"][0], off), script


@pytest.mark.parametrize(("sampler", "cfg"), [("Euler", 5.0), ("Euler", 1.0), ("DPM++ 2M", 5.0), ("DPM++ 2M", 1.0)])
def test_ds_a_a_b_at_lambda_1_is_b_own_image(forge, sampler, cfg):
    """SD3-Medium-like A as the target and the source base, SD3.5-M-like B adapted: D_A + (D_B - D_A) = D_B at
    every call, so the image is B's own (the legs mirror Forge's CFG, its CFG-1 rule and its empty negative)."""
    want = forge.txt2img(sd3(forge, "forge-sd35m-a", sampler_name=sampler, cfg_scale=cfg))["images"][0]
    got = forge.txt2img(sd3(forge, "forge-sd3m-a", sampler_name=sampler, cfg_scale=cfg,
                            alwayson_scripts=pair(forge, "forge-sd3m-a", "forge-sd35m-a")))
    a_alone = forge.txt2img(sd3(forge, "forge-sd3m-a", sampler_name=sampler, cfg_scale=cfg))["images"][0]
    assert_same_image(got["images"][0], want, f"DS(A, A, B) vs B, {sampler} CFG {cfg}")
    assert mean_abs_diff(a_alone, want) > VISIBLE  # A and B do differ
    text = infotext(got)
    assert "Delta source: forge-sd3m-a" in text and "Delta adapted: forge-sd35m-a" in text, text
    models = {m["title"].split(".")[0]: m for m in forge.get("/delta-sampling/v1/status").json()["models"]}
    # both sources were built with the target's menu choices and condition through the target's text encoders
    assert {models[n]["family"] for n in ("forge-sd3m-a", "forge-sd35m-a")} == {"sd3"}
    assert models["forge-sd3m-a"]["uses_target_text_encoders"] and models["forge-sd35m-a"]["uses_target_text_encoders"]


@pytest.mark.parametrize("lora", ["forge-sd35m-lora", "forge-sd35m-locon"])
def test_a_lora_pair_equals_forges_own_lora(forge, lora):
    want = forge.txt2img(sd3(forge, "forge-sd35m-a", f"{PROMPT} <lora:{lora}:0.8>"))["images"][0]
    got = forge.txt2img(sd3(forge, "forge-sd35m-a", alwayson_scripts=pair(
        forge, "forge-sd35m-a", loras=[{"name": lora, "weight": 0.8}])))["images"][0]
    plain = forge.txt2img(sd3(forge, "forge-sd35m-a"))["images"][0]
    assert_same_image(got, want, f"DS LoRA pair vs Forge's <lora:{lora}:0.8>")
    assert mean_abs_diff(plain, want) > VISIBLE


def test_an_l_lora_forge_refuses_on_m_is_carried_by_ds_and_equals_the_premerged_pair(forge):
    """SD3.5-L-like LoRA, SD3.5-M-like target: Forge drops the file (its keys do not fit M); DS(M, L, L + LoRA)
    carries it, and equals the same pair with the LoRA merged into L offline."""
    plain = forge.txt2img(sd3(forge, "forge-sd35m-a"))["images"][0]
    offset = forge.log_offset()
    host = forge.txt2img(sd3(forge, "forge-sd35m-a", f"{PROMPT} <lora:forge-sd35l-lora:1>"))["images"][0]
    assert "LoRA version mismatch" in forge.log_since(offset)
    assert same_bytes(host, plain)  # Forge applied nothing
    carried = forge.txt2img(sd3(forge, "forge-sd35m-a", alwayson_scripts=pair(
        forge, "forge-sd35l-a", loras=[{"name": "forge-sd35l-lora", "weight": 1.0}])))["images"][0]
    merged = forge.txt2img(sd3(forge, "forge-sd35m-a", alwayson_scripts=pair(
        forge, "forge-sd35l-a", "forge-sd35l-a-lora-merged")))["images"][0]
    assert mean_abs_diff(carried, plain) > VISIBLE
    assert_same_image(carried, merged, "DS(M, L, L + LoRA at runtime) vs DS(M, L, L + LoRA merged)")


@pytest.mark.parametrize(("resolution", "factor"), [("native", 1), ("2", 2)])
def test_pooled_legs_on_a_flow_pair_give_a_valid_image(forge, resolution, factor):
    off = forge.txt2img(sd3(forge, "forge-sd3m-a", width=128, height=128))["images"][0]
    res = forge.txt2img(sd3(forge, "forge-sd3m-a", width=128, height=128, alwayson_scripts=pair(
        forge, "forge-sd3m-a", "forge-sd35m-a", source_resolution=resolution)))
    last = forge.get("/delta-sampling/v1/status").json()["last_generation"]
    image = image_array(res["images"][0]).astype(float)
    assert last["pooling_factors"] == [factor] and not last["failed"]
    assert last["legs_sizes"] == [[128 // factor, 128 // factor]]
    assert np.isfinite(image).all() and image.std() > 5  # not a NaN-black or flat image
    assert mean_abs_diff(res["images"][0], off) > VISIBLE


@pytest.mark.parametrize(("target", "source", "adapted", "names"), [
    ("forge-sd3m-a", "forge-sd15-a", "forge-sd15-b", ("4-channel", "sd1", "16-channel", "sd3")),
    ("forge-sd15-a", "forge-sd3m-a", "forge-sd35m-a", ("16-channel", "sd3", "4-channel", "sd1"))])
def test_pairs_across_4_and_16_channels_are_refused_naming_both_families(forge, target, source, adapted, names):
    if target.startswith("forge-sd3"):
        payload = sd3(forge, target)
    else:  # the 4-channel target is built without the SD3 text encoders and VAE
        payload = forge.payload(target, override_settings={"forge_additional_modules": []})
    payload["alwayson_scripts"] = pair(forge, source, adapted)
    r = forge.post("/sdapi/v1/txt2img", json=payload)
    assert r.status_code == 422, r.text[:500]
    detail = r.json()["detail"]
    assert all(name in detail for name in names) and "Traceback" not in detail, detail
    assert forge.txt2img(payload | {"alwayson_scripts": {}})["images"]  # the host keeps serving
