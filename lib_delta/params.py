"""The one parameters model of Delta Sampling.

:data:`SETTINGS` lists every setting once, in the order of the webui script's positional arguments, with its API name,
UI label, infotext key, default, range or choices and help text. The UI, the infotext writer and parser, the HTTP API
(positional list or one dict of named fields), the JSON schema, the XYZ axes and validation are all derived from it.
A plain dataclass with its own validation keeps it independent of the host's pydantic major version.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .control_units import MAX_UNITS, UNIT_FIELDS, ControlUnit, parse_units, unit_from_infotext, units_from_flat
from .errors import ParamError
from .fields import check_number, scalar_schema
from .resolution import RESOLUTION_CHOICES
from .schedule import DECAY_SHAPES, LambdaSchedule

NONE_CHOICE = "None"
"""What the UI shows for "no adapted checkpoint"; the API also accepts null and ""."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA/LyCORIS file of the adapted leg, by the webui's network name, with its weight."""

    name: str
    weight: float = 1.0

    def __str__(self) -> str:
        return f"{self.name}:{_format_number(self.weight)}"


@dataclass(frozen=True)
class Setting:
    """One setting: how it is named, shown, validated, written into infotext and described in the schema."""

    name: str
    label: str
    infotext: str
    kind: str  # bool | float | int | str | choice | checkpoint | optional_checkpoint | loras | controlnet
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    advanced: bool = False
    xyz: bool = False


LORA_WEIGHT_RANGE = (-10.0, 10.0)

SETTINGS: tuple[Setting, ...] = (
    Setting("enabled", "Delta Sampling", "Delta sampling", "bool", False,
            "Turn Delta Sampling on for this generation.", xyz=True),
    Setting("scale", "Delta scale (lambda)", "Delta scale", "float", 0.5,
            "How much of the source pair's difference (adapted - base) is added to the target's prediction. "
            "0 leaves the image unchanged; 1 transfers the difference as is; the paper's examples use 1 to 5.",
            minimum=-10.0, maximum=10.0, step=0.05, xyz=True),
    Setting("source", "Source base checkpoint", "Delta source", "checkpoint", "",
            "The checkpoint the adaptation was made for (e.g. the SD 1.5 base a LoRA was trained on)."),
    Setting("adapted", "Source adapted checkpoint", "Delta adapted", "optional_checkpoint", None,
            "A fine-tuned checkpoint of the source base. 'None' uses the source base itself (add LoRAs below).",
            xyz=True),
    Setting("loras", "Adapted LoRA/LyCORIS", "Delta LoRAs", "loras", (),
            "LoRA/LyCORIS files applied to the adapted leg, as 'name:weight, name2:weight'. They are applied to the "
            "source pair only, never to the model you generate with."),
    Setting("start", "Window start", "Delta start", "float", 0.0,
            "Fraction of the sampling steps before which no delta is added (and the source models do not run).",
            minimum=0.0, maximum=1.0, step=0.01, advanced=True, xyz=True),
    Setting("end", "Window end", "Delta end", "float", 1.0,
            "Fraction of the sampling steps after which no delta is added (and the source models do not run).",
            minimum=0.0, maximum=1.0, step=0.01, advanced=True, xyz=True),
    Setting("decay", "Lambda decay", "Delta decay", "choice", "constant",
            "How lambda falls from its full value at the window's start towards 0 at its end.",
            choices=DECAY_SHAPES, advanced=True),
    Setting("source_prompt", "Source prompt", "Delta source prompt", "str", "",
            "Prompt for the source pair's text encoder. Empty: the same prompt as the target.", advanced=True),
    Setting("source_negative_prompt", "Source negative prompt", "Delta source negative", "str", "",
            "Negative prompt for the source pair. Empty: the same negative prompt as the target.", advanced=True),
    Setting("source_cfg_scale", "Source CFG scale", "Delta source CFG", "float", 0.0,
            "CFG scale of the source legs. 0: the same CFG scale as the target (as in the reference implementation).",
            minimum=0.0, maximum=30.0, step=0.5, advanced=True),
    Setting("hires", "Apply in hires pass", "Delta hires", "bool", True,
            "Also add the delta during the hires fix pass.", advanced=True),
    Setting("guard", "Delta guard", "Delta guard", "float", 0.0,
            "Caps the size of lambda * delta at this multiple of the target prediction's size, per image. Protects "
            "against burnt images at large lambda or with very different source and target. 0 turns it off.",
            minimum=0.0, maximum=10.0, step=0.05, advanced=True),
    Setting("reuse_steps", "Reuse delta for k steps", "Delta reuse", "int", 1,
            "Compute the delta every k-th denoiser call and reuse it in between. 1 is exact; 2 and 3 trade accuracy "
            "for speed.", minimum=1, maximum=4, step=1, advanced=True, xyz=True),
    Setting("cond_only", "Cond-only delta", "Delta cond only", "bool", False,
            "Run the source legs on the positive prompt only, without their own CFG (4 model passes per step instead "
            "of 6). A different, cheaper formula: the delta is then taken from conditional predictions.",
            advanced=True, xyz=True),
    Setting("batch_legs", "Batch source legs", "Delta batch legs", "bool", True,
            "Evaluate the base and adapted legs in one batched forward where they share weights. Exact; turn off only "
            "to save peak memory.", advanced=True),
    Setting("source_resolution", "Source resolution", "Delta source resolution", "choice", "target",
            "Grid the source legs run on. 'target': the target's own (exact). 'native': the source family's trained "
            "size (SD1 512², SD2 768², SDXL 1024²): the noisy latent is average-pooled by a whole factor and the "
            "delta upsampled back, e.g. SD1.5 legs at 512² for an SDXL target at 1024² (about 6x fewer operations per "
            "leg); fine detail of the delta above the coarse grid is lost. 2/3/4: that pooling factor.",
            choices=RESOLUTION_CHOICES, advanced=True, xyz=True),
    # Last: in the UI's positional form its slot is replaced by the unit tabs' flat fields (see from_positional).
    Setting("controlnet", "ControlNet / IP-Adapter on the adapted leg", "Delta ControlNet", "controlnet", (),
            "ControlNet and IP-Adapter units applied to the adapted leg only (a list of unit dicts with "
            "sd-webui-controlnet's field names: model, image as base64, module (a preprocessor, or for an IP-Adapter "
            "its image encoder: ip-adapter_clip_h, ip-adapter_clip_g, ip-adapter-auto), weight, guidance_start, "
            "guidance_end, control_mode, resize_mode, pixel_perfect, processor_res, threshold_a, threshold_b). The "
            "base leg and the target never see them."),
)

SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
SETTINGS_BY_INFOTEXT: dict[str, Setting] = {s.infotext: s for s in SETTINGS}
CONTROLNET_INFOTEXT = SETTINGS_BY_NAME["controlnet"].infotext
UNIT_INFOTEXT_KEYS = tuple(f"{CONTROLNET_INFOTEXT} {i + 1}" for i in range(MAX_UNITS))
"""One infotext key per unit: ``Delta ControlNet 1: "Module: none, Model: name [hash], Weight: 1, ..."``."""
INFOTEXT_KEYS = (*(s.infotext for s in SETTINGS if s.kind != "controlnet"), *UNIT_INFOTEXT_KEYS)


def _format_number(value: float) -> str:
    return f"{value:g}"


def _finite_number(setting: Setting, value: Any, *, integer: bool = False) -> float:
    return check_number(value, where=setting.name, label="", minimum=setting.minimum, maximum=setting.maximum,
                        integer=integer)


_LORA_ITEM = re.compile(r"^\s*(?P<name>.+?)\s*(?::\s*(?P<weight>[^:]+?)\s*)?$")


def parse_loras(value: Any, field_name: str = "loras") -> tuple[LoraSpec, ...]:
    """LoRAs from the API (list of ``{"name", "weight"}`` or ``[name, weight]``) or text ``"a:0.8, b"``."""
    if value is None or value == "":
        return ()
    items: list[tuple[Any, Any]] = []
    if isinstance(value, str):
        for part in value.split(","):
            if not part.strip():
                continue
            m = _LORA_ITEM.match(part)
            assert m is not None  # the pattern matches any non-blank text
            weight_text = m.group("weight")
            try:
                weight = 1.0 if weight_text is None else float(weight_text)
            except ValueError:
                raise ParamError(field_name, f"weight {weight_text!r} of {m.group('name')!r} is not a number") from None
            items.append((m.group("name"), weight))
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, LoraSpec):
                items.append((item.name, item.weight))
            elif isinstance(item, Mapping):
                unknown = set(item) - {"name", "weight"}
                if unknown:
                    raise ParamError(field_name, f"unknown key(s) {sorted(unknown)} in {dict(item)!r}")
                if "name" not in item:
                    raise ParamError(field_name, f"entry {dict(item)!r} has no name")
                items.append((item["name"], item.get("weight", 1.0)))
            elif isinstance(item, (list, tuple)) and len(item) in (1, 2):
                items.append((item[0], item[1] if len(item) == 2 else 1.0))
            elif isinstance(item, str):
                items.extend((spec.name, spec.weight) for spec in parse_loras(item, field_name))
            else:
                raise ParamError(field_name, f"entry {item!r} is not {{'name': ..., 'weight': ...}}")
    else:
        raise ParamError(field_name, f"expected a list of {{'name', 'weight'}} or 'name:weight' text, got {value!r}")
    specs = []
    weight_setting = Setting(f"{field_name} weight", "", "", "float", 1.0, "", *LORA_WEIGHT_RANGE)
    for name, weight in items:
        if not isinstance(name, str) or not name.strip():
            raise ParamError(field_name, f"LoRA name must be non-empty text, got {name!r}")
        if "," in name or ":" in name:
            raise ParamError(field_name, f"LoRA name {name!r} must not contain ',' or ':'")
        specs.append(LoraSpec(name.strip(), _finite_number(weight_setting, weight)))
    return tuple(specs)


def _validate_value(setting: Setting, value: Any) -> Any:
    kind = setting.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ParamError(setting.name, f"expected true or false, got {type(value).__name__} {value!r}")
        return value
    if kind == "float":
        return _finite_number(setting, value)
    if kind == "int":
        return _finite_number(setting, value, integer=True)
    if kind == "checkpoint" and value is None:  # the UI's dropdown before a choice
        return ""
    if kind in ("str", "checkpoint"):
        if not isinstance(value, str):
            raise ParamError(setting.name, f"expected text, got {type(value).__name__} {value!r}")
        return value.strip() if kind == "checkpoint" else value
    if kind == "optional_checkpoint":
        if value is None or value in ("", NONE_CHOICE):
            return None
        if not isinstance(value, str):
            raise ParamError(setting.name, f"expected a checkpoint name or null, got {type(value).__name__} {value!r}")
        return value.strip()
    if kind == "choice":
        if isinstance(value, int) and not isinstance(value, bool) and str(value) in setting.choices:
            value = str(value)  # a factor given as a number (source_resolution: 2)
        if value not in setting.choices:
            raise ParamError(setting.name, f"expected one of {', '.join(setting.choices)}; got {value!r}")
        return value
    if kind == "loras":
        return parse_loras(value, setting.name)
    if kind == "controlnet":
        return parse_units(value, setting.name)
    raise AssertionError(f"unhandled setting kind {kind}")


@dataclass(frozen=True)
class DeltaParams:
    """Every Delta Sampling setting of one generation, validated. Build with :meth:`from_api` or :meth:`create`."""

    enabled: bool = False
    scale: float = 0.5
    source: str = ""
    adapted: str | None = None
    loras: tuple[LoraSpec, ...] = field(default_factory=tuple)
    start: float = 0.0
    end: float = 1.0
    decay: str = "constant"
    source_prompt: str = ""
    source_negative_prompt: str = ""
    source_cfg_scale: float = 0.0
    hires: bool = True
    guard: float = 0.0
    reuse_steps: int = 1
    cond_only: bool = False
    batch_legs: bool = True
    source_resolution: str = "target"
    controlnet: tuple[ControlUnit, ...] = field(default_factory=tuple)

    # -- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, **values: Any) -> DeltaParams:
        """Validated params from named values; unknown names and wrong types raise :class:`ParamError`."""
        unknown = [k for k in values if k not in SETTINGS_BY_NAME]
        if unknown:
            known = ", ".join(s.name for s in SETTINGS)
            raise ParamError(unknown[0], f"unknown setting; known settings are: {known}")
        checked = {k: _validate_value(SETTINGS_BY_NAME[k], v) for k, v in values.items()}
        params = cls(**{**cls._defaults(), **checked})
        params._check_consistency()
        return params

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        return {s.name: s.default for s in SETTINGS}

    @classmethod
    def from_positional(cls, args: Sequence[Any]) -> DeltaParams:
        """Params from the script's positional args (the order of :data:`SETTINGS`); missing trailing args default.

        The last slot, ``controlnet``, holds a list of unit dicts. The UI sends more values instead: the settings
        before it, then each unit tab's :data:`~lib_delta.control_units.UNIT_FIELDS` in order."""
        if len(args) > len(SETTINGS):
            plain = len(SETTINGS) - 1
            if (len(args) - plain) % len(UNIT_FIELDS):
                raise ParamError("args", f"got {len(args)} positional values; Delta Sampling takes at most "
                                         f"{len(SETTINGS)}, or {plain} plus {len(UNIT_FIELDS)} per ControlNet unit")
            values = {s.name: v for s, v in zip(SETTINGS[:plain], args, strict=False)}
            return cls.create(**values, controlnet=units_from_flat(args[plain:]))
        return cls.create(**{s.name: v for s, v in zip(SETTINGS, args, strict=False)})

    @classmethod
    def from_api(cls, args: Sequence[Any] | Mapping[str, Any]) -> DeltaParams:
        """Params from whatever the webui hands the script: positional values, or one dict of named fields first.

        ``alwayson_scripts: {"delta sampling": {"args": [{"enabled": true, "scale": 1, ...}]}}`` places the dict in
        the first slot and leaves the rest at their UI defaults, which are then ignored.
        """
        if isinstance(args, Mapping):
            return cls.create(**args)
        if len(args) > 0 and isinstance(args[0], Mapping):
            return cls.create(**args[0])
        return cls.from_positional(args)

    def replace(self, **changes: Any) -> DeltaParams:
        """A validated copy with some settings changed (used by XYZ axes)."""
        return type(self).create(**{**self.as_dict(raw=True), **changes})

    def _check_consistency(self) -> None:
        if self.start > self.end:
            raise ParamError("end", f"window end {self.end:g} is before window start {self.start:g}")
        if self.enabled:
            if not self.source:
                raise ParamError("source", "choose the source base checkpoint the adaptation was made for")
            if self.adapted is None and not self.loras and not self.controlnet:
                raise ParamError("adapted", "choose an adapted checkpoint, or at least one LoRA or ControlNet unit "
                                            "for the adapted leg")
        if self.source_cfg_scale != 0 and self.source_cfg_scale < 1:
            raise ParamError("source_cfg_scale", "must be 0 (follow the target's CFG scale) or at least 1")

    # -- views ----------------------------------------------------------------------------------------------------

    def as_dict(self, *, raw: bool = False) -> dict[str, Any]:
        """Named values; JSON-friendly (LoRAs as a list of dicts) unless ``raw``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not raw:
            values["loras"] = [{"name": spec.name, "weight": spec.weight} for spec in self.loras]
            values["controlnet"] = [unit.as_dict(with_image=False) for unit in self.controlnet]
        return values

    def positional(self) -> list[Any]:
        """The values in positional order, as the UI would send them."""
        return [self._ui_value(s) for s in SETTINGS]

    def _ui_value(self, setting: Setting) -> Any:
        value = getattr(self, setting.name)
        if setting.kind == "optional_checkpoint":
            return value or NONE_CHOICE
        if setting.kind == "loras":
            return ", ".join(str(spec) for spec in value)
        if setting.kind == "controlnet":
            return [unit.as_dict() for unit in value]
        return value

    def lambda_schedule(self) -> LambdaSchedule:
        return LambdaSchedule(self.scale, self.start, self.end, self.decay)

    @property
    def effective(self) -> bool:
        """Whether this job can change the image at all (enabled, lambda != 0, a non-empty window)."""
        return self.enabled and self.scale != 0 and self.end > self.start

    # -- infotext -------------------------------------------------------------------------------------------------

    def infotext(self) -> dict[str, Any]:
        """Generation-parameter entries: the core settings always, the advanced ones where not at their default."""
        if not self.enabled:
            return {}
        entries: dict[str, Any] = {}
        for setting in SETTINGS:
            if setting.name == "enabled":
                continue
            if setting.kind == "controlnet":
                for key, unit in zip(UNIT_INFOTEXT_KEYS, self.controlnet, strict=False):
                    entries[key] = unit.infotext()
                continue
            value = self._ui_value(setting)
            if setting.advanced and getattr(self, setting.name) == setting.default:
                continue
            if setting.kind == "loras" and not value:
                continue
            if setting.kind == "optional_checkpoint" and value == NONE_CHOICE:
                continue
            entries[setting.infotext] = value
        entries[SETTINGS_BY_NAME["enabled"].infotext] = True
        return entries

    @classmethod
    def from_infotext(cls, params: Mapping[str, Any]) -> DeltaParams:
        """Params from parsed infotext (values are text); absent keys take defaults, so a paste resets them."""
        if not _truthy(params.get(SETTINGS_BY_NAME["enabled"].infotext, "False")):
            return cls()
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            if setting.infotext in params:
                values[setting.name] = infotext_value(setting, params[setting.infotext])
        units = [unit_from_infotext(str(params[key]), key) for key in UNIT_INFOTEXT_KEYS if key in params]
        if units:
            values["controlnet"] = units
        return cls.create(**values)

    # -- schema ---------------------------------------------------------------------------------------------------

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """JSON schema of the named-fields form of the API arguments."""
        props: dict[str, Any] = {}
        for s in SETTINGS:
            prop: dict[str, Any] = {"title": s.label, "description": s.help, "x-infotext": s.infotext,
                                    **scalar_schema(s.kind, s.minimum, s.maximum)}
            if s.kind == "optional_checkpoint":
                prop["type"] = ["string", "null"]
            elif s.kind == "choice":
                prop["type"] = "string"
                prop["enum"] = list(s.choices)
            elif s.kind == "loras":
                prop["type"] = "array"
                prop["items"] = {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "weight": {"type": "number", "minimum": LORA_WEIGHT_RANGE[0], "maximum": LORA_WEIGHT_RANGE[1]},
                    },
                    "required": ["name"],
                    "additionalProperties": False,
                }
            elif s.kind == "controlnet":
                prop["type"] = "array"
                prop["maxItems"] = MAX_UNITS
                prop["items"] = _unit_schema()
            prop["default"] = list(s.default) if s.kind in ("loras", "controlnet") else s.default
            props[s.name] = prop
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "Delta Sampling arguments",
            "type": "object",
            "properties": props,
            "additionalProperties": False,
            "x-positional-order": [s.name for s in SETTINGS],
        }


def _unit_schema() -> dict[str, Any]:
    props: dict[str, Any] = {}
    for f in UNIT_FIELDS:
        prop: dict[str, Any] = {"title": f.label, "description": f.help, "default": f.default,
                                **scalar_schema(f.kind, f.minimum, f.maximum)}
        if f.kind == "choice":
            prop["type"] = ["string", "integer"]
            prop["enum"] = [*f.choices, *range(len(f.choices))]
        elif f.kind == "image":
            prop["type"] = ["string", "null"]
            prop["contentEncoding"] = "base64"
        props[f.name] = prop
    return {"type": "object", "properties": props, "required": ["model"], "additionalProperties": False}


def _truthy(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    return str(text).strip().lower() in ("true", "1", "yes", "on")


def infotext_value(setting: Setting, text: Any) -> Any:
    """One infotext value (text) converted to the setting's type; raises :class:`ParamError` when it cannot be."""
    if not isinstance(text, str):
        return text
    if setting.kind == "bool":
        return _truthy(text)
    if setting.kind in ("float", "int"):
        try:
            number = float(text)
        except ValueError:
            raise ParamError(setting.name, f"infotext value {text!r} is not a number") from None
        return int(number) if setting.kind == "int" and number.is_integer() else number
    if setting.kind == "str" and text.startswith('"'):
        # infotext_utils.quote JSON-quotes values containing , : or newlines; the webui's parser usually unquotes.
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text
