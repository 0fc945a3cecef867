"""LoRA/LyCORIS parity with the webui's own Lora extension: for every module type it applies, DS applies the same.

The judge is the webui itself: with target = source base = A and adapted = A + L at weight w, DS at lambda 1 computes
D_A + (D_{A+L} - D_A) = D_{A+L} at every step, so its image must equal the one the webui makes for ``<lora:L:w>`` on A
(the webui merges L into A's weights; DS runs it as a runtime delta on its own copy, so the two differ only by float
rounding). The fixtures hold each module type the webui v1.10.1 reads (``/delta-test/lora-match`` asks the webui which
types it built), mixed files, convolutions the webui cannot apply IA3 to, and keys that name no layer.
"""

from __future__ import annotations

import json
import re

import pytest

from webui_harness import image_array, mean_abs_diff

pytestmark = pytest.mark.webui

PROMPT = "a (red:1.2) apple on a wooden table, soft light"
NEGATIVE = "ugly, blurry"
WEIGHT = 0.8
# Same tolerance as the checkpoint equivalence (test_delta_sampling.py): 0..255 levels.
MAX_PIXEL_DIFF = 2
MEAN_PIXEL_DIFF = 0.05
VISIBLE = 1.0  # the LoRA must change the image by more than this (mean levels) or the comparison proves nothing
TARGETS = {"sd1": "tiny-sd1-a", "sd2": "tiny-sd2v-a", "sdxl": "tiny-sdxl-a"}

# kind -> the webui's NetworkModule classes for that file (asserted, so each case really exercises its type)
WEBUI_MODULE_TYPES = {
    "lora": {"NetworkModuleLora"},
    "locon": {"NetworkModuleLora"},
    "loha": {"NetworkModuleHada"},
    "lokr": {"NetworkModuleLokr"},
    "norm": {"NetworkModuleNorm"},
    "fullnorm": {"NetworkModuleFull", "NetworkModuleNorm"},
    "ia3": {"NetworkModuleIa3"},
    "loraia3": {"NetworkModuleLora", "NetworkModuleIa3"},
    "glora": {"NetworkModuleGLora"},
    "oft": {"NetworkModuleOFT"},
    "oftdiag": {"NetworkModuleOFT"},
    "boft": {"NetworkModuleOFT"},
    "partial": {"NetworkModuleLora"},
}
# keys DS reports as not applied: IA3 on the 4 convolutions of the file (weight + on_input each; the webui's own
# apply fails there and it skips them too), 3 LoRA modules naming no layer (down, up, alpha each)
SKIPPED = {"ia3": 8, "partial": 9}


def ds(**fields) -> dict:
    return {"delta sampling": {"args": [{"enabled": True, **fields}]}}


def infotext(res: dict) -> str:
    return json.loads(res["info"])["infotexts"][0]


def max_diff(a: str, b: str) -> int:
    return int(abs(image_array(a).astype(int) - image_array(b).astype(int)).max())


@pytest.mark.parametrize("family", sorted(TARGETS))
@pytest.mark.parametrize("kind", list(WEBUI_MODULE_TYPES))
def test_adapted_leg_equals_the_webuis_own_lora(webui, family, kind):
    target = TARGETS[family]
    lora = webui.models.lora(family, kind)
    common = dict(negative_prompt=NEGATIVE, steps=5)
    offset = webui.log_offset()
    direct = webui.txt2img(webui.payload(target, f"{PROMPT} {lora.tag(WEIGHT)}", **common))
    assert "Traceback" not in webui.log_since(offset)
    match = webui.get(f"/delta-test/lora-match/{lora.name}").json()
    assert match["checkpoint"] == webui.models.title(target)
    assert set(match["module_types"]) == WEBUI_MODULE_TYPES[kind], match["module_types"]

    off = webui.txt2img(webui.payload(target, PROMPT, **common))["images"][0]
    res = webui.txt2img(webui.payload(target, PROMPT, **common, alwayson_scripts=ds(
        scale=1.0, source=webui.models.title(target), loras=[{"name": lora.name, "weight": WEIGHT}])))
    lora_effect = mean_abs_diff(direct["images"][0], off)
    assert lora_effect > VISIBLE, f"{lora.name} changes the image by {lora_effect:.2f} levels only"
    mean, peak = mean_abs_diff(res["images"][0], direct["images"][0]), max_diff(res["images"][0], direct["images"][0])
    print(f"{lora.name}: LoRA effect {lora_effect:.2f}, DS vs <lora> mean {mean:.4f} max {peak}")
    assert peak <= MAX_PIXEL_DIFF and mean <= MEAN_PIXEL_DIFF, f"{lora.name}: mean diff {mean:.4f}, max {peak}"

    skipped = SKIPPED.get(kind, 0)
    status = webui.get("/delta-sampling/v1/status").json()
    if skipped:
        assert f'Delta LoRA skipped keys: "{lora.name}: {skipped} (' in infotext(res)
        assert f"not applied: {skipped} (" in status["last_event"]
    else:
        assert "Delta LoRA skipped keys" not in infotext(res)
        assert "not applied" not in status["last_event"]


def test_skipped_keys_name_the_first_keys_and_paste_back(webui):
    a = webui.models.title("tiny-sd1-a")
    res = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(
        scale=1.0, source=a, loras=[{"name": "tiny-sd1-partial", "weight": WEIGHT}])))
    text = infotext(res)
    # the count, then the first three keys that name no layer (in the file's key order), then "..."
    assert re.search(r'Delta LoRA skipped keys: "tiny-sd1-partial: 9 \((lora_unet_nothing_here_\d_proj\.'
                     r'(alpha|lora_down\.weight|lora_up\.weight), ){3}\.\.\.\)"', text), text
    # The informational key does not disturb a paste: the infotext reproduces the image byte for byte.
    again = webui.txt2img({"infotext": text, "width": 64, "height": 64,
                           "override_settings": {"sd_model_checkpoint": a}})
    assert image_array(again["images"][0]).tobytes() == image_array(res["images"][0]).tobytes()
    # A later generation without that LoRA carries no stale key.
    clean = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(
        scale=1.0, source=a, loras=[{"name": "tiny-sd1-lora", "weight": WEIGHT}])))
    assert "Delta LoRA skipped keys" not in infotext(clean)


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ("tiny-sd1-badtype", "which no module type accepts"),
        ("tiny-sd1-nomatch", "none of its keys names a layer of this model"),
        ("tiny-sdxl-lora", "made for another model family"),
    ],
)
def test_user_errors_answer_4xx_without_a_traceback_and_the_next_request_works(webui, lora, message):
    a = webui.models.title("tiny-sd1-a")
    offset = webui.log_offset()
    r = webui.post("/sdapi/v1/txt2img", json=webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(
        scale=1.0, source=a, loras=[{"name": lora}])))
    assert r.status_code == 422, r.text[:500]
    assert message in r.json()["errors"] and lora in r.json()["errors"], r.text[:500]
    log = webui.log_since(offset)
    assert "Traceback" not in log, log[-3000:]
    assert f"Delta Sampling: loras: {lora}" in log  # one line says what went wrong
    ok = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(
        scale=1.0, source=a, loras=[{"name": "tiny-sd1-norm", "weight": WEIGHT}])))
    assert "Delta scale: 1.0" in infotext(ok)


def test_bad_setting_answers_4xx_without_a_traceback(webui):
    a = webui.models.title("tiny-sd1-a")
    offset = webui.log_offset()
    r = webui.post("/sdapi/v1/txt2img", json=webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(
        scale="huge", source=a, loras=[{"name": "tiny-sd1-lora"}])))
    assert r.status_code == 422 and "scale: expected a number" in r.json()["errors"], r.text[:500]
    assert "Traceback" not in webui.log_since(offset)
