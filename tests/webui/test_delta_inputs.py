"""Bad files, memory and the per-generation counters of Delta Sampling in the real webui."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest

from webui_harness import image_array, mean_abs_diff

pytestmark = pytest.mark.webui

PROMPT = "a red apple on a table"


def ds(**fields) -> dict:
    return {"delta sampling": {"args": [{"enabled": True, **fields}]}}


class _Malicious:
    """Unpickling this would run a shell command: the webui's safe unpickler must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/delta-sampling-pickle-ran",))


def write_safetensors(path, keys) -> None:
    """A safetensors file of one fp16 zero per key (enough to be told apart by its names)."""
    header = {key: {"dtype": "F16", "shape": [1], "data_offsets": [2 * i, 2 * i + 2]} for i, key in enumerate(keys)}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\x00\x00" * len(keys))


@pytest.fixture
def bad_files(webui):
    sd_dir = webui.data_dir / "models" / "Stable-diffusion"
    lora_dir = webui.data_dir / "models" / "Lora"
    created = {
        "broken_checkpoint": sd_dir / "zz-broken.safetensors",
        "evil_checkpoint": sd_dir / "zz-evil.ckpt",
        "broken_lora": lora_dir / "zz-broken-lora.safetensors",
        "sd3_checkpoint": sd_dir / "zz-sd3-medium.safetensors",
    }
    write_safetensors(created["sd3_checkpoint"], ["model.diffusion_model.x_embedder.proj.weight",
                                                  "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"])
    created["broken_checkpoint"].write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json" + b"\x00" * 64)
    with open(created["evil_checkpoint"], "wb") as f:
        pickle.dump({"state_dict": {"model.diffusion_model.x": _Malicious()}}, f)
    created["broken_lora"].write_bytes(os.urandom(256))
    assert webui.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert webui.post("/sdapi/v1/refresh-loras").status_code == 200
    yield created
    for path in created.values():
        path.unlink(missing_ok=True)
    webui.post("/sdapi/v1/refresh-checkpoints")
    webui.post("/sdapi/v1/refresh-loras")


def test_bad_files_are_refused_by_name_and_the_next_request_works(webui, bad_files):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    marker = "/tmp/delta-sampling-pickle-ran"
    if os.path.exists(marker):
        os.unlink(marker)
    cases = [
        (ds(scale=1.0, source="zz-broken.safetensors", adapted=b), "cannot read checkpoint"),
        (ds(scale=1.0, source="zz-evil.ckpt", adapted=b), "safe unpickler refused"),
        (ds(scale=1.0, source=a, loras=[{"name": "zz-broken-lora"}]), "cannot read LoRA file"),
        # what this webui cannot load as DS needs it, refused by name before anything is built
        (ds(scale=1.0, source="zz-sd3-medium.safetensors", adapted=b),
         "is an SD3-family checkpoint: Delta Sampling does not run the SD3 family in the AUTOMATIC1111 webui"),
    ]
    for scripts, message in cases:
        before = webui.get("/delta-sampling/v1/status").json()["models"]
        r = webui.post("/sdapi/v1/txt2img", json=webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=scripts))
        assert r.status_code == 422, r.text[:500]
        assert message in r.json()["errors"] and "zz-" in r.json()["errors"], r.text[:500]
        # Nothing half-loaded stays behind.
        after = webui.get("/delta-sampling/v1/status").json()["models"]
        assert {m["title"] for m in after} <= {m["title"] for m in before} | {a}
        ok = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
        assert "Delta scale: 1.0" in ok["info"]
    assert not os.path.exists(marker), "the malicious pickle was executed"


def test_unload_returns_memory(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    webui.post("/delta-sampling/v1/unload")
    webui.txt2img(webui.payload("tiny-sd1-a", PROMPT))  # warm the webui's own allocations first
    before = webui.get("/delta-sampling/v1/status").json()["process_rss_bytes"]
    webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    loaded = webui.get("/delta-sampling/v1/status").json()
    assert len(loaded["models"]) == 2 and loaded["total_bytes"] > 0
    freed = webui.post("/delta-sampling/v1/unload").json()
    assert freed["unloaded"] == 2
    status = webui.get("/delta-sampling/v1/status").json()
    assert status["models"] == [] and status["total_bytes"] == 0
    after = freed["process_rss_bytes"]
    assert after <= 1.05 * before, (
        f"RSS before loading {before / 2**20:.0f} MiB, loaded {loaded['process_rss_bytes'] / 2**20:.0f} MiB "
        f"(models {loaded['total_bytes'] / 2**20:.0f} MiB), after unload {after / 2**20:.0f} MiB")


def test_disabled_extension_holds_nothing_and_runs_no_legs(webui):
    webui.post("/delta-sampling/v1/unload")
    webui.txt2img(webui.payload("tiny-sd1-a", PROMPT))
    status = webui.get("/delta-sampling/v1/status").json()
    assert status["models"] == []


@pytest.mark.parametrize(("start", "end", "expected"), [(0.0, 1.0, 8), (0.0, 0.5, 4), (0.25, 0.75, 4), (0.5, 1.0, 4)])
def test_window_runs_the_legs_only_inside_it(webui, start, end, expected):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, steps=8,
                                alwayson_scripts=ds(scale=1.0, source=a, adapted=b, start=start, end=end)))
    counts = webui.get("/delta-sampling/v1/status").json()["last_generation"]
    assert counts["target_calls"] == 8
    assert counts["source_calls"] == expected


def test_speed_options(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    common = dict(scale=1.0, source=a, adapted=b)

    def run(**extra):
        res = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, steps=8, alwayson_scripts=ds(**common, **extra)))
        return res, webui.get("/delta-sampling/v1/status").json()["last_generation"]

    full, full_counts = run()
    reuse, reuse_counts = run(reuse_steps=2)
    assert (reuse_counts["source_calls"], reuse_counts["reused_calls"]) == (4, 4)
    assert mean_abs_diff(reuse["images"][0], full["images"][0]) > 0
    cond_only, counts = run(cond_only=True)
    assert counts["source_calls"] == 8
    assert image_array(cond_only["images"][0]).tobytes() != image_array(full["images"][0]).tobytes()
    assert "Delta cond only: True" in cond_only["info"] and "Delta reuse: 2" in reuse["info"]
    assert full_counts["source_calls"] == 8


def test_settings_section_and_unload_residency(webui):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    options = webui.get("/sdapi/v1/options").json()
    assert options["delta_sampling_residency"] == "gpu"
    assert options["delta_sampling_dtype"] == "auto"
    assert options["delta_sampling_cache_size"] == 2
    assert webui.post("/sdapi/v1/options", json={"delta_sampling_residency": "unload"}).status_code == 200
    try:
        webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
        assert webui.get("/delta-sampling/v1/status").json()["models"] == []
    finally:
        webui.post("/sdapi/v1/options", json={"delta_sampling_residency": "gpu"})
    webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=ds(scale=1.0, source=a, adapted=b)))
    assert len(webui.get("/delta-sampling/v1/status").json()["models"]) == 2
