"""XYZ plot axes for Delta Sampling, registered into the webui's built-in X/Y/Z plot script.

An axis stores its value in a per-cell dict on ``p`` (:data:`hooks.XYZ_ATTR`), always a new dict so that cells, which
are shallow copies of one ``p``, never see each other's values; :func:`hooks.begin_job` applies it over the script's
arguments and validates the result like any other input.
"""

from __future__ import annotations

from typing import Any

from ..control_units import UNIT_FIELDS_BY_NAME
from ..params import NONE_CHOICE, SETTINGS_BY_NAME, Setting
from .hooks import XYZ_ATTR

AXIS_PREFIX = "Delta "


def _apply(name: str):
    def apply(p: Any, value: Any, _values: Any) -> None:
        setattr(p, XYZ_ATTR, {**(getattr(p, XYZ_ATTR, None) or {}), name: value})

    return apply


def _confirm_range(setting: Setting):
    def confirm(_p: Any, values: list) -> None:
        for value in values:
            if not setting.minimum <= value <= setting.maximum:
                raise ValueError(f"{setting.label}: {value} is outside [{setting.minimum:g}, {setting.maximum:g}]")

    return confirm


def unit_setting(name: str) -> Setting:
    """A unit field as a :class:`Setting` (for the range check of its axis, applied to every unit)."""
    f = UNIT_FIELDS_BY_NAME[name]
    return Setting(f"controlnet_{name}", f"Delta ControlNet {f.label.lower()}", "", f.kind, f.default, f.help,
                   f.minimum, f.maximum)


def _bool(text: str) -> bool:
    return str(text).strip().lower() in ("true", "1", "yes", "on")


def _adapted(text: str) -> str | None:
    return None if text in ("", NONE_CHOICE) else text


def _find_xyz_module() -> Any:
    from modules import scripts

    for data in scripts.scripts_data:
        if data.script_class.__module__ == "xyz_grid.py" and hasattr(data.module, "axis_options"):
            return data.module
    return None


def register() -> bool:
    """Add the axes (once per script load; the webui re-imports xyz_grid on reload, so its list starts fresh)."""
    xyz = _find_xyz_module()
    if xyz is None:
        return False
    if any(getattr(opt, "label", "").startswith(AXIS_PREFIX) for opt in xyz.axis_options):
        return True
    from .ui import checkpoint_titles

    def numeric(label: str, name: str) -> Any:
        setting = SETTINGS_BY_NAME[name]
        kind = int if setting.kind == "int" else float
        return xyz.AxisOption(label, kind, _apply(name), confirm=_confirm_range(setting))

    lora_weight = Setting("lora_weight", "Delta LoRA weight", "", "float", 1.0, "", -10.0, 10.0)
    xyz.axis_options.extend([
        numeric("Delta scale", "scale"),
        numeric("Delta window start", "start"),
        numeric("Delta window end", "end"),
        numeric("Delta reuse steps", "reuse_steps"),
        xyz.AxisOption("Delta LoRA weight", float, _apply("lora_weight"), confirm=_confirm_range(lora_weight)),
        xyz.AxisOption("Delta adapted checkpoint", _adapted, _apply("adapted"), format_value=xyz.format_value,
                       choices=lambda: [NONE_CHOICE, *checkpoint_titles()], cost=1.0),
        xyz.AxisOption("Delta enabled", _bool, _apply("enabled"), choices=xyz.boolean_choice(reverse=True)),
        xyz.AxisOption("Delta cond only", _bool, _apply("cond_only"), choices=xyz.boolean_choice(reverse=True)),
        *(xyz.AxisOption(label, float, _apply(f"controlnet_{name}"), confirm=_confirm_range(unit_setting(name)))
          for label, name in (("Delta ControlNet weight", "weight"), ("Delta ControlNet start", "guidance_start"),
                              ("Delta ControlNet end", "guidance_end"))),
        xyz.AxisOption("Delta source resolution", str, _apply("source_resolution"),
                       choices=lambda: list(SETTINGS_BY_NAME["source_resolution"].choices)),
    ])
    return True
