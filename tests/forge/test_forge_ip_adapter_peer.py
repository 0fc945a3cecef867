"""IP-Adapter on the adapted leg against Forge's own built-in IP-Adapter (``sd_forge_ipadapter``), on a real-size SD1.5.

DS(A, A, A + IP-Adapter, lambda 1) computes D_A + (D_A+IP - D_A) = D_A+IP at every step, so its image must be the
image Forge's IP-Adapter makes on A with the same file, reference image, weight and window. Forge's IP-Adapter
hard-codes the real SD1.5 block ids, so the model is real-size (random): fixtures/make_forge_peer_models.py writes it
once with the adapters and a random CLIP ViT-H/14 (about 2 minutes, cached beside the Forge fixtures). DS follows
Forge's rules here: its preprocessing, the encoder's output for a black image as the plus uncond, and the sigma window.

A heavy tier: a second Forge with a real-size SD1.5 and two ViT-H towers, about 12 GB of memory.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from forge_harness import HERE, MISSING, ensure_forge_models, h, start_forge
from test_delta_sampling import ds, max_diff
from webui_harness import mean_abs_diff

pytestmark = pytest.mark.forge

MAX_PIXEL_DIFF = 3  # the bar: two implementations of the same maths, float32 rounding only
MEAN_PIXEL_DIFF = 0.1


@pytest.fixture(scope="module")
def forge_peer():
    if MISSING:
        pytest.skip(MISSING)
    models = ensure_forge_models(HERE / "fixtures" / "make_forge_peer_models.py")
    ui = start_forge(models, Path(tempfile.mkdtemp(prefix="delta-forge-peer-")))
    try:
        yield ui
    finally:
        h.stop_process(ui.process)


def _reference_224() -> str:
    from test_delta_ip_adapter import reference_image

    return reference_image(224)


@pytest.mark.parametrize(("model", "extra", "steps"), [
    ("ip-adapter_sd15_fpeer", {}, 4),
    ("ip-adapter_sd15_fpeer", {"weight": 0.6, "guidance_start": 0.25, "guidance_end": 0.75}, 6),
    ("ip-adapter-plus_sd15_fpeer", {}, 4),
])
def test_ip_adapter_unit_equals_forges_own_ip_adapter(forge_peer, model, extra, steps):
    ui = forge_peer
    unit = {"image": _reference_224(), "weight": 1.0, **extra}
    payload = ui.payload("forge-peer-sd15", steps=steps)
    names = ui.get("/controlnet/model_list").json()["model_list"]
    their_name = next(n for n in names if n.startswith(model + " ["))
    t0 = time.monotonic()
    plain = ui.txt2img(payload)
    theirs = ui.txt2img({**payload, "alwayson_scripts": {"controlnet": {"args": [
        {**unit, "enabled": True, "module": "CLIP-ViT-H (IPAdapter)", "model": their_name}]}}})
    # Forge's units fail silently (HTTP 200 and a plain image): the unit ran only if its input came back as an extra
    # image and the image changed
    assert len(theirs["images"]) == 2, "Forge's IP-Adapter did not run"
    ours = ui.txt2img({**payload, "alwayson_scripts": ds(scale=1.0, source=ui.default_checkpoint, controlnet=[
        {**unit, "model": model, "module": "CLIP-ViT-H (IPAdapter)"}])})
    effect = mean_abs_diff(theirs["images"][0], plain["images"][0])
    mean, peak = mean_abs_diff(ours["images"][0], theirs["images"][0]), max_diff(ours["images"][0],
                                                                                 theirs["images"][0])
    print(f"{model} {extra}: unit effect {effect:.2f} levels; DS vs Forge's IP-Adapter mean {mean:.4f}, max {peak} "
          f"({time.monotonic() - t0:.0f} s for 3 requests)")
    assert effect > 0.3, f"Forge's unit should change the image (mean {effect:.3f})"
    assert peak <= MAX_PIXEL_DIFF and mean <= MEAN_PIXEL_DIFF, (mean, peak)
