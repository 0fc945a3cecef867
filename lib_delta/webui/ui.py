"""The Gradio accordion, built from :data:`lib_delta.SETTINGS` (one component per setting, in positional order).

The same table gives each component its label, range, default, tooltip (``javascript/delta_sampling.js`` reads the
help texts from a hidden element rendered here) and its infotext paste target.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from typing import Any

from ..params import NONE_CHOICE, SETTINGS, SETTINGS_BY_NAME, Setting, infotext_value
from . import ui_controlnet
from .source_models import CACHE

ENABLED_KEY = SETTINGS[0].infotext


def checkpoint_titles() -> list[str]:
    from modules import sd_models

    return sorted(sd_models.checkpoint_tiles(use_short=False))


def lora_names() -> list[str]:
    try:
        import networks
    except ImportError:
        return []
    return sorted(networks.available_networks)


def ui_default(setting: Setting) -> Any:
    """The value a component starts with (and the API's default for that positional slot)."""
    if setting.kind == "optional_checkpoint":
        return NONE_CHOICE
    if setting.kind == "loras":
        return ""
    return setting.default


def paste_target(setting: Setting) -> Callable[[dict], Any]:
    """Infotext -> component value. Without DS in the infotext only the switch changes (to off); with DS, keys that
    are absent were at their defaults when the image was made, so they are reset to them."""

    def target(params: dict) -> Any:
        if ENABLED_KEY not in params:
            return False if setting.name == "enabled" else None
        if setting.infotext not in params:
            return ui_default(setting)
        value = infotext_value(setting, params[setting.infotext])
        if setting.kind == "optional_checkpoint":
            return value or NONE_CHOICE
        return value

    return target


def status_html() -> str:
    status = CACHE.status()
    if not status["models"]:
        body = f"No source models loaded. {html.escape(status['last_event'])}"
    else:
        rows = "".join(
            f"<li>{html.escape(m['title'])}: {m['family']}, {m['device']}, {m['dtype']}, "
            f"{m['bytes'] / 2**20:.1f} MiB</li>" for m in status["models"]
        )
        body = (f"Loaded source models ({status['total_bytes'] / 2**20:.1f} MiB, shared tensors counted once):"
                f"<ul>{rows}</ul>Last: {html.escape(status['last_event'])}")
    if status["prompt_loras"]:
        body += f"<br>Prompt LoRAs: {html.escape(status['prompt_loras'])}"
    return f"<div class='delta-sampling-status'>{body}</div>"


def tooltips_html(elem_id: Callable[[str], str], extra: dict[str, str] | None = None) -> str:
    data = {**{elem_id(s.name): s.help for s in SETTINGS}, **(extra or {})}
    return (f"<span class='delta-sampling-tooltips' style='display:none' "
            f"data-tooltips='{html.escape(json.dumps(data), quote=True)}'></span>")


def _component(setting: Setting, elem_id: str) -> Any:
    import gradio as gr

    common = {"label": setting.label, "elem_id": elem_id}
    if setting.kind == "bool":
        return gr.Checkbox(value=setting.default, **common)
    if setting.kind in ("float", "int"):
        return gr.Slider(minimum=setting.minimum, maximum=setting.maximum, step=setting.step, value=setting.default,
                         **common)
    if setting.kind == "choice":
        return gr.Dropdown(choices=list(setting.choices), value=setting.default, **common)
    if setting.kind == "checkpoint":
        # gradio 4 (Forge) never takes a choice made in a dropdown whose value is outside its choices: start at None
        # there. Not in gradio 3 (A1111): its API pastes infotext only into components whose value has a type.
        empty = None if int(gr.__version__.split(".")[0]) >= 4 else ""
        return gr.Dropdown(choices=checkpoint_titles(), value=empty, **common)
    if setting.kind == "optional_checkpoint":
        return gr.Dropdown(choices=[NONE_CHOICE, *checkpoint_titles()], value=NONE_CHOICE, **common)
    if setting.kind == "loras":
        return gr.Textbox(value="", placeholder="name:weight, name2:weight", lines=1, **common)
    if setting.kind == "str":
        return gr.Textbox(value=setting.default, lines=2, **common)
    raise AssertionError(setting.kind)


def build(elem_id: Callable[[str], str]) -> tuple[list[Any], list[tuple[Any, Callable[[dict], Any]]]]:
    """Create the accordion; returns the input components in positional order and the infotext paste fields."""
    import gradio as gr
    from modules import sd_models
    from modules.ui_components import FormRow, InputAccordion, ToolButton

    by_name: dict[str, Any] = {}
    with InputAccordion(False, label="Delta Sampling", elem_id=elem_id("enabled")) as enabled:
        by_name["enabled"] = enabled
        by_name["scale"] = _component(SETTINGS_BY_NAME["scale"], elem_id("scale"))
        with FormRow():
            by_name["source"] = _component(SETTINGS_BY_NAME["source"], elem_id("source"))
            by_name["adapted"] = _component(SETTINGS_BY_NAME["adapted"], elem_id("adapted"))
            refresh = ToolButton(value="\U0001f504", elem_id=elem_id("refresh"), tooltip="Refresh the lists")
        with FormRow():
            by_name["loras"] = _component(SETTINGS_BY_NAME["loras"], elem_id("loras"))
            add_lora = gr.Dropdown(choices=lora_names(), value=None, label="Add a LoRA", elem_id=elem_id("add_lora"))
        unit_components, unit_paste_fields, unit_tooltips = ui_controlnet.build(elem_id)
        with gr.Accordion("Advanced", open=False, elem_id=elem_id("advanced")):
            for setting in SETTINGS:
                if setting.advanced:
                    by_name[setting.name] = _component(setting, elem_id(setting.name))
            with FormRow():
                status = gr.HTML(status_html(), elem_id=elem_id("status"))
                status_button = ToolButton(value="\U0001f4ca", elem_id=elem_id("status_refresh"),
                                           tooltip="Show what is loaded")
                unload_button = ToolButton(value="\u23cf", elem_id=elem_id("unload"),
                                           tooltip="Unload the source models now")
        gr.HTML(tooltips_html(elem_id, unit_tooltips))

    def refresh_lists() -> list[Any]:
        sd_models.list_models()
        titles = checkpoint_titles()
        try:
            import networks

            networks.list_available_networks()
        except ImportError:
            pass
        return [gr.update(choices=titles), gr.update(choices=[NONE_CHOICE, *titles]),
                gr.update(choices=lora_names())]

    def append_lora(current: str, name: str | None) -> tuple[Any, Any]:
        if not name:
            return gr.update(), gr.update()
        text = f"{current.rstrip().rstrip(',')}, {name}:1" if current.strip() else f"{name}:1"
        return gr.update(value=text), gr.update(value=None)

    def unload() -> str:
        from modules.call_queue import queue_lock

        with queue_lock:
            CACHE.unload()
        return status_html()

    refresh.click(refresh_lists, inputs=[], outputs=[by_name["source"], by_name["adapted"], add_lora])
    add_lora.change(append_lora, inputs=[by_name["loras"], add_lora], outputs=[by_name["loras"], add_lora])
    status_button.click(status_html, inputs=[], outputs=[status])
    unload_button.click(unload, inputs=[], outputs=[status])

    # positional order: every setting but the units, then the unit tabs' fields (DeltaParams.from_positional)
    plain = [s for s in SETTINGS if s.kind != "controlnet"]
    components = [by_name[s.name] for s in plain] + unit_components
    paste_fields = [(by_name[s.name], paste_target(s)) for s in plain] + unit_paste_fields
    return components, paste_fields
