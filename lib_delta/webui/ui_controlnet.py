"""The "ControlNet on the adapted leg" sub-accordion: one tab per unit, built from :data:`UNIT_FIELDS`.

Each tab's components are inputs in :data:`UNIT_FIELDS` order (the script's positional form puts them after the other
settings, see :meth:`DeltaParams.from_positional`); a preview button shows the control map the unit would use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..control_units import (
    UNIT_FIELDS,
    UNIT_FIELDS_BY_NAME,
    UnitField,
    decode_image,
    parse_unit,
    preprocess,
    unit_from_infotext,
)
from ..errors import ParamError
from ..params import SETTINGS_BY_NAME, UNIT_INFOTEXT_KEYS
from .source_models import list_controlnets

DEFAULT_UNITS = 3


def unit_count() -> int:
    """How many unit tabs the UI shows (the ``delta_sampling_controlnet_units`` setting; read when the UI is built)."""
    from modules import shared

    value = shared.opts.data.get("delta_sampling_controlnet_units", DEFAULT_UNITS)
    return max(1, min(len(UNIT_INFOTEXT_KEYS), int(value)))


def controlnet_names() -> list[str]:
    return list(list_controlnets())


def _component(f: UnitField, elem_id: str) -> Any:
    import gradio as gr

    common = {"label": f.label, "elem_id": elem_id}
    if f.name == "enabled":
        return gr.Checkbox(value=False, **common)  # an unused tab is off; an API unit is on unless it says not
    if f.kind == "bool":
        return gr.Checkbox(value=f.default, **common)
    if f.kind in ("float", "int"):
        return gr.Slider(minimum=f.minimum, maximum=f.maximum, step=f.step, value=f.default, **common)
    if f.kind == "choice" and f.name == "module":
        return gr.Dropdown(choices=list(f.choices), value=f.default, **common)
    if f.kind == "choice":
        return gr.Radio(choices=list(f.choices), value=f.default, **common)
    if f.kind == "image":
        return gr.Image(type="numpy", **common)
    if f.name == "model":
        # "" rather than None: the API's infotext paste converts values to the type of the component's value
        return gr.Dropdown(choices=controlnet_names(), value="", **common)
    raise AssertionError(f.name)


def _paste_target(index: int, f: UnitField) -> Callable[[dict], Any]:
    key = UNIT_INFOTEXT_KEYS[index]

    def target(params: dict) -> Any:
        if SETTINGS_BY_NAME["enabled"].infotext not in params:
            return False if f.name == "enabled" else None  # no DS in the infotext: only switch the tab off
        if key not in params:
            return False if f.name == "enabled" else f.default if f.name != "model" else None
        if f.name == "enabled":
            return True
        value = getattr(unit_from_infotext(str(params[key]), key), f.name)
        if f.name == "model":
            return value.rsplit(" [", 1)[0]  # the list shows names; the hash stays in the infotext
        return value

    return target


def preview(*values: Any) -> Any:
    """The control map of a tab's image and preprocessor settings, at the image's own size."""
    fields = dict(zip([f.name for f in UNIT_FIELDS if f.name not in ("enabled", "model")], values, strict=True))
    try:
        unit = parse_unit({**fields, "model": "preview"})
        image = decode_image(fields["image"])
    except ParamError as exc:
        import gradio as gr

        raise gr.Error(str(exc)) from exc
    assert unit is not None
    return preprocess(unit, image, image.shape[1], image.shape[0])


def build(elem_id: Callable[[str], str]) -> tuple[list[Any], list[tuple[Any, Callable[[dict], Any]]], dict[str, str]]:
    """The sub-accordion; returns its input components (all tabs, flat), their paste fields and their tooltips."""
    import gradio as gr
    from modules.ui_components import FormRow, ToolButton

    setting = SETTINGS_BY_NAME["controlnet"]
    components, paste_fields, tooltips, models = [], [], {}, []
    with gr.Accordion(setting.label, open=False, elem_id=elem_id("controlnet")), gr.Tabs():
        for index in range(unit_count()):
            with gr.Tab(f"Unit {index + 1}", elem_id=elem_id(f"controlnet_{index}_tab")):
                by_name: dict[str, Any] = {}
                with gr.Row():
                    by_name["image"] = _component(UNIT_FIELDS[2], elem_id(f"controlnet_{index}_image"))
                    map_view = gr.Image(label="Control map", interactive=False,
                                        elem_id=elem_id(f"controlnet_{index}_map"))
                with FormRow():
                    for name in ("enabled", "pixel_perfect"):
                        by_name[name] = _component(UNIT_FIELDS_BY_NAME[name], elem_id(f"controlnet_{index}_{name}"))
                    preview_button = gr.Button("Preview map", elem_id=elem_id(f"controlnet_{index}_preview"))
                with FormRow():
                    by_name["module"] = _component(UNIT_FIELDS_BY_NAME["module"], elem_id(f"controlnet_{index}_module"))
                    by_name["model"] = _component(UNIT_FIELDS_BY_NAME["model"], elem_id(f"controlnet_{index}_model"))
                    refresh = ToolButton(value="\U0001f504", elem_id=elem_id(f"controlnet_{index}_refresh"),
                                         tooltip="Refresh the ControlNet / IP-Adapter list")
                for f in UNIT_FIELDS:
                    if f.name not in by_name:
                        by_name[f.name] = _component(f, elem_id(f"controlnet_{index}_{f.name}"))
                for f in UNIT_FIELDS:
                    tooltips[elem_id(f"controlnet_{index}_{f.name}")] = f.help
                    components.append(by_name[f.name])
                    if f.name != "image":
                        paste_fields.append((by_name[f.name], _paste_target(index, f)))
                inputs = [by_name[f.name] for f in UNIT_FIELDS if f.name not in ("enabled", "model")]
                preview_button.click(preview, inputs=inputs, outputs=[map_view])
                models.append((refresh, by_name["model"]))

    for refresh, dropdown in models:
        refresh.click(lambda: gr.update(choices=controlnet_names()), inputs=[], outputs=[dropdown])
    return components, paste_fields, tooltips

