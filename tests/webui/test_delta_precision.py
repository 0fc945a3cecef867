"""Delta Sampling in the precisions GPU users run, reproduced in the real webui on the CPU.

Two more webuis, one after the other (module-scoped, each started once):

* ``half``: ``--use-cpu all --precision half``: fp16 UNets and text encoders, no autocast, plain GroupNorm (the webui's
  dtype flow for a GPU user of ``--precision half``, stricter than the default GPU path: nothing casts for DS);
* ``fp8``: ``--no-half --precision full`` with the option ``fp8_storage: Enable``: Conv2d/Linear weights stored as
  ``float8_e4m3fn``, sampling under ``torch.autocast("cpu", bfloat16)`` (the webui's fp8 path on a CPU).

In each: lambda 0 and source = adapted are bit-identical to DS off; A + (B - A) is B's own image in that mode within
max 2 / mean 0.1 levels for one sampler of each kind (k-diffusion x0, DDIM and UniPC eps, LCM), SDXL too, with hires,
img2img and inpainting; a ControlNet unit equals the direct path; every choice of the "Source model precision" setting
works; the source pair is stored as the mode stores models (status bytes); a plain image is unchanged afterwards.
The LoRA pair is judged against the webui's own ``<lora>`` in fp16; under fp8 the webui merges before quantising
(q(q(W) + dW)) while the runtime LoRA adds dW to q(W), so there DS must only carry most of the LoRA's effect.
"""

from __future__ import annotations

import pytest
from PIL import Image

from test_delta_controlnet import direct, unit
from test_delta_sampling import NEGATIVE, PROMPT, assert_only_the_masked_square_changed, ds, infotext, max_diff, png_b64
from webui_harness import (
    FULL_PRECISION,
    close_to,
    image_array,
    image_from_b64,
    mean_abs_diff,
    start_webui,
    stop_process,
)

pytestmark = pytest.mark.webui

MODES = {
    "half": {"precision": ("--precision", "half"), "config": {}},
    "fp8": {"precision": FULL_PRECISION, "config": {"fp8_storage": "Enable", "cache_fp16_weight": False}},
}
MAX_DIFF, MEAN_DIFF = 2, 0.1  # A + (B - A) against B's own image in the same mode
LORA_PROMPT = "a red apple on a table"
LORA_BOUNDS = (3, 0.5)  # DS LoRA pair against the webui's <lora> in fp16: max, mean
FLOAT32_MAX, FLOAT32_MEAN = 12, 1.0  # a float32 source pair under a reduced-precision target (see the test)
MEASURED: dict[str, dict] = {}  # printed at the end of each mode, for README and bench/RESULTS.md


@pytest.fixture(scope="module", params=list(MODES))
def mode(request, tiny_models, tmp_path_factory):
    name = request.param
    data_dir = tmp_path_factory.mktemp(f"webui-{name}")
    ui = start_webui(tiny_models, data_dir, precision=MODES[name]["precision"], config=MODES[name]["config"])
    ui.mode = name
    # (after a switch: under fp8 the webui loads the checkpoint it starts with otherwise than one it switches to)
    ui.txt2img(ui.payload("tiny-sd1-b", PROMPT))
    ui.first_plain = ui.txt2img(ui.payload("tiny-sd1-a", PROMPT))["images"][0]
    MEASURED[name] = {}
    try:
        yield ui
    finally:
        print(f"\n{name}: {MEASURED[name]}")
        if request.session.testsfailed:
            print(ui.log_tail(60))
        stop_process(ui.process)


def status(ui) -> dict:
    return ui.get("/delta-sampling/v1/status").json()


def test_the_mode_is_what_it_claims(mode):
    log = mode.log_text()
    if mode.mode == "half":
        assert "GroupNorm32 replaced with normal torch.nn.GroupNorm" in log
    a, b = mode.titles("tiny-sd1-a", "tiny-sd1-b")
    mode.txt2img(mode.payload("tiny-sd1-a", alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    dtypes = {m["dtype"] for m in status(mode)["models"]}
    assert dtypes == ({"float16"} if mode.mode == "half" else {"float32 + fp8 weights"}), dtypes


def test_a_source_model_is_the_webuis_own_model_tensor_for_tensor(mode):
    """The source pair follows the storage: DS's model of a checkpoint equals the webui's own model of it (switched
    to, not the one it started with: under fp8 the webui stores those two differently), every UNet and text-encoder
    tensor in dtype and value."""
    for name in ("tiny-sd1-a", "tiny-sdxl-a"):
        other = "tiny-sd1-b" if name == "tiny-sd1-a" else "tiny-sdxl-b"
        mode.txt2img(mode.payload(other))
        mode.txt2img(mode.payload(name))  # the webui switches to it
        report = mode.get("/delta-test/compare-with-target", params={"source": mode.models.title(name)}).json()
        for part in ("unet", "text"):
            got = report[part]
            assert got["tensors"] > 10 and not got["missing"], (name, part, got)
            assert got["dtype_count"] == 0 and got["value_count"] == 0, (name, part, got)


def test_identities_are_bit_for_bit(mode):
    a, b = mode.titles("tiny-sd1-a", "tiny-sd1-b")
    off = mode.txt2img(mode.payload("tiny-sd1-a", PROMPT))["images"][0]
    zero = mode.txt2img(mode.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(scale=0, source=a, adapted=b)))
    same = mode.txt2img(mode.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(scale=2.0, source=b, adapted=b)))
    lora_zero = mode.txt2img(mode.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(
        scale=1.0, source=a, loras=[{"name": mode.models.lora("sd1").name, "weight": 0}])))
    for what, res in (("lambda 0", zero), ("source = adapted", same), ("LoRA at weight 0", lora_zero)):
        assert image_array(res["images"][0]).tobytes() == image_array(off).tobytes(), what


@pytest.mark.parametrize("sampler", ["Euler", "DDIM", "UniPC", "LCM"])
def test_a_plus_b_minus_a_is_b_in_this_mode(mode, sampler):
    # (DDIM under fp8 was mean 0.21 / max 2 before the legs' timestep snapped to the target's integer step)
    a, b = mode.titles("tiny-sd1-a", "tiny-sd1-b")
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, sampler_name=sampler, steps=6)
    alone = mode.txt2img(mode.payload("tiny-sd1-b", **common))["images"][0]
    target = mode.txt2img(mode.payload("tiny-sd1-a", **common))["images"][0]
    res = mode.txt2img(mode.payload("tiny-sd1-a", **common, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    assert mean_abs_diff(target, alone) > 5, "fixtures too similar to tell anything apart"
    MEASURED[mode.mode][sampler] = close_to(res["images"][0], alone, MAX_DIFF, MEAN_DIFF, sampler)


def test_a_plus_b_minus_a_is_b_for_sdxl(mode):
    a, b = mode.titles("tiny-sdxl-a", "tiny-sdxl-b")
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=5)
    alone = mode.txt2img(mode.payload("tiny-sdxl-b", **common))["images"][0]
    res = mode.txt2img(mode.payload("tiny-sdxl-a", **common, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    MEASURED[mode.mode]["sdxl"] = close_to(res["images"][0], alone, MAX_DIFF, MEAN_DIFF, "sdxl")


def test_hires_img2img_and_inpainting(mode):
    a, b = mode.titles("tiny-sd1-a", "tiny-sd1-b")
    pair = ds(scale=1.0, source=a, adapted=b)
    hires = dict(prompt=PROMPT, steps=5, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6,
                 hr_second_pass_steps=4)
    alone = mode.txt2img(mode.payload("tiny-sd1-b", **hires))["images"][0]
    res = mode.txt2img(mode.payload("tiny-sd1-a", **hires, alwayson_scripts=pair))["images"][0]
    assert image_from_b64(res).size == (96, 96)
    MEASURED[mode.mode]["hires"] = close_to(res, alone, MAX_DIFF, MEAN_DIFF, "hires")

    init = mode.txt2img(mode.payload("tiny-sd1-a", "a house"))["images"][0]
    i2i = dict(prompt=PROMPT, steps=8, init_images=[init], denoising_strength=0.6)
    alone = mode.img2img(mode.payload("tiny-sd1-b", **i2i))["images"][0]
    res = mode.img2img(mode.payload("tiny-sd1-a", **i2i, alwayson_scripts=pair))["images"][0]
    MEASURED[mode.mode]["img2img"] = close_to(res, alone, MAX_DIFF, MEAN_DIFF, "img2img")

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpaint = dict(prompt=PROMPT, steps=6, init_images=[png_b64(image_from_b64(init))], mask=png_b64(mask),
                   denoising_strength=0.9, inpainting_fill=1, inpaint_full_res=False, mask_blur=0,
                   inpainting_mask_invert=0)
    off = image_array(mode.img2img(mode.payload("tiny-sd1-inpaint", **inpaint))["images"][0]).astype(int)
    res = mode.img2img(mode.payload("tiny-sd1-inpaint", **inpaint, alwayson_scripts=ds(scale=2.0, source=a,
                                                                                          adapted=b)))
    assert_only_the_masked_square_changed(res["images"][0], off, 16, 48, 4)


def lora_images(ui, family: str) -> tuple[str, str, str]:
    """(the webui's own ``<lora:L:0.8>`` image, the plain image, DS(A, A, A + L at 0.8)) on the family's A."""
    lora = ui.models.lora(family)
    name = {"sd1": "tiny-sd1-a", "sdxl": "tiny-sdxl-a"}[family]
    common = dict(negative_prompt=NEGATIVE, steps=6)
    ui.txt2img(ui.payload(name.replace("-a", "-b")))  # A then comes from a switch (see the tensor test)
    own = ui.txt2img(ui.payload(name, f"{LORA_PROMPT} {lora.tag(0.8)}", **common))["images"][0]
    off = ui.txt2img(ui.payload(name, LORA_PROMPT, **common))["images"][0]
    res = ui.txt2img(ui.payload(name, LORA_PROMPT, **common, alwayson_scripts=ds(
        scale=1.0, source=ui.models.title(name), loras=[{"name": lora.name, "weight": 0.8}])))["images"][0]
    return own, off, res


def check_fp8_lora(ui, full, family: str) -> tuple:
    """Under fp8 the webui merges before quantising, q(q(W) + dW) (q(W16 + dW) with the fp16 copy: 3 mantissa bits
    either way), where the runtime LoRA adds dW to q(W): no bitwise judge. The judge is the full-precision webui's
    ``<lora>`` image: DS's fp8 LoRA pair must be about as close to it as the webui's own fp8 ``<lora>`` (measured: SD1
    16.2 against 14.9-17.1; SDXL 27.3 against 55.2, where most of the webui's UNet LoRA rounds away)."""
    own, off, res = lora_images(ui, family)
    full_own, _, _ = lora_images(full, family)
    effect, ours, theirs = mean_abs_diff(own, off), mean_abs_diff(res, full_own), mean_abs_diff(own, full_own)
    assert effect > 5 and ours <= 1.2 * theirs + 1, f"{family}: DS {ours:.2f}, the webui's own {theirs:.2f} from " \
        "the full-precision <lora>"
    return round(ours, 2), round(theirs, 2), round(effect, 1)


def test_lora_pair_against_the_webuis_own_lora(mode, webui):
    if mode.mode == "half":
        own, off, res = lora_images(mode, "sd1")
        effect = mean_abs_diff(own, off)
        assert effect > 5, f"the LoRA changes the image by {effect:.2f} levels only"
        MEASURED[mode.mode]["lora"] = (*close_to(res, own, *LORA_BOUNDS, "LoRA pair"), round(effect, 1))
    else:
        MEASURED[mode.mode]["lora sd1 (DS, webui to fp32 <lora>; effect)"] = check_fp8_lora(mode, webui, "sd1")
        MEASURED[mode.mode]["lora sdxl (DS, webui to fp32 <lora>; effect)"] = check_fp8_lora(mode, webui, "sdxl")


def test_controlnet_unit_equals_the_direct_path(mode):
    (a,) = mode.titles("tiny-sd1-a")
    units = [unit("sd1")]
    plain = mode.txt2img(mode.payload("tiny-sd1-a"))["images"][0]
    direct_image = mode.txt2img(mode.payload("tiny-sd1-a", alwayson_scripts=direct(units)))["images"][0]
    res = mode.txt2img(mode.payload("tiny-sd1-a", alwayson_scripts=ds(scale=1.0, source=a, controlnet=units)))
    assert mean_abs_diff(direct_image, plain) > 1.0
    MEASURED[mode.mode]["controlnet"] = close_to(res["images"][0], direct_image, MAX_DIFF, MEAN_DIFF, "ControlNet")


@pytest.mark.parametrize("setting", ["auto", "float32"])
def test_every_precision_setting_works(mode, setting):
    a, b = mode.titles("tiny-sd1-a", "tiny-sd1-b")
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=6)
    alone = mode.txt2img(mode.payload("tiny-sd1-b", **common))["images"][0]
    assert mode.post("/delta-sampling/v1/unload").status_code == 200  # the status then shows this pair alone
    offset = mode.log_offset()
    res = mode.txt2img(mode.payload("tiny-sd1-a", **common, override_settings={"delta_sampling_dtype": setting},
                                    alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    assert "Traceback" not in mode.log_since(offset)
    models = status(mode)["models"]
    measured = (round(mean_abs_diff(res["images"][0], alone), 4), max_diff(res["images"][0], alone))
    MEASURED[mode.mode][f"{setting} setting"] = measured
    if setting == "float32":
        assert {m["dtype"] for m in models if m["title"] in (a, b)} == {"float32"}
    if mode.mode == "half":  # under fp8 see FP8_GAP; a float32 pair there leaves the target's fp8 error uncancelled
        # float32: D_A in fp16 + (D_B - D_A) in float32, B's image up to the target's own rounding of D_A
        peak, mean = (FLOAT32_MAX, FLOAT32_MEAN) if setting == "float32" else (MAX_DIFF, MEAN_DIFF)
        close_to(res["images"][0], alone, peak, mean, f"{setting} setting")
    MEASURED[mode.mode][f"pair bytes ({setting})"] = sum(m["bytes"] for m in models if m["title"] in (a, b))


def test_the_pair_is_stored_as_the_mode_stores_models(mode):
    measured = MEASURED[mode.mode]
    auto, full = measured.get("pair bytes (auto)"), measured.get("pair bytes (float32)")
    if auto is None or full is None:
        pytest.skip("needs test_every_precision_setting_works first")
    # fp16: half of float32; fp8: Conv/Linear weights at a quarter (the tiny text encoders' token embeddings, norms
    # and biases stay float32, and they are a large share of these small models)
    assert auto <= (0.51 if mode.mode == "half" else 0.75) * full, (auto, full)


def test_a_plain_image_is_unchanged_afterwards(mode):
    again = mode.txt2img(mode.payload("tiny-sd1-a", PROMPT))["images"][0]
    assert image_array(again).tobytes() == image_array(mode.first_plain).tobytes()
    assert "Delta" not in infotext(mode.txt2img(mode.payload("tiny-sd1-a", PROMPT)))


# --- "Enable for SDXL" with the fp16 copy for LoRA ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_sdxl(tiny_models, tmp_path_factory):
    """fp8 for SDXL models only, with the webui's "cache fp16 weight for LoRA" copies."""
    ui = start_webui(tiny_models, tmp_path_factory.mktemp("webui-fp8-sdxl"),
                     config={"fp8_storage": "Enable for SDXL", "cache_fp16_weight": True})
    try:
        yield ui
    finally:
        stop_process(ui.process)


def test_fp8_for_sdxl_only_stores_each_family_as_the_webui_does(fp8_sdxl):
    ui = fp8_sdxl
    # (SDXL: A switched to from B, another fp8 model; from a model without fp8 the webui loads it afresh, with
    # float32 norms, as it loads the checkpoint it starts with)
    for name, other, fp8 in (("tiny-sdxl-a", "tiny-sdxl-b", True), ("tiny-sd1-a", "tiny-sd1-b", False)):
        ui.txt2img(ui.payload(other))
        ui.txt2img(ui.payload(name))
        report = ui.get("/delta-test/compare-with-target", params={"source": ui.models.title(name)}).json()
        for part in ("unet", "text"):
            got = report[part]
            assert got["dtype_count"] == 0 and got["value_count"] == 0, (name, part, got)
            assert got["fp16_copies_differ"] == 0, (name, part, got)
            assert (got["fp16_copies"][0] > 10) is fp8 and got["fp16_copies"][0] == got["fp16_copies"][1], got


def test_fp8_for_sdxl_only_equivalence_in_both_families_and_a_cross_family_pair(fp8_sdxl):
    ui = fp8_sdxl
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=5)
    for a_name, b_name in (("tiny-sd1-a", "tiny-sd1-b"), ("tiny-sdxl-a", "tiny-sdxl-b")):
        a, b = ui.titles(a_name, b_name)
        ui.txt2img(ui.payload(a_name))  # B is then switched to from A: for SDXL a switch between two fp8 models
        alone = ui.txt2img(ui.payload(b_name, **common))["images"][0]
        res = ui.txt2img(ui.payload(a_name, **common, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
        close_to(res["images"][0], alone, MAX_DIFF, MEAN_DIFF, a_name)
    # an SD1 pair (full precision: no fp8 for SD1) steering the fp8 SDXL target: it runs and changes the image
    a, b = ui.titles("tiny-sd1-a", "tiny-sd1-b")
    off = ui.txt2img(ui.payload("tiny-sdxl-a", **common))["images"][0]
    res = ui.txt2img(ui.payload("tiny-sdxl-a", **common, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    assert mean_abs_diff(res["images"][0], off) > 1
    assert {m["dtype"] for m in status(ui)["models"] if m["title"] in (a, b)} == {"float32"}


def test_fp8_for_sdxl_lora_pair_with_the_fp16_copy(fp8_sdxl, webui):
    """With the copy the webui builds its deltas from the copy (so does DS for the weight-dependent kinds)."""
    print(f"fp8-sdxl LoRA pair: {check_fp8_lora(fp8_sdxl, webui, 'sdxl')}")
