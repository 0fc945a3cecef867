"""A GPU running out of memory in Delta Sampling's part of a generation, reproduced on the CPU: the test-only support
script (delta-test-support, ``POST /delta-test/inject-oom``) makes the next source load or source-leg forward raise
``torch.cuda.OutOfMemoryError`` once. The answer is one line (HTTP 500, as the webui answers its own out-of-memory
errors) without a traceback, nothing stays loaded, and the next generation works and is unchanged."""

from __future__ import annotations

import pytest

from test_delta_sampling import PROMPT, ds
from webui_harness import image_array

pytestmark = pytest.mark.webui


@pytest.mark.parametrize("where", ["load", "leg"])
def test_out_of_memory_answers_one_line_frees_the_pair_and_the_next_generation_works(webui, where):
    a, b = webui.models.title("tiny-sd1-a"), webui.models.title("tiny-sd1-b")
    pair = ds(scale=1.0, source=a, adapted=b)
    before = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=pair))["images"][0]
    if where == "load":
        assert webui.post("/delta-sampling/v1/unload").status_code == 200  # so that the next request loads
    assert webui.post("/delta-test/inject-oom", params={"where": where}).json() == {"armed": where}
    offset = webui.log_offset()
    r = webui.post("/sdapi/v1/txt2img", json=webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=pair))
    assert r.status_code == 500, r.text[:500]
    assert "out of GPU memory" in r.json()["detail"], r.text[:500]
    log = webui.log_since(offset)
    assert "Traceback" not in log, log[-3000:]
    assert sum("out of GPU memory" in line for line in log.splitlines()) == 1, log[-3000:]
    status = webui.get("/delta-sampling/v1/status").json()
    assert status["models"] == [] and status["total_bytes"] == 0, status
    after = webui.txt2img(webui.payload("tiny-sd1-a", PROMPT, alwayson_scripts=pair))["images"][0]
    assert image_array(after).tobytes() == image_array(before).tobytes()
