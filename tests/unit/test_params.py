import dataclasses
import json

import pytest

from lib_delta import SETTINGS, DeltaParams, LoraSpec, ParamError
from lib_delta.params import NONE_CHOICE, parse_loras

FULL = dict(
    enabled=True, scale=1.25, source="base [abc123]", adapted="tuned [def456]",
    loras=[{"name": "style", "weight": 0.8}, {"name": "detail", "weight": -0.5}],
    start=0.1, end=0.9, decay="cosine", source_prompt="a cat, (fluffy:1.2)", source_negative_prompt="blurry",
    source_cfg_scale=5.0, hires=False, guard=1.5, reuse_steps=2, cond_only=True, batch_legs=False,
)


def test_dataclass_and_settings_table_agree():
    fields = dataclasses.fields(DeltaParams)
    assert [f.name for f in fields] == [s.name for s in SETTINGS]
    defaults = DeltaParams()
    for s in SETTINGS:
        assert getattr(defaults, s.name) == s.default, s.name
        assert s.help and s.label and s.infotext
    assert len({s.infotext for s in SETTINGS}) == len(SETTINGS)


def test_infotext_keys_are_parseable_by_the_webui():
    # The webui's infotext parser only accepts keys matching \w[\w \-/]+ (no ':', ',', '(' or '.').
    import re

    for s in SETTINGS:
        assert re.fullmatch(r"\w[\w \-/]+", s.infotext), s.infotext


def test_positional_round_trip():
    p = DeltaParams.create(**FULL)
    assert p.loras == (LoraSpec("style", 0.8), LoraSpec("detail", -0.5))
    assert DeltaParams.from_positional(p.positional()) == p
    assert DeltaParams.from_api(p.positional()) == p


def test_missing_trailing_positional_args_take_defaults():
    p = DeltaParams.from_positional([True, 2.0, "base", "tuned"])
    assert (p.enabled, p.scale, p.source, p.adapted, p.end, p.batch_legs) == (True, 2.0, "base", "tuned", 1.0, True)


def test_named_dict_in_first_slot_wins_over_ui_defaults():
    positional_defaults = DeltaParams().positional()
    args = [{"enabled": True, "scale": 1, "source": "base", "loras": [{"name": "style"}]}, *positional_defaults[1:]]
    p = DeltaParams.from_api(args)
    assert (p.enabled, p.scale, p.source, p.adapted, p.loras) == (True, 1.0, "base", None, (LoraSpec("style", 1.0),))
    assert DeltaParams.from_api({"enabled": False}) == DeltaParams()


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"strength": 1.0}, "strength", "unknown setting"),
        ({"scale": "abc"}, "scale", "expected a number, got str"),
        ({"scale": True}, "scale", "expected a number, got bool"),
        ({"scale": float("nan")}, "scale", "finite"),
        ({"scale": 1e9}, "scale", "above the maximum 10"),
        ({"enabled": "yes"}, "enabled", "expected true or false"),
        ({"start": -0.1}, "start", "below the minimum 0"),
        ({"start": 0.8, "end": 0.2}, "end", "before window start"),
        ({"decay": "exp"}, "decay", "expected one of constant, linear, cosine, sigmoid"),
        ({"reuse_steps": 1.5}, "reuse_steps", "whole number"),
        ({"source": 3}, "source", "expected text"),
        ({"adapted": 3}, "adapted", "checkpoint name or null"),
        ({"loras": 5}, "loras", "expected a list"),
        ({"loras": [{"name": "a", "strength": 1}]}, "loras", "unknown key"),
        ({"loras": [{"weight": 1}]}, "loras", "has no name"),
        ({"loras": [{"name": "a", "weight": "x"}]}, "loras weight", "expected a number"),
        ({"loras": "a:lots"}, "loras", "'lots' of 'a' is not a number"),
        ({"source_cfg_scale": 0.5}, "source_cfg_scale", "at least 1"),
        ({"enabled": True, "adapted": "x"}, "source", "choose the source base"),
        ({"enabled": True, "source": None, "adapted": "x"}, "source", "choose the source base"),  # gradio 4's empty
        ({"enabled": True, "source": "x"}, "adapted", "adapted checkpoint, or at least one LoRA"),
    ],
)
def test_bad_values_name_the_field(values, field, message):
    with pytest.raises(ParamError, match=message) as info:
        DeltaParams.create(**values)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_too_many_positional_args():
    with pytest.raises(ParamError, match="at most"):
        DeltaParams.from_positional([False] * (len(SETTINGS) + 1))


def test_adapted_none_spellings():
    for value in (None, "", NONE_CHOICE):
        assert DeltaParams.create(adapted=value).adapted is None
    assert DeltaParams.create(adapted="x").positional()[3] == "x"
    assert DeltaParams().positional()[3] == NONE_CHOICE


def test_lora_text_forms():
    assert parse_loras("style:0.8, detail") == (LoraSpec("style", 0.8), LoraSpec("detail", 1.0))
    assert parse_loras([["a", 2], "b:0.5"]) == (LoraSpec("a", 2.0), LoraSpec("b", 0.5))
    assert parse_loras(" ") == ()
    assert str(LoraSpec("a", 0.5)) == "a:0.5"


def test_infotext_round_trip_through_text():
    p = DeltaParams.create(**FULL)
    entries = p.infotext()
    assert entries["Delta scale"] == 1.25 and entries["Delta LoRAs"] == "style:0.8, detail:-0.5"
    as_text = {k: str(v) for k, v in entries.items()}  # what parsing the infotext line gives back
    assert DeltaParams.from_infotext(as_text) == p


def test_infotext_omits_defaults_of_advanced_settings_and_paste_resets_them():
    p = DeltaParams.create(enabled=True, source="base", loras="style:1")
    entries = p.infotext()
    assert set(entries) == {"Delta sampling", "Delta scale", "Delta source", "Delta LoRAs"}
    assert DeltaParams.from_infotext({k: str(v) for k, v in entries.items()}) == p
    assert DeltaParams().infotext() == {}
    assert DeltaParams.from_infotext({"Steps": "20"}) == DeltaParams()


def test_infotext_with_quoted_prompt():
    p = DeltaParams.create(enabled=True, source="b", adapted="a", source_prompt='a, "quoted": prompt')
    text = {k: (json.dumps(v) if k == "Delta source prompt" else str(v)) for k, v in p.infotext().items()}
    assert DeltaParams.from_infotext(text).source_prompt == 'a, "quoted": prompt'


def test_json_schema_describes_every_setting():
    schema = DeltaParams.json_schema()
    assert list(schema["properties"]) == [s.name for s in SETTINGS] == schema["x-positional-order"]
    assert schema["properties"]["decay"]["enum"] == ["constant", "linear", "cosine", "sigmoid"]
    assert schema["properties"]["scale"]["minimum"] == -10 and schema["properties"]["scale"]["default"] == 0.5
    assert schema["properties"]["adapted"]["type"] == ["string", "null"]
    json.dumps(schema)


def test_replace_keeps_loras():
    p = DeltaParams.create(enabled=True, source="b", loras="style:0.5, x")
    assert p.replace(scale=2.0).loras == p.loras
    assert p.replace(loras=[{"name": s.name, "weight": 1.5} for s in p.loras]).loras == (
        LoraSpec("style", 1.5), LoraSpec("x", 1.5))


def test_replace_validates_and_effective():
    p = DeltaParams.create(enabled=True, source="b", adapted="a")
    assert p.effective
    assert not p.replace(scale=0).effective
    assert not p.replace(start=0.5, end=0.5).effective
    with pytest.raises(ParamError, match="scale"):
        p.replace(scale="big")
    assert p.lambda_schedule().at(0.0) == 0.5
