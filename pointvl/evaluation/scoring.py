"""Score any model's outputs on a split of the benchmark with the paper's metrics (§4.3, Tables 1-4).

Input: the shard folder and a JSONL file (``pointvl predict`` writes one), one line per instance::

    {"instance_id": "...", "output": "<raw model text>", "attribute_answers": ["...", ...]}

- ``output`` is the model's raw text. A JSON object is accepted as the object: it is scored as its
  JSON text (``json.dumps``), exactly as if the model had written that text. Any other type is
  refused with one line.
- ``attribute_answers`` (optional) answer the record's attribute questions ``qa[1:]``, in order.

Each output is parsed and scored by :func:`pointvl.grca.verify.verify`, the verifier GRPO's rewards call,
with the same options (``num_keypoints``: 16, the paper's; ``keypoint_spread``: off), so a metric and its
reward are one formula on one parse:

- ``iou2d``, ``iou3d``: IoU of the de-quantized predicted box with the target box.
- ``kpa2d``, ``kpa3d``: fraction of predicted keypoints inside the *target* 2D/3D box (KPA).
- ``rpc``: IoU of the predicted bbox2d with the box enclosing the projected corners of the predicted
  bbox3d (the instance's K, R, t); 0 when a corner is behind the camera or either box is invalid.
- ``category_accuracy``: the output's ``answer`` equals ``qa[0].answer`` (the multiple-choice
  category question) after ``strip().casefold()``.
- ``attribute_accuracy``: the share of attribute questions ``qa[1:]`` of every record answered
  right (same comparison) by ``attribute_answers``; ``None`` (not computed, with the reason) when no
  prediction line carries ``attribute_answers`` or the split has no attribute question.
- ``qa_accuracy``: right answers over every QA pair asked: all pairs when attribute answers were
  given (a pair without an answer is wrong), else the category question alone.
- ``bleu1..4``, ``rouge1/2/L``, ``bertscore``: :mod:`pointvl.evaluation.text_metrics` (corpus BLEU of sacrebleu).

Every computed metric has a 95 % percentile-bootstrap interval over the records in ``intervals``
(``{metric: [lo, hi]}``, per category too; :mod:`pointvl.evaluation.stats`).

Geometry, category and ROUGE values are means over the split's records (``n``); a field that does not
parse scores 0; a prediction in which no field parses is counted in ``n_unparsable``; a record without
a prediction scores 0 everywhere and is counted in ``n_missing``. ``per_category`` (optional) repeats
every metric over each category's records. The JSON also records ``definitions`` and ``versions``.

Hostile input stays cheap: an output over the verifier's limits (:mod:`pointvl.grca.verify`:
:data:`MAX_OUTPUT_CHARS` characters, :data:`MAX_DEPTH` bracket levels) is not parsed: it is unparsable
and counted in ``n_over_limit`` too. A line nested too deep for the JSON reader counts the same way
when its ``instance_id`` can be read. Within the limits a parse costs at most about 0.3 s (``make bench``,
``benchmarks/bench_evaluate.py``). Repeated problems (duplicate ids, ids outside the split, missing
predictions) are one warning line each. An empty file, or one whose
ids match nothing in the split, is an error that names the split they belong to, if any.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pointvl.core import io as pio
from pointvl.core.errors import InputError
from pointvl.core.record import iter_records, list_shards, record_camera, record_target
from pointvl.core.spatial import QuantConfig
from pointvl.evaluation import text_metrics as tm
from pointvl.evaluation.predictions import Prediction, read_predictions
from pointvl.evaluation.stats import RESAMPLES, Statistic, bootstrap_interval, mean, ratio, resample_counts
from pointvl.grca.parse import FIELDS
from pointvl.grca.verify import MAX_DEPTH, MAX_OUTPUT_CHARS, output_limit, verify

logger = logging.getLogger(__name__)


GEOMETRY_KEYS: tuple[str, ...] = ("iou2d", "iou3d", "kpa2d", "kpa3d", "rpc")
QA_KEYS: tuple[str, ...] = ("category_accuracy", "attribute_accuracy", "qa_accuracy")
TEXT_KEYS: tuple[str, ...] = tm.BLEU_KEYS + tm.ROUGE_KEYS
OPTIONAL_KEYS: tuple[str, ...] = ("attribute_accuracy", "bertscore")
"""Metrics that are ``None`` (with the reason in ``not_computed``) when they cannot be computed."""
METRIC_KEYS: tuple[str, ...] = GEOMETRY_KEYS + ("category_accuracy", "qa_accuracy") + TEXT_KEYS
"""Metrics that always hold a number in [0, 1]."""
COUNT_KEYS: tuple[str, ...] = ("n", "n_unparsable", "n_over_limit", "n_missing", "n_attribute_questions")
_REWARD_OF = {"iou2d": "bbox2d", "iou3d": "bbox3d", "kpa2d": "kpts2d", "kpa3d": "kpts3d", "rpc": "rpc"}

DEFINITIONS: dict[str, str] = {
    "iou2d": "IoU of the de-quantized predicted bbox2d with the target (pixels)",
    "iou3d": "IoU of the de-quantized predicted axis-aligned bbox3d with the target (world units)",
    "kpa2d": "fraction of predicted kpts2d inside the target bbox2d (half a bin of tolerance)",
    "kpa3d": "fraction of predicted kpts3d inside the target bbox3d (half a bin of tolerance)",
    "rpc": "IoU of the predicted bbox2d with the box enclosing the projected predicted bbox3d corners",
    "category_accuracy": "answer == qa[0].answer after strip().casefold()",
    "attribute_accuracy": "attribute_answers[i] == qa[i + 1].answer after strip().casefold(), over all attribute pairs",
    "qa_accuracy": "right answers over every QA pair asked (all pairs with attribute answers, else qa[0])",
    "bleu1..4": "sacrebleu corpus BLEU, max_ngram_order n, 13a tokenizer, case-sensitive, exp smoothing, / 100",
    "rouge1/2/L": "rouge_score F-measure with the Porter stemmer, mean over records",
    "bertscore": "bert_score F1 (no rescaling, no idf), mean over records; only with a local model",
    "empty": "a missing or unparsable prediction scores 0 (an empty description for BLEU)",
    "limits": f"an output over {MAX_OUTPUT_CHARS} characters or nested deeper than {MAX_DEPTH} is unparsable",
}


@dataclass
class EvaluateConfig:
    """How predictions are scored (paper §4.3).

    Attributes:
        split: the split to score (default ``"test"``).
        quant: the coordinate bins the model writes (``docs/design.md#quantization``; default 1000 bins,
            3D range [-1, 1]).
        num_keypoints: keypoints a kpts2d/kpts3d field must hold to be scored (16, the paper's §4.1;
            None accepts any count >= 1); the same option as GRPO's ``grpo.grca.num_keypoints``.
        keypoint_spread: the optional keypoint-spread guard (0: off, the paper's KPA;
            :func:`pointvl.grca.rewards.output_rewards`); the same option as ``grpo.grca.keypoint_spread``.
        per_category: also break every metric down by category (``per_category`` in the result).
        bertscore_model: BERTScore's model, a local folder or a Hugging Face id already in the cache
            (default ``roberta-large``, bert_score's English default); never downloaded.
        bertscore_layers: the layer whose embeddings BERTScore compares (roberta-large: 17).
    """

    split: str = "test"
    quant: QuantConfig = field(default_factory=QuantConfig)
    num_keypoints: int | None = 16
    keypoint_spread: float = 0.0
    per_category: bool = False
    bertscore_model: str = "roberta-large"
    bertscore_layers: int = 17

    def __post_init__(self) -> None:
        if not self.split:
            raise ValueError("EvaluateConfig.split must name a split, e.g. 'test'")
        if self.num_keypoints is not None and self.num_keypoints < 1:
            raise ValueError(f"EvaluateConfig.num_keypoints must be None or >= 1 (paper: 16), got {self.num_keypoints}")
        if not 0 <= self.keypoint_spread <= 1:
            raise ValueError(f"EvaluateConfig.keypoint_spread must lie in [0, 1] (0: off), got {self.keypoint_spread}")
        if self.bertscore_layers < 1:
            raise ValueError(
                f"EvaluateConfig.bertscore_layers must be >= 1 (roberta-large: 17), got {self.bertscore_layers}"
            )










@dataclass
class RecordScore:
    """The scores of one record; ``status`` is ``ok``, ``unparsable``, ``over_limit`` or ``missing``."""

    instance_id: str
    category: str
    status: str
    scores: dict[str, float]
    attributes_right: int
    attributes_total: int
    hypothesis: str
    reference: str


def _qa_pairs(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    return json.loads(record["qa"]) if isinstance(record["qa"], str) else list(record["qa"])


def _same(a: str, b: Any) -> bool:
    return a.strip().casefold() == str(b).strip().casefold()


def score_record(record: Mapping[str, Any], pred: Prediction | None, config: EvaluateConfig,
                 rouge: tm.RougeScorer) -> RecordScore:
    """Per-record scores (geometry, category answer, ROUGE, attribute answers) of one prediction."""
    target, attributes = record_target(dict(record)), _qa_pairs(record)[1:]
    zero = dict.fromkeys((*GEOMETRY_KEYS, "category_accuracy", *tm.ROUGE_KEYS), 0.0)
    base = {"instance_id": record["instance_id"], "category": str(record["category"]),
            "attributes_total": len(attributes), "reference": target["description"]}
    if pred is None or pred.over_limit:
        return RecordScore(**base, status="missing" if pred is None else "over_limit", scores=zero,
                           attributes_right=0, hypothesis="")
    verdict = verify(pred.output, target, record_camera(dict(record)), config.quant, config.num_keypoints,
                     config.keypoint_spread)
    parsed, rewards = verdict.parsed, verdict.rewards
    scores = {k: float(rewards[r]) for k, r in _REWARD_OF.items()}
    scores["category_accuracy"] = float(rewards["answer"])
    hyp = parsed["description"].value if parsed["description"].valid else ""
    scores.update(rouge(hyp, target["description"]))
    answers = pred.attribute_answers or ()
    right = sum(_same(a, qa["answer"]) for a, qa in zip(answers, attributes, strict=False))
    status = "ok" if any(parsed[f].valid for f in FIELDS) else "unparsable"
    return RecordScore(**base, status=status, scores=scores, attributes_right=right, hypothesis=hyp)


def aggregate(rows: list[RecordScore], attributes_asked: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """Metrics and counts of ``rows`` (keys in the module docstring) and ``{metric: reason}`` not computed."""
    n = len(rows)
    metrics: dict[str, Any] = {k: sum(r.scores[k] for r in rows) / n for k in (*GEOMETRY_KEYS, "category_accuracy")}
    not_computed: dict[str, str] = {}
    pairs = sum(r.attributes_total for r in rows)
    right = sum(r.attributes_right for r in rows)
    if attributes_asked and pairs:
        metrics["attribute_accuracy"] = right / pairs
        metrics["qa_accuracy"] = (metrics["category_accuracy"] * n + right) / (n + pairs)
    else:
        metrics["attribute_accuracy"] = None
        not_computed["attribute_accuracy"] = (
            "the split has no attribute question" if not pairs
            else "no prediction line carries attribute_answers (qa_accuracy is the category question alone)"
        )
        metrics["qa_accuracy"] = metrics["category_accuracy"]
    metrics.update(tm.corpus_bleu([r.hypothesis for r in rows], [r.reference for r in rows]))
    metrics.update({k: sum(r.scores[k] for r in rows) / n for k in tm.ROUGE_KEYS})
    metrics["bertscore"] = sum(r.scores["bertscore"] for r in rows) / n if "bertscore" in rows[0].scores else None
    statuses = [r.status for r in rows]
    metrics.update(n=n, n_unparsable=statuses.count("unparsable") + statuses.count("over_limit"),
                   n_over_limit=statuses.count("over_limit"), n_missing=statuses.count("missing"),
                   n_attribute_questions=pairs)
    return metrics, not_computed


def record_statistics(rows: list[RecordScore], attributes_asked: bool) -> dict[str, Statistic]:
    """Every computed metric of :func:`aggregate` as a :class:`~pointvl.evaluation.stats.Statistic` of the
    records (same values), for bootstrap intervals and paired comparisons."""
    stats = {k: mean(np.array([r.scores[k] for r in rows])) for k in (*GEOMETRY_KEYS, "category_accuracy",
                                                                       *tm.ROUGE_KEYS)}
    if "bertscore" in rows[0].scores:
        stats["bertscore"] = mean(np.array([r.scores["bertscore"] for r in rows]))
    right = np.array([r.attributes_right for r in rows], dtype=np.float64)
    asked = np.array([r.attributes_total for r in rows], dtype=np.float64)
    if attributes_asked and asked.sum():
        stats["attribute_accuracy"] = ratio(right, asked)
        stats["qa_accuracy"] = ratio(stats["category_accuracy"].rows[:, 0] + right, 1 + asked)
    else:
        stats["qa_accuracy"] = stats["category_accuracy"]
    hyps, refs = [r.hypothesis for r in rows], [r.reference for r in rows]
    for order in range(1, 5):
        stats[f"bleu{order}"] = Statistic(
            np.asarray(tm.bleu_statistics(hyps, refs, order), dtype=np.float64),
            lambda s, o=order: np.apply_along_axis(tm.bleu_from_statistics, -1, s, o),
        )
    return stats


def intervals(rows: list[RecordScore], attributes_asked: bool) -> dict[str, list[float]]:
    """``{metric: [lo, hi]}``, the 95 % percentile-bootstrap interval of every computed metric over ``rows``
    (:mod:`pointvl.evaluation.stats`; the same resamples for every metric)."""
    counts = resample_counts(len(rows), RESAMPLES, seed=0)
    return {k: bootstrap_interval(st, counts=counts) for k, st in record_statistics(rows, attributes_asked).items()}


def _split_ids(shards_dir: str, split: str) -> set[str]:
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for path in list_shards(shards_dir, split):
        fs, p = pio.filesystem(path)
        with fs.open(p, "rb") as f:
            ids.update(pq.read_table(f, columns=["instance_id"]).column("instance_id").to_pylist())
    return ids


def _no_match(shards_dir: str, split: str, ids: Iterable[str]) -> InputError:
    """The error for predictions that match no record of ``split``, naming the split they belong to."""
    fs, root = pio.filesystem(shards_dir)
    names = {p.rsplit("/", 1)[-1].split("-", 1)[0] for p in pio.ls_matching(fs, root, "*-*-of-*.parquet")}
    given = set(ids)
    for other in sorted(names - {split}):
        if given & _split_ids(shards_dir, other):
            return InputError(f"the predictions are for the {other} split, not {split}: "
                              f"pass --split {other}, or predict the {split} split")
    return InputError(f"none of the {len(given)} predictions matches an instance_id of the {split} split "
                      f"of {shards_dir} (e.g. {sorted(given)[:2]})")


def score_records(shards_dir: str, predictions: Mapping[str, str | Prediction],
                  config: EvaluateConfig | None = None) -> list[RecordScore]:
    """One :class:`RecordScore` per record of the split, BERTScore included when it can be computed."""
    cfg = config or EvaluateConfig()
    preds = {k: v if isinstance(v, Prediction) else Prediction(v, None, output_limit(v))
             for k, v in predictions.items()}
    rouge = tm.RougeScorer()
    rows = [score_record(r, preds.get(r["instance_id"]), cfg, rouge)
            for r in iter_records(shards_dir, cfg.split)]
    if not rows:
        raise InputError(f"the {cfg.split} split of {shards_dir} has no records")
    matched = {r.instance_id for r in rows if r.status != "missing"}
    if not matched:
        raise _no_match(shards_dir, cfg.split, preds)
    extra = sorted(set(preds) - matched)
    if extra:
        logger.warning("%d predictions are for ids outside the %s split (ignored), e.g. %s",
                       len(extra), cfg.split, extra[:3])
    missing = [r.instance_id for r in rows if r.status == "missing"]
    if missing:
        logger.warning("%d/%d %s instances have no prediction (scored 0), e.g. %s",
                       len(missing), len(rows), cfg.split, missing[:5])
    over = [r.instance_id for r in rows if r.status == "over_limit"]
    if over:
        logger.warning("%d outputs are over the parse limits (counted unparsable), e.g. %s: %s",
                       len(over), over[0], preds[over[0]].over_limit)
    if tm.bertscore_unavailable(cfg.bertscore_model) is None:
        f1 = tm.bertscore_f1([r.hypothesis for r in rows], [r.reference for r in rows],
                             cfg.bertscore_model, cfg.bertscore_layers)
        for r, v in zip(rows, f1, strict=True):
            r.scores["bertscore"] = v
    return rows


def summarize(rows: list[RecordScore], config: EvaluateConfig, attributes_asked: bool) -> dict[str, Any]:
    """The evaluation JSON of scored rows: metrics, counts, ``not_computed``, definitions, versions."""
    metrics, not_computed = aggregate(rows, attributes_asked)
    reason = tm.bertscore_unavailable(config.bertscore_model)
    if reason:
        not_computed["bertscore"] = f"BERTScore not computed: {reason}"
    metrics["not_computed"] = not_computed
    metrics["intervals"] = intervals(rows, attributes_asked)
    if config.per_category:
        groups: dict[str, list[RecordScore]] = defaultdict(list)
        for r in rows:
            groups[r.category].append(r)
        metrics["per_category"] = {c: {**aggregate(g, attributes_asked)[0], "intervals": intervals(g, attributes_asked)}
                                   for c, g in sorted(groups.items())}
    metrics.update(
        split=config.split,
        bins=config.quant.bins,
        definitions={**DEFINITIONS, "bleu_signature": tm.bleu_signature()},
        versions={name: tm.package_version(name) for name in ("pointvl", "sacrebleu", "rouge-score", "bert-score")},
    )
    if "bertscore" not in not_computed:
        metrics["definitions"]["bertscore_model"] = f"{config.bertscore_model}, layer {config.bertscore_layers}"
    return metrics


def evaluate(shards_dir: str, predictions: Mapping[str, str | Prediction],
             config: EvaluateConfig | None = None) -> dict[str, Any]:
    """The evaluation JSON of ``predictions`` (id -> output text or :class:`Prediction`) on ``config.split``."""
    cfg = config or EvaluateConfig()
    rows = score_records(shards_dir, predictions, cfg)
    asked = any(isinstance(p, Prediction) and p.attribute_answers is not None for p in predictions.values())
    return summarize(rows, cfg, asked)


def format_table(metrics: Mapping[str, Any], name: str = "model") -> str:
    """Markdown tables shaped like the paper's Tables 1-4 for one run (:func:`pointvl.evaluation.report.tables`)."""
    from pointvl.evaluation.report import tables

    return tables({name: metrics})


def run(shards_dir: str, predictions_path: str, out_path: str, config: EvaluateConfig | None = None) -> dict:
    """Evaluate a predictions file and write the evaluation JSON atomically to ``out_path``."""
    metrics = evaluate(shards_dir, read_predictions(predictions_path), config)
    pio.write_json(out_path, metrics)
    logger.info("wrote %s (n=%d)", out_path, metrics["n"])
    return metrics
