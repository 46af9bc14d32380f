"""Commands that are not the build: bad input is one line and exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys


def pointvl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pointvl.cli", *args], capture_output=True, text=True, timeout=300)


def _one_clear_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_evaluate_reports_a_missing_or_malformed_predictions_file(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    out = str(tmp_path / "m.json")
    _one_clear_line(pointvl("evaluate", "--shards", str(shards), "--predictions", str(tmp_path / "p.jsonl"),
                            "--out", out), "predictions file not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instance_id": "a", "output": "x"}\n{not json\n')
    _one_clear_line(pointvl("evaluate", "--shards", str(shards), "--predictions", str(bad), "--out", out),
                    "line 2 is not JSON")


def test_train_with_a_run_folder_reaches_the_shards_check(tmp_path):
    result = pointvl("train", "--shards", str(tmp_path), "--run", str(tmp_path / "run"), "--preset", "tiny")
    _one_clear_line(result, "no train-*-of-*.parquet shards")


def test_orchestrator_errors_get_one_line_and_a_hint_other_errors_keep_their_traceback():
    import httpx

    from pointvl.cli import orchestrator_hint

    try:
        httpx.get("http://127.0.0.1:9/api/health", timeout=2)
    except httpx.TransportError as err:
        assert "make server" in orchestrator_hint(err)
    assert orchestrator_hint(KeyError("a bug")) is None


def test_train_choices_come_from_the_configs_and_parsing_imports_no_torch():
    """``--preset`` and ``--variant`` list the configs' names (pointvl.train.variants), read without torch."""
    code = (
        "import sys, argparse\n"
        "from pointvl.cli import build_parser\n"
        "parser = build_parser()\n"
        "args = parser.parse_args(['train', '--shards', 's', '--run', 'r', '--preset', 'tiny', '--variant', 'grca'])\n"
        "train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices['train']\n"
        "print(sorted(tuple(a.choices) for a in train._actions if a.dest in ('preset', 'variant')))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    from pointvl.train.train_config import PRESETS, VARIANTS

    assert out.stdout.splitlines() == [str(sorted([tuple(PRESETS), VARIANTS])), "False"]
