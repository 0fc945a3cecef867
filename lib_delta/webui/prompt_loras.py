"""Prompt LoRA tags of another family, in the webui: reading the tags and files, the settings, withholding tags from
the host's Lora extension, and the report (:mod:`lib_delta.prompt_loras` decides).

The host parses a batch's tags in ``p.parse_extra_network_prompts`` (after the scripts' ``before_process_batch``, before
it activates the networks), which also strips them from ``p.prompts`` and ``p.hr_prompts``; ``p.all_prompts`` keeps them
for the infotext. :mod:`.hooks` wraps that method for each generation: the tags are read per image from the prompts
before the call, and the carried ones are removed from the parsed ``extra_network_data`` after it, so the host never
applies them, not even the parts whose names fit the target.
"""

from __future__ import annotations

import collections
import os
from typing import Any

from ..errors import ParamError
from ..params import LORA_WEIGHT_RANGE
from ..prompt_loras import (
    FAMILY_LABELS,
    CarryPlan,
    CarrySettings,
    PromptLora,
    context_width_key,
    declared_family,
    lora_family,
)
from ..resolution import RESOLUTION_CHOICES

LORA_TAGS = ("lora", "lyco")  # A1111 registers <lyco:…> as an alias of <lora:…>
BASE_OPTIONS = {family: f"delta_sampling_carry_base_{family}" for family in FAMILY_LABELS}
CARRY_OPTION = "delta_sampling_carry_loras"
SCALE_OPTION = "delta_sampling_carry_scale"
RESOLUTION_OPTION = "delta_sampling_carry_resolution"
DEFAULT_SCALE = 1.0
DEFAULT_RESOLUTION = "target"
NONE_BASE = "None"

CARRIED_INFOTEXT = "Delta carried LoRAs"
CARRIED_BASE_INFOTEXT = "Delta carried base"
CARRIED_SETTINGS_INFOTEXT = "Delta carried settings"
NOTE_INFOTEXT = "Delta LoRA note"
INFOTEXT_KEYS = (CARRIED_INFOTEXT, CARRIED_BASE_INFOTEXT, CARRIED_SETTINGS_INFOTEXT, NOTE_INFOTEXT)


def carry_settings() -> CarrySettings:
    from modules import shared

    opts = shared.opts
    bases = {}
    for family, key in BASE_OPTIONS.items():
        value = getattr(opts, key, NONE_BASE) or NONE_BASE
        if value != NONE_BASE:
            bases[family] = str(value)
    resolution = str(getattr(opts, RESOLUTION_OPTION, DEFAULT_RESOLUTION))
    return CarrySettings(bases=bases, carry=bool(getattr(opts, CARRY_OPTION, True)),
                         scale=float(getattr(opts, SCALE_OPTION, DEFAULT_SCALE)),
                         source_resolution=resolution if resolution in RESOLUTION_CHOICES else DEFAULT_RESOLUTION)


def host_does(forge: bool) -> str:
    """What the host itself does with a LoRA of another family (read in both hosts; see README)."""
    if forge:
        return "Forge drops it ('LoRA version mismatch')"
    return "A1111 applies only the parts whose layer names fit this model, to unrelated layers"


class FamilyVerdicts:
    """Which family each LoRA file is for (reading a file's keys costs a header read, or a load for .pt files): a
    cache owned by this module, keyed by file, size and time, at most :attr:`LIMIT` entries."""

    LIMIT = 256

    def __init__(self) -> None:
        self._verdicts: collections.OrderedDict[tuple, str | None] = collections.OrderedDict()

    def family(self, on_disk: Any, target: str) -> str | None:
        st = os.stat(on_disk.filename)
        key = (os.path.abspath(on_disk.filename), st.st_size, st.st_mtime, target)
        if key in self._verdicts:
            self._verdicts.move_to_end(key)
            return self._verdicts[key]
        version = getattr(getattr(on_disk, "sd_version", None), "name", None)
        declared = declared_family(getattr(on_disk, "metadata", None), version)
        keys, width = _file_keys(on_disk.filename)
        verdict = lora_family(keys, target, declared, width)
        self._verdicts[key] = verdict
        while len(self._verdicts) > self.LIMIT:
            self._verdicts.popitem(last=False)
        return verdict


VERDICTS = FamilyVerdicts()


def _file_keys(filename: str) -> tuple[list[str], int | None]:
    """The file's keys, and the UNet context width its cross-attention keys tell (None: none of them)."""
    if filename.lower().endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(filename, framework="pt", device="cpu") as f:  # the header only
            keys = list(f.keys())
            width = next((f.get_slice(k).get_shape()[1] for k in keys if context_width_key(k)), None)
        return keys, width
    from .source_models import read_checked_state_dict

    state_dict = read_checked_state_dict(filename, "LoRA file")
    width = next((value.shape[1] for key, value in state_dict.items() if context_width_key(key)), None)
    return list(state_dict), width


def _find_network(name: str) -> Any:
    try:
        import networks  # the host's Lora extension (A1111 extensions-builtin/Lora, Forge sd_forge_lora)
    except ImportError:
        return None
    if not networks.available_networks:
        networks.list_available_networks()
    return networks.available_networks.get(name) or networks.available_network_aliases.get(name)


def _family_or_none(on_disk: Any, target: str) -> str | None:
    """The file's family, or None (left to the host, which reports unreadable files itself) when it cannot be read."""
    if on_disk is None:
        return None  # not a known LoRA: the host says "networks not found"
    try:
        return VERDICTS.family(on_disk, target)
    except Exception as exc:  # a damaged file is the host's to report, as without Delta Sampling
        print(f"Delta Sampling: cannot read the keys of {on_disk.filename} ({type(exc).__name__}: {exc}); the webui "
              "handles its tag as usual")
        return None


def _tag_weight(params: Any, where: str) -> float:
    """The tag's multiplier as the hosts read it: ``<lora:name:te:unet>`` or ``te=``/``unet=``; one weight only."""
    positional, named = list(params.positional), dict(params.named)
    try:
        te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
        unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
    except (TypeError, ValueError):
        raise ParamError("prompt", f"{where}: the LoRA tag's weight is not a number") from None
    if te != unet:
        raise ParamError("prompt", f"{where}: the tag gives the text encoder {te:g} and the UNet {unet:g}; a LoRA "
                                   "carried onto another family's source pair takes one weight")
    if not LORA_WEIGHT_RANGE[0] <= te <= LORA_WEIGHT_RANGE[1]:
        raise ParamError("prompt", f"{where}: weight {te:g} is outside {LORA_WEIGHT_RANGE[0]:g}..."
                                   f"{LORA_WEIGHT_RANGE[1]:g}")
    return te


def prompt_tags(prompts: list[str], first_image: int, target: str) -> list[list[PromptLora]]:
    """Each prompt's LoRA tags with the family of their files (None: fits the target, unclear, or not found)."""
    from modules import extra_networks

    images = []
    for offset, prompt in enumerate(prompts):
        _, data = extra_networks.parse_prompts([prompt])
        tags = []
        for kind in LORA_TAGS:
            for params in data.get(kind, []):
                if not params.positional:
                    continue
                name = str(params.positional[0])
                on_disk = _find_network(name)
                family = _family_or_none(on_disk, target)
                weight = _tag_weight(params, f"<{kind}:{name}> in image {first_image + offset + 1}") if family else 1.0
                tags.append(PromptLora(name, weight, family))
        images.append(tags)
    return images


def withhold(p: Any, names: frozenset[str]) -> None:
    """Remove the tags of ``names`` from what the host will activate, in both passes."""
    if not names:
        return
    for attr in ("extra_network_data", "hr_extra_network_data"):
        data = getattr(p, attr, None)
        if not data:
            continue
        for kind in LORA_TAGS:
            if kind not in data:
                continue
            kept = [params for params in data[kind] if not params.positional or params.positional[0] not in names]
            if kept:
                data[kind] = kept
            else:
                del data[kind]  # as if the prompt had no such tag: the host then deactivates its networks


def reported_text(plan: CarryPlan) -> str:
    """The infotext / console note for tags of another family that are not carried."""
    return "; ".join(f"{tag.name} is an {FAMILY_LABELS[tag.family]} LoRA: {why}" for tag, why in plan.reported)
