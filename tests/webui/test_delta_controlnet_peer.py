"""ControlNet on the adapted leg against a peer: sd-webui-controlnet (Mikubill, v1.1.455) in the same real webui.

DS(A, A, A + unit, lambda 1) computes D_A + (D_A+CN - D_A) = D_A+CN at every step, so its image must be the image
sd-webui-controlnet makes on A with the same model file, control image, weight, window and control mode. The models
are real-size (sd-webui-controlnet builds every SD1 ControlNet with the full SD1.5 configuration) and random:
``fixtures/make_peer_models.py`` writes them once (about 75 s) and they are cached beside the tiny fixtures.

A heavy tier: a second webui with both extensions, about 7-12 GB of memory and 25-40 s a request on 2 CPU cores.
It runs when sd-webui-controlnet is found at ``SD_WEBUI_CONTROLNET_DIR`` (default ``~/sd-webui-controlnet``, a copy
of Mikubill/sd-webui-controlnet at 56cec5b) and the webui's venv has ``controlnet_aux`` (tests/webui/README.md);
otherwise it skips with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import webui_harness as h
from test_delta_controlnet import control_image
from test_delta_sampling import ds, max_diff
from webui_harness import image_array, mean_abs_diff

pytestmark = pytest.mark.webui

PEER_DIR = Path(os.environ.get("SD_WEBUI_CONTROLNET_DIR", "~/sd-webui-controlnet")).expanduser()
GENERATOR = Path(__file__).parent / "fixtures" / "make_peer_models.py"
# Same maths, two implementations (their ControlNet class and UNet hook against lib_delta's): float32 rounding only
MAX_PIXEL_DIFF = 2
MEAN_PIXEL_DIFF = 0.1


def _missing() -> str | None:
    reason = h.webui_missing_reason()
    if reason:
        return reason
    if not (PEER_DIR / "scripts" / "controlnet.py").is_file():
        return f"sd-webui-controlnet not found at {PEER_DIR} (set SD_WEBUI_CONTROLNET_DIR)"
    probe = subprocess.run([str(h.WEBUI_PYTHON), "-c", "import controlnet_aux"], check=False, capture_output=True)
    if probe.returncode:
        return "the webui's venv lacks controlnet_aux (pip install --no-deps controlnet_aux==0.0.9)"
    return None


def _peer_models() -> Path:
    digest = hashlib.sha256(GENERATOR.read_bytes() + (GENERATOR.parent / "make_tiny_models.py").read_bytes())
    root = h.CACHE_ROOT.parent / "peer" / digest.hexdigest()[:16]
    if not (root / "manifest.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(h.WEBUI_PYTHON), str(GENERATOR), "--webui-dir", str(h.WEBUI_DIR), "--out", str(root)],
                       check=True, env=h.webui_subprocess_env(), stdout=subprocess.DEVNULL)
    return root


@pytest.fixture(scope="module")
def peer():
    reason = _missing()
    if reason:
        pytest.skip(reason)
    root = _peer_models()
    manifest = json.loads((root / "manifest.json").read_text())
    c = manifest["checkpoint"]
    checkpoint = h.Checkpoint(name=c["name"], family="sd1", file=c["file"], path=root / "Stable-diffusion" / c["file"],
                              yaml_path=root / "Stable-diffusion" / c["yaml"], title=c["title"], sha256=c["sha256"],
                              shorthash=c["shorthash"], parameterization="eps", inpainting=False,
                              bytes=c["bytes"], params={}, vae_seed=0)
    empty = Path(tempfile.mkdtemp())
    models = h.TinyModels(root=root, ckpt_dir=root / "Stable-diffusion", lora_dir=empty,
                          open_clip_configs=empty, checkpoints={c["name"]: checkpoint}, loras={}, manifest=manifest,
                          seconds=0.0, generated=False)
    data_dir = Path(tempfile.mkdtemp(prefix="delta-peer-"))
    (data_dir / "extensions").mkdir(parents=True)
    (data_dir / "extensions" / "sd-webui-controlnet").symlink_to(PEER_DIR, target_is_directory=True)
    annotators = data_dir / "annotators"  # it writes there at start-up; keep its own folder untouched
    annotators.mkdir()
    (annotators / "clip_vision").symlink_to(root / "clip_vision", target_is_directory=True)  # its clip_h.pth
    ui = h.start_webui(models, data_dir, c["name"], extra_args=["--controlnet-annotator-models-path",
                                                                 str(annotators)])
    try:
        yield ui
    finally:
        h.stop_process(ui.process)


def _peer_model_name(ui) -> str:
    names = ui.get("/controlnet/model_list").json()["model_list"]
    found = [n for n in names if n.startswith("control_sd15_peer")]
    assert found, names
    return found[0]


@pytest.mark.parametrize("mode", ["Balanced", "ControlNet is more important"])
def test_ds_with_a_unit_equals_sd_webui_controlnet(peer, mode):
    image = control_image()
    unit = {"image": image, "module": "none", "weight": 0.8, "guidance_start": 0.0, "guidance_end": 0.75,
            "control_mode": mode, "resize_mode": "Just Resize", "pixel_perfect": False, "processor_res": 64}
    payload = peer.payload("peer-sd15", steps=6)
    t0 = time.monotonic()
    plain = peer.txt2img(payload)
    theirs = peer.txt2img({**payload, "alwayson_scripts": {"controlnet": {"args": [
        {**unit, "enabled": True, "model": _peer_model_name(peer), "save_detected_map": True}]}}})
    # it fails silently (an image without the unit), so make sure it ran: the map comes back as a second image
    assert len(theirs["images"]) == 2, "sd-webui-controlnet did not run the unit"
    ours = peer.txt2img({**payload, "alwayson_scripts": ds(scale=1.0, source=peer.default_checkpoint,
                                                           controlnet=[{**unit, "model": "control_sd15_peer"}])})
    effect = mean_abs_diff(theirs["images"][0], plain["images"][0])
    mean, peak = mean_abs_diff(ours["images"][0], theirs["images"][0]), max_diff(ours["images"][0],
                                                                                 theirs["images"][0])
    print(f"{mode}: unit effect {effect:.2f} levels; DS vs sd-webui-controlnet mean {mean:.4f}, max {peak} "
          f"({time.monotonic() - t0:.0f} s for 3 requests)")
    assert effect > 1.0
    assert peak <= MAX_PIXEL_DIFF and mean <= MEAN_PIXEL_DIFF, (mean, peak)
    assert image_array(plain["images"][0]).tobytes() == image_array(peer.txt2img(payload)["images"][0]).tobytes()


def _their_unit(ui, model_prefix: str, unit: dict) -> dict:
    names = ui.get("/controlnet/model_list").json()["model_list"]
    found = [n for n in names if n.startswith(model_prefix + " [") or n == model_prefix]
    assert found, names
    return {**unit, "enabled": True, "model": found[0], "save_detected_map": True}


def _compare(peer, payload: dict, units: tuple[dict, dict], what: str, min_effect: float) -> None:
    their_unit, our_unit = units
    t0 = time.monotonic()
    plain = peer.txt2img(payload)
    theirs = peer.txt2img({**payload, "alwayson_scripts": {"controlnet": {"args": [their_unit]}}})
    # it fails silently (HTTP 200 and a plain image): the unit ran only if its input came back as a second image
    # and the image changed
    inputs = len(their_unit["image"]) if isinstance(their_unit["image"], list) else 1
    assert len(theirs["images"]) == 1 + inputs, f"{what}: sd-webui-controlnet did not run the unit"
    ours = peer.txt2img({**payload, "alwayson_scripts": ds(scale=1.0, source=peer.default_checkpoint,
                                                           controlnet=[our_unit])})
    effect = mean_abs_diff(theirs["images"][0], plain["images"][0])
    mean, peak = mean_abs_diff(ours["images"][0], theirs["images"][0]), max_diff(ours["images"][0],
                                                                                 theirs["images"][0])
    print(f"{what}: unit effect {effect:.2f} levels; DS vs sd-webui-controlnet mean {mean:.4f}, max {peak} "
          f"({time.monotonic() - t0:.0f} s for 3 requests)")
    assert effect > min_effect, f"{what}: the peer's unit should change the image (mean {effect:.3f})"
    assert peak <= MAX_PIXEL_DIFF and mean <= MEAN_PIXEL_DIFF, (what, mean, peak)


@pytest.mark.parametrize(("steps", "sampler"), [(4, "Euler"), (6, "Euler"), (4, "Heun")])
def test_window_inside_the_steps_equals_sd_webui_controlnet(peer, steps, sampler):
    """A window that starts and ends inside the steps: sd-webui-controlnet reads the webui's step fraction, which the
    sampler's callback sets after each step (a one-step lag; both ends inclusive), and so must DS."""
    unit = {"image": control_image(), "module": "none", "weight": 1.0, "guidance_start": 0.25, "guidance_end": 0.75,
            "resize_mode": "Just Resize", "pixel_perfect": False, "processor_res": 64}
    _compare(peer, peer.payload("peer-sd15", steps=steps, sampler_name=sampler),
             (_their_unit(peer, "control_sd15_peer", unit), {**unit, "model": "control_sd15_peer"}),
             f"ControlNet window [.25, .75], {steps} steps {sampler}", 0.3)


def _reference_224(hue: int = 0) -> str:
    from test_delta_ip_adapter import reference_image

    return reference_image(224, hue)


@pytest.mark.parametrize(("model", "extra", "steps"), [
    ("ip-adapter_sd15_peer", {}, 4),
    ("ip-adapter_sd15_peer", {"weight": 0.6, "guidance_start": 0.25, "guidance_end": 0.75}, 6),
    ("ip-adapter-plus_sd15_peer", {}, 4),
    ("ip-adapter_sd15_peer", {"image": "two"}, 4),  # two reference images: their tokens averaged
])
def test_ip_adapter_unit_equals_sd_webui_controlnets(peer, model, extra, steps):
    """DS(A, A, A + IP-Adapter, lambda 1) against sd-webui-controlnet's IP-Adapter on A: the same file, reference
    image (224 x 224), weight and window; plus: its shipped uncond hidden states on both sides."""
    what = f"{model} {extra}"
    if extra.get("image") == "two":
        extra = {"image": [{"image": _reference_224()}, {"image": _reference_224(hue=80)}]}
    unit = {"image": _reference_224(), "module": "ip-adapter_clip_h", "weight": 1.0, **extra}
    _compare(peer, peer.payload("peer-sd15", steps=steps), (_their_unit(peer, model, unit), {**unit, "model": model}),
             what, 0.3)
