"""Map fields' character spans to token indices (paper §3.3 "Parsing and span masks", eq. 6-7).

Token character offsets come from one of two places:

- the tokenizer's offsets when the text was tokenized (``tokenizers.Encoding.offsets``, or a fast
  ``transformers`` tokenizer's ``return_offsets_mapping=True``), e.g. for SFT targets;
- :func:`offsets_from_decode` for generated token ids (RL rollouts), where re-tokenizing the decoded
  text could give other tokens: token ``i`` covers ``[len(decode(ids[:i])), len(decode(ids[:i + 1])))``
  (the paper's "cumulative decoded offsets").

**Straddle rule** (one rule for every tokenizer): a token belongs to geometric field ``f`` when its
characters overlap ``f``'s span by at least one character; a token overlapping two fields' spans goes
to the one it overlaps most (the earlier field in :data:`GEOMETRIC_FIELDS` on a tie). So a byte-level
BPE token holding ``": [1`` belongs to the field whose value starts at ``[``, and a token ``],`` to the
field it closes. Every other token is background (S_bg): keys, punctuation, answer, description,
template and special tokens, tokens with an empty range, and all tokens of an invalid field.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from pointvl.grca.parse import GEOMETRIC_FIELDS, ParsedField

logger = logging.getLogger(__name__)

BACKGROUND: int = -1
"""Field id of background tokens; ids ``0..3`` index :data:`GEOMETRIC_FIELDS`."""


def offsets_from_decode(
    token_ids: Sequence[int], decode: Callable[[list[int]], str]
) -> list[tuple[int, int]]:
    """Character offsets of generated tokens from cumulative decoded lengths.

    ``decode`` maps a list of ids to text, exactly as the text given to ``parse_output`` was made
    (same ``skip_special_tokens`` choice). Assumes each decoded prefix is a prefix of the full text,
    up to a trailing replacement character where a token ends inside a multi-byte character; ends
    are made non-decreasing and capped at the full length, so such a token may get an empty range
    (then it is background). Costs one decode per token (O(T^2) characters).
    """
    ids = list(token_ids)
    total = len(decode(ids))
    offsets: list[tuple[int, int]] = []
    prev = 0
    for i in range(1, len(ids) + 1):
        end = min(total, max(prev, len(decode(ids[:i]))))
        offsets.append((prev, end))
        prev = end
    return offsets


def token_field_ids(
    token_offsets: Sequence[tuple[int, int]] | NDArray, parsed: Mapping[str, ParsedField]
) -> NDArray[np.int64]:
    """Field id per token: ``i`` for ``GEOMETRIC_FIELDS[i]``, :data:`BACKGROUND` (-1) otherwise.

    Follows the straddle rule of the module docstring; only valid fields have a span.
    """
    off = np.asarray(token_offsets, dtype=np.int64).reshape(-1, 2)
    ids = np.full(len(off), BACKGROUND, dtype=np.int64)
    spans = [(k, parsed[f].span) for k, f in enumerate(GEOMETRIC_FIELDS) if parsed[f].valid]
    if not spans or not len(off):
        return ids
    bounds = np.array([s for _, s in spans], dtype=np.int64)  # (F, 2)
    overlap = np.minimum(off[:, 1:2], bounds[None, :, 1]) - np.maximum(off[:, 0:1], bounds[None, :, 0])
    best = np.argmax(overlap, axis=1)
    hit = overlap[np.arange(len(off)), best] > 0
    field_index = np.array([k for k, _ in spans], dtype=np.int64)
    ids[hit] = field_index[best[hit]]
    return ids
