"""LoRA tags of another model family in the prompt: which family a file was made for, and what to do with the tags.

Host-free. A prompt's ``<lora:name:weight>`` tag names a file made for some family; when that is not the target's
family the host misapplies it (A1111 applies the keys whose layer names happen to exist in the target, Forge drops the
file). :func:`lora_family` says which other family a file is for, or None when it fits the target or is unclear (then
the host keeps it, exactly as without Delta Sampling). :func:`plan_carry` decides, for one batch, which tags Delta
Sampling carries on a source pair, which it only reports, and which it leaves to the host.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import ParamError
from .lora_keys import FAMILIES, layers_named_per_family
from .params import LoraSpec

FAMILY_LABELS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}

_ARCHITECTURES = {  # modelspec.architecture values (Stability's model-spec, written by kohya's sd-scripts)
    "stable-diffusion-v1/lora": "sd1",
    "stable-diffusion-v2-512/lora": "sd2",
    "stable-diffusion-v2-768-v/lora": "sd2",
    "stable-diffusion-xl-v1-base/lora": "sdxl",
}


def declared_family(metadata: Mapping[str, str] | None, host_version: str | None = None) -> str | None:
    """The family a LoRA file's metadata names: model-spec's architecture, or kohya's ``ss_base_model_version`` /
    ``ss_v2``; else the host's own reading (``NetworkOnDisk.sd_version``: ``SD1``/``SD2``/``SDXL``)."""
    metadata = metadata or {}
    architecture = str(metadata.get("modelspec.architecture", ""))
    if architecture in _ARCHITECTURES:
        return _ARCHITECTURES[architecture]
    base = str(metadata.get("ss_base_model_version", ""))
    if base.startswith("sdxl_"):
        return "sdxl"
    if base.startswith(("sd_v2", "sd_2")) or str(metadata.get("ss_v2", "")) == "True":
        return "sd2"
    if base.startswith(("sd_v1", "sd_1")) or str(metadata.get("ss_v2", "")) == "False":
        return "sd1"
    version = (host_version or "").lower()
    return version if version in FAMILIES else None


CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # the full-size UNets' cross-attention context widths


def context_width_key(key: str) -> bool:
    """Whether a LoRA key's tensor tells the UNet's context width: a cross-attention key projection's down matrix."""
    return "attn2_to_k" in key and key.endswith("lora_down.weight")


def lora_family(keys: Iterable[str], target: str, declared: str | None = None,
                context_width: int | None = None) -> str | None:
    """The family a LoRA file was made for, when it is another family than ``target``'s; None when the file fits the
    target, or names no layer of any family (both: the host keeps the tag).

    The keys decide first: the family whose standard layout names the most of the file's layers. A tie that includes
    the target leaves the file to the target unless its metadata (``declared``) names another of the tied families
    (SD1 and SD2 UNets have the same layer names). A tie among other families (an SD1-or-SD2 file in an SDXL prompt)
    is broken by the metadata, then by the cross-attention's ``context_width`` (768 SD1, 1024 SD2), then in favour
    of SD1: its layout holds every name of such a file, while SD2 files usually also name OpenCLIP's layers 12-22.
    """
    counts = layers_named_per_family(keys)
    best = max(counts.values())
    if best == 0:
        return None  # names no layer of any family: not a LoRA DS can judge
    leaders = [family for family in FAMILIES if counts[family] == best]
    if target in leaders:
        return declared if declared in leaders and declared != target else None
    if len(leaders) == 1:
        return leaders[0]
    for evidence in (declared, CONTEXT_WIDTHS.get(context_width or 0)):
        if evidence in leaders:
            return evidence
    return "sd1" if "sd1" in leaders else None


@dataclass(frozen=True)
class PromptLora:
    """One ``<lora:…>`` tag of one image's prompt, with the family its file was made for (None: the host's)."""

    name: str
    weight: float
    family: str | None

    @property
    def spec(self) -> LoraSpec:
        return LoraSpec(self.name, self.weight)


@dataclass(frozen=True)
class CarrySettings:
    """The webui settings that govern carried LoRAs."""

    bases: Mapping[str, str]  # family -> source base checkpoint ("" or absent: none)
    carry: bool = True
    scale: float = 1.0
    source_resolution: str = "target"


@dataclass(frozen=True)
class CarryPlan:
    """What happens to one batch's LoRA tags of another family."""

    family: str | None = None  # the family carried on a source pair (None: nothing carried)
    base: str = ""  # its source base checkpoint (accordion off)
    loras: tuple[LoraSpec, ...] = ()  # carried, in prompt order
    reported: tuple[tuple[PromptLora, str], ...] = ()  # of another family, not carried: (tag, why)
    withheld: frozenset[str] = field(default_factory=frozenset)  # names the host must not apply (carried or dropped)

    @property
    def empty(self) -> bool:
        return not self.loras and not self.reported


def plan_carry(images: Sequence[Sequence[PromptLora]], target: str, settings: CarrySettings, *,
               pair_family: str | None = None, host_does: str = "", first_image: int = 0) -> CarryPlan:
    """Decide one batch: ``images`` are each image's tags, ``pair_family`` the accordion's source family when it is
    on (its pair takes the carried LoRAs of that family; others are reported and not applied), ``first_image`` the
    index of the batch's first image in the generation.

    With the accordion off, the first family (in prompt order) that has a source base configured is carried; other
    families are reported, and not applied when some family is carried (DS runs one source pair). A family with no
    base configured, or with carrying switched off, is reported and left to the host (``host_does`` says what that
    is). Images of one batch that would carry different sets raise :class:`ParamError` naming them.
    """
    foreign = [[tag for tag in tags if tag.family is not None and tag.family != target] for tags in images]
    tags = [tag for per_image in foreign for tag in per_image]
    if not tags:
        return CarryPlan()
    if pair_family is not None:
        family, base = pair_family, ""
    else:
        usable = [tag.family for tag in tags if settings.carry and settings.bases.get(tag.family)]
        family = usable[0] if usable else None
        base = settings.bases.get(family, "") if family else ""
    if family is not None:
        sets = [tuple(tag.spec for tag in per_image if tag.family == family) for per_image in foreign]
        if len(set(sets)) > 1:
            described = "; ".join(f"image {first_image + i + 1}: {', '.join(map(str, s)) or 'none'}"
                                  for i, s in enumerate(sets))
            raise ParamError("prompt", f"the images of one batch carry different {FAMILY_LABELS[family]} LoRAs "
                                       f"({described}); Delta Sampling runs one source pair per batch. Use batch "
                                       "size 1 (each batch then carries its own) or the same LoRA tags in every "
                                       "prompt of the batch")
        carried = sets[0] if sets else ()
    else:
        carried = ()
    one_pair = pair_family if pair_family is not None else (family if carried else None)
    reported, withheld = [], set()
    seen: set[str] = set()
    for tag in tags:
        if tag.family == family and carried:
            withheld.add(tag.name)
            continue
        if tag.name in seen:
            continue
        seen.add(tag.name)
        label = FAMILY_LABELS[tag.family]
        if one_pair is not None:
            withheld.add(tag.name)
            why = (f"not applied: this generation's source pair is {FAMILY_LABELS[one_pair]}, and the host would "
                   f"misapply a {label} LoRA")
        elif not settings.bases.get(tag.family):
            why = (f"{host_does}; set Settings > Delta Sampling > {label} source base to carry it with Delta "
                   "Sampling")
        else:
            why = f"{host_does}; carrying is switched off in Settings > Delta Sampling"
        reported.append((tag, why))
    return CarryPlan(family if carried else None, base if carried else "", carried, tuple(reported),
                     frozenset(withheld))
