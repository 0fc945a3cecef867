"""The "Delta Sampling" section of the webui's settings. Read with ``getattr(shared.opts, key, default)``: the options
exist only once the settings UI has been built."""

from __future__ import annotations

from ..prompt_loras import FAMILY_LABELS
from ..resolution import RESOLUTION_CHOICES
from . import prompt_loras
from .precision import CHOICES

RESIDENCY = ("gpu", "cpu", "unload")


def register() -> None:
    from modules import script_callbacks

    script_callbacks.on_ui_settings(_add_options, name="delta_sampling")


def _add_options() -> None:
    import gradio as gr
    from modules import sd_models, shared

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
    for family, key in prompt_loras.BASE_OPTIONS.items():
        shared.opts.add_option(key, shared.OptionInfo(
            prompt_loras.NONE_BASE, f"Source base for prompt LoRAs made for {FAMILY_LABELS[family]}", gr.Dropdown,
            lambda: {"choices": [prompt_loras.NONE_BASE, *sd_models.checkpoint_tiles(use_short=False)]},
            refresh=sd_models.list_models, section=section,
        ).info(f"an {FAMILY_LABELS[family]} checkpoint: an {FAMILY_LABELS[family]} LoRA's <lora:…> tag in the prompt "
               "of another family's model then runs Delta Sampling on it instead of being misapplied by the webui"))
    shared.opts.add_option(prompt_loras.CARRY_OPTION, shared.OptionInfo(
        True, "Carry prompt LoRAs made for another family", gr.Checkbox, section=section,
    ).info("with a source base chosen above for the LoRA's family; off: the webui handles such tags as it would "
           "without Delta Sampling (and the infotext says what it did)"))
    shared.opts.add_option(prompt_loras.SCALE_OPTION, shared.OptionInfo(
        prompt_loras.DEFAULT_SCALE, "Delta scale (lambda) for carried prompt LoRAs", gr.Slider,
        {"minimum": 0.0, "maximum": 3.0, "step": 0.05}, section=section,
    ).info("1: the LoRA's difference on its own base is transferred as is, so the tag's weight means what it means "
           "there"))
    shared.opts.add_option(prompt_loras.RESOLUTION_OPTION, shared.OptionInfo(
        prompt_loras.DEFAULT_RESOLUTION, "Source resolution for carried prompt LoRAs", gr.Radio,
        {"choices": list(RESOLUTION_CHOICES)}, section=section,
    ).info("target: exact, the source legs on the target's grid; native: the source family's trained size, cheaper"))
