"""`pointvl evaluate` never crashes on what a predictions file can hold (issue 24 item 8): any JSON value
on a line, huge integers, lone surrogates, nulls, a byte-order mark, a line over the size limit. Each
run ends with exit 0 (the odd line scores 0, with at most a warning) or exit 2 and one line."""

from __future__ import annotations

import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pointvl.cli import main
from pointvl.core.record import iter_records
from pointvl.evaluation import predictions

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
RAW = st.sampled_from([
    '{"instance_id": "%s", "output": 1' + "0" * 5000 + "}",  # an integer past Python's digit limit
    '{"instance_id": "%s", "output": "\\ud800 lone surrogate"}',
    '{"instance_id": null, "output": null}',
    '{"instance_id": "%s", "output": "ok", "attribute_answers": ["\\udfff"]}',
    '[1, 2, 3]',
    'NaN',
    '{"instance_id": "%s", "output": "' + "[" * 2000 + '"}',
    '',
])


def _line(value: object, iid: str) -> str:
    if isinstance(value, str) and "%s" in value:
        return value.replace("%s", iid)
    return value if isinstance(value, str) else json.dumps(value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(JSON, RAW, st.fixed_dictionaries(
    {"instance_id": st.text(alphabet=string.printable, max_size=6), "output": JSON})), min_size=1, max_size=4),
    bom=st.booleans())
def test_evaluate_ends_in_exit_0_or_2_on_any_line(eval_shards, tmp_path_factory, capsys, lines, bom):
    iid = next(iter_records(eval_shards, "test"))["instance_id"]
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "preds.jsonl"
    text = "\n".join(_line(v, iid) for v in lines) + "\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass"))
    code = main(["evaluate", "--shards", eval_shards, "--predictions", str(path), "--out", str(folder / "m.json")])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert len([line for line in err.splitlines() if line.startswith("pointvl evaluate: error:")]) == 1
        assert "Traceback" not in err


def test_a_bom_a_lone_surrogate_and_an_oversized_line_are_read(eval_shards, tmp_path, monkeypatch):
    records = list(iter_records(eval_shards, "test"))
    a, b = records[0]["instance_id"], records[1]["instance_id"]
    monkeypatch.setattr(predictions, "MAX_LINE_BYTES", 200)
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps({"instance_id": a, "output": "\ud800"}) + "\n").encode(
        "utf-8", "surrogatepass") + (json.dumps({"instance_id": b, "output": "x" * 500}) + "\n").encode())
    read = predictions.read_predictions(str(path))
    assert read[a].output == "?" and read[a].over_limit is None  # the surrogate replaced, the BOM gone
    assert read[b].output == "" and read[b].over_limit == "the line is over 200 bytes"
