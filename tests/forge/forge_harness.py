"""A real Forge (lllyasviel/stable-diffusion-webui-forge main, the ``backend/`` Forge) for the Forge tier.

Forge from ``FORGE_DIR`` (default ``~/stable-diffusion-webui-forge``) with its python ``FORGE_PYTHON`` (default
``$FORGE_DIR/venv/bin/python``), on CPU (``--always-cpu``), offline, one process per session with a temporary
``--data-dir``; fixtures from ``fixtures/make_forge_models.py`` (built with the A1111 webui's ``ldm`` classes, so the
A1111 webui of the webui tier must be there too), cached like the A1111 ones. The HTTP client side (``WebUI``,
image helpers) is the webui tier's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "webui"))

import webui_harness as h  # noqa: E402

FORGE_DIR = Path(os.path.expanduser(os.environ.get("FORGE_DIR", "~/stable-diffusion-webui-forge")))
FORGE_PYTHON = Path(os.path.expanduser(os.environ.get("FORGE_PYTHON", str(FORGE_DIR / "venv" / "bin" / "python"))))
FORGE_CACHE = h.CACHE_ROOT.parent / "forge-fixtures"
GENERATOR = HERE / "fixtures" / "make_forge_models.py"
SD3_GENERATOR = HERE / "fixtures" / "make_forge_sd3_models.py"
API_AUTH = ("delta", "s3cret")  # the tier's Forge runs with --api-auth (not in conftest: two tiers have a conftest)

CONFIG = {
    "live_previews_enable": False,  # else the first SDXL generation downloads the SDXL preview VAE
    "show_progress_every_n_steps": -1,
    "samples_save": False,
    "grid_save": False,
    "auto_launch_browser": "Disable",
    "randn_source": "CPU",
    "s_min_uncond": 0.0,
    "skip_early_cond": 0.0,
}


def forge_missing_reason() -> str | None:
    if not (FORGE_DIR / "launch.py").is_file() or not (FORGE_DIR / "backend" / "loader.py").is_file():
        return f"no Forge (backend/ Forge) at FORGE_DIR={FORGE_DIR}"
    if not FORGE_PYTHON.exists():
        return f"Forge python not found: FORGE_PYTHON={FORGE_PYTHON}"
    reason = h.webui_missing_reason()
    if reason:
        return f"the Forge fixtures are built with the A1111 webui's ldm classes: {reason}"
    return None


MISSING = forge_missing_reason()


def ensure_forge_models(generator: Path = GENERATOR) -> h.TinyModels:
    """The Forge tier's fixtures (or, with ``generator`` = fixtures/make_forge_peer_models.py, the IP-Adapter peer's),
    generated once with the A1111 webui's python and cached by the generators' contents."""
    sources = GENERATOR.read_bytes() + h.GENERATOR.read_bytes()
    if generator != GENERATOR:
        sources += generator.read_bytes()
    digest = hashlib.sha256(sources).hexdigest()[:16]
    name = digest if generator == GENERATOR else f"{generator.stem}-{digest}"
    return _cached(name, [str(h.WEBUI_PYTHON), str(generator), "--webui-dir", str(h.WEBUI_DIR)], h.WEBUI_DIR)


def ensure_forge_sd3_models() -> h.TinyModels:
    """The SD3-family fixtures (fixtures/make_forge_sd3_models.py, run in Forge's own venv: it builds the
    transformers with Forge's ``MMDiTX``), generated once and cached by the generator's contents. Their text encoders
    and VAE are separate files (``manifest["modules"]``), chosen per request as Forge's "VAE / Text Encoder"."""
    digest = hashlib.sha256(SD3_GENERATOR.read_bytes()).hexdigest()[:16]
    return _cached(f"sd3-{digest}", [str(FORGE_PYTHON), str(SD3_GENERATOR), "--forge-dir", str(FORGE_DIR)],
                   FORGE_DIR)


def _cached(name: str, command: list[str], cwd: Path) -> h.TinyModels:
    """Fixtures under ``FORGE_CACHE/name``, made by ``command --out DIR`` unless a manifest is there already."""
    root = FORGE_CACHE / name
    FORGE_CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    generated = False
    with open(FORGE_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "manifest.json").is_file():
            root.mkdir(parents=True, exist_ok=True)
            with open(root / "generate.log", "w") as log:
                subprocess.run([*command, "--out", str(root)], check=True, cwd=cwd, env=h.webui_subprocess_env(),
                               stdout=log, stderr=subprocess.STDOUT, timeout=1200)
            generated = True
    manifest = json.loads((root / "manifest.json").read_text())
    return _models(root, manifest, generated, time.monotonic() - t0)


def _models(root: Path, manifest: dict, generated: bool, seconds: float) -> h.TinyModels:
    ckpt_dir = root / "Stable-diffusion"
    checkpoints = {c["name"]: h.Checkpoint(
        name=c["name"], family=c["family"], file=c["file"], path=ckpt_dir / c["file"],
        yaml_path=ckpt_dir / (c["name"] + ".yaml"),
        title=c["title"], sha256=c["sha256"], shorthash=c["shorthash"], parameterization="eps", inpainting=False,
        bytes=c["bytes"], params=c["params"], vae_seed=0) for c in manifest["checkpoints"]}
    loras = {lo["name"]: h.Lora(name=lo["name"], family=lo["family"], kind=lo["kind"], file=lo["file"],
                                path=root / "Lora" / lo["file"], expect_match=True, module_keys=(), bytes=lo["bytes"])
             for lo in manifest.get("loras", [])}
    return h.TinyModels(root=root, ckpt_dir=ckpt_dir, lora_dir=root / "Lora", open_clip_configs=root,
                        manifest=manifest, checkpoints=checkpoints, loras=loras, generated=generated,
                        seconds=seconds)


def combined(*sets: h.TinyModels) -> h.TinyModels:
    """Several fixture sets served by one Forge (the first set's root holds its ControlNet files)."""
    first = sets[0]
    manifest = {"checkpoints": [c for s in sets for c in s.manifest["checkpoints"]],
                "loras": [lo for s in sets for lo in s.manifest.get("loras", [])],
                "modules": [dict(m, root=str(s.root)) for s in sets for m in s.manifest.get("modules", [])]}
    return h.TinyModels(root=first.root, ckpt_dir=first.ckpt_dir, lora_dir=first.lora_dir,
                        open_clip_configs=first.open_clip_configs, manifest=manifest,
                        checkpoints={k: v for s in sets for k, v in s.checkpoints.items()},
                        loras={k: v for s in sets for k, v in s.loras.items()},
                        generated=any(s.generated for s in sets), seconds=sum(s.seconds for s in sets))


def start_forge(models: h.TinyModels, data_dir: Path, extra_args: list[str] | None = None, *,
                extension: bool = True, auth: tuple[str, str] | None = None,
                extra_extensions: dict[str, Path] | None = None) -> h.WebUI:
    import requests

    sd_dir = data_dir / "models" / "Stable-diffusion"
    sd_dir.mkdir(parents=True, exist_ok=True)
    for c in models.checkpoints.values():
        (sd_dir / c.file).symlink_to(c.path)
        if c.yaml_path.is_file():  # SD2-v: Forge reads v-prediction from the same-name yaml
            (sd_dir / c.yaml_path.name).symlink_to(c.yaml_path)
    lora_dir = data_dir / "models" / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    for lo in models.loras.values():
        (lora_dir / lo.file).symlink_to(lo.path)
    cn_dir = data_dir / "models" / "ControlNet"
    cn_dir.mkdir(parents=True, exist_ok=True)
    for path in (models.root / "ControlNet").glob("*.safetensors"):
        (cn_dir / path.name).symlink_to(path)
    if (models.root / "ControlNetPreprocessor").is_dir():  # the IP-Adapter fixture's image encoder
        (data_dir / "models" / "ControlNetPreprocessor").symlink_to(models.root / "ControlNetPreprocessor",
                                                                     target_is_directory=True)
    for module in models.manifest.get("modules", []):  # SD3 fixtures: Forge's "VAE / Text Encoder" choices
        folder = data_dir / "models" / module["folder"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / module["file"]).symlink_to(Path(module.get("root", models.root)) / module["folder"] / module["file"])
    (data_dir / "extensions").mkdir(exist_ok=True)
    if extension:  # False: the same Forge without this project (the bench's "absent" process)
        (data_dir / "extensions" / h.EXTENSION_NAME).symlink_to(h.PROJECT_ROOT, target_is_directory=True)
    for name, path in (extra_extensions or {}).items():  # the bench's support extension
        (data_dir / "extensions" / name).symlink_to(path, target_is_directory=True)
    hashes = {f"checkpoint/{c.file}": {"mtime": os.path.getmtime(c.path), "sha256": c.sha256}
              for c in models.checkpoints.values()}
    (data_dir / "cache.json").write_text(json.dumps({"hashes": hashes}))
    (data_dir / "config.json").write_text(json.dumps(CONFIG, indent=1))
    port = h.free_port()
    cmd = [str(FORGE_PYTHON), "launch.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
           "--skip-version-check", "--skip-python-version-check", "--always-cpu", "--api", "--server-name",
           "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir), "--ckpt-dir", str(sd_dir),
           "--disable-console-progressbars", *(["--api-auth", ":".join(auth)] if auth else []),
           # gradio 4 serves files only from allowed paths, and Forge allows only the data dir: with a data dir of
           # its own, its own script.js (FORGE_DIR) and this extension's (the symlink's target) would be refused
           "--gradio-allowed-path", str(FORGE_DIR), "--gradio-allowed-path", str(h.PROJECT_ROOT),
           *(extra_args or [])]
    log_path = data_dir / "forge.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as logf:
        logf.write(("$ " + " ".join(cmd) + "\n").encode())
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=FORGE_DIR, env=h.webui_subprocess_env(), stdout=logf,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    session = requests.Session()
    session.trust_env = False
    session.auth = auth
    default = next(iter(models.checkpoints.values()))
    ui = h.WebUI(url=f"http://127.0.0.1:{port}", port=port, data_dir=data_dir, log_path=log_path, session=session,
                 models=models, process=proc, default_checkpoint=default.title,
                 extension_dir=data_dir / "extensions" / h.EXTENSION_NAME)
    try:
        h.wait_until_ready(ui, t0, h.STARTUP_TIMEOUT, "Forge")
    except BaseException:
        h.stop_process(proc)
        raise
    return ui
