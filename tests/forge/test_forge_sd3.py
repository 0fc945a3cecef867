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
from PIL import Image

from forge_harness import API_AUTH, MISSING, combined, ensure_forge_models, ensure_forge_sd3_models, h, start_forge
from test_delta_sampling import assert_only_the_masked_square_changed, assert_same_image, ds, infotext, png_b64
from webui_harness import image_array, image_from_b64, mean_abs_diff

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
    models = {m["title"].split(".")[0]: m for m in forge.get("/delta-sampling/v1/status").json()["models"]}
    assert models["forge-sd35m-a"]["uses_target_text_encoders"]  # the new target's, not the earlier one's


def test_a_diffusers_format_lora_forge_refuses_equals_forges_own_kohya_lora(forge):
    """The M-like LoRA in diffusers/PEFT names (q/k/v apart): Forge drops the file; on DS's runtime LoRA it is the
    kohya file's delta, judged by Forge's own <lora> of the kohya file."""
    offset = forge.log_offset()
    host = forge.txt2img(sd3(forge, "forge-sd35m-a", f"{PROMPT} <lora:forge-sd35m-lora-diffusers:0.8>"))["images"][0]
    assert "LoRA version mismatch" in forge.log_since(offset)
    assert same_bytes(host, forge.txt2img(sd3(forge, "forge-sd35m-a"))["images"][0])
    want = forge.txt2img(sd3(forge, "forge-sd35m-a", f"{PROMPT} <lora:forge-sd35m-lora:0.8>"))["images"][0]
    got = forge.txt2img(sd3(forge, "forge-sd35m-a", alwayson_scripts=pair(
        forge, "forge-sd35m-a", loras=[{"name": "forge-sd35m-lora-diffusers", "weight": 0.8}])))["images"][0]
    assert_same_image(got, want, "DS diffusers-format LoRA pair vs Forge's <lora> of the kohya file")
    loras = {lo["name"]: lo for m in forge.get("/delta-sampling/v1/status").json()["models"] for lo in m["loras"]}
    assert loras["forge-sd35m-lora-diffusers"]["not_applied_keys"] == 0


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


def test_hires_img2img_and_inpainting_on_an_sd3_target(forge):
    """The flow family's own img2img noising and inpainting re-noising: DS(A, A, B) is B's own image in the hires pass,
    in img2img and inside an inpainting mask, and outside the mask the image is the host's."""
    a_a_b = pair(forge, "forge-sd3m-a", "forge-sd35m-a")
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6, hr_second_pass_steps=3,
                 hr_cfg=5.0, hr_additional_modules=["Use same choices"])
    alone = forge.txt2img(sd3(forge, "forge-sd35m-a", **hires))["images"][0]
    res = forge.txt2img(sd3(forge, "forge-sd3m-a", **hires, alwayson_scripts=a_a_b))["images"][0]
    assert image_from_b64(res).size == (96, 96)
    assert forge.get("/delta-sampling/v1/status").json()["last_generation"]["passes"] == 2
    assert_same_image(res, alone, "hires, DS(A, A, B) vs B")

    init = forge.txt2img(sd3(forge, "forge-sd3m-a", "a house"))["images"][0]
    i2i = dict(init_images=[init], denoising_strength=0.6)
    forge.img2img(sd3(forge, "forge-sd35m-a", **i2i))  # warm-up: a first img2img differs (see the A1111 tier)
    alone = forge.img2img(sd3(forge, "forge-sd35m-a", **i2i))["images"][0]
    res = forge.img2img(sd3(forge, "forge-sd3m-a", **i2i, alwayson_scripts=a_a_b))["images"][0]
    assert_same_image(res, alone, "img2img, DS(A, A, B) vs B")

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpaint = dict(init_images=[init], mask=png_b64(mask), denoising_strength=0.9, inpainting_fill=1,
                   inpaint_full_res=False, mask_blur=0, inpainting_mask_invert=0)
    off = image_array(forge.img2img(sd3(forge, "forge-sd3m-a", **inpaint))["images"][0]).astype(int)
    res = forge.img2img(sd3(forge, "forge-sd3m-a", **inpaint, alwayson_scripts=pair(
        forge, "forge-sd3m-a", "forge-sd35m-a", scale=2.0)))
    assert_only_the_masked_square_changed(res["images"][0], off, 16, 48, 4)


def test_a_flux_source_is_refused_by_name_before_forge_builds_it(forge):
    from test_delta_inputs import write_safetensors

    path = forge.data_dir / "models" / "Stable-diffusion" / "zz-flux-dev.safetensors"
    write_safetensors(path, ["double_blocks.0.img_attn.qkv.weight", "img_in.weight"])
    try:
        assert forge.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        script = ds(scale=1.0, source="zz-flux-dev.safetensors", adapted=forge.models.title("forge-sd35m-a"))
        r = forge.post("/sdapi/v1/txt2img", json=sd3(forge, "forge-sd3m-a", alwayson_scripts=script))
        assert r.status_code == 422, r.text[:500]
        detail = r.json()["detail"]
        assert "zz-flux-dev.safetensors is a Flux-family checkpoint" in detail and "Chroma" in detail, detail
        assert "zz-flux" not in str(forge.get("/delta-sampling/v1/status").json()["models"])  # nothing half-loaded
        assert forge.txt2img(sd3(forge, "forge-sd3m-a"))["images"]
    finally:
        path.unlink(missing_ok=True)
        forge.post("/sdapi/v1/refresh-checkpoints")


def test_xyz_infotext_unload_and_units_on_an_sd3_pair(forge):
    """As for the other families: an XYZ lambda axis, the infotext pasted back through Forge's own parser, the status
    and unload routes (unloading sources that use the target's text encoders leaves the target's intact), and a
    ControlNet unit on an SD3-family source refused by name."""
    import json

    from lib_delta import DeltaParams

    plain = forge.txt2img(sd3(forge, "forge-sd3m-a"))["images"][0]
    info = forge.get("/sdapi/v1/script-info").json()
    names = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])["args"][0]["choices"]
    script_args = [names.index("Delta scale"), "0, 1", [], 0, "", [], 0, "", [], True, True, False, False, False,
                   False, False, 0, False]
    res = forge.txt2img(sd3(forge, "forge-sd3m-a", script_name="x/y/z plot", script_args=script_args,
                            alwayson_scripts=pair(forge, "forge-sd3m-a", "forge-sd35m-a", scale=0.5)))
    images, texts = res["images"][1:], json.loads(res["info"])["infotexts"][1:]
    assert len(images) == 2 and "Delta scale: 0.0," in texts[0] and "Delta scale: 1.0," in texts[1]
    one = forge.txt2img(sd3(forge, "forge-sd3m-a", alwayson_scripts=pair(forge, "forge-sd3m-a", "forge-sd35m-a")))
    assert same_bytes(images[0], plain) and same_bytes(images[1], one["images"][0])
    parsed = forge.post("/sdapi/v1/png-info", json={"image": one["images"][0]}).json()["parameters"]
    params = DeltaParams.from_infotext(parsed)
    again = forge.txt2img(sd3(forge, "forge-sd3m-a", alwayson_scripts={"delta sampling": {"args": [params.as_dict()]}}))
    assert same_bytes(again["images"][0], one["images"][0])

    control = pair(forge, "forge-sd3m-a", controlnet=[{"model": "control_forge_sd15", "image": plain}])
    r = forge.post("/sdapi/v1/txt2img", json=sd3(forge, "forge-sd3m-a", alwayson_scripts=control))
    assert r.status_code == 422 and "no ControlNet or IP-Adapter units on SD3-family sources" in r.json()["detail"]

    assert forge.post("/delta-sampling/v1/unload").json()["unloaded"] >= 2
    assert same_bytes(forge.txt2img(sd3(forge, "forge-sd3m-a"))["images"][0], plain)  # the target's encoders intact
    again = forge.txt2img(sd3(forge, "forge-sd3m-a", alwayson_scripts=pair(forge, "forge-sd3m-a", "forge-sd35m-a")))
    assert same_bytes(again["images"][0], one["images"][0])
