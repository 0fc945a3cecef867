"""Harness of the real-webui test tier (imported by conftest.py and the tests; no pytest fixtures here).

A real AUTOMATIC1111 webui from WEBUI_DIR, tiny generated checkpoints, driven over HTTP.

Also usable outside pytest (e.g. to start a webui by hand on the fixtures)::

    import webui_harness as h
    ui = h.start_webui(h.ensure_tiny_models(), Path(tempfile.mkdtemp()))
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parent.parent
GENERATOR = HERE / "fixtures" / "make_tiny_models.py"
SUPPORT_EXTENSION = HERE / "support_extension"
LORA_KEYS_SOURCES = [PROJECT_ROOT / "lib_delta" / "lora_keys.py", PROJECT_ROOT / "lib_delta" / "errors.py"]
EXTENSION_NAME = "sd-webui-delta-sampling"
SUPPORT_NAME = "delta-test-support"
FIXTURE_FORMAT = "1"  # bump to force regeneration when the cache layout changes

WEBUI_DIR = Path(os.path.expanduser(os.environ.get("WEBUI_DIR", "~/stable-diffusion-webui"))).resolve()
WEBUI_PYTHON = Path(os.path.expanduser(os.environ.get("WEBUI_PYTHON", str(WEBUI_DIR / "venv" / "bin" / "python"))))
CACHE_ROOT = Path(os.path.expanduser(os.environ.get(
    "DELTA_FIXTURE_CACHE", "~/.cache/sd-webui-delta-sampling/fixtures")))
STARTUP_TIMEOUT = float(os.environ.get("WEBUI_STARTUP_TIMEOUT", "180"))
REQUEST_TIMEOUT = float(os.environ.get("WEBUI_REQUEST_TIMEOUT", "120"))
LOG_TAIL_LINES = 80

CHROMIUM = os.environ.get("CHROMIUM_BINARY", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
}

# config.json of the temporary data dir: no previews (SDXL previews would try to download TAESD), nothing saved,
# everything that influences the numbers pinned to the webui's defaults.
BASE_CONFIG: dict[str, Any] = {
    "live_previews_enable": False,
    "show_progress_every_n_steps": -1,
    "samples_save": False,
    "grid_save": False,
    "save_images_before_face_restoration": False,
    "auto_launch_browser": "Disable",
    "sd_checkpoints_limit": 1,
    "sd_checkpoints_keep_in_cpu": True,
    "sd_checkpoint_cache": 0,
    "sd_vae_checkpoint_cache": 0,
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
    "randn_source": "CPU",
    "eta_noise_seed_delta": 0,
    "enable_quantization": False,
    "emphasis": "Original",
    "cross_attention_optimization": "Automatic",
    "batch_cond_uncond": True,
    "s_min_uncond": 0.0,
    "skip_early_cond": 0.0,
    "lora_functional": False,
    "lora_in_memory_limit": 0,
    "disabled_extensions": [],
    "disable_all_extensions": "none",
}


# ---------------------------------------------------------------------------------------------------------------
# availability


def webui_missing_reason() -> str | None:
    """One line saying what is missing, or None when the tier can run."""
    if not (WEBUI_DIR / "launch.py").is_file() or not (WEBUI_DIR / "modules").is_dir():
        return f"no AUTOMATIC1111 webui at WEBUI_DIR={WEBUI_DIR} (launch.py not found)"
    if not WEBUI_PYTHON.exists():
        return f"webui python not found: WEBUI_PYTHON={WEBUI_PYTHON}"
    if not (WEBUI_DIR / "repositories" / "stable-diffusion-stability-ai" / "ldm").is_dir():
        return f"webui at {WEBUI_DIR} has no repositories/stable-diffusion-stability-ai (ldm)"
    try:
        import requests  # noqa: F401
    except ImportError:
        return "python package 'requests' is not installed in the test python"
    return None


MISSING = webui_missing_reason()


# ---------------------------------------------------------------------------------------------------------------
# tiny models


@dataclass(frozen=True)
class Checkpoint:
    name: str              # "tiny-sd1-a"
    family: str            # "sd1" | "sd2" | "sdxl"
    file: str              # "tiny-sd1-a.safetensors" (the webui's CheckpointInfo.name)
    path: Path             # cached file (a symlink to it sits in <data-dir>/models/Stable-diffusion)
    yaml_path: Path
    title: str             # "tiny-sd1-a.safetensors [0123456789]" - pass this as sd_model_checkpoint
    sha256: str
    shorthash: str
    parameterization: str  # "eps" | "v"
    inpainting: bool
    bytes: int
    params: dict           # {"unet": n, "te": n, "vae": n}
    vae_seed: int          # equal vae_seed <=> identical first_stage_model weights


@dataclass(frozen=True)
class Lora:
    name: str              # "tiny-sd1-lora" (what goes into <lora:NAME:w>)
    family: str
    kind: str              # "lora" | "locon" | "loha" | "lokr" | "norm" | ... (README) | "nomatch"
    file: str
    path: Path
    expect_match: bool     # False for "nomatch", "partial" and "badtype"
    module_keys: tuple     # kohya module keys in the file
    bytes: int

    def tag(self, weight: float = 1.0) -> str:
        return f"<lora:{self.name}:{weight:g}>"


@dataclass
class TinyModels:
    root: Path
    ckpt_dir: Path
    lora_dir: Path
    open_clip_configs: Path
    manifest: dict
    checkpoints: dict[str, Checkpoint]
    loras: dict[str, Lora]
    generated: bool        # True if this session generated them (False: served from cache)
    seconds: float

    def ckpt(self, name: str) -> Checkpoint:
        return self.checkpoints[name]

    def title(self, name: str) -> str:
        return self.checkpoints[name].title

    def family(self, family: str, *, inpainting: bool = False) -> list[Checkpoint]:
        return [c for c in self.checkpoints.values() if c.family == family and c.inpainting == inpainting]

    def lora(self, family: str, kind: str = "lora") -> Lora:
        return self.loras[f"tiny-{family}-{kind}"]


def fixture_key() -> str:
    h = hashlib.sha256()
    h.update(FIXTURE_FORMAT.encode())
    h.update(str(WEBUI_DIR).encode())
    for p in [GENERATOR, *LORA_KEYS_SOURCES]:
        h.update(p.name.encode())
        h.update(p.read_bytes() if p.exists() else b"<absent>")
    return h.hexdigest()[:16]


# torch intra-op threads of the webui (and generator). The tiny models gain nothing from more threads, and OpenMP
# spin-waiting makes a multi-threaded webui crawl (10x) when another CPU-heavy process shares this 2-core machine.
WEBUI_THREADS = os.environ.get("WEBUI_THREADS", "1")


def webui_subprocess_env() -> dict:
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    if WEBUI_THREADS:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = WEBUI_THREADS
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    env.pop("VIRTUAL_ENV", None)
    return env


def _load_tiny_models(root: Path, generated: bool, seconds: float) -> TinyModels:
    manifest = json.loads((root / "manifest.json").read_text())
    ckpt_dir, lora_dir = root / "Stable-diffusion", root / "Lora"
    cks = {}
    for c in manifest["checkpoints"]:
        cks[c["name"]] = Checkpoint(
            name=c["name"], family=c["family"], file=c["file"], path=ckpt_dir / c["file"],
            yaml_path=ckpt_dir / c["yaml"], title=c["title"], sha256=c["sha256"], shorthash=c["shorthash"],
            parameterization=c["parameterization"], inpainting=c["inpainting"], bytes=c["bytes"], params=c["params"],
            vae_seed=c["vae_seed"])
    loras = {}
    for lo in manifest["loras"]:
        loras[lo["name"]] = Lora(
            name=lo["name"], family=lo["family"], kind=lo["kind"], file=lo["file"], path=lora_dir / lo["file"],
            expect_match=lo["expect_match"], module_keys=tuple(lo["module_keys"]), bytes=lo["bytes"])
    return TinyModels(root=root, ckpt_dir=ckpt_dir, lora_dir=lora_dir, open_clip_configs=root / "open_clip_configs",
                      manifest=manifest, checkpoints=cks, loras=loras, generated=generated, seconds=seconds)


def ensure_tiny_models() -> TinyModels:
    """Generate (or reuse) the fixtures; safe against concurrent sessions through a lock file."""
    root = CACHE_ROOT / fixture_key()
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(CACHE_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / ".complete").exists():
            return _load_tiny_models(root, False, time.monotonic() - t0)
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        cmd = [str(WEBUI_PYTHON), str(GENERATOR), "--webui-dir", str(WEBUI_DIR), "--out", str(root)]
        if LORA_KEYS_SOURCES[0].exists():
            cmd += ["--lora-keys", str(LORA_KEYS_SOURCES[0])]
        log = root / "generate.log"
        with open(log, "w") as f:
            r = subprocess.run(cmd, check=False, cwd=WEBUI_DIR, env=webui_subprocess_env(), stdout=f,
                               stderr=subprocess.STDOUT, timeout=900)
        if r.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
            raise RuntimeError(f"fixture generator failed (rc={r.returncode}): {' '.join(cmd)}\n{tail}")
        (root / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        _prune_cache(keep=root)
        return _load_tiny_models(root, True, time.monotonic() - t0)


def _prune_cache(keep: Path, max_entries: int = 2) -> None:
    """Drop old fixture generations (about 250 MB each), keeping ``keep`` and the newest others up to max_entries."""
    others = sorted((p for p in CACHE_ROOT.iterdir() if p.is_dir() and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for p in others[max_entries - 1:]:
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# the webui process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_from_b64(data: str):
    """PIL image from the API's base64 string (with or without a data: prefix)."""
    from PIL import Image

    if "," in data[:64]:
        data = data.split(",", 1)[1]
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def image_array(data: str):
    """uint8 numpy array [H, W, 3] of an API image."""
    import numpy as np

    return np.asarray(image_from_b64(data), dtype=np.uint8)


def mean_abs_diff(a: str, b: str) -> float:
    """Mean absolute difference (0..255) between two API images."""
    import numpy as np

    return float(np.abs(image_array(a).astype(np.int16) - image_array(b).astype(np.int16)).mean())


def close_to(got: str, want: str, peak: int, mean: float, what: str) -> tuple[float, int]:
    """Assert two API images are within ``peak`` (max) and ``mean`` levels; returns (mean, max) as measured."""
    import numpy as np

    m = mean_abs_diff(got, want)
    p = int(np.abs(image_array(got).astype(np.int16) - image_array(want).astype(np.int16)).max())
    assert p <= peak and m <= mean, f"{what}: mean diff {m:.4f}, max {p} (allowed {mean} / {peak})"
    return round(m, 4), p


@dataclass
class WebUI:
    url: str               # "http://127.0.0.1:<port>"
    port: int
    data_dir: Path
    log_path: Path
    session: Any           # requests.Session
    models: TinyModels
    process: subprocess.Popen
    startup_seconds: float = 0.0
    default_checkpoint: str = ""
    extension_dir: Path = field(default_factory=Path)

    # --- raw HTTP ---------------------------------------------------------------------------------------------
    def api(self, path: str) -> str:
        return self.url + path

    def get(self, path: str, **kw):
        kw.setdefault("timeout", REQUEST_TIMEOUT)
        return self.session.get(self.api(path), **kw)

    def post(self, path: str, json: Any = None, **kw):
        kw.setdefault("timeout", REQUEST_TIMEOUT)
        return self.session.post(self.api(path), json=json, **kw)

    # --- generation helpers -----------------------------------------------------------------------------------
    def payload(self, checkpoint: str, prompt: str = "a red apple on a table", **over) -> dict:
        """A small deterministic txt2img payload for the checkpoint NAME ("tiny-sd1-a") or title."""
        title = self.models.checkpoints[checkpoint].title if checkpoint in self.models.checkpoints else checkpoint
        p = {
            "prompt": prompt,
            "negative_prompt": "",
            "width": 64,
            "height": 64,
            "steps": 4,
            "sampler_name": "Euler",
            "scheduler": "Automatic",
            "cfg_scale": 5.0,
            "seed": 1234,
            "batch_size": 1,
            "n_iter": 1,
            "send_images": True,
            "save_images": False,
            "override_settings": {"sd_model_checkpoint": title},
        }
        extra_overrides = over.pop("override_settings", None)
        p.update(over)
        if extra_overrides:
            p["override_settings"] = {**p["override_settings"], **extra_overrides}
        return p

    def titles(self, *names: str) -> list[str]:
        """The exact titles of checkpoints given by name."""
        return [self.models.title(n) for n in names]

    def txt2img(self, payload: dict, expect_status: int = 200) -> dict:
        r = self.post("/sdapi/v1/txt2img", json=payload)
        assert r.status_code == expect_status, f"HTTP {r.status_code}: {r.text[:2000]}"
        return r.json()

    def img2img(self, payload: dict, expect_status: int = 200) -> dict:
        r = self.post("/sdapi/v1/img2img", json=payload)
        assert r.status_code == expect_status, f"HTTP {r.status_code}: {r.text[:2000]}"
        return r.json()

    # --- log --------------------------------------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_offset(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def alive(self) -> bool:
        return self.process.poll() is None


def make_data_dir(data_dir: Path, models: TinyModels, default: Checkpoint, config: dict | None = None) -> Path:
    """Lay out a webui --data-dir: models (symlinks), LoRAs, extensions, config.json. Returns the extension path."""
    sd_dir = data_dir / "models" / "Stable-diffusion"
    lora_dir = data_dir / "models" / "Lora"
    ext_dir = data_dir / "extensions"
    for d in (sd_dir, lora_dir, ext_dir):
        d.mkdir(parents=True, exist_ok=True)
    for c in models.checkpoints.values():
        (sd_dir / c.file).symlink_to(c.path)
        (sd_dir / c.yaml_path.name).symlink_to(c.yaml_path)
    for lo in models.loras.values():
        (lora_dir / lo.file).symlink_to(lo.path)
    cn_dir = data_dir / "models" / "ControlNet"  # where the extension (and sd-webui-controlnet) look first
    cn_dir.mkdir(parents=True, exist_ok=True)
    for path in (models.root / "ControlNet").iterdir():  # ControlNets and IP-Adapters
        (cn_dir / path.name).symlink_to(path)
    if (models.root / "clip_vision").is_dir():  # the IP-Adapter fixtures' image encoders
        (data_dir / "models" / "clip_vision").symlink_to(models.root / "clip_vision", target_is_directory=True)
    ext = ext_dir / EXTENSION_NAME
    ext.symlink_to(PROJECT_ROOT, target_is_directory=True)
    support = ext_dir / SUPPORT_NAME
    shutil.copytree(SUPPORT_EXTENSION, support, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(models.open_clip_configs, support / "open_clip_configs")
    # Pre-seed the webui's hash cache (the legacy cache.json is imported on first use) so every checkpoint has its
    # "name [shorthash]" title from the start; otherwise only loaded checkpoints get a hash and a title, and an
    # override_settings sd_model_checkpoint naming an unhashed title silently falls back to the current model.
    hashes = {f"checkpoint/{c.file}": {"mtime": os.path.getmtime(c.path), "sha256": c.sha256}
              for c in models.checkpoints.values()}
    (data_dir / "cache.json").write_text(json.dumps({"hashes": hashes}))
    settings = dict(BASE_CONFIG, sd_model_checkpoint=default.title, **(config or {}))
    (data_dir / "config.json").write_text(json.dumps(settings, indent=1))
    return ext


FULL_PRECISION = ("--no-half", "--precision", "full")
"""The tiers' default; tests/webui/test_delta_precision.py runs ``--precision half`` (an fp16 UNet, no autocast)."""


def webui_command(port: int, data_dir: Path, default: Checkpoint, extra: list[str] | None = None,
                  precision: tuple[str, ...] = FULL_PRECISION) -> list[str]:
    return [
        str(WEBUI_PYTHON), "launch.py",
        "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
        "--use-cpu", "all", *precision,
        "--api", "--port", str(port), "--server-name", "127.0.0.1",
        "--no-download-sd-model", "--data-dir", str(data_dir),
        "--ckpt-dir", str(data_dir / "models" / "Stable-diffusion"),
        "--ckpt", str(data_dir / "models" / "Stable-diffusion" / default.file),
        "--disable-console-progressbars",
        *(extra or []),
    ]


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def start_webui(models: TinyModels, data_dir: Path, default_name: str = "tiny-sd1-a",
                extra_args: list[str] | None = None, auth: tuple[str, str] | None = None, *,
                precision: tuple[str, ...] = FULL_PRECISION, config: dict | None = None) -> WebUI:
    """``config``: settings over the tier's pinned ones in config.json (``fp8_storage``, say)."""
    import requests

    default = models.checkpoints[default_name]
    ext = make_data_dir(data_dir, models, default, config)
    port = free_port()
    log_path = data_dir / "webui.log"
    cmd = webui_command(port, data_dir, default, extra_args, precision)
    t0 = time.monotonic()
    with open(log_path, "wb") as logf:
        logf.write(("$ " + " ".join(cmd) + "\n").encode())
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=WEBUI_DIR, env=webui_subprocess_env(), stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    session = requests.Session()
    session.trust_env = False  # never route 127.0.0.1 through a proxy
    session.auth = auth  # for a webui started with --api-auth (readiness polls an authenticated route)
    ui = WebUI(url=f"http://127.0.0.1:{port}", port=port, data_dir=data_dir, log_path=log_path, session=session,
               models=models, process=proc, default_checkpoint=default.title, extension_dir=ext)
    try:
        wait_until_ready(ui, t0, STARTUP_TIMEOUT)
    except BaseException:
        stop_process(proc)
        raise
    return ui


def wait_until_ready(ui: WebUI, t0: float, timeout: float, what: str = "webui") -> None:
    """Wait for a started webui (A1111 or Forge) to serve its API and every extension route; sets
    ``ui.startup_seconds``. Raises with the log's tail when the process dies or ``timeout`` seconds pass."""
    import requests

    while True:
        if ui.process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {ui.process.returncode} during startup\n{ui.log_tail()}")
        # /sdapi/v1/* answers as soon as create_api() ran, but extension routes (on_app_started: the Lora
        # extension's /sdapi/v1/refresh-loras, this project's, the support extension's) are added after it; the
        # webui prints "Startup time:" once those callbacks are done. No request before that line: one that
        # arrives between gradio's launch and create_api() builds the app's middleware stack, and the webui then
        # dies adding its own ("Cannot add middleware after an application has started").
        if "Startup time:" in ui.log_text():
            try:
                if ui.session.get(ui.api("/sdapi/v1/sd-models"), timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{what} not ready after {timeout:.0f}s\n{ui.log_tail()}")
        time.sleep(0.5)
    ui.startup_seconds = time.monotonic() - t0


# ---------------------------------------------------------------------------------------------------------------
# browser


def browser_missing_reason() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium chromium-driver)"
    if not os.path.exists(CHROMEDRIVER):
        return f"chromedriver not found at {CHROMEDRIVER} (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "python package 'selenium' is not installed in the test python"
    return None


def skip_tier_without_host(items: list, tier_dir: Path, missing: str | None) -> None:
    """Mark every collected test under ``tier_dir`` skipped with the one-line reason its host is ``missing``."""
    if missing is None:
        return
    import pytest

    marker = pytest.mark.skip(reason=missing)
    for item in items:
        if tier_dir in Path(str(item.fspath)).resolve().parents:
            item.add_marker(marker)


def attach_log_tail(report: Any, ui: WebUI | None, what: str) -> None:
    """Give a failing test's report the last lines of the webui's (or Forge's) log."""
    if report.failed and ui is not None:
        report.sections.append((f"{what} log (last {LOG_TAIL_LINES} lines of {ui.log_path})", ui.log_tail()))


@contextlib.contextmanager
def chromium(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium selenium driver; the test skips, saying what is missing, without one."""
    reason = browser_missing_reason()
    if reason:
        import pytest

        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(a)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


