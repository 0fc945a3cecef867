"""The host-free engine on fake CUDA at real SD1.5 / SDXL sizes in fp16 (fake_cuda_checks.py, run with the webui's
python): every tensor DS makes must be made on the device of what it meets. A planted mistake, a tensor made without
``device=`` in the legs, must make the run fail, or the tier would prove nothing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from webui_harness import WEBUI_DIR, WEBUI_PYTHON, webui_subprocess_env

pytestmark = pytest.mark.fakecuda
CHECKS = Path(__file__).resolve().parent / "fake_cuda_checks.py"  # (not conftest's: several tiers have one)


def run_checks(*extra: str) -> tuple[int, list[dict], str]:
    proc = subprocess.run([str(WEBUI_PYTHON), str(CHECKS), "--repositories", str(WEBUI_DIR / "repositories"),
                           *extra], capture_output=True, text=True, timeout=900, env=webui_subprocess_env(),
                          check=False)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, records, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def checks() -> dict[str, dict]:
    code, records, stderr = run_checks()
    assert code == 0, stderr
    return {r["check"]: r for r in records}


def test_real_size_unets_on_fake_cuda_in_fp16(checks):
    build = checks["build"]
    assert build["sd15_params"] > 850e6 and build["sdxl_params"] > 2.5e9, build
    assert build["devices"] == ["cuda:0"] and build["dtypes"] == ["torch.float16"], build


@pytest.mark.parametrize("factor", [1, 2])
def test_legs_with_runtime_lora_and_a_controlnet_built_on_the_cpu(checks, factor):
    got = checks[f"legs sd1.5 LoRA + ControlNet on an SDXL 1024 latent, factor {factor}"]
    assert got["shape"] == [2, 4, 128, 128] and got["device"] == "cuda:0", got
    assert got["controlnet_device"] == "cuda:0", got  # the network came to the legs' device
    assert checks["done"]["lora_modules"] == 128  # every attention projection of SD1.5's UNet


def test_a_ds_step_on_sdxl_and_every_reference_sampler(checks):
    assert checks["one DS step on the SDXL target"]["device"] == "cuda:0"
    for name in ("euler", "heun", "dpmpp_2m", "euler_ancestral", "ddim"):
        got = checks[f"sampler {name}"]
        assert got["device"] == "cuda:0" and got["shape"] == [2, 4, 64, 64], (name, got)


def test_a_planted_device_mistake_fails_the_run():
    code, records, stderr = run_checks("--plant")
    assert code != 0 and "FakeTensorDeviceMismatchError" in stderr and "cuda:0 and cpu" in stderr, stderr
    assert not any(r["check"].startswith("legs") for r in records), records


def test_the_gpu_probe_dry_run():
    """bench/gpu_probe.py, the probe for a lent GPU, on fake CUDA: every phase runs at real sizes and reports."""
    repos = WEBUI_DIR / "repositories"
    proc = subprocess.run([str(WEBUI_PYTHON), str(CHECKS.parents[2] / "bench" / "gpu_probe.py"), "--dry-run",
                           "--unet-sources", str(repos / "stable-diffusion-stability-ai"),
                           str(repos / "generative-models")], capture_output=True, text=True, timeout=900,
                          env=webui_subprocess_env(), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    identities = [r for r in records if r["phase"] == 1]
    assert [r["precision"] for r in identities] == ["fp16 autocast", "fp16", "bf16"]
    assert all(r["lambda_0_is_target"] and r["devices"] == ["cuda:0"] for r in identities), identities
    configs = [r["config"] for r in records if r["phase"] == 2]
    assert configs == ["target alone", "DS factor 1 batched", "DS factor 1 separate", "DS factor 2 batched",
                       "DS factor 2 separate"], configs
    assert records[-1]["phase"] == "done"
