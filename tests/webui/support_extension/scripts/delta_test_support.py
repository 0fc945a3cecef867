"""Test-only routes for tests/webui (not part of the shipped extension).

GET /delta-test/lora-match/{name}: load the LoRA ``name`` the way the webui's Lora extension does
(``networks.load_network``, against the currently loaded checkpoint) and report which of the file's module keys found
a layer. Nothing global is changed (``loaded_networks`` stays as it is).

GET /delta-test/controlnet-build?paths=a,b: read ControlNet files (absolute paths) with the webui's own reader and build
them with ``lib_delta`` for the loaded checkpoint's UNet; report a fingerprint of each built network, or the error.

GET /delta-test/controlnet-invariants: build ControlNets (``lib_delta.controlnet``) for the currently loaded
checkpoint's UNet, made in-process from that UNet's own weights, and report the invariants of
tests/webui/test_delta_controlnet_core.py as numbers (max differences, first changed decoder block).

GET /delta-test/compare-with-target?source=<title>: the source model DS loads for ``source`` (through its cache, as a
generation would) against the webui's own loaded checkpoint, tensor by tensor (UNet and text encoders): how many
differ in dtype or value, and the first few names.

POST /delta-test/inject-oom?where=load|leg: reproduce a GPU running out of memory on this CPU-only machine. The next
source-model load (``where=load``: after its weights are in, inside the loader, so the clean-up is exercised) or the
next source-leg forward (``where=leg``) raises ``torch.cuda.OutOfMemoryError``, once.
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


def _controlnet_invariants():
    import torch
    from modules import call_queue, devices

    from lib_delta.controlnet import build_controlnet, controlnet_residuals, forward_with_control
    from lib_delta.controlnet_files import read_controlnet

    with call_queue.queue_lock, torch.no_grad():
        model, unet, kwargs = _unet_and_kwargs()
        own = {k: v.detach().clone() for k, v in unet.state_dict().items()
               if k.startswith(("time_embed.", "label_emb.", "input_blocks.", "middle_block."))}
        mc = int(unet.model_channels)
        channels = [int(b[-1].out_channels if hasattr(b[-1], "out_channels") else b[0].out_channels)
                    for b in unet.input_blocks]
        middle = int(unet.middle_block[-1].out_channels)
        g = torch.Generator().manual_seed(0)
        widths = (3, 16, 16, 32, 32, 96, 96, 256, mc)

        def tensors(zero: str) -> dict:
            sd = {f"control_model.{k}": v for k, v in own.items()}
            for i in range(8):
                w = torch.randn(widths[i + 1], widths[i], 3, 3, generator=g) * 0.1
                sd[f"control_model.input_hint_block.{2 * i}.weight"] = w * (0 if i == 7 else 1)
                sd[f"control_model.input_hint_block.{2 * i}.bias"] = torch.zeros(widths[i + 1])
            for i, c in enumerate([*channels, middle]):
                name = f"zero_convs.{i}.0" if i < len(channels) else "middle_block_out.0"
                if zero == "identity":
                    w = torch.eye(c)[:, :, None, None]
                elif zero == "zero" or (zero.startswith("only") and int(zero[4:]) != i):
                    w = torch.zeros(c, c, 1, 1)
                else:
                    w = torch.randn(c, c, 1, 1, generator=g) * 0.1
                sd[f"control_model.{name}.weight"] = w
                sd[f"control_model.{name}.bias"] = torch.zeros(c)
            return sd

        dtype = next(unet.parameters()).dtype
        device = devices.device

        def net(zero: str):
            return build_controlnet(unet, kwargs, read_controlnet(tensors(zero), name=zero), device=device,
                                    dtype=dtype, source=model.sd_checkpoint_info.title)

        batch, size = 2, 8
        x = torch.randn(batch, 4, size, size, generator=g).to(device, dtype)
        t = torch.tensor([500, 20], device=device)
        cond = model.get_learned_conditioning(["a red apple", "a tree"])
        if isinstance(cond, dict):
            context, y = cond["crossattn"].to(dtype), cond["vector"].to(dtype)
        else:
            context, y = cond.to(dtype), None
        hint = torch.rand(batch, 3, 8 * size, 8 * size, generator=g).to(device, dtype)
        plain = unet(x, timesteps=t, context=context, y=y)
        restated = forward_with_control(unet, x, t, context, y)
        # the UNet's own skips, for the identity ControlNet
        skips = []
        handles = [b.register_forward_hook(lambda m, a, o: skips.append(o)) for b in unet.input_blocks]
        handles.append(unet.middle_block.register_forward_hook(lambda m, a, o: skips.append(o)))
        unet(x, timesteps=t, context=context, y=y)
        for h in handles:
            h.remove()
        identity = controlnet_residuals(net("identity"), x, t, context, hint, y=y)
        zero = controlnet_residuals(net("zero"), x, t, context, hint, y=y)
        with_zero = forward_with_control(unet, x, t, context, y, residuals=zero)
        random_res = controlnet_residuals(net("random"), x, t, context, hint, y=y)
        rows = forward_with_control(unet, x, t, context, y, residuals=[r[1:] for r in random_res], rows=slice(1, None))
        full = forward_with_control(unet, x, t, context, y, residuals=random_res)
        # order: only zero conv k non-zero -> the first decoder block whose input changes is N - 1 - k
        first_changed = {}
        n = len(unet.input_blocks)
        for k in (0, 2, n - 1):
            res = controlnet_residuals(net(f"only{k}"), x, t, context, hint, y=y)
            seen_plain, seen_cn = [], []
            hooks = [b.register_forward_pre_hook(lambda m, a, s=seen_plain: s.append(a[0])) for b in unet.output_blocks]
            forward_with_control(unet, x, t, context, y)
            for h in hooks:
                h.remove()
            hooks = [b.register_forward_pre_hook(lambda m, a, s=seen_cn: s.append(a[0])) for b in unet.output_blocks]
            forward_with_control(unet, x, t, context, y, residuals=res)
            for h in hooks:
                h.remove()
            changed = [not torch.equal(p, c) for p, c in zip(seen_plain, seen_cn, strict=True)]
            first_changed[str(k)] = changed.index(True)

        def diff(a, b):
            return float((a.float() - b.float()).abs().max())

        return {
            "checkpoint": model.sd_checkpoint_info.title,
            "input_blocks": n,
            "residuals": len(identity),
            "restated_vs_forward": diff(restated, plain),
            "restated_bitwise": bool(torch.equal(restated, plain)),
            "zero_cn_bitwise": bool(torch.equal(with_zero, plain)),
            "identity_vs_skips": max(diff(a, b) for a, b in zip(identity, skips, strict=True)),
            "random_effect": diff(full, plain),
            "rows_base_bitwise": bool(torch.equal(rows[:1], plain[:1])),
            "rows_adapted_vs_full": diff(rows[1:], full[1:]),
            "first_changed_decoder_block": first_changed,
        }


def _unet_and_kwargs():
    import os

    from modules import shared
    from omegaconf import OmegaConf

    model = shared.sd_model
    conf = OmegaConf.load(os.path.splitext(model.sd_checkpoint_info.filename)[0] + ".yaml").model.params
    kwargs = OmegaConf.to_container((conf.get("unet_config") or conf.get("network_config")).params)
    return model, model.model.diffusion_model, kwargs


def _controlnet_build(paths: str):
    import hashlib
    import os

    import torch
    from modules import call_queue, sd_models

    from lib_delta.controlnet import build_controlnet
    from lib_delta.controlnet_files import read_controlnet
    from lib_delta.errors import DeltaSamplingError

    with call_queue.queue_lock, torch.no_grad():
        model, unet, kwargs = _unet_and_kwargs()
        own = unet.state_dict()
        results = {}
        for path in paths.split(","):
            name = os.path.basename(path)
            try:
                cn = read_controlnet(sd_models.read_state_dict(path), name=name)
                net = build_controlnet(unet, kwargs, cn, dtype=torch.float32, source=model.sd_checkpoint_info.title)
            except DeltaSamplingError as exc:
                results[name] = {"ok": False, "error": str(exc)}
                continue
            state = net.state_dict()
            digest = hashlib.sha256()
            for key in sorted(state):
                digest.update(key.encode())
                digest.update(state[key].float().cpu().numpy().tobytes())
            roots = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
            encoder = [k for k in state if k.startswith(roots)]
            results[name] = {
                "ok": True, "layout": cn.layout, "residuals": cn.residuals, "tensors": len(state),
                "sha256": digest.hexdigest(),
                "abs_sum": float(sum(v.double().abs().sum() for v in state.values())),
                "encoder_vs_unet": max(float((state[k].float() - own[k].float()).abs().max()) for k in encoder),
            }
        return {"checkpoint": model.sd_checkpoint_info.title, "results": results}


def _on_app_started(demo, app):
    app.add_api_route("/delta-test/controlnet-build", _controlnet_build, methods=["GET"])
    app.add_api_route("/delta-test/lora-match/{name}", _lora_match, methods=["GET"])
    app.add_api_route("/delta-test/controlnet-invariants", _controlnet_invariants, methods=["GET"])
    app.add_api_route("/delta-test/inject-oom", _inject_oom, methods=["POST"])
    app.add_api_route("/delta-test/compare-with-target", _compare_with_target, methods=["GET"])


def _compare_with_target(source: str):
    import torch
    from modules import call_queue, devices, shared

    from lib_delta.webui import source_models
    from lib_delta.webui.precision import current_precision

    with call_queue.queue_lock, torch.no_grad():
        info = source_models.resolve_checkpoint(source, "source")
        loaded, _ = source_models.CACHE.checkpoint(info, devices.device, current_precision(), set())
        target = shared.sd_model
        report = {"target": target.sd_checkpoint_info.title, "source": info.title}
        for part, mine, theirs in (("unet", loaded.unet, target.model.diffusion_model),
                                   ("text", loaded.model.cond_stage_model, target.cond_stage_model)):
            a, b = mine.state_dict(), theirs.state_dict()
            dtype, value = [], []
            for name, tensor in b.items():
                other = a.get(name)
                if other is None:
                    continue
                if other.dtype != tensor.dtype:
                    dtype.append(f"{name}: {other.dtype} vs {tensor.dtype}")
                elif not torch.equal(other.view(torch.uint8) if other.element_size() == 1 else other, tensor.view(
                        torch.uint8) if tensor.element_size() == 1 else tensor):
                    value.append(name)
            copies = [{name: m.fp16_weight for name, m in model.named_modules() if hasattr(m, "fp16_weight")}
                      for model in (mine, theirs)]
            report[part] = {"tensors": len(b), "missing": sorted(set(b) - set(a))[:5], "dtype": dtype[:5],
                            "dtype_count": len(dtype), "value": value[:5], "value_count": len(value),
                            # the webui's "cache fp16 weight for LoRA" copies beside fp8 weights
                            "fp16_copies": [len(copies[0]), len(copies[1])],
                            "fp16_copies_differ": sum(not torch.equal(t, copies[0].get(n, t + 1))
                                                      for n, t in copies[1].items())}
        return report


def _inject_oom(where: str):
    import torch

    from lib_delta.webui import legs, source_models

    targets = {"load": (source_models, "_wrap_text_encoders"), "leg": (legs, "_run_segments")}
    if where not in targets:
        raise HTTPException(status_code=404, detail=f"where: one of {sorted(targets)}")
    module, name = targets[where]
    original = getattr(module, name)

    def fail_once(*args, **kwargs):
        setattr(module, name, original)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by "
                                          "delta-test-support)")

    setattr(module, name, fail_once)
    return {"armed": where}


script_callbacks.on_app_started(_on_app_started)
