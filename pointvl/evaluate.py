"""Score any model's outputs on the benchmark's test split with the paper's metrics (§4.3, Tables 1-4).

Input: the shard folder and a JSONL file, one line per instance:
``{"instance_id": "...", "output": "<raw model text>"}``. Each output is parsed with
:func:`pointvl.grca.parse.parse_output` and scored with the training rewards
(:func:`pointvl.grca.rewards.output_rewards`), so a metric and its reward are one formula:

- ``iou2d``, ``iou3d``: IoU of the de-quantized predicted box with the target box.
- ``kpa2d``, ``kpa3d``: fraction of predicted keypoints inside the *target* 2D/3D box (KPA).
- ``rpc``: IoU of the predicted bbox2d with the box enclosing the projected corners of the predicted
  bbox3d (the instance's K, R, t); 0 when a corner is behind the camera or either box is invalid.
- ``qa_accuracy``: the ``answer`` equals ``qa[0].answer`` after ``strip().casefold()``.
- ``bleu1..4``: NLTK ``sentence_bleu`` of the predicted description against the record's
  description, cumulative n-gram weights (BLEU-n = uniform weights over 1..n), smoothing
  ``SmoothingFunction().method1`` (epsilon 0.1 on zero n-gram counts); tokens are the lower-cased
  words and punctuation marks (``\\w+|[^\\w\\s]``).
- ``rouge1``, ``rouge2``, ``rougeL``: ``rouge_score`` F-measure with the Porter stemmer.
- BERTScore is not computed: its model cannot be fetched on machines without a network, and no
  package for it is pinned; the table says so.

Every metric is a mean over the test records (``n``), in [0, 1]. A field that does not parse scores 0;
a prediction in which no field parses is counted in ``n_unparsable``; a test record without a
prediction scores 0 everywhere and is counted in ``n_missing`` (the ids are logged). Predictions
for ids outside the split are ignored with a warning.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pointvl import io as pio
from pointvl.errors import InputError
from pointvl.geometry import QuantConfig
from pointvl.grca.parse import FIELDS, parse_output
from pointvl.grca.rewards import output_rewards
from pointvl.train.data import iter_records, record_camera, record_target

logger = logging.getLogger(__name__)

GEOMETRY_KEYS: tuple[str, ...] = ("iou2d", "iou3d", "kpa2d", "kpa3d", "rpc")
TEXT_KEYS: tuple[str, ...] = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL")
METRIC_KEYS: tuple[str, ...] = GEOMETRY_KEYS + ("qa_accuracy",) + TEXT_KEYS
_REWARD_OF = {"iou2d": "bbox2d", "iou3d": "bbox3d", "kpa2d": "kpts2d", "kpa3d": "kpts3d", "rpc": "rpc"}
_BLEU_WEIGHTS = {n: tuple([1.0 / n] * n) for n in (1, 2, 3, 4)}
_WORDS = re.compile(r"\w+|[^\w\s]")


@dataclass
class EvaluateConfig:
    """How predictions are scored (paper §4.3).

    Attributes:
        split: the split to score (default ``"test"``).
        quant: the coordinate bins the model writes (DESIGN.md; default 1000 bins, 3D range [-1, 1]).
    """

    split: str = "test"
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self) -> None:
        if not self.split:
            raise ValueError("EvaluateConfig.split must name a split, e.g. 'test'")


def read_predictions(path: str) -> dict[str, str]:
    """``{instance_id: output}`` from a JSONL file; a repeated id keeps its last line (with a warning)."""
    fs, p = pio.filesystem(path)
    if not fs.isfile(p):
        raise InputError(f"predictions file not found: {path}")
    with fs.open(p, "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    out: dict[str, str] = {}
    for k, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path} line {k} is not JSON ({err.msg})") from err
        if not isinstance(row, dict) or "instance_id" not in row or "output" not in row:
            raise InputError(f"{path} line {k}: expected {{\"instance_id\": ..., \"output\": ...}}")
        if row["instance_id"] in out:
            logger.warning("%s: %s appears more than once; the last line is used", path, row["instance_id"])
        out[str(row["instance_id"])] = str(row["output"])
    return out


def _words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


class TextScorer:
    """BLEU-1..4 and ROUGE-1/2/L of one hypothesis against one reference (see the module docstring)."""

    def __init__(self) -> None:
        try:
            from nltk.translate.bleu_score import SmoothingFunction
            from rouge_score import rouge_scorer
        except ImportError as e:
            raise ImportError("text metrics need nltk and rouge-score: `pip install pointvl[train]`") from e
        self._smooth = SmoothingFunction().method1
        self._rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)

    def __call__(self, hypothesis: str, reference: str) -> dict[str, float]:
        from nltk.translate.bleu_score import sentence_bleu

        hyp, ref = _words(hypothesis), _words(reference)
        out = {}
        for n, weights in _BLEU_WEIGHTS.items():
            bleu = sentence_bleu([ref], hyp, weights=weights, smoothing_function=self._smooth) if hyp else 0.0
            out[f"bleu{n}"] = float(bleu)
        rouge = self._rouge.score(reference, hypothesis)
        out.update({k: float(rouge[k].fmeasure) for k in ("rouge1", "rouge2", "rougeL")})
        return out


def score_output(
    text: str,
    target: Mapping[str, Any],
    camera: Mapping[str, Any],
    quant: QuantConfig,
    text_scorer: TextScorer,
) -> tuple[dict[str, float], bool]:
    """Metrics of one output (keys :data:`METRIC_KEYS`) and whether any field parsed."""
    parsed = parse_output(text, bins=quant.bins)
    rewards = output_rewards(parsed, target, camera, quant)
    scores = {k: rewards[r] for k, r in _REWARD_OF.items()}
    scores["qa_accuracy"] = rewards["answer"]
    if parsed["description"].valid:
        scores.update(text_scorer(parsed["description"].value, str(target["description"])))
    else:
        scores.update(dict.fromkeys(TEXT_KEYS, 0.0))
    return scores, any(parsed[f].valid for f in FIELDS)


def evaluate(shards_dir: str, predictions: Mapping[str, str], config: EvaluateConfig | None = None) -> dict:
    """Mean metrics over ``config.split`` of ``shards_dir`` plus ``n``, ``n_unparsable``, ``n_missing``."""
    cfg = config or EvaluateConfig()
    scorer = TextScorer()
    totals = dict.fromkeys(METRIC_KEYS, 0.0)
    n, unparsable, missing, seen = 0, 0, [], set()
    for record in iter_records(shards_dir, cfg.split):
        n += 1
        iid = record["instance_id"]
        if iid not in predictions:
            missing.append(iid)
            continue
        seen.add(iid)
        scores, parsed_any = score_output(
            predictions[iid], record_target(record), record_camera(record), cfg.quant, scorer
        )
        unparsable += not parsed_any
        for k in METRIC_KEYS:
            totals[k] += scores[k]
    if n == 0:
        raise InputError(f"the {cfg.split} split of {shards_dir} has no records")
    extra = sorted(set(predictions) - seen)
    if extra:
        logger.warning("%d predictions are for ids outside the %s split (ignored), e.g. %s",
                       len(extra), cfg.split, extra[:3])
    if missing:
        logger.warning("%d/%d %s instances have no prediction (scored 0), e.g. %s",
                       len(missing), n, cfg.split, missing[:5])
    metrics: dict[str, Any] = {k: totals[k] / n for k in METRIC_KEYS}
    metrics.update(n=n, n_unparsable=unparsable, n_missing=len(missing))
    return metrics


def format_table(metrics: Mapping[str, Any], name: str = "model") -> str:
    """Markdown tables shaped like the paper's: geometry (Tables 1-3) and language (Table 4)."""
    geo_head = ["Method", "IoU2D", "IoU3D", "KPA-2D", "KPA-3D", "RPC"]
    txt_head = ["Model", "B-1", "B-2", "B-3", "B-4", "R-1", "R-2", "R-L", "BERTScore", "QA Acc."]
    geo = [name, *(f"{metrics[k]:.3f}" for k in GEOMETRY_KEYS)]
    txt = [name, *(f"{metrics[k]:.4f}" for k in TEXT_KEYS), "-", f"{metrics['qa_accuracy']:.3f}"]

    def table(head: list[str], row: list[str]) -> str:
        lines = [head, ["---"] * len(head), row]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)

    counts = (
        f"n = {metrics['n']}, unparsable = {metrics['n_unparsable']}, missing = {metrics['n_missing']}; "
        "BERTScore not computed (no model offline)"
    )
    return "\n\n".join([table(geo_head, geo), table(txt_head, txt), counts])


def run(shards_dir: str, predictions_path: str, out_path: str, config: EvaluateConfig | None = None) -> dict:
    """Evaluate a predictions file and write the metrics JSON atomically to ``out_path``."""
    metrics = evaluate(shards_dir, read_predictions(predictions_path), config)
    pio.write_json(out_path, metrics)
    logger.info("wrote %s (n=%d)", out_path, metrics["n"])
    return metrics
