"""The real-webui tier of the bench: two webui processes (DS installed, DS absent), same seed, interleaved timings.

Reuses tests/webui/webui_harness.py (tiny fixtures, data-dir layout, command line, HTTP client) and adds the bench's
support extension (bench/support_extension: per-generation time inside ``p.sample`` and every UNet forward of the
target and of the source legs) plus a mid-size random SD1 checkpoint pair and LoRA (bench/make_mid_model.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parent
sys.path.insert(0, str(PROJECT_ROOT / "tests" / "webui"))

import webui_harness as h  # noqa: E402

SUPPORT = HERE / "support_extension"
SUPPORT_NAME = "delta-bench-support"
MID_GENERATOR = HERE / "make_mid_model.py"
BENCH_CACHE = Path(os.path.expanduser(os.environ.get("DELTA_BENCH_CACHE", "~/.cache/sd-webui-delta-sampling/bench")))
MID_UNET_CH = int(os.environ.get("DELTA_BENCH_MID_CH", "160"))
CPU_FLAGS = ("--use-cpu", "all", "--no-half", "--precision", "full")


# --- models --------------------------------------------------------------------------------------------------------


TINY_NEEDED = ("tiny-sd1-a", "tiny-sd1-b")
TINY_LORAS = ("tiny-sd1-lora",)


def snapshot_tiny(tiny: h.TinyModels) -> h.TinyModels:
    """A bench-owned copy of the tiny fixtures the bench uses (SD1 a/b, the SD1 LoRA, the CLIP files): the test
    tier's cache dir is replaced whenever its generator changes, which must not break a bench run half-way."""
    root = BENCH_CACHE / f"tiny-{tiny.root.name}"
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    with open(BENCH_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".complete").exists():
            if root.exists():
                shutil.rmtree(root)
            (root / "Stable-diffusion").mkdir(parents=True)
            (root / "Lora").mkdir()
            clip_dir = root / "text_encoders" / "clip-l-tiny"
            shutil.copytree(tiny.manifest["clip_dir"], clip_dir)
            shutil.copytree(tiny.open_clip_configs, root / "open_clip_configs")
            manifest = dict(tiny.manifest, clip_dir=str(clip_dir), open_clip_configs=str(root / "open_clip_configs"))
            manifest["checkpoints"] = [c for c in tiny.manifest["checkpoints"] if c["name"] in TINY_NEEDED]
            manifest["loras"] = [lo for lo in tiny.manifest["loras"] if lo["name"] in TINY_LORAS]
            for c in manifest["checkpoints"]:
                shutil.copy2(tiny.ckpt_dir / c["file"], root / "Stable-diffusion" / c["file"])
                text = (tiny.ckpt_dir / c["yaml"]).read_text().replace(tiny.manifest["clip_dir"], str(clip_dir))
                (root / "Stable-diffusion" / c["yaml"]).write_text(text)
            for lo in manifest["loras"]:
                shutil.copy2(tiny.lora_dir / lo["file"], root / "Lora" / lo["file"])
            (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
            (root / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    return h._load_tiny_models(root, False, 0.0)


def ensure_mid_models(tiny: h.TinyModels) -> tuple[dict[str, h.Checkpoint], dict[str, h.Lora], dict]:
    """The mid-size SD1 pair + LoRA, generated once (about a minute) and cached."""
    digest = hashlib.sha256()
    parts = (MID_GENERATOR.read_bytes(), h.GENERATOR.read_bytes(), str(MID_UNET_CH).encode())
    for part in parts:
        digest.update(part)
    root = BENCH_CACHE / f"mid-{digest.hexdigest()[:16]}"
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    with open(BENCH_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".complete").exists():
            print(f"generating the mid-size model (UNet channels {MID_UNET_CH}) into {root} ...", flush=True)
            root.mkdir(parents=True, exist_ok=True)
            cmd = [str(h.WEBUI_PYTHON), str(MID_GENERATOR), "--webui-dir", str(h.WEBUI_DIR), "--tiny-root",
                   str(tiny.root), "--out", str(root), "--unet-ch", str(MID_UNET_CH)]
            with open(root / "generate.log", "w") as log:
                r = subprocess.run(cmd, check=False, cwd=h.WEBUI_DIR, env=h.webui_subprocess_env(), stdout=log,
                                   stderr=subprocess.STDOUT, timeout=1800)
            if r.returncode != 0:
                raise RuntimeError(f"mid-size generator failed; see {root / 'generate.log'}")
            (root / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    manifest = json.loads((root / "manifest.json").read_text())
    cks = {c["name"]: h.Checkpoint(
        name=c["name"], family=c["family"], file=c["file"], path=root / "Stable-diffusion" / c["file"],
        yaml_path=root / "Stable-diffusion" / c["yaml"], title=c["title"], sha256=c["sha256"],
        shorthash=c["shorthash"], parameterization=c["parameterization"], inpainting=c["inpainting"],
        bytes=c["bytes"], params=c["params"], vae_seed=c["vae_seed"]) for c in manifest["checkpoints"]}
    loras = {lo["name"]: h.Lora(
        name=lo["name"], family=lo["family"], kind=lo["kind"], file=lo["file"], path=root / "Lora" / lo["file"],
        expect_match=True, module_keys=tuple(lo["module_keys"]), bytes=lo["bytes"]) for lo in manifest["loras"]}
    return cks, loras, manifest


# --- processes -----------------------------------------------------------------------------------------------------


def _launch(models: h.TinyModels, data_dir: Path, *, extension: bool, device: str) -> tuple[h.WebUI, float]:
    default = models.checkpoints["tiny-sd1-a"]
    ext = h.make_data_dir(data_dir, models, default)
    if not extension:
        ext.unlink()  # the "extension absent" process: everything else identical
    (data_dir / "extensions" / SUPPORT_NAME).symlink_to(SUPPORT, target_is_directory=True)
    cmd = h.webui_command(h.free_port(), data_dir, default)
    port = int(cmd[cmd.index("--port") + 1])
    if device == "cuda":
        cmd = [a for a in cmd if a not in CPU_FLAGS]
    log_path = data_dir / "webui.log"
    env = h.webui_subprocess_env()
    if device == "cuda":
        env.pop("OMP_NUM_THREADS", None)
        env.pop("MKL_NUM_THREADS", None)
    with open(log_path, "wb") as logf:
        logf.write(("$ " + " ".join(cmd) + "\n").encode())
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=h.WEBUI_DIR, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    import requests

    session = requests.Session()
    session.trust_env = False
    ui = h.WebUI(url=f"http://127.0.0.1:{port}", port=port, data_dir=data_dir, log_path=log_path, session=session,
                 models=models, process=proc, default_checkpoint=default.title, extension_dir=ext)
    return ui, time.monotonic()


def _wait_ready(ui: h.WebUI, t0: float) -> None:
    h.wait_until_ready(ui, t0, h.STARTUP_TIMEOUT * 2)


@contextlib.contextmanager
def two_webuis(models: h.TinyModels, work: Path, device: str):
    """(installed, absent): started side by side, stopped on exit."""
    started = []
    try:
        for name, extension in (("installed", True), ("absent", False)):
            d = work / name
            d.mkdir(parents=True)
            started.append(_launch(models, d, extension=extension, device=device))
        for ui, t0 in started:
            _wait_ready(ui, t0)
        installed, absent = started[0][0], started[1][0]
        scripts = installed.get("/sdapi/v1/scripts").json()
        if "delta sampling" not in [s.lower() for s in scripts.get("txt2img", [])]:
            raise RuntimeError(f"DS script not found in the installed webui: {scripts}")
        if "delta sampling" in [s.lower() for s in absent.get("/sdapi/v1/scripts").json().get("txt2img", [])]:
            raise RuntimeError("the 'absent' webui has the DS script")
        yield installed, absent
    finally:
        for ui, _ in started:
            h.stop_process(ui.process)


# --- one generation ------------------------------------------------------------------------------------------------


def ds_args(source: str, *, adapted: str | None = None, loras: tuple = (), **over: Any) -> dict:
    args = {"enabled": True, "scale": 1.0, "source": source, "adapted": adapted,
            "loras": [{"name": n, "weight": 1.0} for n in loras], "start": 0.0, "end": 1.0, "decay": "constant",
            "reuse_steps": 1, "cond_only": False, "batch_legs": True}
    args.update(over)
    return args


def generate(ui: h.WebUI, payload: dict) -> dict:
    before = ui.get("/delta-bench/v1/ds-time").json()
    t0 = time.perf_counter()
    res = ui.txt2img(payload)
    wall = time.perf_counter() - t0
    last = ui.get("/delta-bench/v1/last").json()
    after = ui.get("/delta-bench/v1/ds-time").json()
    last.pop("profile", None)
    return {"wall_s": wall, **last, "ds_code_s": after["s"] - before["s"],
            "ds_code_calls": after["calls"] - before["calls"], "image": res["images"][0], "info": res.get("info", "")}


@dataclass
class Config:
    name: str
    process: str  # "installed" | "absent" | "detached" (installed process, DS's callbacks and script taken out)
    ds: dict | None  # DS args, None: no alwayson_scripts entry (DS installed but disabled, or absent)
    nominal: float | None = None  # expected fraction of full DS's leg work (window, reuse)
    group: str = "option"


def configs(source: str, lora: str, steps: int) -> list[Config]:
    full = ds_args(source, loras=(lora,))
    half = steps // 2
    reuse2 = -(-steps // 2) / steps
    reuse3 = -(-steps // 3) / steps
    return [
        Config("absent", "absent", None, group="base"),
        Config("detached", "detached", None, group="base"),
        Config("off", "installed", None, group="base"),
        Config("full", "installed", full, 1.0, group="base"),
        Config("batch_legs=false", "installed", {**full, "batch_legs": False}, 1.0, group="batch"),
        Config("window [0, 0.5)", "installed", {**full, "end": 0.5}, half / steps),
        Config("window [0.5, 1)", "installed", {**full, "start": 0.5}, (steps - half) / steps),
        Config("decay linear", "installed", {**full, "decay": "linear"}, 1.0),
        Config("reuse_steps=2", "installed", {**full, "reuse_steps": 2}, reuse2),
        Config("reuse_steps=3", "installed", {**full, "reuse_steps": 3}, reuse3),
        Config("cond_only", "installed", {**full, "cond_only": True}, None),
        # the legs on a 2x coarser grid (at 64 px the latent is 8 x 8 and the factor falls back to 1)
        Config("source_resolution=2", "installed", {**full, "source_resolution": "2"}, None),
    ]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _spread(values: list[float]) -> dict:
    if not values:
        return {}
    s = sorted(values)
    q = statistics.quantiles(s, n=4) if len(s) >= 4 else [s[0], statistics.median(s), s[-1]]
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q[0], "q3": q[2], "n": len(s)}


# --- one model -----------------------------------------------------------------------------------------------------


def bench_model(installed: h.WebUI, absent: h.WebUI, *, label: str, checkpoint: h.Checkpoint, adapted: h.Checkpoint,
                lora: h.Lora, size: int, steps: int, repeats: int, absent_repeats: int, log=print) -> dict:
    """Every webui measurement for one source/target model (DS: target = source base = ``checkpoint``)."""
    base_payload = {
        "prompt": "a red apple on a table", "negative_prompt": "blurry", "width": size, "height": size,
        "steps": steps, "sampler_name": "Euler", "scheduler": "Automatic", "cfg_scale": 5.0, "seed": 1234,
        "batch_size": 1, "n_iter": 1, "send_images": True, "save_images": False,
        "override_settings": {"sd_model_checkpoint": checkpoint.title},
        "override_settings_restore_afterwards": False,
    }
    cfgs = configs(checkpoint.title, lora.name, steps)

    def payload(cfg: Config) -> dict:
        p = dict(base_payload)
        if cfg.ds is not None:
            p["alwayson_scripts"] = {"delta sampling": {"args": [cfg.ds]}}
        return p

    def ui_of(cfg: Config) -> h.WebUI:
        return absent if cfg.process == "absent" else installed

    def run(cfg: Config) -> dict:
        if cfg.process == "detached":
            state = installed.post("/delta-bench/v1/detach", params={"on": "true"}).json()
            if not state["detached"] or state["scripts"] < 1 or state["callbacks"] < 2:
                raise RuntimeError(f"could not detach DS: {state}")
            try:
                return generate(installed, payload(cfg))
            finally:
                installed.post("/delta-bench/v1/detach", params={"on": "false"})
        return generate(ui_of(cfg), payload(cfg))

    runs: dict[str, list[dict]] = {c.name: [] for c in cfgs}
    images: dict[str, str] = {}
    # warm-up: loads the checkpoint in both processes and the source model, one run of every config
    t_warm = time.monotonic()
    for cfg in cfgs:
        for _ in range(2 if cfg.name in ("absent", "detached", "off", "full") else 1):
            r = run(cfg)
        images[cfg.name] = r["image"]
        if cfg.ds is not None and "Delta" not in r["info"]:
            raise RuntimeError(f"{cfg.name}: the generation's infotext has no Delta entry; DS did not run")
    log(f"  [{label}] warm-up {time.monotonic() - t_warm:.1f}s")
    rng = random.Random(1234)
    nondeterministic: set[str] = set()
    t_loop = time.monotonic()
    base = [c for c in cfgs if c.name in ("absent", "detached", "off")]
    order_base = [c for c in cfgs if c not in base]
    for i in range(max(repeats, absent_repeats)):
        # absent, detached and off back to back, rotated each round (ratio 1); the DS configs follow, shuffled
        if i < absent_repeats:
            for cfg in base[i % 3:] + base[:i % 3]:
                runs[cfg.name].append(run(cfg))
        if i < repeats:
            order = list(order_base)
            rng.shuffle(order)
            for cfg in order:
                r = run(cfg)
                if r["image"] != images[cfg.name] and _image_diff(r["image"], images[cfg.name]) > 0:
                    nondeterministic.add(cfg.name)
                runs[cfg.name].append(r)
    log(f"  [{label}] timed loop {time.monotonic() - t_loop:.1f}s")

    profile = None
    with contextlib.suppress(Exception):
        installed.post("/delta-bench/v1/profile", params={"top": 35})
        installed.txt2img(payload(next(c for c in cfgs if c.name == "full")))
        profile = installed.get("/delta-bench/v1/last").json().get("profile")

    try:
        memory = bench_memory(installed, base_payload, checkpoint, adapted, lora)
    except Exception as exc:
        memory = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"  [{label}] memory measurement failed: {memory['error']}")
    result = summarize(label, cfgs, runs, images, memory=memory, profile=profile, checkpoint=checkpoint, lora=lora,
                       size=size, steps=steps)
    result["nondeterministic"] = sorted(nondeterministic)
    return result


def bench_memory(ui: h.WebUI, base_payload: dict, checkpoint: h.Checkpoint, adapted: h.Checkpoint,
                 lora: h.Lora) -> dict:
    """Source-model bytes (status route, shared tensors once; LoRA tensors from the support route) and RSS deltas."""

    def run(ds: dict) -> None:
        ui.txt2img({**base_payload, "steps": 2, "alwayson_scripts": {"delta sampling": {"args": [ds]}}})

    def status() -> dict:
        return ui.get("/delta-sampling/v1/status").json()

    def mem() -> dict:
        return ui.get("/delta-bench/v1/memory").json()

    out: dict[str, Any] = {}
    ui.post("/delta-sampling/v1/unload")
    rss0 = status()["process_rss_bytes"]
    run(ds_args(checkpoint.title, adapted=checkpoint.title))  # base == adapted: loads one model, runs no leg
    s1 = status()
    out["one_model_bytes"] = s1["total_bytes"]
    out["rss_one_model"] = s1["process_rss_bytes"] - rss0
    run(ds_args(checkpoint.title, loras=(lora.name,)))
    s2, m2 = status(), mem()
    out["lora_pair_model_bytes"] = s2["total_bytes"]
    out["lora_pair_lora_bytes"] = m2["lora_bytes"]
    out["lora_pair_bytes"] = s2["total_bytes"] + m2["lora_bytes"]
    out["rss_lora_pair"] = s2["process_rss_bytes"] - rss0
    out["lora_file_bytes"] = lora.bytes
    ui.post("/delta-sampling/v1/unload")
    rss3 = status()["process_rss_bytes"]
    run(ds_args(checkpoint.title, adapted=adapted.title))
    s4 = status()
    out["checkpoint_pair_bytes"] = s4["total_bytes"]
    out["rss_checkpoint_pair"] = s4["process_rss_bytes"] - rss3
    out["models_in_checkpoint_pair"] = len(s4["models"])
    ui.post("/delta-sampling/v1/unload")
    out["lora_pair_vs_one"] = out["lora_pair_bytes"] / out["one_model_bytes"]
    out["checkpoint_pair_vs_one"] = out["checkpoint_pair_bytes"] / out["one_model_bytes"]
    out["lora_pair_vs_checkpoint_pair"] = out["lora_pair_bytes"] / out["checkpoint_pair_bytes"]
    out["rss_lora_pair_vs_one"] = out["rss_lora_pair"] / out["rss_one_model"] if out["rss_one_model"] > 0 else None
    return out


# --- numbers -------------------------------------------------------------------------------------------------------


def _image_diff(a: str, b: str) -> float:
    return h.mean_abs_diff(a, b)


def summarize(label: str, cfgs: list[Config], runs: dict, images: dict, *, memory: dict, profile: str | None,
              checkpoint: h.Checkpoint, lora: h.Lora, size: int, steps: int) -> dict:
    def med(name: str, key: str) -> float:
        return _median([r[key] for r in runs[name]])

    sample = {n: med(n, "sample_s") for n in runs}
    wall = {n: med(n, "wall_s") for n in runs}
    off, full = sample["off"], sample["full"]
    full_runs = runs["full"]
    off_nonfwd = _median([r["sample_s"] - r["target_fwd_s"] for r in runs["off"]])
    # ratio 2: DS full vs (DS off's own non-forward time + every forward of the full run, target and legs)
    overhead_runs = [r["sample_s"] / (r["target_fwd_s"] + r["source_fwd_s"] + off_nonfwd) for r in full_runs]
    fwd_share = [(r["target_fwd_s"] + r["source_fwd_s"]) / r["sample_s"] for r in full_runs]
    ds_nonfwd_ms = _median([(r["sample_s"] - r["target_fwd_s"] - r["source_fwd_s"] - off_nonfwd) * 1000
                            for r in full_runs])
    legs_sum = med("full", "source_fwd_s")
    ds_own_ms = _median([(r["ds_code_s"] - r["source_fwd_s"]) * 1000 for r in full_runs])

    ds_cost_full = full - off
    options = []
    for cfg in cfgs:
        if cfg.name in ("absent", "detached", "off"):
            continue
        s = sample[cfg.name]
        ds_cost = (s - off) / ds_cost_full if ds_cost_full > 0 else float("nan")
        calls = med(cfg.name, "source_calls")
        row = {
            "option": cfg.name,
            "sample_s": s,
            "wall_s": wall[cfg.name],
            "cost_vs_full": s / full,
            "ds_cost_vs_full": ds_cost,
            "legs_fwd_s": med(cfg.name, "source_fwd_s"),
            "legs_fwd_vs_full": med(cfg.name, "source_fwd_s") / legs_sum if legs_sum else float("nan"),
            "source_calls": calls,
            "source_rows": med(cfg.name, "source_rows"),
            "nominal_fraction": cfg.nominal,
            "call_fraction": calls / med("full", "source_calls") if med("full", "source_calls") else None,
            "image_diff_vs_full": _image_diff(images[cfg.name], images["full"]),
            "spread": _spread([r["sample_s"] for r in runs[cfg.name]]),
        }
        if cfg.nominal:
            row["ds_cost_vs_nominal"] = ds_cost / cfg.nominal
        options.append(row)

    result = {
        "label": label,
        "checkpoint": checkpoint.title,
        "unet_params": checkpoint.params.get("unet"),
        "params": checkpoint.params,
        "file_bytes": checkpoint.bytes,
        "lora": lora.name,
        "lora_bytes": lora.bytes,
        "image_size": size,
        "steps": steps,
        "sampler": "Euler",
        "repeats": len(runs["full"]),
        "absent_repeats": len(runs["absent"]),
        "sample_s": sample,
        "wall_s": wall,
        "spread": {n: _spread([r["sample_s"] for r in runs[n]]) for n in runs},
        "wall_spread": {n: _spread([r["wall_s"] for r in runs[n]]) for n in runs},
        "target_fwd_s": {n: med(n, "target_fwd_s") for n in runs},
        "ratio_disabled_vs_absent": {
            # same process: DS's callbacks and script taken out vs in (the primary number)
            "same_process_wall": wall["off"] / wall["detached"],
            "same_process_sample": sample["off"] / sample["detached"],
            "same_process_paired_wall": _paired(runs["detached"], runs["off"], "wall_s"),
            "same_process_target_fwd": med("off", "target_fwd_s") / med("detached", "target_fwd_s"),
            # two processes: also measures how two webui processes differ (memory placement of the weights)
            "target_fwd_off_vs_absent": med("off", "target_fwd_s") / med("absent", "target_fwd_s"),
            "wall": wall["off"] / wall["absent"],
            "sample": sample["off"] / sample["absent"],
            "paired_wall": _paired(runs["absent"], runs["off"], "wall_s"),
            "paired_sample": _paired(runs["absent"], runs["off"], "sample_s"),
            # DS's own code in a disabled generation (its callbacks + job set-up), timed from inside the process
            "ds_code_ms_disabled": med("off", "ds_code_s") * 1000,
            "direct": 1 + med("off", "ds_code_s") / wall["absent"],
        },
        "ratio_overhead": {
            "ds_full_vs_off_plus_legs": _median(overhead_runs),
            "ds_full_vs_all_forwards": _median([r["sample_s"] / (r["target_fwd_s"] + r["source_fwd_s"])
                                                for r in full_runs]),
            "off_vs_target_forwards": _median([r["sample_s"] / r["target_fwd_s"] for r in runs["off"]]),
            "forward_share_full": _median(fwd_share),
            "ds_bookkeeping_ms": ds_nonfwd_ms,
            "ds_bookkeeping_ms_per_call": ds_nonfwd_ms / max(med("full", "source_calls"), 1),
            "legs_fwd_s": legs_sum,
            "target_fwd_s_full": med("full", "target_fwd_s"),
            "off_nonfwd_s": off_nonfwd,
            "per_run": overhead_runs,
            # direct: DS's own code time (its callbacks and job set-up, timed inside the process) minus the legs'
            # forwards, against the rest of the generation: T_full / (T_full - own)
            "ds_own_ms": ds_own_ms,
            "ds_own_ms_per_call": ds_own_ms / max(steps, 1),
            "direct": _median([r["sample_s"] / (r["sample_s"] - (r["ds_code_s"] - r["source_fwd_s"]))
                               for r in full_runs]),
        },
        "ratio_batch_legs": {
            "batched_vs_unbatched": sample["full"] / sample["batch_legs=false"],
            "ds_cost_batched_vs_unbatched": (full - off) / (sample["batch_legs=false"] - off),
            "legs_fwd_batched_vs_unbatched": legs_sum / med("batch_legs=false", "source_fwd_s"),
            "calls_batched": med("full", "source_calls"),
            "calls_unbatched": med("batch_legs=false", "source_calls"),
        },
        "ds_effect_image_diff": _image_diff(images["off"], images["full"]),
        "absent_vs_off_image_diff": _image_diff(images["off"], images["absent"]),
        "detached_vs_off_image_diff": _image_diff(images["off"], images["detached"]),
        "options": options,
        "memory": memory,
        "profile_full": profile,
    }
    return result


def _paired(a: list[dict], b: list[dict], key: str) -> dict:
    """Median of per-round ratios b/a (the two runs of a round ran back to back)."""
    ratios = [y[key] / x[key] for x, y in zip(a, b, strict=False)]
    return _spread(ratios)


def run_webui_tier(*, quick: bool, device: str, work: Path, log=print, partial=None) -> dict:
    tiny = snapshot_tiny(h.ensure_tiny_models())
    mid_cks, mid_loras, mid_manifest = ({}, {}, None) if quick else ensure_mid_models(tiny)
    models = dataclasses.replace(tiny, checkpoints={**tiny.checkpoints, **mid_cks}, loras={**tiny.loras, **mid_loras})
    out: dict[str, Any] = {"models": {}}
    t0 = time.monotonic()
    with two_webuis(models, work, device) as (installed, absent):
        log(f"  webuis ready in {time.monotonic() - t0:.1f}s")
        out["startup_s"] = {"installed": installed.startup_seconds, "absent": absent.startup_seconds}
        plans = [("tiny", tiny.ckpt("tiny-sd1-a"), tiny.ckpt("tiny-sd1-b"), tiny.lora("sd1"), 64,
                  20, 3 if quick else 9, 8 if quick else 21)]
        if not quick:
            plans.append(("mid", mid_cks["bench-mid-sd1-a"], mid_cks["bench-mid-sd1-b"],
                          mid_loras["bench-mid-sd1-lora"], int(os.environ.get("DELTA_BENCH_MID_SIZE", "128")),
                          int(os.environ.get("DELTA_BENCH_MID_STEPS", "12")),
                          int(os.environ.get("DELTA_BENCH_MID_REPEATS", "5")),
                          int(os.environ.get("DELTA_BENCH_MID_ABSENT_REPEATS", "9"))))
        for label, ck, adapted, lora, size, steps, repeats, absent_repeats in plans:
            t = time.monotonic()
            try:
                out["models"][label] = bench_model(installed, absent, label=label, checkpoint=ck, adapted=adapted,
                                                   lora=lora, size=size, steps=steps, repeats=repeats,
                                                   absent_repeats=absent_repeats, log=log)
            except Exception as exc:  # keep what the other model measured
                out.setdefault("errors", {})[label] = f"{type(exc).__name__}: {exc}"
                log(f"  [{label}] FAILED: {type(exc).__name__}: {exc}\n{installed.log_tail(30)}")
                continue
            out["models"][label]["seconds"] = time.monotonic() - t
            if partial is not None:
                partial(out)
            log(f"  [{label}] done in {time.monotonic() - t:.1f}s")
    out["mid_manifest"] = mid_manifest
    return out
