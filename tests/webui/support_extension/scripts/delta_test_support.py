"""Test-only routes for tests/webui (not part of the shipped extension).

GET /delta-test/lora-match/{name}: load the LoRA ``name`` the way the webui's Lora extension does
(``networks.load_network``, against the currently loaded checkpoint) and report which of the file's module keys found
a layer. Nothing global is changed (``loaded_networks`` stays as it is).
"""

from fastapi import HTTPException
from modules import script_callbacks


def _lora_match(name: str):
    import networks
    from modules import call_queue, shared

    with call_queue.queue_lock:
        networks.list_available_networks()
        nod = networks.available_network_aliases.get(name) or networks.available_networks.get(name)
        if nod is None:
            raise HTTPException(status_code=404, detail=f"no LoRA named {name!r}")
        from modules import sd_models

        sd = sd_models.read_state_dict(nod.filename)
        file_modules = sorted({k.split(".", 1)[0] for k in sd})
        net = networks.load_network(name, nod)
        matched = sorted({m.network_key.split(".", 1)[0] for m in net.modules.values()})
        model = shared.sd_model
        return {
            "name": name,
            "checkpoint": getattr(getattr(model, "sd_checkpoint_info", None), "title", None),
            "sd_version": str(getattr(nod, "sd_version", None)),
            "file_modules": len(file_modules),
            "matched_modules": len(matched),
            "unmatched": [k for k in file_modules if k not in set(matched)],
            "module_types": sorted({type(m).__name__ for m in net.modules.values()}),
        }


def _on_app_started(demo, app):
    app.add_api_route("/delta-test/lora-match/{name}", _lora_match, methods=["GET"])


script_callbacks.on_app_started(_on_app_started)
