"""One verifier for the training rewards and the evaluation metrics: the same text scores the same under both.

:func:`verify` is what ``score_group`` (GRPO's rewards) and ``pointvl evaluate`` (the paper's metrics) both
call on one output:

1. **Limits.** An output longer than :data:`MAX_OUTPUT_CHARS` characters, or whose brackets nest deeper
   than :data:`MAX_DEPTH` levels (:func:`nesting_depth`: every bracket counted; then, reading JSON strings
   from the start and from inside a string, the brackets outside the strings and those inside them, so
   an object starting anywhere is covered), is not parsed: every field is invalid and every reward 0.
   Every check is a linear pass; within the limits a parse costs at most about 0.3 s.
2. **Parse** with :func:`pointvl.grca.parse.parse_output` (``bins``, ``num_keypoints``: 16 by default, the
   paper's §4.1; a keypoint field with another count is invalid and scores 0).
3. **Rewards** with :func:`pointvl.grca.rewards.output_rewards` (the optional keypoint-spread guard
   included), on de-quantized coordinates.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pointvl.core.spatial import QuantConfig
from pointvl.grca.parse import FIELDS, ParsedField, parse_output
from pointvl.grca.rewards import output_rewards

logger = logging.getLogger(__name__)

MAX_OUTPUT_CHARS = 65_536
"""Longest output parsed (characters); a full answer with 16 keypoints is about 600."""
MAX_DEPTH = 64
"""Deepest bracket nesting parsed; a valid answer nests 3 levels."""
_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}]')
_BRACKETS = re.compile(r"[\[\]{}]")
_STRING_TAIL = re.compile(r'(?:[^"\\]++|\\.)*+"')


def nesting_depth(text: str, stop_above: int | None = None) -> int:
    """The deepest bracket nesting an object starting anywhere in ``text`` could see (linear passes);
    returns as soon as it exceeds ``stop_above``."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    steps = np.isin(codes, (91, 123)).astype(np.int64) - np.isin(codes, (93, 125))
    raw = np.concatenate([[0], np.cumsum(steps)])
    best = int((raw - np.minimum.accumulate(raw)).max())  # every bracket counted, strings or not
    starts = [0]
    tail = _STRING_TAIL.match(text)  # the reading that begins inside a string
    if tail:
        starts.append(tail.end())
    for start in starts:
        depth = low = inner = inner_low = 0  # brackets outside the reading's strings, and inside them
        for m in _TOKENS.finditer(text, start):
            if stop_above is not None and best > stop_above:
                return best
            token = m.group()
            if token[0] == '"':  # an object starting in this string reads it as JSON: count it too
                for c in _BRACKETS.findall(token):
                    inner += 1 if c in "[{" else -1
                    inner_low = min(inner_low, inner)
                    best = max(best, inner - inner_low)
                continue
            depth += 1 if token in "[{" else -1
            low = min(low, depth)
            best = max(best, depth - low)
    return best


def output_limit(text: str) -> str | None:
    """Why ``text`` is not parsed (over :data:`MAX_OUTPUT_CHARS` or :data:`MAX_DEPTH`), or ``None``."""
    if len(text) > MAX_OUTPUT_CHARS:
        return f"{len(text)} characters, over the limit of {MAX_OUTPUT_CHARS}"
    if nesting_depth(text, stop_above=MAX_DEPTH) > MAX_DEPTH:
        return f"brackets nest deeper than {MAX_DEPTH} levels"
    return None


@dataclass(frozen=True)
class Verdict:
    """What :func:`verify` found: the parsed fields, the rewards (``rewards.REWARD_KEYS``) and, for an
    output over the limits, why it was not parsed (else ``None``)."""

    parsed: dict[str, ParsedField]
    rewards: dict[str, float]
    over_limit: str | None


def verify(
    text: str,
    target: Mapping[str, Any],
    camera: Mapping[str, Any],
    quant: QuantConfig,
    num_keypoints: int | None = 16,
    keypoint_spread: float = 0.0,
) -> Verdict:
    """Parse and score one output (module docstring); ``target``/``camera`` as ``output_rewards`` takes them."""
    over = output_limit(text) if isinstance(text, str) else None
    if over is not None:
        parsed = {f: ParsedField(None, None, False, f"missing: not parsed ({over})") for f in FIELDS}
    else:
        parsed = parse_output(text, quant.bins, num_keypoints)
    return Verdict(parsed, output_rewards(parsed, target, camera, quant, keypoint_spread), over)
