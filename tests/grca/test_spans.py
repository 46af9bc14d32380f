"""Span -> token routing: characters, hand-made straddling tokens and a real byte-level BPE tokenizer."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from benchmarks.bench_grca import sample_outputs
from pointvl.grca import BACKGROUND, GEOMETRIC_FIELDS, offsets_from_decode, parse_output, token_field_ids


def _char_fields(text: str, parsed: dict) -> np.ndarray:
    """Field id of every character (independent of the token code)."""
    ids = np.full(len(text), BACKGROUND)
    for k, name in enumerate(GEOMETRIC_FIELDS):
        if parsed[name].valid:
            s, e = parsed[name].span
            ids[s:e] = k
    return ids


def _expected_token_fields(text: str, parsed: dict, offsets: list[tuple[int, int]]) -> np.ndarray:
    """The straddle rule computed per token by counting characters: most-covered field, earliest on ties."""
    chars = _char_fields(text, parsed)
    out = []
    for s, e in offsets:
        counts = [int(np.sum(chars[s:e] == k)) for k in range(len(GEOMETRIC_FIELDS))]
        out.append(int(np.argmax(counts)) if max(counts, default=0) > 0 else BACKGROUND)
    return np.array(out)


def test_character_tokens_follow_the_spans() -> None:
    text = sample_outputs(1, np.random.default_rng(0), num_keypoints=4)[0]
    parsed = parse_output(text)
    ids = token_field_ids([(i, i + 1) for i in range(len(text))], parsed)
    assert np.array_equal(ids, _char_fields(text, parsed))
    assert "".join(text[i] for i in np.flatnonzero(ids == 0)) == text[slice(*parsed["bbox2d"].span)]


def test_straddling_tokens_by_hand() -> None:
    text = '{"bbox2d": [1, 2, 3, 4], "bbox3d": [5, 6, 7, 8, 9, 10]}'
    parsed = parse_output(text)
    s2, e2 = parsed["bbox2d"].span
    s3, e3 = parsed["bbox3d"].span
    offsets = [
        (0, s2 - 3),        # '{"bbox2d' : background
        (s2 - 3, s2 + 2),   # '": [1' : one character of the span is enough -> bbox2d
        (e2 - 1, s3 + 1),   # '], "bbox3d": [' : 1 char of each span, tie -> earlier field bbox2d
        (e2 - 1, s3 + 3),   # same start, 3 chars of bbox3d -> bbox3d
        (e3, len(text)),    # '}' : background
        (5, 5),             # an empty token (special token): background
    ]
    assert token_field_ids(offsets, parsed).tolist() == [BACKGROUND, 0, 0, 1, BACKGROUND, BACKGROUND]


def test_invalid_field_tokens_are_background() -> None:
    text = '{"bbox2d": [1, 2, 3], "bbox3d": [5, 6, 7, 8, 9, 10]}'
    parsed = parse_output(text)
    ids = token_field_ids([(i, i + 1) for i in range(len(text))], parsed)
    assert not parsed["bbox2d"].valid and set(ids.tolist()) == {BACKGROUND, 1}


def test_real_byte_level_bpe_offsets_and_routing(tokenizer: Any) -> None:
    texts = sample_outputs(6, np.random.default_rng(7), 320, 240)
    crossing = 0
    for text in texts:
        enc = tokenizer.encode(text)
        pieces = [text[s:e] for s, e in enc.offsets]
        assert "".join(pieces) == text  # offsets are characters and tile the text
        crossing += sum(any(c.isdigit() for c in p) and any(c in '[],: "' for c in p) for p in pieces)
        decoded = offsets_from_decode(enc.ids, tokenizer.decode)
        assert decoded == [tuple(o) for o in enc.offsets]
        parsed = parse_output(tokenizer.decode(enc.ids))
        ids = token_field_ids(decoded, parsed)
        assert np.array_equal(ids, _expected_token_fields(text, parsed, decoded))
        for k, name in enumerate(GEOMETRIC_FIELDS):
            chosen = np.flatnonzero(ids == k)
            assert np.all(np.diff(chosen) == 1)  # a field's tokens are contiguous
            covered = "".join(pieces[i] for i in chosen)
            assert text[slice(*parsed[name].span)] in covered
    assert crossing > 0, "the toy tokenizer should merge punctuation with digits (the hard case)"


@pytest.mark.parametrize("description", ["é à ü", "你好 世界 chair", "emoji 🙂🪑 ok"])
def test_multibyte_text_split_inside_characters(tokenizer: Any, description: str) -> None:
    text = sample_outputs(1, np.random.default_rng(3), 320, 240)[0]
    start = text.index('"description": "') + len('"description": "')
    text = text[:start] + description + text[text.index('"', start):]
    ids = tokenizer.encode(text).ids
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "some token must hold part of a multi-byte character"
    offsets = offsets_from_decode(ids, tokenizer.decode)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:], strict=False))
    parsed = parse_output(tokenizer.decode(ids))
    assert all(f.valid for f in parsed.values())
    field_ids = token_field_ids(offsets, parsed)
    assert np.array_equal(field_ids, _expected_token_fields(text, parsed, offsets))
