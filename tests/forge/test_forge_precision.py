"""Delta Sampling in Forge with the storage and compute dtypes GPU users run, reproduced on the CPU.

Three Forges, one after the other (module-scoped): UNets stored in fp16 (``--unet-in-fp16``), in fp8
(``--unet-in-fp8-e4m3fn``), and fp16 storage with fp16 *computation* (Forge computes in float32 on a CPU whatever it
stores; the test-only support script ``support_extension/scripts/forge_fp16_compute.py`` makes it compute in fp16,
as it does on a GPU, where no layer casts for DS). The source engines are built by Forge's own loader, so they follow
the storage by construction; the status reports it. In each: lambda 0 and source = adapted bit-identical to DS off,
A + (B - A) = B, a LoRA pair against Forge's own ``<lora>``, a ControlNet unit against Forge's built-in ControlNet,
and a plain image unchanged afterwards.
"""

from __future__ import annotations

import pytest

from forge_harness import API_AUTH, HERE, MISSING, ensure_forge_models, h, start_forge
from test_delta_controlnet import control_image
from test_delta_sampling import ds, max_diff
from test_forge_delta import forge_and_ds_controlnet

pytestmark = pytest.mark.forge

PROMPT = "a (red:1.3) apple on a [wooden:marble:0.5] table, soft light"
NEGATIVE = "ugly, (dark:1.2)"
MODES = {
    "fp16": {"args": ["--unet-in-fp16"], "storage": "float16"},
    "fp8": {"args": ["--unet-in-fp8-e4m3fn"], "storage": "float8_e4m3fn"},
    "fp16 compute": {"args": ["--unet-in-fp16"], "storage": "float16", "support": True},
}
MAX_DIFF, MEAN_DIFF = 2, 0.1
MEASURED: dict[str, dict] = {}


@pytest.fixture(scope="module", params=list(MODES))
def mode(request, tmp_path_factory):
    if MISSING:
        pytest.skip(MISSING)
    name = request.param
    spec = MODES[name]
    extra = {"forge-fp16-compute": HERE / "support_extension"} if spec.get("support") else None
    ui = start_forge(ensure_forge_models(), tmp_path_factory.mktemp("forge-" + name.replace(" ", "-")),
                     spec["args"], auth=API_AUTH, extra_extensions=extra)
    ui.mode = name
    ui.first_plain = ui.txt2img(ui.payload("forge-sd15-a", PROMPT))["images"][0]
    MEASURED[name] = {}
    try:
        yield ui
    finally:
        print(f"\n{name}: {MEASURED[name]}")
        h.stop_process(ui.process)


def same_bytes(a: str, b: str) -> bool:
    return h.image_array(a).tobytes() == h.image_array(b).tobytes()


def test_the_mode_is_what_it_claims_and_identities_are_bit_for_bit(mode):
    if mode.mode == "fp16 compute":
        assert "Forge computes in float16 on the CPU" in mode.log_text()
    a, b = mode.titles("forge-sd15-a", "forge-sd15-b")
    off = mode.txt2img(mode.payload("forge-sd15-a", PROMPT))["images"][0]
    zero = mode.txt2img(mode.payload("forge-sd15-a", PROMPT, alwayson_scripts=ds(scale=0, source=a, adapted=b)))
    same = mode.txt2img(mode.payload("forge-sd15-a", PROMPT, alwayson_scripts=ds(scale=2.0, source=b, adapted=b)))
    assert same_bytes(zero["images"][0], off) and same_bytes(same["images"][0], off)
    models = mode.get("/delta-sampling/v1/status").json()["models"]
    assert {m["dtype"] for m in models} == {MODES[mode.mode]["storage"]}, models
    MEASURED[mode.mode]["pair bytes"] = sum(m["bytes"] for m in models)


@pytest.mark.parametrize(("family", "sampler"), [("sd15", "Euler"), ("sd15", "DDIM"), ("sdxl", "Euler")])
def test_a_plus_b_minus_a_is_b_in_this_mode(mode, family, sampler):
    a_name, b_name = f"forge-{family}-a", f"forge-{family}-b"
    a, b = mode.titles(a_name, b_name)
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, sampler_name=sampler, steps=5 if family == "sd15" else 4)
    alone = mode.txt2img(mode.payload(b_name, **common))["images"][0]
    target = mode.txt2img(mode.payload(a_name, **common))["images"][0]
    res = mode.txt2img(mode.payload(a_name, **common, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    assert h.mean_abs_diff(target, alone) > 5
    MEASURED[mode.mode][f"{family} {sampler}"] = h.close_to(res["images"][0], alone, MAX_DIFF, MEAN_DIFF,
                                                           f"{family} {sampler}")


def test_lora_pair_against_forges_own_lora(mode):
    (a,) = mode.titles("forge-sd15-a")
    common = dict(negative_prompt=NEGATIVE, steps=5)
    plain = mode.txt2img(mode.payload("forge-sd15-a", PROMPT, **common))["images"][0]
    theirs = mode.txt2img(mode.payload("forge-sd15-a", f"{PROMPT} <lora:forge-sd15-lora:0.8>", **common))["images"][0]
    ours = mode.txt2img(mode.payload("forge-sd15-a", PROMPT, **common, alwayson_scripts=ds(
        scale=1.0, source=a, loras=[{"name": "forge-sd15-lora", "weight": 0.8}])))["images"][0]
    effect = h.mean_abs_diff(theirs, plain)
    assert effect > 2, f"the LoRA should change the image ({effect:.2f})"
    if mode.mode == "fp8":
        # Forge merges the LoRA into the weights before they are stored as fp8 again, q(q(W) + dW); the runtime LoRA
        # adds dW to q(W): no bitwise judge, but DS must carry most of the effect
        distance = h.mean_abs_diff(ours, theirs)
        MEASURED[mode.mode]["lora (DS vs <lora>, max, effect)"] = (round(distance, 4), max_diff(ours, theirs),
                                                                   round(effect, 1))
        assert distance < effect / 2, (distance, effect)
    else:
        MEASURED[mode.mode]["lora"] = (*h.close_to(ours, theirs, 3, 0.5, "LoRA pair"), round(effect, 1))
    assert same_bytes(mode.txt2img(mode.payload("forge-sd15-a", PROMPT, **common))["images"][0], plain)


def test_controlnet_unit_against_forges_own_controlnet(mode):
    (a,) = mode.titles("forge-sd15-a")
    unit = {"image": control_image(), "weight": 0.8, "guidance_start": 0.0, "guidance_end": 1.0,
            "control_mode": "Balanced", "resize_mode": "Just Resize", "pixel_perfect": False, "processor_res": 64}
    plain, theirs, ours = forge_and_ds_controlnet(mode, mode.payload("forge-sd15-a", PROMPT, steps=4), unit, a)
    assert h.mean_abs_diff(theirs["images"][0], plain) > 2
    MEASURED[mode.mode]["controlnet"] = h.close_to(ours, theirs["images"][0], MAX_DIFF, MEAN_DIFF, "ControlNet")


def test_a_plain_image_is_unchanged_afterwards(mode):
    assert same_bytes(mode.txt2img(mode.payload("forge-sd15-a", PROMPT))["images"][0], mode.first_plain)
