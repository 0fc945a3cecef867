"""Prompt LoRA tags of another family: which family a file is for, and the per-batch carry decision."""

from __future__ import annotations

import pytest

from lib_delta.errors import ParamError
from lib_delta.lora_keys import compvis_to_kohya, standard_module_paths
from lib_delta.params import LoraSpec
from lib_delta.prompt_loras import CarrySettings, PromptLora, declared_family, lora_family, plan_carry


def lora_keys(family: str, *, text_encoder: bool = True) -> list[str]:
    """Kohya keys of a LoRA over every attention linear of the full-size ``family`` model."""
    keys = []
    for path, kind in standard_module_paths(family).items():
        if kind == "mha" or ("attn" not in path and "self_attn" not in path):
            continue
        if not text_encoder and not path.startswith("model.diffusion_model."):
            continue
        key = compvis_to_kohya(path, family)
        keys += [f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"]
    return keys


@pytest.mark.parametrize(("metadata", "host", "family"), [
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, None, "sdxl"),
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, None, "sd1"),
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "SD1", "sdxl"),
    ({"ss_base_model_version": "sd_v1"}, None, "sd1"),
    ({"ss_v2": "True"}, None, "sd2"),
    ({"ss_v2": "False"}, None, "sd1"),
    ({"ss_network_module": "networks.lora"}, "SD1", "sd1"),  # A1111 reads any metadata as SD1
    ({"ss_network_module": "networks.lora"}, "Unknown", None),  # Forge does not
    ({}, None, None),
])
def test_declared_family_reads_model_spec_kohya_and_the_host(metadata, host, family):
    assert declared_family(metadata, host) == family


def test_lora_family_by_the_layer_names_with_metadata_for_ties():
    sd1, sdxl = lora_keys("sd1"), lora_keys("sdxl")
    # names that fit the target as well as any other family: the host's
    assert lora_family(sd1, "sd1") is None
    assert lora_family(sdxl, "sdxl") is None
    # SDXL's names are its own
    assert lora_family(sdxl, "sd1") == "sdxl"
    assert lora_family(sdxl, "sd2") == "sdxl"
    # SD1's UNet and CLIP-L names exist in SD2's layout too: a tie the metadata, the context width, or else SD1 wins
    assert lora_family(sd1, "sdxl", declared="sd2") == "sd2"
    assert lora_family(sd1, "sdxl", context_width=1024) == "sd2"
    assert lora_family(sd1, "sdxl", declared="sd1", context_width=1024) == "sd1"  # the metadata first
    assert lora_family(sd1, "sdxl", context_width=32) == "sd1"
    assert lora_family(sd1, "sdxl") == "sd1"
    assert lora_family(lora_keys("sd2"), "sdxl") == "sd2"  # OpenCLIP's layers 12-22 are SD2's alone
    # a tie that includes the target stays the target's unless the metadata names the other family
    assert lora_family(sd1, "sd2") is None
    assert lora_family(sd1, "sd2", declared="sd1") == "sd1"
    assert lora_family(sd1, "sd2", declared="sdxl") is None  # metadata of a family the names rule out
    assert lora_family(["lora_unet_nothing_here.lora_down.weight"], "sdxl", declared="sd1") is None


def tag(name, family, weight=0.8):
    return PromptLora(name, weight, family)


BASES = CarrySettings(bases={"sd1": "tiny-sd1-a"})


def test_plan_carries_the_configured_family_and_withholds_it_from_the_host():
    images = [[tag("sd1-style", "sd1"), tag("xl-detail", None)]]
    plan = plan_carry(images, "sdxl", BASES, host_does="A1111 applies parts")
    assert (plan.family, plan.base, plan.loras) == ("sd1", "tiny-sd1-a", (LoraSpec("sd1-style", 0.8),))
    assert plan.withheld == {"sd1-style"} and not plan.reported  # the SDXL LoRA stays the host's


def test_plan_without_a_base_reports_and_leaves_the_tag_to_the_host():
    plan = plan_carry([[tag("sd1-style", "sd1")]], "sdxl", CarrySettings(bases={}), host_does="A1111 applies parts")
    assert not plan.loras and not plan.withheld
    ((reported, why),) = plan.reported
    assert reported.name == "sd1-style" and why.startswith("A1111 applies parts") and "SD1 source base" in why
    off = plan_carry([[tag("sd1-style", "sd1")]], "sdxl", CarrySettings(bases={"sd1": "x"}, carry=False), host_does="h")
    assert not off.loras and not off.withheld and "switched off" in off.reported[0][1]


def test_plan_carries_one_family_and_drops_a_third_one_with_a_reason():
    images = [[tag("sd2-thing", "sd2"), tag("sd1-style", "sd1")]]
    plan = plan_carry(images, "sdxl", CarrySettings(bases={"sd1": "a", "sd2": "b"}))
    assert plan.family == "sd2" and plan.loras == (LoraSpec("sd2-thing", 0.8),)  # the first in prompt order
    assert plan.withheld == {"sd2-thing", "sd1-style"} and "not applied" in plan.reported[0][1]
    # the accordion's pair decides the family; the others are not applied
    plan = plan_carry(images, "sdxl", CarrySettings(bases={}), pair_family="sd1")
    assert plan.loras == (LoraSpec("sd1-style", 0.8),) and plan.withheld == {"sd2-thing", "sd1-style"}
    assert [t.name for t, _ in plan.reported] == ["sd2-thing"]


def test_plan_refuses_a_batch_whose_images_carry_different_sets():
    images = [[tag("sd1-style", "sd1")], [tag("sd1-style", "sd1", weight=0.5)]]
    with pytest.raises(ParamError, match=r"image 3: sd1-style:0.8; image 4: sd1-style:0.5"):
        plan_carry(images, "sdxl", BASES, first_image=2)
    with pytest.raises(ParamError, match=r"image 2: none"):
        plan_carry([[tag("sd1-style", "sd1")], []], "sdxl", BASES)
    same = plan_carry([[tag("s", "sd1")], [tag("s", "sd1")]], "sdxl", BASES)
    assert same.loras == (LoraSpec("s", 0.8),)
    assert plan_carry([[tag("x", None)], []], "sdxl", BASES).empty  # tags of the target's family: nothing to do
