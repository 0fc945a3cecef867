"""ControlNet core on the source UNet (groundwork for ControlNet on the adapted leg), in the real webui's ldm/sgm.

``/delta-test/controlnet-invariants`` (the test-support extension) builds ControlNets for the loaded checkpoint's UNet
from that UNet's own weights, with ``lib_delta.controlnet``, and measures the invariants of
../shared/controlnet-facts.md §4 on a batch of 2 with the webui's own conditioning.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.webui


@pytest.mark.parametrize("checkpoint", ["tiny-sd1-a", "tiny-sdxl-a"])
def test_controlnet_core_invariants(webui, checkpoint):
    webui.txt2img(webui.payload(checkpoint, "a house", steps=1))  # loads the checkpoint
    r = webui.get("/delta-test/controlnet-invariants")
    assert r.status_code == 200, r.text[:2000]
    got = r.json()
    print(checkpoint, got)
    assert got["checkpoint"] == webui.models.title(checkpoint)
    n = got["input_blocks"]
    assert got["residuals"] == n + 1
    # 1. the re-stated forward is the UNet's own, bit for bit
    assert got["restated_bitwise"], got["restated_vs_forward"]
    # 2. zero convolutions all zero: the output is unchanged, bit for bit
    assert got["zero_cn_bitwise"]
    # 4. encoder = the UNet's own weights, zero hint, identity zero convs: residual i is the UNet's own skip i
    assert got["identity_vs_skips"] == 0.0
    # a random ControlNet changes the output; on rows 1: only, row 0 is untouched and rows 1: are the full answer
    assert got["random_effect"] > 1e-3
    assert got["rows_base_bitwise"]
    assert got["rows_adapted_vs_full"] < 1e-5
    # 5. order: only zero conv k non-zero changes the decoder first at block N - 1 - k
    assert got["first_changed_decoder_block"] == {str(k): n - 1 - k for k in (0, 2, n - 1)}


@pytest.mark.parametrize(("checkpoint", "family", "other"),
                         [("tiny-sd1-a", "sd1", "sdxl"), ("tiny-sdxl-a", "sdxl", "sd1")])
def test_controlnet_files_of_every_layout_build_the_same_network(webui, tiny_models, checkpoint, family, other):
    webui.txt2img(webui.payload(checkpoint, "a house", steps=1))  # loads the checkpoint
    cn_dir = tiny_models.root / "ControlNet"
    names = [f"tiny-{family}-cn{s}.safetensors" for s in ("", "-bare", "-diffusers", "-fp16")]
    wrong = f"tiny-{other}-cn.safetensors"
    r = webui.get("/delta-test/controlnet-build", params={"paths": ",".join(str(cn_dir / n) for n in [*names, wrong])})
    assert r.status_code == 200, r.text[:2000]
    got = r.json()
    assert got["checkpoint"] == webui.models.title(checkpoint)
    res = got["results"]
    prefixed, bare, diffusers, half = (res[n] for n in names)
    assert [x["layout"] for x in (prefixed, bare, diffusers, half)] == ["ldm-prefixed", "ldm-bare", "diffusers",
                                                                        "ldm-prefixed"]
    # the three fp32 layouts build the same network bit for bit; fp16 within its rounding
    assert prefixed["sha256"] == bare["sha256"] == diffusers["sha256"]
    assert abs(half["abs_sum"] / prefixed["abs_sum"] - 1) < 1e-3
    # the fixture's encoder is the UNet's own: the built encoder holds exactly those weights
    assert prefixed["encoder_vs_unet"] == 0.0
    assert prefixed["residuals"] == (13 if family == "sd1" else 10)
    # a ControlNet of the other family: an error naming the file, the source and the first tensor that does not fit
    assert not res[wrong]["ok"]
    error = res[wrong]["error"]
    assert wrong in error and webui.models.title(checkpoint) in error, error
    # the first tensor of the file that the source UNet lacks or shapes differently is named
    assert "does not fit the source" in error, error
    assert "has no counterpart" in error or "in the source UNet" in error, error
