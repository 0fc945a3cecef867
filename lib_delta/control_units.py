"""ControlNet units of the adapted leg: their settings, their control maps, and how strongly each residual enters.

Host-free (numpy and torch; OpenCV and Pillow are imported only where an image is decoded, resized or edge-detected:
both hosts ship them). The unit fields use sd-webui-controlnet's API names and values (``module``, ``guidance_start``,
``control_mode`` "Balanced" / "My prompt is more important" / "ControlNet is more important", ``resize_mode``
"Just Resize" / "Crop and Resize" / "Resize and Fill", ...), so a unit dict written for that extension works here.

* :data:`UNIT_FIELDS`: every field once (API name, label, kind, default, range or choices, help); the UI, the API
  schema, validation and the infotext are derived from it, as :data:`lib_delta.params.SETTINGS` is for the rest.
* :func:`residual_scales`: weight times the soft-injection table (0.825^(12-i), the first N entries of the 13-long
  SD1 table for every family, as both ecosystem implementations do) or weight alone ("Balanced").
* :func:`control_map` / :func:`hint_tensor`: the preprocessor (none, invert, canny) and the resize modes.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import ParamError
from .fields import check_number

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_PREPROCESSORS = ("none", "invert", "canny")
IP_ENCODERS = ("ip-adapter_clip_h", "ip-adapter_clip_g", "ip-adapter-auto")
"""IP-Adapter units' ``module``: the CLIP vision encoder (ViT-H/14, ViT-bigG/14, or the one the adapter reads)."""
PREPROCESSORS = (*CONTROL_PREPROCESSORS, *IP_ENCODERS)
# sd-webui-controlnet's and Forge's module names for the same preprocessors and encoders
_PREPROCESSOR_ALIASES = {"invert (from white bg & black line)": "invert", "None": "none",
                         "ip-adapter_clip_sd15": "ip-adapter_clip_h",
                         "ip-adapter_clip_sdxl_plus_vith": "ip-adapter_clip_h",
                         "CLIP-ViT-H (IPAdapter)": "ip-adapter_clip_h", "ip-adapter_clip_sdxl": "ip-adapter_clip_g",
                         "CLIP-ViT-bigG (IPAdapter)": "ip-adapter_clip_g"}
MAX_UNITS = 8
"""The most units one generation takes (the UI shows as many as the ``delta_sampling_controlnet_units`` setting)."""
SOFT_INJECTION_BASE = 0.825


@dataclass(frozen=True)
class UnitField:
    name: str
    label: str
    infotext: str  # the key inside one unit's infotext value ("" for the image, which infotext does not carry)
    kind: str  # bool | float | int | str | choice | image
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()


UNIT_FIELDS: tuple[UnitField, ...] = (
    UnitField("enabled", "Enable unit", "", "bool", True,
              "Use this unit. In the API a listed unit is on unless it says enabled: false."),
    UnitField("model", "ControlNet / IP-Adapter model", "Model", "str", "",
              "A ControlNet or IP-Adapter file from models/ControlNet (or the ControlNet extension's model folders), "
              "by name; made for the source pair's family."),
    UnitField("image", "Control / reference image", "", "image", None,
              "The control image, or an IP-Adapter's reference image (base64 in the API). Empty in img2img: the init "
              "image is used."),
    UnitField("module", "Preprocessor / encoder", "Module", "choice", "none",
              "ControlNet: what turns the image into the control map: none (the image is the map), invert (white "
              "background, black lines -> the reverse), canny (edges; thresholds A and B). IP-Adapter: the CLIP "
              "vision encoder, ip-adapter_clip_h (ViT-H/14), ip-adapter_clip_g (ViT-bigG/14) or ip-adapter-auto "
              "(the one the adapter reads).", choices=PREPROCESSORS),
    UnitField("threshold_a", "Canny low threshold", "Threshold A", "float", 100.0,
              "Canny's lower hysteresis threshold.", 1.0, 255.0, 1.0),
    UnitField("threshold_b", "Canny high threshold", "Threshold B", "float", 200.0,
              "Canny's upper hysteresis threshold.", 1.0, 255.0, 1.0),
    UnitField("processor_res", "Preprocessor resolution", "Processor Res", "int", 512,
              "The short side the image is resized to before edge detection (unless pixel perfect).", 64, 2048, 8),
    UnitField("pixel_perfect", "Pixel perfect", "Pixel Perfect", "bool", False,
              "Pick the preprocessor resolution from the generation size and the resize mode."),
    UnitField("weight", "Control weight", "Weight", "float", 1.0,
              "Multiplies every residual of this unit. 0: the unit runs nothing.", 0.0, 2.0, 0.05),
    UnitField("guidance_start", "Starting control step", "Guidance Start", "float", 0.0,
              "Fraction of the sampling steps before which this unit is off (and does not run).", 0.0, 1.0, 0.01),
    UnitField("guidance_end", "Ending control step", "Guidance End", "float", 1.0,
              "Fraction of the sampling steps after which this unit is off (and does not run).", 0.0, 1.0, 0.01),
    UnitField("control_mode", "Control mode", "Control Mode", "choice", "Balanced",
              "Balanced: residuals on the adapted leg's cond and uncond rows. 'My prompt is more important': "
              "residuals fade towards the shallow blocks (0.825 per block). 'ControlNet is more important': the same, "
              "on the cond rows only, so CFG amplifies the control.", choices=CONTROL_MODES),
    UnitField("resize_mode", "Resize mode", "Resize Mode", "choice", "Crop and Resize",
              "How a control map of another aspect ratio is fitted: stretched, scaled to cover and centre-cropped, "
              "or scaled to fit and padded with black.", choices=RESIZE_MODES),
)
UNIT_FIELDS_BY_NAME = {f.name: f for f in UNIT_FIELDS}
UNIT_FIELDS_BY_INFOTEXT = {f.infotext: f for f in UNIT_FIELDS if f.infotext}


@dataclass(frozen=True)
class Moment:
    """Where sampling is at one denoiser call, as each host's own units read it for their window.

    * A1111 (sd-webui-controlnet): ``fraction`` = the webui's ``state.sampling_step / state.sampling_steps``, compared
      inclusively. The step counter is set by the sampler's callback after each step, so every model call of step k
      sees ``max(k - 1, 0) / steps`` (a multi-call sampler's calls of one step all see the same).
    * Forge: the call's ``sigma``; the unit is off where ``sigma > percent_to_sigma(start)`` or
      ``sigma < percent_to_sigma(end)`` (its ControlNet's and IP-Adapter's rule, the model's timestep-percent)."""

    fraction: float
    sigma: float | None = None
    percent_to_sigma: Callable[[float], float] | None = None


@dataclass(frozen=True)
class ControlUnit:
    """One validated ControlNet unit of the adapted leg. ``image`` is kept as given (base64 text, an array, a PIL
    image); it takes no part in equality, as it takes no part in the infotext."""

    model: str
    image: Any = field(default=None, compare=False, repr=False)
    module: str = "none"
    threshold_a: float = 100.0
    threshold_b: float = 200.0
    processor_res: int = 512
    pixel_perfect: bool = False
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "Balanced"
    resize_mode: str = "Crop and Resize"

    def as_dict(self, *, with_image: bool = True) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in UNIT_FIELDS if f.name != "enabled"}
        if not with_image:
            out.pop("image")
        return out

    def active_at(self, moment: Moment) -> bool:
        """Whether the unit runs at this denoiser call: weight not 0 and the call inside its window, read as the
        host's own units read it (:class:`Moment`)."""
        if self.weight == 0:
            return False
        if moment.percent_to_sigma is not None:
            assert moment.sigma is not None
            return not (moment.sigma > moment.percent_to_sigma(self.guidance_start)
                        or moment.sigma < moment.percent_to_sigma(self.guidance_end))
        return self.guidance_start <= moment.fraction <= self.guidance_end

    @property
    def is_image_prompt(self) -> bool:
        """An IP-Adapter unit (its module is a CLIP vision encoder)."""
        return self.module in IP_ENCODERS

    @property
    def cond_rows_only(self) -> bool:
        """"ControlNet is more important": the residuals go to the cond rows only (CFG then amplifies them)."""
        return self.control_mode == CONTROL_MODES[2]

    def infotext(self, model_title: str | None = None) -> str:
        """One unit as ``Module: canny, Model: name [hash], Weight: 1, ...`` (sd-webui-controlnet's format)."""
        parts = []
        for f in UNIT_FIELDS:
            if not f.infotext:
                continue
            value = model_title if f.name == "model" and model_title else getattr(self, f.name)
            parts.append(f"{f.infotext}: {_format(value)}")
        return ", ".join(parts)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _unit_value(f: UnitField, value: Any, where: str) -> Any:
    if f.kind == "bool":
        if not isinstance(value, bool):
            raise ParamError(where, f"{f.name}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if f.kind in ("float", "int"):
        return check_number(value, where=where, label=f"{f.name}: ", minimum=f.minimum, maximum=f.maximum,
                            integer=f.kind == "int")
    if f.kind == "str":
        if not isinstance(value, str):
            raise ParamError(where, f"{f.name}: expected text, got {type(value).__name__} {value!r}")
        return value.strip()
    if f.kind == "choice":
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(f.choices):
            return f.choices[value]  # sd-webui-controlnet's API also takes the modes' indices
        value = _PREPROCESSOR_ALIASES.get(value, value) if f.name == "module" else value
        if value not in f.choices:
            raise ParamError(where, f"{f.name}: expected one of {', '.join(f.choices)}; got {value!r}")
        return value
    if f.kind == "image":
        if isinstance(value, (list, tuple)):  # sd-webui-controlnet's several images: [{"image": ...}, ...]
            if not value or not all(isinstance(item, Mapping) and "image" in item for item in value):
                raise ParamError(where, "image: several images are a list of {\"image\": <base64>} dicts (as "
                                        "sd-webui-controlnet takes them)")
            for item in value:
                _unit_value(f, item["image"], where)
            return tuple(value)
        if value is not None and not isinstance(value, (str, np.ndarray, Mapping)) and not hasattr(value, "convert"):
            raise ParamError(where, f"image: expected base64 image text, got {type(value).__name__}")
        return value
    raise AssertionError(f.kind)


def parse_unit(value: Any, where: str = "controlnet") -> ControlUnit | None:
    """One unit from a dict of named fields (or a :class:`ControlUnit`); None when it says ``enabled: false``."""
    if isinstance(value, ControlUnit):
        return value
    if not isinstance(value, Mapping):
        raise ParamError(where, f"expected a unit dict such as {{'model': ..., 'image': ...}}, got {value!r:.80}")
    unknown = [k for k in value if k not in UNIT_FIELDS_BY_NAME]
    if unknown:
        raise ParamError(where, f"unknown unit field {unknown[0]!r}; known: {', '.join(UNIT_FIELDS_BY_NAME)}")
    checked = {k: _unit_value(UNIT_FIELDS_BY_NAME[k], v, where) for k, v in value.items()}
    if not checked.pop("enabled", True):
        return None
    if not checked.get("model"):
        raise ParamError(where, "model: choose the ControlNet file of this unit")
    if "," in checked["model"]:
        raise ParamError(where, f"model: a ControlNet name must not contain ',' ({checked['model']!r})")
    unit = ControlUnit(**checked)
    if unit.guidance_start > unit.guidance_end:
        raise ParamError(where, f"guidance_end {unit.guidance_end:g} is before guidance_start {unit.guidance_start:g}")
    if unit.module == "canny" and unit.threshold_a > unit.threshold_b:
        raise ParamError(where, f"threshold_a {unit.threshold_a:g} (canny low) is above threshold_b "
                                f"{unit.threshold_b:g} (canny high)")
    return unit


def parse_units(value: Any, where: str = "controlnet") -> tuple[ControlUnit, ...]:
    """Units from the API: a list of unit dicts (disabled ones dropped), or None / [] for none."""
    if value is None or value == "":
        return ()
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ParamError(where, f"expected a list of unit dicts, got {type(value).__name__}")
    units = []
    for i, item in enumerate(value):
        unit = parse_unit(item, f"{where}[{i}]")
        if unit is not None:
            units.append(unit)
    if len(units) > MAX_UNITS:
        raise ParamError(where, f"{len(units)} units; at most {MAX_UNITS} are supported")
    return tuple(units)


def units_from_flat(values: Sequence[Any], where: str = "controlnet") -> tuple[ControlUnit, ...]:
    """Units from the UI's flat positional values: :data:`UNIT_FIELDS` in order, once per unit tab."""
    width = len(UNIT_FIELDS)
    if len(values) % width:
        raise ParamError(where, f"{len(values)} trailing positional values do not make whole units of {width} fields")
    units = []
    for i in range(0, len(values), width):
        fields = dict(zip(UNIT_FIELDS_BY_NAME, values[i:i + width], strict=True))
        if fields["enabled"] is not True:
            continue  # an unused tab: its other fields may hold anything
        unit = parse_unit(fields, f"{where}[{i // width}]")
        if unit is not None:
            units.append(unit)
    return tuple(units)


_INFOTEXT_PART = re.compile(r"\s*([\w ]+?):\s*([^,]*)(?:,|$)")


def unit_from_infotext(text: str, where: str = "controlnet") -> ControlUnit:
    """The inverse of :meth:`ControlUnit.infotext` (without the image, which infotext never carries)."""
    values: dict[str, Any] = {}
    for key, raw_value in _INFOTEXT_PART.findall(text):
        f = UNIT_FIELDS_BY_INFOTEXT.get(key.strip())
        if f is None:
            continue
        raw = raw_value.strip()
        if f.kind == "bool":
            values[f.name] = raw.lower() in ("true", "1", "yes")
        elif f.kind in ("float", "int"):
            try:
                number = float(raw)
            except ValueError:
                raise ParamError(where, f"infotext value {raw!r} of {key} is not a number") from None
            values[f.name] = int(number) if f.kind == "int" and number.is_integer() else number
        else:
            values[f.name] = raw
    unit = parse_unit(values, where)
    assert unit is not None
    return unit


# --- residual scales -----------------------------------------------------------------------------------------------


def soft_injection_table(count: int, middle: float | None = None) -> list[float]:
    """0.825^(12 - i) for i < 13, cut to ``count`` entries: an SDXL ControlNet (10 residuals) gets the first 10 of the
    SD1 table, middle residual 0.825^3, as sd-webui-controlnet and Forge do. ``middle`` replaces the last entry: Forge
    fixes it by family (1 for SD1/SD2, 0.825^3 for SDXL), which is the same for the real families' residual counts
    (13 and 10) and differs only for other counts."""
    length = max(13, count)
    table = [SOFT_INJECTION_BASE ** (length - 1 - i) for i in range(length)][:count]
    if middle is not None and table:
        table[-1] = middle
    return table


def forge_soft_middle(family: str) -> float:
    """Forge's middle-residual factor in the soft modes (its ControlNet script: 0.561515625 for SDXL, else 1)."""
    return SOFT_INJECTION_BASE ** 3 if family == "sdxl" else 1.0


def residual_scales(unit: ControlUnit, count: int, *, soft_middle: float | None = None) -> list[float]:
    """The factor of each of a unit's ``count`` residuals (input blocks first, the middle one last)."""
    if unit.control_mode == CONTROL_MODES[0]:
        return [unit.weight] * count
    return [unit.weight * s for s in soft_injection_table(count, soft_middle)]


# --- control maps --------------------------------------------------------------------------------------------------


def decode_image(value: Any, where: str = "controlnet") -> np.ndarray:
    """An RGB uint8 array (H, W, 3) from base64 text (a data URL too), an array, a PIL image or a gradio image dict."""
    if isinstance(value, Mapping):  # gradio's sketch / upload-with-mask form
        value = value.get("image")
    if value is None:
        raise ParamError(where, "image: this unit has no control image")
    if isinstance(value, str):
        from PIL import Image

        text = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            data = base64.b64decode(text, validate=True)
            value = Image.open(io.BytesIO(data))
            value.load()
        except (binascii.Error, ValueError, OSError) as exc:
            raise ParamError(where, f"image: not a base64-encoded PNG/JPEG image ({type(exc).__name__}: "
                                    f"{str(exc)[:80]})") from None
    if hasattr(value, "convert"):
        value = np.asarray(value.convert("RGB"))
    array = np.asarray(value)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ParamError(where, f"image: expected an (H, W, 3) image, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
            raise ParamError(where, "image: pixel values must be finite numbers")
        array = np.clip(array, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array[:, :, :3])


def pixel_perfect_resolution(image: np.ndarray, width: int, height: int, resize_mode: str) -> int:
    """The preprocessor resolution at which the map comes out at the generation's size (sd-webui-controlnet's rule)."""
    raw_h, raw_w = image.shape[:2]
    k_h, k_w = height / raw_h, width / raw_w
    k = min(k_h, k_w) if resize_mode == RESIZE_MODES[2] else max(k_h, k_w)
    return round(k * min(raw_h, raw_w))


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    if (image.shape[1], image.shape[0]) == (width, height):
        return image
    shrinking = width * height < image.shape[0] * image.shape[1]
    out = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    if len(np.unique(image)) <= 2:  # a binary map (edges) stays binary: no grey halo from the interpolation
        low, high = int(image.min()), int(image.max())
        out = np.where(out.astype(np.int32) * 2 >= low + high, high, low).astype(np.uint8)
    return out


def preprocess(unit: ControlUnit, image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The unit's preprocessor applied to ``image`` (the generation is ``width`` x ``height``)."""
    if unit.module == "none" or unit.is_image_prompt:
        return image  # an IP-Adapter's reference image goes to its encoder as it is
    if unit.module == "invert":
        return 255 - image
    import cv2

    resolution = (pixel_perfect_resolution(image, width, height, unit.resize_mode) if unit.pixel_perfect
                  else unit.processor_res)
    h, w = image.shape[:2]
    k = resolution / min(h, w)
    work = _resize(image, max(1, round(w * k)), max(1, round(h * k)))
    edges = cv2.Canny(work, unit.threshold_a, unit.threshold_b)
    return np.repeat(edges[:, :, None], 3, axis=2)


def fit(image: np.ndarray, width: int, height: int, resize_mode: str) -> np.ndarray:
    """The map fitted to ``width`` x ``height`` pixels by the resize mode."""
    h, w = image.shape[:2]
    if resize_mode == RESIZE_MODES[0]:
        return _resize(image, width, height)
    cover = resize_mode == RESIZE_MODES[1]
    k = max(width / w, height / h) if cover else min(width / w, height / h)
    new_w, new_h = max(1, round(w * k)), max(1, round(h * k))
    scaled = _resize(image, new_w, new_h)
    if cover:
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return np.ascontiguousarray(scaled[top:top + height, left:left + width])
    out = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top:top + new_h, left:left + new_w] = scaled[:height, :width]
    return out


def control_map(unit: ControlUnit, image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Preprocess, then fit to the generation's size: the map the ControlNet sees (uint8 RGB, H x W)."""
    return fit(preprocess(unit, image, width, height), width, height, unit.resize_mode)


def hint_tensor(control: np.ndarray) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1]: a control map as every ControlNet takes it."""
    return torch.from_numpy(np.ascontiguousarray(control)).float().div(255.0).permute(2, 0, 1).unsqueeze(0)


def encode_png(image: np.ndarray) -> str:
    """Base64 PNG text of an RGB uint8 array (for the preview route)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --- one generation's units ----------------------------------------------------------------------------------------


class ControlStack:
    """The adapted leg's units for one generation: each with its network (a ControlNet or an IP-Adapter) and decoded
    image. ControlNet hints are made once per pixel size (a hires pass or a pooled source grid asks for another);
    IP-Adapter tokens once per generation (:meth:`set_tokens`, by the host layer, which owns the encoders). Both are
    kept until the generation ends."""

    def __init__(self, entries: Sequence[tuple[ControlUnit, Any, np.ndarray]], *,
                 soft_middle: float | None = None) -> None:
        self.entries = list(entries)
        self.soft_middle = soft_middle  # the host's middle factor in the soft modes (Forge's), or the table's
        self._hints: dict[tuple[int, int, int], torch.Tensor] = {}
        self.tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # IP unit index -> (cond, uncond) tokens
        self.calls = 0  # ControlNet forwards run (each unit, each batched call)

    def count_call(self) -> None:
        self.calls += 1

    def set_tokens(self, index: int, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        self.tokens[index] = (cond, uncond)

    def any_active(self, moment: Moment) -> bool:
        return any(unit.active_at(moment) for unit, _, _ in self.entries)

    def hint(self, index: int, width: int, height: int) -> torch.Tensor:
        key = (index, width, height)
        if key not in self._hints:
            unit, _, image = self.entries[index]
            self._hints[key] = hint_tensor(control_map(unit, image, width, height))
        return self._hints[key]

    def active(self, moment: Moment, width: int, height: int) -> list:
        """The ControlNet units that run at this call, as :class:`lib_delta.controlnet.ActiveControl` for a ``width``
        x ``height`` pixel grid; a unit at weight 0 or outside its window is not among them (it runs nothing)."""
        from .controlnet import ActiveControl

        out = []
        for index, (unit, net, _image) in enumerate(self.entries):
            if unit.is_image_prompt or not unit.active_at(moment):
                continue
            count = len(net.zero_convs) + 1
            out.append(ActiveControl(net, self.hint(index, width, height),
                                     residual_scales(unit, count, soft_middle=self.soft_middle),
                                     unit.cond_rows_only))
        return out

    def image_prompts(self, moment: Moment) -> list:
        """The IP-Adapter units that run at this call, as :class:`lib_delta.ip_adapter.ImagePrompt`."""
        from .ip_adapter import ImagePrompt

        out = []
        for index, (unit, adapter, _image) in enumerate(self.entries):
            if unit.is_image_prompt and unit.active_at(moment):
                cond, uncond = self.tokens[index]
                out.append(ImagePrompt(adapter, unit.weight, cond, uncond))
        return out
