"""Parse the policy's JSON output into fields with character spans (paper §3.3 "Parsing", §3.7).

The policy writes one JSON object (``docs/design.md#model-output``)::

    {"answer": str, "description": str, "bbox2d": [4 ints], "bbox3d": [6 ints],
     "kpts2d": [[2 ints] x K], "kpts3d": [[3 ints] x K]}

with coordinates as integer bins in ``[0, bins - 1]``. :func:`parse_output` returns every one of the six
fields, each valid or invalid with a reason, and the character span of each valid value so that the
routing can find the tokens that wrote it. It never raises.

Rules, all stated here:

- **Finding the object.** Text around the object (a chat template, a ``<think>`` block) is ignored.
  Every ``{`` is a candidate start; the values inside it are decoded by the standard library's JSON
  scanner (so strings, escapes and numbers follow JSON exactly). Among candidates that parse as a
  complete object holding at least one of the six keys, the *last* one wins (a model that drafts an
  object while thinking answers with the last one); a candidate nested inside a complete object is
  never considered. If no complete object exists (e.g. generation was truncated), the candidate
  with the most known keys read before the syntax error wins, and the pairs read before the error
  are used: fields written completely before a truncation keep their value; the rest are missing.
- **Per field.** A key that does not occur is ``missing``; a key that occurs more than once is
  ``duplicated`` (neither occurrence is used); a value of the wrong JSON type or length is ``wrong
  shape``; a coordinate that is not a JSON integer (``1.5``, ``1.0``, ``"3"``, ``true``) is
  ``malformed``; an integer outside ``[0, bins - 1]`` is ``out of range``. Keypoint fields accept any
  count K >= 1 (each field on its own) unless ``num_keypoints`` fixes it.
- **Spans.** ``span = (start, end)`` is the half-open character range of the value's JSON text in
  ``text``, brackets and quotes included (``[1, 2, 3, 4]``, ``"a chair"``). An invalid field has
  ``span = None`` and ``value = None``: the paper gives it an empty span and reward 0.
- **Not checked here**: key order (``docs/design.md#model-output`` fixes one, but order does not
  change any value), extra keys (they are background), and whether a box's corners are ordered
  (geometry scores an inverted box 0).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from json.decoder import scanstring
from typing import Any

import numpy as np

from pointvl.core.model_output import format_output as format_output  # the writer of this contract

logger = logging.getLogger(__name__)

TEXT_FIELDS: tuple[str, ...] = ("answer", "description")
GEOMETRIC_FIELDS: tuple[str, ...] = ("bbox2d", "bbox3d", "kpts2d", "kpts3d")
FIELDS: tuple[str, ...] = TEXT_FIELDS + GEOMETRIC_FIELDS

_DECODER = json.JSONDecoder()
_WS = " \t\n\r"
_BOX_LEN = {"bbox2d": 4, "bbox3d": 6}
_KPT_DIM = {"kpts2d": 2, "kpts3d": 3}


@dataclass(frozen=True)
class ParsedField:
    """One field of a parsed output.

    Attributes:
        value: ``str`` for answer/description; an int64 array of bins for the geometric fields
            (``(4,)``, ``(6,)``, ``(K, 2)``, ``(K, 3)``); ``None`` when invalid.
        span: half-open ``(start, end)`` characters of the value's JSON text, ``None`` when invalid.
        valid: whether the field can be scored.
        reason: ``"ok"`` or why the field is invalid (``missing``, ``duplicated``, ``wrong shape``,
            ``malformed``, ``out of range``, ``wrong type``, with details).
    """

    value: Any
    span: tuple[int, int] | None
    valid: bool
    reason: str


@dataclass
class _Pair:
    key: str
    value: Any
    span: tuple[int, int]


@dataclass
class _Candidate:
    pairs: list[_Pair]
    end: int | None  # index after the closing brace; None when the object did not close
    error: str


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    return i


def _scan_object(text: str, start: int) -> _Candidate:
    """Read ``key: value`` pairs of the object whose ``{`` is at ``start`` until it closes or fails."""
    pairs: list[_Pair] = []
    i = _skip_ws(text, start + 1)
    if i < len(text) and text[i] == "}":
        return _Candidate(pairs, i + 1, "")
    while True:
        if i >= len(text) or text[i] != '"':
            return _Candidate(pairs, None, f"expected a key string at char {i}")
        try:
            key, i = scanstring(text, i + 1)
        except ValueError as err:
            return _Candidate(pairs, None, f"bad key string: {err}")
        i = _skip_ws(text, i)
        if i >= len(text) or text[i] != ":":
            return _Candidate(pairs, None, f"expected ':' at char {i}")
        i = _skip_ws(text, i + 1)
        try:
            value, end = _DECODER.raw_decode(text, i)
        except (ValueError, RecursionError) as err:
            return _Candidate(pairs, None, f"bad value for {key!r}: {str(err)[:80]}")
        pairs.append(_Pair(key, value, (i, end)))
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == "}":
            return _Candidate(pairs, i + 1, "")
        if i >= len(text) or text[i] != ",":
            return _Candidate(pairs, None, f"expected ',' or '}}' at char {i}")
        i = _skip_ws(text, i + 1)


def _known(candidate: _Candidate) -> int:
    return sum(p.key in FIELDS for p in candidate.pairs)


def _find_object(text: str) -> _Candidate | None:
    complete: _Candidate | None = None
    partial: _Candidate | None = None
    pos = text.find("{")
    while pos != -1:
        cand = _scan_object(text, pos)
        if cand.end is not None:
            if _known(cand):
                complete = cand
            pos = text.find("{", cand.end)
            continue
        if partial is None or _known(cand) > _known(partial):
            partial = cand
        pos = text.find("{", pos + 1)
    if complete is not None:
        return complete
    return partial if partial is not None and _known(partial) else None


def _coords(values: list[Any], bins: int, where: str) -> str | None:
    """None when every entry is an integer bin, else why not (the first bad entry)."""
    for j, v in enumerate(values):
        if type(v) is not int:  # bool is a subclass of int: excluded on purpose
            return f"malformed: {where}[{j}] is {json.dumps(v)[:20]}, not an integer bin"
        if not 0 <= v < bins:
            return f"out of range: {where}[{j}] = {v} is outside [0, {bins - 1}]"
    return None


def _check_box(name: str, value: Any, bins: int) -> tuple[np.ndarray | None, str]:
    n = _BOX_LEN[name]
    if not isinstance(value, list) or len(value) != n:
        got = f"{len(value)} values" if isinstance(value, list) else type(value).__name__
        return None, f"wrong shape: expected a list of {n} integers, got {got}"
    problem = _coords(value, bins, name)
    if problem:
        return None, problem
    return np.asarray(value, dtype=np.int64), "ok"


def _check_kpts(name: str, value: Any, bins: int, num_keypoints: int | None) -> tuple[np.ndarray | None, str]:
    d = _KPT_DIM[name]
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        return None, f"wrong shape: expected a non-empty list of [{d} integers], got {got}"
    if num_keypoints is not None and len(value) != num_keypoints:
        return None, f"wrong shape: expected {num_keypoints} keypoints, got {len(value)}"
    for k, row in enumerate(value):
        if not isinstance(row, list) or len(row) != d:
            return None, f"wrong shape: {name}[{k}] is not a list of {d} integers"
    for k, row in enumerate(value):
        problem = _coords(row, bins, f"{name}[{k}]")
        if problem:
            return None, problem
    return np.asarray(value, dtype=np.int64).reshape(len(value), d), "ok"


def _check(name: str, value: Any, bins: int, num_keypoints: int | None) -> tuple[Any, str]:
    if name in TEXT_FIELDS:
        if not isinstance(value, str):
            return None, f"wrong type: expected a string, got {type(value).__name__}"
        return value, "ok"
    if name in _BOX_LEN:
        return _check_box(name, value, bins)
    return _check_kpts(name, value, bins, num_keypoints)


def parse_output(text: str, bins: int = 1000, num_keypoints: int | None = None) -> dict[str, ParsedField]:
    """Parse one generated output into its six fields (rules in the module docstring).

    Args:
        text: the decoded generation (anything; never raises).
        bins: number of quantization bins B; valid coordinates lie in ``[0, B - 1]`` (QuantConfig.bins).
        num_keypoints: if set, kpts2d and kpts3d must hold exactly this many keypoints.

    Returns:
        ``{field: ParsedField}`` for every name in :data:`FIELDS`, in that order.
    """
    if not isinstance(text, str):
        return {f: ParsedField(None, None, False, f"missing: input is {type(text).__name__}, not str")
                for f in FIELDS}
    found = _find_object(text)
    if found is None:
        return {f: ParsedField(None, None, False, "missing: no JSON object with a known key") for f in FIELDS}
    out: dict[str, ParsedField] = {}
    for name in FIELDS:
        hits = [p for p in found.pairs if p.key == name]
        if not hits:
            tail = f" (object not closed: {found.error})" if found.end is None else ""
            out[name] = ParsedField(None, None, False, "missing" + tail)
        elif len(hits) > 1:
            out[name] = ParsedField(None, None, False, f"duplicated: key occurs {len(hits)} times")
        else:
            value, reason = _check(name, hits[0].value, bins, num_keypoints)
            valid = reason == "ok"
            out[name] = ParsedField(value, hits[0].span if valid else None, valid, reason)
    return out
