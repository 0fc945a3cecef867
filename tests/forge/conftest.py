"""Fixtures of the Forge tier (see README.md; the machinery is in forge_harness.py).

Everything in tests/forge skips with one line when no Forge (or no A1111 webui to build its fixtures) is found.
``forge`` -> ``webui_harness.WebUI``: one Forge process per test module with this project installed; on a failing test
the last lines of its log are attached to the report.
"""

from __future__ import annotations

from typing import Any

import pytest

from forge_harness import API_AUTH, HERE, MISSING, ensure_forge_models, h, start_forge

_FORGE_KEY = pytest.StashKey[Any]()


def pytest_collection_modifyitems(config, items):
    h.skip_tier_without_host(items, HERE, MISSING)


@pytest.fixture(scope="module")  # heavy tiers run one at a time: Forge is gone before the A1111 tiers start
def forge(request, tmp_path_factory) -> h.WebUI:
    if MISSING:
        pytest.skip(MISSING)
    models = ensure_forge_models()
    # --api-auth: every request of the tier carries the credentials; test_forge_auth checks the routes refuse others
    ui = start_forge(models, tmp_path_factory.mktemp("forge-data"), auth=API_AUTH)
    request.config.stash[_FORGE_KEY] = ui
    try:
        yield ui
    finally:
        h.stop_process(ui.process)
        request.config.stash[_FORGE_KEY] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    h.attach_log_tail(outcome.get_result(), item.config.stash.get(_FORGE_KEY, None), "Forge")


@pytest.fixture
def browser(tmp_path):
    with h.chromium(tmp_path) as driver:
        yield driver
