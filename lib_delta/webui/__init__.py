"""Everything that touches the webui's ``modules``: the AUTOMATIC1111 webui's, and Forge's, which keeps that API
(what Forge does differently is in :mod:`lib_delta.forge`). Imported only inside a webui.

``install`` wires it all up; ``scripts/delta_sampling.py`` only calls it and defines the Script class.
"""

from __future__ import annotations


def install() -> None:
    """Register callbacks, settings, routes and XYZ axes (once per script load)."""
    from modules import script_callbacks

    from . import hooks, routes, settings, xyz
    from .source_models import CACHE

    current = hooks.host()
    if not current.supported:
        print(f"Delta Sampling: not loaded: {current.why}")
        return
    if current.forge:
        from ..forge.source_models import install as install_forge

        install_forge(CACHE)

    hooks.register_callbacks()
    settings.register()
    script_callbacks.on_app_started(lambda _demo, app: routes.register(app), name="delta_sampling")
    # Free the models when the script is unloaded ("Reload UI"): the new script instance starts from an empty cache.
    script_callbacks.on_script_unloaded(CACHE.unload, name="delta_sampling")
    # Root scripts (xyz_grid) load before extensions, so the axes can be added now; this also covers --nowebui, where
    # the UI is built before on_before_ui fires.
    if not xyz.register():
        script_callbacks.on_before_ui(xyz.register, name="delta_sampling")
