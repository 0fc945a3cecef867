"""Bench-only webui extension (linked into the bench's data dir by bench/webui_bench.py and bench/forge_bench.py,
never shipped).

It measures, inside the webui process, for every txt2img generation:

* ``sample_s``: wall time inside ``p.sample`` (sampler set-up, noise, every denoiser call, DS's source legs and
  bookkeeping; not the text encoding of the target's prompts, not the VAE decode);
* ``target_fwd_s`` / ``source_fwd_s``: the summed wall time of every forward of the target's UNet
  (``shared.sd_model.model.diffusion_model``; on Forge the engine's ``forge_objects.unet.model.diffusion_model``)
  and of the DS source models' UNets (found in ``lib_delta.webui.source_models.CACHE``), with their call and row
  counts. A runtime LoRA's hooks run inside the
  source UNet's forward, so they count as the leg's own forward.

On CUDA the hooks synchronise the device before reading the clock (CPU execution is synchronous already).

* ``ds-time``: cumulative wall time inside DS's own entry points (its two CFG callbacks, ``hooks.begin_job`` and
  ``hooks.end_job``); the client reads it around each generation.

Routes: ``GET /delta-bench/v1/last`` (the last generation's numbers), ``POST /delta-bench/v1/profile?top=N`` (cProfile
the next generation's ``p.sample``; the text report lands in the next ``last`` under ``profile``),
``POST /delta-bench/v1/controlnet-cost?size=S&repeats=R`` (times a ControlNet built on the loaded SD1 checkpoint's UNet
against that UNet's own forwards, and writes it to ``models/ControlNet/bench-cn-<checkpoint>.safetensors`` for
end-to-end runs).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
import weakref

import torch
from modules import processing, script_callbacks, shared


class _Stats:
    def __init__(self) -> None:
        self.last: dict = {}
        self.profile_top = 0
        self.hooked: dict[int, tuple[weakref.ref, str, list]] = {}
        self.reset()

    def reset(self) -> None:
        self.fwd = {"target": [0.0, 0, 0], "source": [0.0, 0, 0]}  # seconds, calls, rows
        self.started: list[float] = []


STATS = _Stats()


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _pre(_module, args):
    _sync()
    STATS.started.append(time.perf_counter())


def _make_post(role: str):
    def post(_module, args, _output):
        _sync()
        start = STATS.started.pop() if STATS.started else time.perf_counter()
        if STATS.started:
            return  # a nested forward (not expected): counted by the outer one
        bucket = STATS.fwd[role]
        bucket[0] += time.perf_counter() - start
        bucket[1] += 1
        bucket[2] += int(args[0].shape[0]) if args and hasattr(args[0], "shape") else 0

    return post


def _hook(module: torch.nn.Module, role: str) -> None:
    entry = STATS.hooked.get(id(module))
    if entry is not None and entry[0]() is module and entry[1] == role:
        return
    if entry is not None and entry[0]() is module:
        for handle in entry[2]:
            handle.remove()
    handles = [module.register_forward_pre_hook(_pre), module.register_forward_hook(_make_post(role))]
    STATS.hooked[id(module)] = (weakref.ref(module), role, handles)


def _target_unet() -> torch.nn.Module | None:
    model = shared.sd_model
    forge_objects = getattr(model, "forge_objects", None)  # Forge: the engine's KModel holds the UNet
    if forge_objects is not None:
        return forge_objects.unet.model.diffusion_model
    return getattr(getattr(model, "model", None), "diffusion_model", None)


def _hook_models() -> list[str]:
    found = []
    target = _target_unet()
    if target is not None:
        _hook(target, "target")
    source_models = sys.modules.get("lib_delta.webui.source_models")
    if source_models is not None:
        for loaded in list(source_models.CACHE._models.values()):
            unet = loaded.unet  # A1111 and Forge checkpoints alike
            if unet is not None and unet is not target:
                _hook(unet, "source")
                found.append(loaded.title)
    return found


def _wrap(cls) -> None:
    original = cls.sample
    if getattr(original, "_delta_bench", False):
        return

    def sample(self, *args, **kwargs):
        sources = _hook_models()
        STATS.reset()
        profiler = None
        if STATS.profile_top:
            profiler = cProfile.Profile()
        _sync()
        t0 = time.perf_counter()
        try:
            if profiler is not None:
                profiler.enable()
            return original(self, *args, **kwargs)
        finally:
            if profiler is not None:
                profiler.disable()
            _sync()
            elapsed = time.perf_counter() - t0
            last = {
                "sample_s": elapsed,
                "target_fwd_s": STATS.fwd["target"][0], "target_calls": STATS.fwd["target"][1],
                "target_rows": STATS.fwd["target"][2],
                "source_fwd_s": STATS.fwd["source"][0], "source_calls": STATS.fwd["source"][1],
                "source_rows": STATS.fwd["source"][2],
                "source_models": sources, "steps": getattr(self, "steps", None),
            }
            if profiler is not None:
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(STATS.profile_top)
                out2 = io.StringIO()
                pstats.Stats(profiler, stream=out2).sort_stats("tottime").print_stats(STATS.profile_top)
                out3 = io.StringIO()
                pstats.Stats(profiler, stream=out3).sort_stats("cumulative").print_stats("lib_delta", 40)
                last["profile"] = out.getvalue() + "\n" + out2.getvalue() + "\n" + out3.getvalue()
                STATS.profile_top = 0
            STATS.last = last

    sample._delta_bench = True
    cls.sample = sample


_wrap(processing.StableDiffusionProcessingTxt2Img)


DS_TIME = {"s": 0.0, "calls": 0}


def _timed(fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            DS_TIME["s"] += time.perf_counter() - t0
            DS_TIME["calls"] += 1

    wrapper._delta_bench = True
    wrapper.__wrapped__ = fn
    wrapper.__name__ = getattr(fn, "__name__", "wrapped")
    return wrapper


def _is_ds(fn) -> bool:
    fn = getattr(fn, "__wrapped__", fn)
    return getattr(fn, "__module__", "").startswith("lib_delta")


_DETACHED: dict = {"callbacks": [], "scripts": []}


def _set_detached(detached: bool) -> dict:
    """Emulate "extension absent" inside this process: take DS's generation-time callbacks and its script out of the
    webui's lists (``detached=True``), or put them back exactly where they were. Same process, same weights, same
    memory: the cross-process comparison also measures how two processes differ (memory placement), this does not."""
    from modules import scripts

    runner = scripts.scripts_txt2img
    if detached and not _DETACHED["scripts"]:
        for key in ("callbacks_cfg_denoiser", "callbacks_cfg_after_cfg"):
            entries = script_callbacks.callback_map[key]
            for index, cb in reversed(list(enumerate(entries))):
                if _is_ds(cb.callback):
                    _DETACHED["callbacks"].append((key, index, entries.pop(index)))
        for name in ("alwayson_scripts",):
            entries = getattr(runner, name)
            for index, script in reversed(list(enumerate(entries))):
                if type(script).__module__.startswith("delta_sampling") or "sd-webui-delta-sampling" in str(
                        getattr(script, "filename", "")):
                    _DETACHED["scripts"].append((name, index, entries.pop(index)))
    elif not detached and _DETACHED["scripts"]:
        for key, index, cb in reversed(_DETACHED["callbacks"]):
            script_callbacks.callback_map[key].insert(index, cb)
        for name, index, script in reversed(_DETACHED["scripts"]):
            getattr(runner, name).insert(index, script)
        _DETACHED["callbacks"].clear()
        _DETACHED["scripts"].clear()
    runner.callback_map.clear()  # the runner's cached per-method orderings
    script_callbacks.ordered_callbacks_map.clear()
    return {"detached": bool(_DETACHED["scripts"]), "callbacks": len(_DETACHED["callbacks"]),
            "scripts": len(_DETACHED["scripts"])}


def _wrap_ds() -> list[str]:
    """Time every entry point of DS's own code in a generation: its CFG callbacks and its script's job set-up and
    tear-down (with DS on, the callbacks include the legs' forwards, which the UNet hooks measure separately)."""
    wrapped = []
    for key in ("callbacks_cfg_denoiser", "callbacks_cfg_after_cfg"):
        for cb in script_callbacks.callback_map[key]:
            fn = cb.callback
            if _is_ds(fn) and not getattr(fn, "_delta_bench", False):
                cb.callback = _timed(fn)
                wrapped.append(f"{key}:{fn.__name__}")
    hooks = sys.modules.get("lib_delta.webui.hooks")
    if hooks is not None:
        for name in ("begin_job", "end_job"):
            fn = getattr(hooks, name)
            if not getattr(fn, "_delta_bench", False):
                setattr(hooks, name, _timed(fn))
                wrapped.append(name)
    return wrapped


def _tensors(obj, out: list, depth: int = 0) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif depth < 3 and isinstance(obj, dict):
        for value in obj.values():
            _tensors(value, out, depth + 1)
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for value in obj:
            _tensors(value, out, depth + 1)


def _memory() -> dict:
    """Bytes of the source models and of the LoRA tensors DS holds for them (parsed files + cached copies)."""
    source_models = sys.modules.get("lib_delta.webui.source_models")
    models, seen = [], set()
    if source_models is not None:
        for loaded in list(source_models.CACHE._models.values()):
            model_bytes = loaded.nbytes(seen)
            lora_tensors: list = []
            for net in loaded.lora_cache.values():
                for deltas in net.modules.values():
                    for delta in deltas:
                        _tensors(vars(delta), lora_tensors)
            lora_bytes = 0
            for t in lora_tensors:
                if t.device.type != "meta" and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    lora_bytes += t.numel() * t.element_size()
            models.append({"title": loaded.title, "model_bytes": model_bytes, "lora_bytes": lora_bytes,
                           "loras": len(loaded.lora_cache)})
    return {"models": models, "model_bytes": sum(m["model_bytes"] for m in models),
            "lora_bytes": sum(m["lora_bytes"] for m in models)}


def _on_app_started(_demo, app):
    wrapped = _wrap_ds()
    print(f"delta-bench-support: timing DS entry points {wrapped}", flush=True)

    def ds_time() -> dict:
        return dict(DS_TIME)
    def last() -> dict:
        return STATS.last

    def profile(top: int = 40) -> dict:
        STATS.profile_top = int(top)
        return {"profile_next": STATS.profile_top}

    app.add_api_route("/delta-bench/v1/last", last, methods=["GET"])
    app.add_api_route("/delta-bench/v1/profile", profile, methods=["POST"])
    app.add_api_route("/delta-bench/v1/memory", _memory, methods=["GET"])
    app.add_api_route("/delta-bench/v1/ds-time", ds_time, methods=["GET"])

    def detach(on: bool = True) -> dict:
        return _set_detached(on)

    app.add_api_route("/delta-bench/v1/detach", detach, methods=["POST"])


    app.add_api_route("/delta-bench/v1/controlnet-cost", _controlnet_cost, methods=["POST"])


def _controlnet_cost(size: int = 64, repeats: int = 5) -> dict:
    """Forward timings for one ControlNet unit on the legs' batch (base cond, base uncond, adapted cond, adapted
    uncond) of the loaded SD1 checkpoint, median of ``repeats``."""
    import os
    import statistics

    from modules import call_queue, paths
    from safetensors.torch import save_file

    from lib_delta.control_units import soft_injection_table
    from lib_delta.controlnet import ActiveControl, ControlNet, controlled_forward, controlnet_residuals

    with call_queue.queue_lock, torch.no_grad():
        model = shared.sd_model
        unet = model.model.diffusion_model
        if unet.num_classes is not None:
            return {"error": "load an SD1/SD2 checkpoint first"}
        channels = [int(b[-1].out_channels if hasattr(b[-1], "out_channels") else b[0].out_channels)
                    for b in unet.input_blocks]
        net = ControlNet(unet, 3, channels, int(unet.middle_block[-1].out_channels))  # the UNet's own encoder
        gen = torch.Generator().manual_seed(0)
        for module in [*net.input_hint_block, *net.zero_convs, net.middle_block_out]:
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        net = net.to(next(unet.parameters()).device)
        device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
        latent = size // 8
        x = torch.randn(4, 4, latent, latent, generator=gen).to(device, dtype)
        t = torch.full((4,), 500.0, device=device)
        context = torch.randn(4, 77, int(unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features),
                              generator=gen).to(device, dtype)
        hint = torch.rand(1, 3, size, size, generator=gen).to(device, dtype)
        scales = [1.0] * (len(channels) + 1)
        rows, cond_rows = torch.tensor([2, 3], device=device), torch.tensor([2], device=device)
        both, first = torch.arange(2, device=device), torch.tensor([0], device=device)
        balanced = controlled_forward(unet, [ActiveControl(net, hint, scales)], rows, cond_rows)
        cond_only = controlled_forward(unet, [ActiveControl(net, hint, soft_injection_table(len(scales)), True)],
                                       rows, cond_rows)
        adapted_alone = controlled_forward(unet, [ActiveControl(net, hint, scales)], both, first)

        def legs():
            return unet(x, t, context)

        def separate():
            unet(x[:2], t[:2], context[:2])
            return adapted_alone(x[2:], t[2:], context[2:])

        cases = {
            "legs_batch4": legs,
            "legs_batch4_with_unit": lambda: balanced(x, t, context),
            "legs_batch4_with_unit_cond_rows_only": lambda: cond_only(x, t, context),
            "legs_separate_with_unit": separate,
            "unet_batch2": lambda: unet(x[:2], t[:2], context[:2]),
            "controlnet_batch2": lambda: controlnet_residuals(net, x[2:], t[2:], context[2:],
                                                              hint.expand(2, -1, -1, -1)),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(max(1, int(repeats))):
            for name, fn in cases.items():
                _sync()
                t0 = time.perf_counter()
                fn()
                _sync()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) for name, v in times.items()}
        title = os.path.splitext(os.path.basename(model.sd_checkpoint_info.filename))[0]
        folder = os.path.join(paths.models_path, "ControlNet")
        os.makedirs(folder, exist_ok=True)
        state = {f"control_model.{k}": v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(state, os.path.join(folder, f"bench-cn-{title}.safetensors"))
        return {"checkpoint": title, "size": size, "repeats": repeats, "median_s": med,
                "controlnet_params": sum(p.numel() for p in net.parameters()),
                "unet_params": sum(p.numel() for p in unet.parameters()),
                "controlnet_file": f"bench-cn-{title}"}


script_callbacks.on_app_started(_on_app_started)
