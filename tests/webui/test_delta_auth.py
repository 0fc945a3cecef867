"""The extension's routes honour --api-auth exactly like the webui's own (a second webui, started with it)."""

from __future__ import annotations

import pytest

from webui_harness import start_webui, stop_process

pytestmark = pytest.mark.webui

USER, PASSWORD = "delta", "s3cret"


@pytest.fixture(scope="module")
def locked_webui(tiny_models, tmp_path_factory):
    ui = start_webui(tiny_models, tmp_path_factory.mktemp("webui-auth"),
                     extra_args=["--api-auth", f"{USER}:{PASSWORD}"], auth=(USER, PASSWORD))
    try:
        yield ui
    finally:
        stop_process(ui.process)


ROUTES = [("get", "/delta-sampling/v1/version"), ("get", "/delta-sampling/v1/schema"),
          ("get", "/delta-sampling/v1/status"), ("post", "/delta-sampling/v1/unload"),
          ("get", "/sdapi/v1/sd-models")]  # the last one is the webui's own, for comparison


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_routes_need_the_api_credentials(locked_webui, method, path):
    import requests

    request = getattr(requests, method)
    url = locked_webui.api(path)
    assert request(url, timeout=60).status_code == 401
    assert request(url, auth=(USER, "wrong"), timeout=60).status_code == 401
    assert request(url, auth=(USER, PASSWORD), timeout=60).status_code == 200
