"""Benchmark: ``pointvl evaluate`` on hostile outputs (``make bench``; issue 11 item 6).

Times what evaluation spends on one output (the limit checks, then the parse when within the limits)
for a normal answer and for the hostile shapes: 10 MB never closed, 100k-deep nesting, a 64k-character
nest of objects, objects whose brackets hide in strings, and the costliest shape found that passes the
checks (a never-closed list of 6,500 small objects: one parse candidate each). Targets: a normal
output < 1 ms; every over-limit output < 0.1 s; any output within the limits < 1 s.
"""

from __future__ import annotations

import json
import time

from pointvl.core.spatial import QuantConfig
from pointvl.evaluation.scoring import MAX_OUTPUT_CHARS, output_limit
from pointvl.grca.parse import parse_output


def _cases() -> dict[str, str]:
    normal = json.dumps({"answer": "chair", "description": "A wooden chair with four legs.",
                         "bbox2d": [100, 120, 400, 380], "bbox3d": [250, 300, 350, 750, 700, 650],
                         "kpts2d": [[200 + k, 300 - k] for k in range(16)],
                         "kpts3d": [[400 + k, 500, 600 - k] for k in range(16)]})
    return {
        "normal": normal,
        "unclosed_10mb": '{"answer": "chair", "kpts2d": [' + "[1, 2], " * 1_250_000,
        "nested_100k": '{"answer": ' + "[" * 100_000,
        "nested_objects_64k": '{"a": ' * (MAX_OUTPUT_CHARS // 6),
        "hidden_brackets_64k": '\\"' + '{"a": [ "]}", ' * ((MAX_OUTPUT_CHARS - 2) // 14),
        "many_objects_64k": '{"a": [' + '{"b": 1}, ' * ((MAX_OUTPUT_CHARS - 7) // 10),
    }


def run(repeats: int = 3) -> dict[str, float]:
    """Seconds per output for each case (best of ``repeats``), and whether the limits stopped it."""
    bins = QuantConfig().bins
    out: dict[str, float] = {}
    for name, text in _cases().items():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            if output_limit(text) is None:
                parse_output(text, bins=bins)
            best = min(best, time.perf_counter() - start)
        out[f"{name}_s"] = round(best, 5)
        out[f"{name}_over_limit"] = float(output_limit(text) is not None)
    return out


if __name__ == "__main__":
    print(json.dumps(run()))
