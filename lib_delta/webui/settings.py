"""The "Delta Sampling" section of the webui's settings. Read with ``getattr(shared.opts, key, default)``: the options
exist only once the settings UI has been built."""

from __future__ import annotations

from .precision import CHOICES

RESIDENCY = ("gpu", "cpu", "unload")


def register() -> None:
    from modules import script_callbacks

    script_callbacks.on_ui_settings(_add_options, name="delta_sampling")


def _add_options() -> None:
    import gradio as gr
    from modules import shared

    section = ("delta_sampling", "Delta Sampling")
    shared.opts.add_option("delta_sampling_residency", shared.OptionInfo(
        "gpu", "Where the source models wait between generations", gr.Radio, {"choices": list(RESIDENCY)},
        section=section,
    ).info("gpu: fastest next generation; cpu: frees VRAM, costs a copy per generation; unload: frees everything"))
    shared.opts.add_option("delta_sampling_dtype", shared.OptionInfo(
        "auto", "Source model precision", gr.Radio, {"choices": list(CHOICES)}, section=section,
    ).info("auto: stored as the webui stores its model (fp16 unless --no-half, fp8 weights with 'FP8 weight'); "
           "float32: full precision whatever the webui uses (more memory). A1111 only: Forge's loader decides"))
    shared.opts.add_option("delta_sampling_cache_size", shared.OptionInfo(
        2, "Source checkpoints kept loaded", gr.Slider, {"minimum": 1, "maximum": 6, "step": 1}, section=section,
    ).info("least recently used ones are freed first; a LoRA pair needs 1, a checkpoint pair 2"))
    shared.opts.add_option("delta_sampling_controlnet_units", shared.OptionInfo(
        3, "ControlNet unit tabs on the adapted leg", gr.Slider, {"minimum": 1, "maximum": 8, "step": 1},
        section=section,
    ).info("how many units the UI shows (the API takes up to 8 in any case); needs a UI reload").needs_reload_ui())
