"""The fake-CUDA tier (see test_fake_cuda.py): it needs the A1111 webui's python and its ldm/sgm sources (the UNet
classes); without them every test here skips with one line."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "webui"))

import webui_harness as h  # noqa: E402


def pytest_collection_modifyitems(config, items):
    h.skip_tier_without_host(items, HERE, h.MISSING)
