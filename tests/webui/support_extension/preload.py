"""Test-only webui extension (copied into the test data dir by tests/webui/conftest.py, never shipped).

preload.py runs in the webui process while the command line is parsed, i.e. before any checkpoint is loaded: register
the tiny OpenCLIP architectures the fixture yamls name in ``arch:`` (copied into ./open_clip_configs by the conftest).
"""

import os

_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "open_clip_configs")

if os.path.isdir(_CONFIGS):
    import open_clip

    open_clip.add_model_config(_CONFIGS)
    print(f"delta-test-support: registered open_clip configs from {_CONFIGS}", flush=True)


def preload(parser):
    pass
