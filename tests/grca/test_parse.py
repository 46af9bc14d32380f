"""parse_output / format_output: round trips, every failure category, surrounding text, fuzzing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pointvl.core.spatial import QuantConfig
from pointvl.grca import FIELDS, GEOMETRIC_FIELDS, format_output, parse_output

QC = QuantConfig()
W, H = 320, 240


def _canonical(k: int = 16, seed: int = 0, description: str = "a wooden chair") -> tuple[str, dict]:
    rng = np.random.default_rng(seed)
    cont = {"bbox2d": [20.5, 30.0, 200.0, 220.0], "bbox3d": [-0.5, -0.4, -0.3, 0.5, 0.4, 0.3],
            "kpts2d": rng.uniform(0, [W, H], (k, 2)), "kpts3d": rng.uniform(-1, 1, (k, 3))}
    text = format_output("chair", description, cont["bbox2d"], cont["bbox3d"], cont["kpts2d"], cont["kpts3d"],
                         W, H, QC)
    bins = {"bbox2d": QC.quantize_2d(cont["bbox2d"], W, H), "bbox3d": QC.quantize_3d(cont["bbox3d"]),
            "kpts2d": QC.quantize_2d(cont["kpts2d"], W, H), "kpts3d": QC.quantize_3d(cont["kpts3d"])}
    return text, bins


def _obj(**over: object) -> str:
    base: dict[str, object] = {"answer": "chair", "description": "d", "bbox2d": [1, 2, 3, 4],
                               "bbox3d": [1, 2, 3, 4, 5, 6], "kpts2d": [[1, 2]], "kpts3d": [[1, 2, 3]]}
    base.update(over)
    return json.dumps(base)


def _check_spans(text: str, parsed: dict) -> None:
    """Every valid field's span decodes to its value; invalid fields carry neither."""
    for name, f in parsed.items():
        if f.valid:
            assert f.reason == "ok" and f.span is not None
            decoded = json.loads(text[f.span[0]:f.span[1]])
            if name in GEOMETRIC_FIELDS:
                assert np.array_equal(np.asarray(decoded), f.value)
            else:
                assert decoded == f.value
        else:
            assert f.span is None and f.value is None and f.reason != "ok"


@pytest.mark.parametrize("k", [1, 5, 16])
def test_format_output_round_trips(k: int) -> None:
    text, bins = _canonical(k, seed=k, description='quotes " and \\ and unicode é 你好')
    parsed = parse_output(text)
    assert list(parsed) == list(FIELDS)
    assert all(f.valid for f in parsed.values())
    assert parsed["answer"].value == "chair"
    assert parsed["description"].value == 'quotes " and \\ and unicode é 你好'
    for name in GEOMETRIC_FIELDS:
        assert np.array_equal(parsed[name].value, bins[name])
    assert parsed["kpts2d"].value.shape == (k, 2) and parsed["kpts3d"].value.shape == (k, 3)
    assert list(json.loads(text)) == list(FIELDS)  # the key order of docs/design.md#model-output
    _check_spans(text, parsed)
    span = parsed["bbox2d"].span
    assert text[span[0]] == "[" and text[span[1] - 1] == "]"


def test_surrounding_text_and_think_block_are_ignored() -> None:
    text, bins = _canonical()
    draft = _obj(bbox2d=[9, 9, 9, 9])
    wrapped = (f"<|im_start|>assistant\n<think>a set {{1, 2}} and a draft {draft} then more}}</think>\n"
               f"```json\n{text}\n```<|im_end|>")
    parsed = parse_output(wrapped)
    assert all(f.valid for f in parsed.values())
    assert np.array_equal(parsed["bbox2d"].value, bins["bbox2d"])  # the last complete object wins
    _check_spans(wrapped, parsed)


def test_object_nested_in_a_string_is_not_a_candidate() -> None:
    inner = _obj(bbox2d=[7, 7, 8, 8])
    text = _obj(description=f"see {inner}")
    parsed = parse_output(text)
    assert parsed["bbox2d"].value.tolist() == [1, 2, 3, 4]
    assert parsed["description"].value == f"see {inner}"


@pytest.mark.parametrize(
    ("over", "field", "reason"),
    [
        ({"bbox2d": [1, 2, 3]}, "bbox2d", "wrong shape"),
        ({"bbox2d": "1, 2, 3, 4"}, "bbox2d", "wrong shape"),
        ({"bbox3d": [1, 2, 3, 4, 5, 6.5]}, "bbox3d", "malformed"),
        ({"bbox3d": [1, 2, 3, 4, 5, 6.0]}, "bbox3d", "malformed"),
        ({"bbox2d": [1, 2, "3", 4]}, "bbox2d", "malformed"),
        ({"bbox2d": [1, 2, True, 4]}, "bbox2d", "malformed"),
        ({"bbox2d": [1, 2, 3, 1000]}, "bbox2d", "out of range"),
        ({"bbox3d": [-1, 2, 3, 4, 5, 6]}, "bbox3d", "out of range"),
        ({"kpts2d": []}, "kpts2d", "wrong shape"),
        ({"kpts2d": [[1, 2], [3]]}, "kpts2d", "wrong shape"),
        ({"kpts2d": [[1, 2, 3]]}, "kpts2d", "wrong shape"),
        ({"kpts3d": [[1, 2, 3], [1, 2, None]]}, "kpts3d", "malformed"),
        ({"kpts3d": [1, 2, 3]}, "kpts3d", "wrong shape"),
        ({"kpts3d": [[1, 2, 3000]]}, "kpts3d", "out of range"),
        ({"answer": 3}, "answer", "wrong type"),
        ({"description": ["x"]}, "description", "wrong type"),
    ],
)
def test_bad_field_is_invalid_and_others_stay_valid(over: dict, field: str, reason: str) -> None:
    parsed = parse_output(_obj(**over))
    assert not parsed[field].valid and parsed[field].reason.startswith(reason)
    assert all(f.valid for name, f in parsed.items() if name != field)


def test_missing_and_duplicated_keys() -> None:
    text = '{"answer": "a", "bbox2d": [1, 2, 3, 4], "bbox2d": [1, 2, 3, 4], "kpts2d": [[1, 2]]}'
    parsed = parse_output(text)
    assert parsed["bbox2d"].reason.startswith("duplicated")
    assert parsed["bbox3d"].reason == "missing" and parsed["description"].reason == "missing"
    assert parsed["answer"].valid and parsed["kpts2d"].valid


def test_truncated_output_keeps_the_fields_written_before_the_cut() -> None:
    text, bins = _canonical()
    cut = text[: text.index('"kpts3d"') + 20]
    parsed = parse_output(cut)
    assert all(parsed[f].valid for f in ("answer", "description", "bbox2d", "bbox3d", "kpts2d"))
    assert np.array_equal(parsed["kpts2d"].value, bins["kpts2d"])
    assert not parsed["kpts3d"].valid and "not closed" in parsed["kpts3d"].reason


def test_num_keypoints_and_bins() -> None:
    text = _obj(kpts2d=[[1, 2], [3, 4]])
    assert parse_output(text).get("kpts2d").valid
    assert parse_output(text, num_keypoints=2)["kpts2d"].valid
    assert parse_output(text, num_keypoints=2)["kpts3d"].reason.startswith("wrong shape")
    assert parse_output(_obj(bbox2d=[1, 2, 3, 9])).get("bbox2d").valid
    assert parse_output(_obj(bbox2d=[1, 2, 3, 9]), bins=9)["bbox2d"].reason.startswith("out of range")


@pytest.mark.parametrize("text", ["", "no json here", "{", "{}", '{"other": 1}', "[1, 2]", "{" * 5000,
                                  "[" * 5000, '{"bbox2d": ' + "[" * 5000, '{"answer": "x"'])
def test_hostile_strings(text: str) -> None:
    parsed = parse_output(text)
    assert list(parsed) == list(FIELDS)
    _check_spans(text, parsed)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_never_raises_on_any_text(text: str) -> None:
    parsed = parse_output(text)
    assert list(parsed) == list(FIELDS)
    _check_spans(text, parsed)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 40), st.text(max_size=8), st.integers(0, 10))
def test_never_raises_on_mutated_outputs(pos: int, cut: int, insert: str, seed: int) -> None:
    text, _ = _canonical(k=3, seed=seed)
    p = pos % (len(text) + 1)
    mutated = text[:p] + insert + text[p + cut:]
    parsed = parse_output(mutated)
    _check_spans(mutated, parsed)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="{"), max_size=50),
       st.text(alphabet=st.characters(blacklist_characters="{"), max_size=50))
def test_any_prefix_and_suffix_without_braces_are_tolerated(prefix: str, suffix: str) -> None:
    text, bins = _canonical(k=2)
    parsed = parse_output(prefix + text + suffix)
    assert all(f.valid for f in parsed.values())
    for name in GEOMETRIC_FIELDS:
        assert np.array_equal(parsed[name].value, bins[name])
    assert parsed["bbox2d"].span[0] == len(prefix) + text.index("[")
