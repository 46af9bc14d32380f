"""Reading a predictions JSONL for ``pointvl evaluate``: one ``{"instance_id", "output", "attribute_answers"}``
per line, bounded (size and nesting, via the verifier's limits), one line naming each bad line, the last of
repeated ids kept."""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from pointvl.core import io as pio
from pointvl.core.errors import InputError
from pointvl.grca.parse import parse_output
from pointvl.grca.verify import MAX_DEPTH, output_limit

_ID = re.compile(r'"instance_id"\s*:\s*"((?:[^"\\]++|\\.)*+)"')

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One prediction line: the output text, optional attribute answers, and a limit it broke (if any)."""

    output: str
    attribute_answers: tuple[str, ...] | None = None
    over_limit: str | None = None


MAX_LINE_BYTES = 16 << 20
"""A prediction line longer than this is not parsed (its output scores 0): no model writes 16 MB per record."""


def _text(value: str) -> str:
    """``value`` with lone surrogates (valid JSON escapes, ``"\\ud800"``, but not encodable) replaced by ``?``."""
    return value.encode("utf-8", "replace").decode("utf-8")


def _prediction(row: dict[str, Any], where: str) -> Prediction:
    output = row["output"]
    if isinstance(output, dict):
        try:
            output = json.dumps(output, ensure_ascii=False)
        except RecursionError:  # nested about as deep as the JSON reader goes: far over MAX_DEPTH
            return Prediction("", None, f"the output object nests deeper than {MAX_DEPTH} levels")
    elif not isinstance(output, str):
        raise InputError(f"{where}: output must be the model's text or its JSON object, got {type(output).__name__}")
    answers = row.get("attribute_answers")
    if answers is not None and not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
        raise InputError(f"{where}: attribute_answers must be a list of strings")
    output = _text(output)
    return Prediction(output, tuple(_text(a) for a in answers) if answers is not None else None, output_limit(output))


def _answer(pred: Prediction) -> str:
    if pred.over_limit:
        return ""
    field = parse_output(pred.output)["answer"]
    return field.value if field.valid else ""


def read_predictions(path: str) -> dict[str, Prediction]:
    """``{instance_id: Prediction}`` from a JSONL file; a repeated id keeps its last line (one warning).

    A line with ``qa_index`` k > 0 answers the record's attribute question k with its output's
    ``answer`` (one line per QA pair, as ``pointvl predict`` writes for a checkpoint); those answers
    become the record's ``attribute_answers`` unless its main line gives them."""
    fs, p = pio.filesystem(path)
    if not fs.isfile(p):
        raise InputError(f"predictions file not found: {path}")
    out: dict[str, Prediction] = {}
    attribute: defaultdict[str, dict[int, str]] = defaultdict(dict)
    seen: set[tuple[str, int]] = set()
    duplicates: list[str] = []
    with fs.open(p, "rb") as f:
        for k, raw in enumerate(f, 1):
            where = f"{path} line {k}"
            try:  # a byte-order mark (Windows editors) is no part of the first line's JSON
                line = raw.decode("utf-8-sig" if k == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{where} is not UTF-8 ({err.reason})") from None
            if not line.strip():
                continue
            over = None
            try:
                if len(raw) > MAX_LINE_BYTES:
                    raise RecursionError  # not parsed: read its id alone, as for a line nested too deep
                row = json.loads(line)
            except RecursionError:  # over the size limit, or nested deeper than the JSON reader goes
                found = _ID.search(line[:4096])
                if found is None:
                    raise InputError(f"{where} is too large or nests too deep to read and names no "
                                     "instance_id") from None
                try:
                    row = {"instance_id": json.loads(f'"{found.group(1)}"'), "output": ""}
                except ValueError:
                    raise InputError(f"{where} is too large or nests too deep to read; its instance_id is not a "
                                     "JSON string") from None
                over = (f"the line is over {MAX_LINE_BYTES} bytes" if len(raw) > MAX_LINE_BYTES else
                        f"the line nests too deep for the JSON reader (the limit is {MAX_DEPTH} levels)")
            except ValueError as err:  # not JSON, or an integer of more digits than Python converts
                raise InputError(f"{where} is not JSON ({getattr(err, 'msg', str(err).splitlines()[0])})") from None
            if not isinstance(row, dict) or "instance_id" not in row or "output" not in row:
                raise InputError(f"{where}: expected {{\"instance_id\": ..., \"output\": ...}}")
            if not isinstance(row["instance_id"], str | int) or isinstance(row["instance_id"], bool):
                raise InputError(f"{where}: instance_id must be a string, got {type(row['instance_id']).__name__}")
            iid = _text(str(row["instance_id"]))
            qa_index = row.get("qa_index", 0)
            if not isinstance(qa_index, int) or isinstance(qa_index, bool) or qa_index < 0:
                raise InputError(f"{where}: qa_index must be a non-negative integer, got {qa_index!r}")
            if (iid, qa_index) in seen:
                duplicates.append(iid)
            seen.add((iid, qa_index))
            pred = _prediction(row, where)
            if qa_index:  # a line of its own per attribute question (`pointvl predict` of a checkpoint)
                attribute[iid][qa_index] = _answer(pred)
                continue
            out[iid] = Prediction(pred.output, pred.attribute_answers, over) if over else pred
    for iid, answers in attribute.items():
        if iid in out and out[iid].attribute_answers is None:
            given = tuple(answers.get(k, "") for k in range(1, max(answers) + 1))
            out[iid] = Prediction(out[iid].output, given, out[iid].over_limit)
    if not out:
        raise InputError(f"{path} holds no predictions (the file is empty)")
    if duplicates:
        logger.warning("%s: %d lines repeat an earlier instance_id (the last line is used), e.g. %s",
                       path, len(duplicates), sorted(set(duplicates))[:3])
    return out
