"""Delta Sampling in the real webui: identities, equivalence with the adapted model, API forms, infotext, XYZ, errors.

The central invariant: with the target checkpoint A also as the source base and checkpoint B as the adapted leg, at
lambda = 1 DS computes D_A + (D_B - D_A) = D_B at every step, so the image must equal the one B makes on its own
(A and B share one VAE). It only holds if the source legs see exactly what the target sees: the same noisy latent and
sigma, the same prompt schedule (emphasis, BREAK and prompt editing through the webui's own text-encoder wrappers),
the same CFG and batch layout, for every sampler, pass and batch shape.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from webui_harness import image_array, image_from_b64, mean_abs_diff

pytestmark = pytest.mark.webui

PROMPT = "a (red:1.3) apple on a [wooden:marble:0.5] table BREAK soft light, [blurry]"
NEGATIVE = "ugly, (dark:1.2)"
# Equivalence tolerance, 0..255 pixel levels: the DS image and B's image go through the same float32 operations except
# that D_B arrives as D_A + (D_B - D_A), which rounds differently in the last bits.
MAX_PIXEL_DIFF = 2
MEAN_PIXEL_DIFF = 0.05

FAMILIES = {"sd1": ("tiny-sd1-a", "tiny-sd1-b"), "sd2": ("tiny-sd2v-a", "tiny-sd2v-b"),
            "sdxl": ("tiny-sdxl-a", "tiny-sdxl-b")}


def ds(**fields) -> dict:
    return {"delta sampling": {"args": [{"enabled": True, **fields}]}}


def max_diff(a: str, b: str) -> int:
    return int(abs(image_array(a).astype(int) - image_array(b).astype(int)).max())


def assert_same_image(a: str, b: str, what: str) -> None:
    mean, peak = mean_abs_diff(a, b), max_diff(a, b)
    assert peak <= MAX_PIXEL_DIFF and mean <= MEAN_PIXEL_DIFF, f"{what}: mean diff {mean:.4f}, max {peak}"


def assert_only_the_masked_square_changed(result_b64: str, off, lo: int, hi: int, margin: int) -> None:
    """Inpainting with the square mask [lo, hi)^2: outside it the image is ``off``'s (within 1 level); inside, away
    from the edge by ``margin`` px, DS changed it."""
    got = image_array(result_b64).astype(int)
    outside = got.copy()
    outside[lo:hi, lo:hi] = off[lo:hi, lo:hi]
    assert abs(outside - off).max() <= 1, "DS changed pixels outside the mask"
    inner = slice(lo + margin, hi - margin)
    assert abs(got[inner, inner] - off[inner, inner]).mean() > 1, "DS did nothing inside the mask"


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def infotext(res: dict, index: int = 0) -> str:
    return json.loads(res["info"])["infotexts"][index]


# --- identities -------------------------------------------------------------------------------------------------


def test_lambda_zero_and_base_equal_adapted_are_byte_identical_to_ds_off(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    off = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT))["images"][0]
    zero = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(scale=0, source=a, adapted=b)))
    same = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(scale=2.0, source=b, adapted=b)))
    assert image_array(zero["images"][0]).tobytes() == image_array(off).tobytes()
    assert image_array(same["images"][0]).tobytes() == image_array(off).tobytes()
    assert "Delta scale: 0" in infotext(zero) and "Delta scale: 2.0" in infotext(same)


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_source_pair_alone_forms_the_delta(webui, scale):
    # Source base == adapted == B with target A: whatever lambda, A's image (the target never enters the delta).
    b = webui.models.title("tiny-sd1-b")
    off = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT))["images"][0]
    res = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(scale=scale, source=b, adapted=b)))
    assert image_array(res["images"][0]).tobytes() == image_array(off).tobytes()


# --- equivalence with the adapted checkpoint ----------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "Euler a", "DDIM", "DDIM CFG++", "Heun", "DPM++ 2M SDE",
                                     "Restart", "UniPC", "PLMS", "LCM"])
def test_lambda_one_with_target_as_base_reproduces_the_adapted_checkpoint(webui, sampler):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, sampler_name=sampler, steps=6)
    alone = webui.txt2img(webui.payload("tiny-sd1-b", **common))["images"][0]
    target = webui.txt2img(webui.payload("tiny-sd1-a", **common))["images"][0]
    res = webui.txt2img(webui.payload("tiny-sd1-a", **common, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    assert mean_abs_diff(target, alone) > 5, "fixtures too similar to tell anything apart"
    assert_same_image(res["images"][0], alone, sampler)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_identity_and_equivalence_other_families(webui, family):
    a_name, b_name = FAMILIES[family]
    a, b = webui.models.title(a_name), webui.models.title(b_name)
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=5)
    off = webui.txt2img(webui.payload(a_name, **common))["images"][0]
    alone = webui.txt2img(webui.payload(b_name, **common))["images"][0]
    zero = webui.txt2img(webui.payload(a_name, **common, alwayson_scripts=ds(scale=0, source=a, adapted=b)))
    one = webui.txt2img(webui.payload(a_name, **common, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    assert image_array(zero["images"][0]).tobytes() == image_array(off).tobytes()
    assert mean_abs_diff(off, alone) > 5
    assert_same_image(one["images"][0], alone, family)


def test_equivalence_holds_for_batches_and_prompts_per_image(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    common = dict(prompt="a cat AND a dog:0.6", negative_prompt=NEGATIVE, batch_size=2, n_iter=2, steps=5,
                  sampler_name="DPM++ 2M")
    alone = webui.txt2img(webui.payload("tiny-sd1-b", **common))["images"]
    res = webui.txt2img(webui.payload("tiny-sd1-a", **common, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    assert len(res["images"]) == len(alone) == 4  # the API returns no grid by default
    for i, (got, want) in enumerate(zip(res["images"], alone, strict=True)):
        assert_same_image(got, want, f"image {i}")
    texts = json.loads(res["info"])["infotexts"]
    assert all("Delta scale: 1.0" in t for t in texts)


def test_equivalence_holds_with_hires_fix_and_ngms(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    common = dict(prompt=PROMPT, steps=5, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6,
                  hr_second_pass_steps=4, s_min_uncond=2.0)
    alone = webui.txt2img(webui.payload("tiny-sd1-b", **common))["images"][0]
    res = webui.txt2img(webui.payload("tiny-sd1-a", **common, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    assert image_from_b64(res["images"][0]).size == (96, 96)
    assert_same_image(res["images"][0], alone, "hires + NGMS")
    # With the hires pass excluded, only the first pass is B's: the result is neither A's nor B's.
    first_only = webui.txt2img(webui.payload("tiny-sd1-a", **common,
                                             alwayson_scripts=ds(scale=1.0, source=a, adapted=b, hires=False)))
    assert mean_abs_diff(first_only["images"][0], alone) > 0.5
    assert "Delta hires: False" in infotext(first_only)


def test_equivalence_holds_for_img2img(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    init = webui.txt2img(webui.payload("tiny-sd1-a", "a house"))["images"][0]
    common = dict(prompt=PROMPT, steps=8, init_images=[init], denoising_strength=0.6)
    alone = webui.img2img(webui.payload("tiny-sd1-b", **common))["images"][0]
    res = webui.img2img(webui.payload("tiny-sd1-a", **common, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    assert_same_image(res["images"][0], alone, "img2img")


def test_inpainting_changes_only_the_masked_area(webui):
    # Target: the SD1 inpainting checkpoint; source pair: ordinary SD1 checkpoints.
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    init = image_from_b64(webui.txt2img(webui.payload("tiny-sd1-a", "a house"))["images"][0])
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    common = dict(prompt=PROMPT, steps=6, init_images=[png_b64(init)], mask=png_b64(mask), denoising_strength=0.9,
                  inpainting_fill=1, inpaint_full_res=False, mask_blur=0, inpainting_mask_invert=0)
    off = image_array(webui.img2img(webui.payload("tiny-sd1-inpaint", **common))["images"][0]).astype(int)
    res = webui.img2img(webui.payload("tiny-sd1-inpaint", **common,
                                      alwayson_scripts=ds(scale=2.0, source=a, adapted=b)))
    assert_only_the_masked_square_changed(res["images"][0], off, 16, 48, 4)


def test_hires_checkpoint_and_refiner_swap_the_target_mid_job(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6, hr_second_pass_steps=3,
                 hr_checkpoint_name=b)
    off = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, **hires))["images"][0]
    res = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, **hires,
                                      alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    assert mean_abs_diff(res["images"][0], off) > 0.5
    xa, xb = webui.models.title("tiny-sdxl-a"), webui.models.title("tiny-sdxl-b")
    refiner = dict(refiner_checkpoint=xb, refiner_switch_at=0.5, steps=6)
    off = webui.txt2img(webui.payload("tiny-sdxl-a", PROMPT, **refiner))
    assert "Refiner" in infotext(off)
    res = webui.txt2img(webui.payload("tiny-sdxl-a", PROMPT, **refiner,
                                      alwayson_scripts=ds(scale=1.0, source=xa, adapted=xb)))
    assert "Refiner" in infotext(res) and "Delta scale: 1.0" in infotext(res)
    assert mean_abs_diff(res["images"][0], off["images"][0]) > 0.5


def test_adapted_checkpoint_plus_lora(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    plain = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    stacked = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(
        scale=1.0, source=a, adapted=b, loras=[{"name": "tiny-sd1-lora", "weight": 1.0}])))
    assert mean_abs_diff(plain["images"][0], stacked["images"][0]) > 0.5
    assert f"Delta adapted: {b}" in infotext(stacked) and "Delta LoRAs" in infotext(stacked)


def test_cross_family_source_pair(webui):
    # An SDXL-shaped source pair on an SD1 target: the latent map rescales by 0.13025 / 0.18215; the image changes.
    a, b = webui.models.title("tiny-sdxl-a"), webui.models.title("tiny-sdxl-b")
    off = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT))["images"][0]
    res = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    assert mean_abs_diff(res["images"][0], off) > 1
    assert f"Delta source: {a}" in infotext(res)


# --- LoRA pair and cache ------------------------------------------------------------------------------------------


def test_lora_pair_shares_weights_and_second_generation_loads_nothing(webui):
    a = webui.models.title("tiny-sd1-a")
    webui.post("/delta-sampling/v1/unload")
    off = webui.txt2img(webui.payload("tiny-sd1-b", PROMPT))["images"][0]
    fields = dict(scale=1.0, source=a, loras=[{"name": "tiny-sd1-lora", "weight": 1.0}])
    first = webui.txt2img(webui.payload("tiny-sd1-b", PROMPT, alwayson_scripts=ds(**fields)))
    status = webui.get("/delta-sampling/v1/status").json()
    assert [m["title"] for m in status["models"]] == [a]
    one_model = status["models"][0]["bytes"]
    assert status["total_bytes"] <= 1.10 * one_model
    assert mean_abs_diff(first["images"][0], off) > 1, "the LoRA delta did nothing"
    assert 'Delta LoRAs: "tiny-sd1-lora:1"' in infotext(first)  # quoted by the webui: the value holds a ':'
    lora_hash = webui.models.lora("sd1").name
    assert f'Delta LoRA hashes: "{lora_hash}: ' in infotext(first) and ": unknown" not in infotext(first)
    second = webui.txt2img(webui.payload("tiny-sd1-b", PROMPT, alwayson_scripts=ds(**fields)))
    assert webui.get("/delta-sampling/v1/status").json()["last_event"].startswith("reused")
    assert image_array(second["images"][0]).tobytes() == image_array(first["images"][0]).tobytes()


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr"])
def test_lycoris_kinds_change_the_image(webui, kind):
    a = webui.models.title("tiny-sd1-a")
    off = webui.txt2img(webui.payload("tiny-sd1-b", PROMPT))["images"][0]
    lora = webui.models.lora("sd1", kind).name
    res = webui.txt2img(webui.payload("tiny-sd1-b", PROMPT,
                                      alwayson_scripts=ds(scale=1.0, source=a, loras=[{"name": lora}])))
    assert mean_abs_diff(res["images"][0], off) > 0.5


def test_batched_and_separate_legs_agree(webui):
    a = webui.models.title("tiny-sd1-a")
    fields = dict(scale=1.5, source=a, loras="tiny-sd1-lora:0.8")
    batched = webui.txt2img(webui.payload("tiny-sd1-b", PROMPT, alwayson_scripts=ds(**fields)))["images"][0]
    separate = webui.txt2img(webui.payload("tiny-sd1-b", PROMPT,
                                           alwayson_scripts=ds(**fields, batch_legs=False)))["images"][0]
    assert_same_image(batched, separate, "batched vs separate legs")


# --- API forms, infotext, XYZ -------------------------------------------------------------------------------------


def test_positional_and_named_api_forms_agree(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    named = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(scale=0.7, source=a, adapted=b)))
    positional = webui.txt2img(webui.payload(
        "tiny-sd1-a", PROMPT, alwayson_scripts={"Delta Sampling": {"args": [True, 0.7, a, b]}}))
    assert image_array(named["images"][0]).tobytes() == image_array(positional["images"][0]).tobytes()


def test_infotext_round_trip_reproduces_the_image(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    fields = dict(scale=1.3, source=a, adapted=b, loras=[{"name": "tiny-sd1-lora", "weight": 0.5}], start=0.1,
                  end=0.9, decay="cosine", source_prompt="a green (pear:1.2)", source_cfg_scale=4.0, guard=2.0)
    res = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, steps=6, alwayson_scripts=ds(**fields)))
    text = infotext(res)
    again = webui.txt2img({"infotext": text, "width": 64, "height": 64,
                           "override_settings": {"sd_model_checkpoint": a}})
    assert "Delta source prompt" in infotext(again)
    assert image_array(again["images"][0]).tobytes() == image_array(res["images"][0]).tobytes()


def test_xyz_plot_over_delta_scale(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    info = webui.get("/sdapi/v1/script-info").json()
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    axis_names = xyz["args"][0]["choices"]
    x_type = axis_names.index("Delta scale")
    # x/y/z plot args: x_type, x_values, x_values_dropdown, y_type, ..., z_type, ..., draw_legend, include_lone_images,
    # include_sub_grids, no_fixed_seeds, vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode
    script_args = [x_type, "0, 1, 2.5", [], 0, "", [], 0, "", [], True, True, False, False, False, False, False, 0,
                   False]
    res = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, script_name="x/y/z plot", script_args=script_args,
                                      alwayson_scripts=ds(scale=0.5, source=a, adapted=b)))
    images, texts = res["images"][1:], json.loads(res["info"])["infotexts"][1:]
    assert len(images) == 3
    assert [t.count("Delta scale: ") for t in texts] == [1, 1, 1]
    for text, value in zip(texts, ("0.0", "1.0", "2.5"), strict=True):
        assert f"Delta scale: {value}," in text
    for i in range(3):
        for j in range(i + 1, 3):
            assert mean_abs_diff(images[i], images[j]) > 0.5
    # Cell "1" equals a plain request with lambda 1 (no state leaks between cells).
    plain = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    assert image_array(plain["images"][0]).tobytes() == image_array(images[1]).tobytes()


def test_xyz_enabled_and_lora_weight_axes_do_not_leak(webui):
    a = webui.models.title("tiny-sd1-a")
    info = webui.get("/sdapi/v1/script-info").json()
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    names = xyz["args"][0]["choices"]
    # Axes with choices take their values from the dropdown list, not the text.
    script_args = [names.index("Delta enabled"), "", ["True", "False"], names.index("Delta LoRA weight"), "0.5, 1.5",
                   [], 0, "", [], True, True, False, False, False, False, False, 0, False]
    res = webui.txt2img(webui.payload("tiny-sd1-b", PROMPT, script_name="x/y/z plot", script_args=script_args,
                                      alwayson_scripts=ds(scale=1.0, source=a, loras="tiny-sd1-lora:1")))
    texts = json.loads(res["info"])["infotexts"][1:]  # the grid comes first
    enabled = [t for t in texts if "Delta sampling: True" in t]
    disabled = [t for t in texts if "Delta" not in t]
    assert len(enabled) == 2 and len(disabled) == 2, [t.splitlines()[-1] for t in texts]
    assert sorted('"tiny-sd1-lora:0.5"' in t for t in enabled) == [False, True]
    assert sorted('"tiny-sd1-lora:1.5"' in t for t in enabled) == [False, True]


def test_routes(webui):
    assert webui.get("/delta-sampling/v1/version").json()["version"]
    schema = webui.get("/delta-sampling/v1/schema").json()
    assert schema["x-positional-order"][:4] == ["enabled", "scale", "source", "adapted"]
    assert "process_rss_bytes" in webui.get("/delta-sampling/v1/status").json()
    assert webui.get("/delta-sampling/v1/unload").status_code == 405  # POST only


# --- failures are loud --------------------------------------------------------------------------------------------


def test_failures_return_http_errors_and_the_next_request_works(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    xl = webui.models.title("tiny-sdxl-b")
    cases = [
        (ds(scale=1.0, source="no-such-model", adapted=b), 422, "no checkpoint named 'no-such-model'"),
        (ds(scale=1.0, source=a, loras=[{"name": "no-such-lora"}]), 422, "no LoRA/LyCORIS named 'no-such-lora'"),
        (ds(scale=1.0, source=a, loras=[{"name": "tiny-sd1-nomatch"}]), 422, "matched 0 of"),
        (ds(scale=1.0, source=a, loras=[{"name": "tiny-sdxl-lora"}]), 422, "made for another model family"),
        (ds(scale=1.0, source=a, adapted=xl), 422, "must be the same family"),
        (ds(scale="big", source=a, adapted=b), 422, "scale: expected a number"),
        (ds(scale=1.0, source=a, adapted=b, strength=2), 422, "strength: unknown setting"),
        (ds(scale=1.0, source=a), 422, "adapted: choose an adapted checkpoint"),
    ]
    for scripts, status, message in cases:
        r = webui.post("/sdapi/v1/txt2img", json=webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=scripts))
        assert r.status_code == status, (message, r.status_code, r.text[:500])
        assert message in r.json()["errors"], r.text[:500]
        ok = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
        assert "Delta scale: 1.0" in infotext(ok)
