"""Which webui a process is (lib_delta.forge.detect), told from the packages the host ships: the A1111 webui has no
``modules_forge``; Forge main has ``modules_forge`` and ``backend/loader.py``; reForge and Forge Classic have
``modules_forge`` and ``ldm_patched`` but no ``backend``. Each layout is laid out as empty packages on sys.path (the
finder only looks for them; nothing is imported), so this checks the decision, not a host."""

from __future__ import annotations

import importlib
import sys

import pytest

from lib_delta.forge import detect

LAYOUTS = {
    "a1111": ["modules/__init__.py"],
    "forge": ["modules/__init__.py", "modules_forge/__init__.py", "backend/__init__.py", "backend/loader.py"],
    "forge-classic": ["modules/__init__.py", "modules_forge/__init__.py", "modules_forge/forge_loader.py",
                      "ldm_patched/__init__.py"],
}


@pytest.fixture
def host_root(tmp_path, monkeypatch):
    for name in ("modules", "modules_forge", "backend", "backend.loader", "ldm_patched"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    def lay_out(files):
        for rel in files:
            path = tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
        monkeypatch.syspath_prepend(str(tmp_path))
        importlib.invalidate_caches()

    return lay_out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_host_layout_is_told_apart(host_root, layout):
    if layout == "a1111" and importlib.util.find_spec("modules_forge") is not None:
        pytest.skip("this python has a modules_forge package of its own")
    host_root(LAYOUTS[layout])
    host = detect()
    assert host.name == layout
    assert host.supported == (layout != "forge-classic")
    assert host.forge == (layout == "forge")
    if layout == "forge-classic":  # the one console line the extension prints there instead of loading
        assert "reForge / Forge Classic" in host.why and "Forge main" in host.why
