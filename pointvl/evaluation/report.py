"""The paper's tables and plots for one or more runs: ``pointvl report`` (paper §4, Tables 1-4).

``OUT/report.md`` holds, for every run (a model, or a Table 3 variant), tables shaped like the paper's
with three decimals: Table 1 (IoU2D, KPA-2D, the 2D VLM comparison), Table 2 (IoU3D, KPA-3D, RPC),
Table 3 (all five geometric metrics, the ablation), Table 4 (BLEU-1..4, ROUGE-1/2/L, BERTScore, QA
accuracy) and the QA breakdown (category, attribute, all), then the counts and what was not computed.
Next to it, PNG plots (matplotlib, Agg): ``metrics.png`` (bars per metric across runs),
``per_category.png`` (heat map of each run's metrics per category), ``iou_hist.png`` (per-record IoU2D
and IoU3D) and, given a training run folder, ``training_curves.png`` (loss and mean rewards per step).
``OUT/<run>.json`` is each run's evaluation JSON (``per_category`` included).

Uncertainty (:mod:`pointvl.evaluation.stats`): every value has its 95 % bootstrap interval over records;
with two runs or more, each run is compared with the first on the same records (difference, paired
bootstrap interval, permutation p-value; ``OUT/comparisons.json``). Runs from training run folders
(``RUN/eval/predictions.jsonl``) carry their budget (``RUN/compute.json``): runs whose training samples
differ by more than 5 % are refused unless ``allow_unmatched`` (``--allow-unmatched``) says so.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from pointvl.core import io as pio
from pointvl.core.errors import InputError
from pointvl.core.extras import require
from pointvl.evaluation.predictions import read_predictions
from pointvl.evaluation.scoring import EvaluateConfig, RecordScore, record_statistics, score_records, summarize
from pointvl.evaluation.stats import paired_comparison

logger = logging.getLogger(__name__)

TABLES: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("Table 1: 2D grounding", "Model", (("IoU2D", "iou2d"), ("KPA-2D", "kpa2d"))),
    ("Table 2: 3D grounding and consistency", "Model", (("IoU3D", "iou3d"), ("KPA-3D", "kpa3d"), ("RPC", "rpc"))),
    ("Table 3: all geometric metrics (ablations)", "Method",
     (("IoU2D", "iou2d"), ("IoU3D", "iou3d"), ("KPA-2D", "kpa2d"), ("KPA-3D", "kpa3d"), ("RPC", "rpc"))),
    ("Table 4: language", "Model",
     (("B-1", "bleu1"), ("B-2", "bleu2"), ("B-3", "bleu3"), ("B-4", "bleu4"), ("R-1", "rouge1"),
      ("R-2", "rouge2"), ("R-L", "rougeL"), ("BERTScore", "bertscore"), ("QA Acc.", "qa_accuracy"))),
    ("Question answering", "Model",
     (("Category", "category_accuracy"), ("Attribute", "attribute_accuracy"), ("All QA", "qa_accuracy"))),
)
HEATMAP_KEYS: tuple[str, ...] = ("iou2d", "iou3d", "kpa2d", "kpa3d", "rpc", "category_accuracy")
_NAME = re.compile(r"^[\w .+()-]{1,64}$")


def _cell(value: Any, interval: Sequence[float] | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if interval is None else f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [list(head), ["---"] * len(head), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def tables(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """The paper-shaped tables of ``runs`` (name -> evaluation JSON), counts and not-computed notes; each
    value with its 95 % bootstrap interval over records (``[lo, hi]``) when the JSON holds ``intervals``."""
    parts = []
    for title, first, columns in TABLES:
        rows = [[name, *(_cell(m.get(key), m.get("intervals", {}).get(key)) for _, key in columns)]
                for name, m in runs.items()]
        parts.append(f"**{title}**\n\n" + _markdown([first, *(c for c, _ in columns)], rows))
    counts = [[name, *(str(m[k]) for k in ("n", "n_unparsable", "n_over_limit", "n_missing"))]
              for name, m in runs.items()]
    parts.append(_markdown(["Run", "n", "unparsable", "over limit", "missing"], counts))
    notes = sorted({f"{key}: {why}" for m in runs.values() for key, why in m.get("not_computed", {}).items()})
    if notes:
        parts.append("Not computed (–): " + "; ".join(notes))
    return "\n\n".join(parts)


def _pyplot() -> Any:
    require("matplotlib", extra="eval", purpose="the report's plots").use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    pio.write_bytes(path, buf.getvalue())


def plot_metrics(runs: Mapping[str, Mapping[str, Any]], path: str) -> None:
    """Grouped bars: one group per metric, one bar per run (metrics that are not computed are left out)."""
    plt = _pyplot()
    keys = [k for _, _, cols in TABLES[2:] for _, k in cols]
    keys = [k for k in dict.fromkeys(keys) if all(m.get(k) is not None for m in runs.values())]
    fig, ax = plt.subplots(figsize=(max(6, len(keys) * 0.9), 3.5))
    width = 0.8 / len(runs)
    for j, (name, m) in enumerate(runs.items()):
        ax.bar([i + j * width for i in range(len(keys))], [m[k] for k in keys], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_per_category(runs: Mapping[str, Mapping[str, Any]], path: str) -> None:
    """One heat map per run: categories (rows) x metrics (columns), values written in the cells."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 0.4 * len(next(iter(runs.values()))
                                                                             ["per_category"]) + 1.8), squeeze=False)
    for ax, (name, m) in zip(axes[0], runs.items(), strict=True):
        cats = list(m["per_category"])
        grid = [[m["per_category"][c][k] for k in HEATMAP_KEYS] for c in cats]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(HEATMAP_KEYS)), HEATMAP_KEYS, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(cats)), cats, fontsize=7)
        ax.set_title(name, fontsize=9)
    _save(fig, path)


def plot_iou_histograms(rows: Mapping[str, list[RecordScore]], path: str) -> None:
    """Per-record IoU2D and IoU3D of every run (missing and unparsable records at 0 included)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key in zip(axes, ("iou2d", "iou3d"), strict=True):
        for name, scored in rows.items():
            ax.hist([r.scores[key] for r in scored], bins=20, range=(0, 1), histtype="step", label=name)
        ax.set_xlabel(key)
        ax.set_ylabel("records")
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_curves(run_dir: str, stages: list[str]) -> str:
    """Plot loss (and GRPO mean rewards) per step of each finished stage to ``RUN/curves.png``; a second row
    shows GRPO's diagnostics (zero-spread groups per field, truncated and unparsable completions, clip
    fraction) when a stage logged them."""
    require("matplotlib", extra="train", purpose="the training-curve plot").use("Agg")
    import matplotlib.pyplot as plt

    histories = {stage: pio.read_json(pio.join(run_dir, stage, "history.json")) for stage in stages}
    diagnosed = any(h and "truncated" in h[0] for h in histories.values())
    fig, axes = plt.subplots(1 + diagnosed, len(stages), figsize=(5 * len(stages), 3.5 * (1 + diagnosed)),
                             squeeze=False)
    for j, (stage, history) in enumerate(histories.items()):
        ax = axes[0][j]
        steps = [r["step"] for r in history]
        ax.plot(steps, [r["loss"] for r in history], label="loss")
        for key in ("reward_format", "reward_bbox2d", "reward_bbox3d", "reward_kpts3d", "reward_rpc"):
            if history and key in history[0]:
                ax.plot(steps, [r[key] for r in history], label=key.removeprefix("reward_"))
        ax.set_title(stage)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
        if not diagnosed:
            continue
        ax = axes[1][j]
        if not (history and "truncated" in history[0]):
            ax.axis("off")
            continue
        keys = [k for k in history[0] if k.startswith("zero_spread_")] + ["truncated", "unparsable", "clip_fraction"]
        for key in keys:
            ax.plot(steps, [r[key] for r in history], label=key.replace("zero_spread_", "zero spread "))
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{stage}: diagnostics (share)")
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path = pio.join(run_dir, "curves.png")
    pio.write_bytes(path, buf.getvalue())
    return path


def training_curves(train_run: str, path: str) -> None:
    """The loss and reward curves of every finished stage of a training run folder, copied to ``path``
    (drawn by :func:`plot_curves`, which also refreshes ``RUN/curves.png``)."""
    fs, root = pio.filesystem(train_run)
    stages = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in pio.ls_matching(fs, root, "*")
                    if fs.exists(f"{p.rstrip('/')}/history.json"))
    if not stages:
        raise InputError(f"{train_run} has no training stage (no */history.json); give a `pointvl train --run` folder")
    order = {"sft": 0}  # SFT first, as trained
    pio.write_bytes(path, pio.read_bytes(plot_curves(train_run, sorted(stages, key=lambda s: (order.get(s, 1), s)))))


def parse_runs(specs: Sequence[str]) -> dict[str, str]:
    """``["NAME=PREDICTIONS.jsonl", ...]`` -> ``{name: path}``; one-line errors for bad or repeated names."""
    runs: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not path:
            raise InputError(f"--run {spec!r}: expected NAME=PREDICTIONS.jsonl")
        if not _NAME.match(name):
            raise InputError(f"--run {spec!r}: a run name is 1-64 letters, digits, spaces or . + ( ) - _")
        if name in runs:
            raise InputError(f"run name {name!r} is used twice (--run {name}={runs[name]} and --run {spec})")
        runs[name] = path
    if not runs:
        raise InputError("give at least one --run NAME=PREDICTIONS.jsonl")
    return runs


BUDGET_TOLERANCE = 0.05
"""Runs whose training budgets (``compute.json`` samples) differ by more than this share are not put side
by side unless ``allow_unmatched``."""


def run_budget(predictions_path: str) -> dict[str, float] | None:
    """The training budget of the run that wrote ``predictions_path`` (``RUN/eval/predictions.jsonl``):
    samples, tokens and generated tokens summed over the stages of ``RUN/compute.json``; None without one."""
    folder = predictions_path.rstrip("/").rsplit("/", 1)[0] if "/" in predictions_path else "."
    for candidate in (folder, folder.rsplit("/", 1)[0] if "/" in folder else "."):
        path = pio.join(candidate, "compute.json")
        if pio.exists(path):
            rows = pio.read_json(path)
            return {k: float(sum(r[k] for r in rows)) for k in ("samples", "tokens", "generated_tokens")}
    return None


def check_budgets(runs: Mapping[str, str], allow_unmatched: bool) -> tuple[dict[str, dict[str, float] | None], str]:
    """Each run's budget and a note; InputError when known budgets differ by more than 5 % in samples and
    ``allow_unmatched`` is not set (the compared runs must have cost the same)."""
    budgets = {name: run_budget(path) for name, path in runs.items()}
    known = {name: b["samples"] for name, b in budgets.items() if b is not None}
    note = ""
    if len(known) > 1 and min(known.values()) > 0:
        spread = max(known.values()) / min(known.values()) - 1
        if spread > BUDGET_TOLERANCE:
            listed = ", ".join(f"{name} {v:.0f}" for name, v in known.items())
            if not allow_unmatched:
                raise InputError(f"the runs' training budgets differ by {100 * spread:.0f}% in samples (compute.json: "
                                 f"{listed}), over {100 * BUDGET_TOLERANCE:.0f}%: compare budget-matched runs, or "
                                 "pass --allow-unmatched to put them side by side anyway")
            note = (f"**Unmatched budgets** (--allow-unmatched): training samples differ by {100 * spread:.0f}% "
                    f"({listed}).")
    return budgets, note


def comparison_tables(reference: str, stats: Mapping[str, Mapping[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Paired comparisons of every run with ``reference`` on the same records: markdown and the numbers."""
    parts, numbers = [], {}
    for name, st in stats.items():
        if name == reference:
            continue
        rows, numbers[name] = [], {}
        for key in st:
            if key not in stats[reference]:
                continue
            c = paired_comparison(st[key], stats[reference][key])
            numbers[name][key] = c
            lo, hi = c["interval"]
            rows.append([key, f"{float(st[key]()):.3f}", f"{float(stats[reference][key]()):.3f}",
                         f"{c['difference']:+.3f}", f"[{lo:+.3f}, {hi:+.3f}]", f"{c['p_value']:.4f}"])
        parts.append(f"**{name} vs {reference}** (paired over the same records)\n\n"
                     + _markdown(["Metric", name, reference, "Difference", "95% interval", "p"], rows))
    return "\n\n".join(parts), numbers


def report(shards_dir: str, out_dir: str, runs: Mapping[str, str], train_run: str | None = None,
           config: EvaluateConfig | None = None, allow_unmatched: bool = False) -> str:
    """Score every run on the split, write ``OUT/report.md``, the PNG plots, ``OUT/<run>.json`` and, for two
    runs or more, ``OUT/comparisons.json`` (each run against the first); returns the report's markdown.

    Refuses (InputError) runs whose ``compute.json`` budgets differ by more than 5 % unless ``allow_unmatched``.
    """
    cfg = replace(config or EvaluateConfig(), per_category=True)  # the heat map needs the breakdown
    budgets, budget_note = check_budgets(runs, allow_unmatched)
    predictions = {name: read_predictions(path) for name, path in runs.items()}  # every file checked first
    metrics, scored, stats = {}, {}, {}
    for name, preds in predictions.items():
        logger.info("report: scoring %s (%d predictions)", name, len(preds))
        scored[name] = score_records(shards_dir, preds, cfg)
        asked = any(p.attribute_answers is not None for p in preds.values())
        metrics[name] = summarize(scored[name], cfg, asked)
        stats[name] = record_statistics(scored[name], asked)
        pio.write_json(pio.join(out_dir, f"{name}.json"), metrics[name])
    comparisons = ""
    if len(runs) > 1:
        reference = next(iter(runs))
        comparisons, numbers = comparison_tables(reference, stats)
        pio.write_json(pio.join(out_dir, "comparisons.json"), {"reference": reference, "runs": numbers})
    budget_rows = [[name, *(f"{b[k]:.0f}" if b else "–" for k in ("samples", "tokens", "generated_tokens"))]
                   for name, b in budgets.items()]
    plots = {"metrics.png": "Metrics across runs", "per_category.png": "Per-category metrics",
             "iou_hist.png": "Per-record IoU"}
    plot_metrics(metrics, pio.join(out_dir, "metrics.png"))
    plot_per_category(metrics, pio.join(out_dir, "per_category.png"))
    plot_iou_histograms(scored, pio.join(out_dir, "iou_hist.png"))
    if train_run:
        training_curves(train_run, pio.join(out_dir, "training_curves.png"))
        plots["training_curves.png"] = f"Training curves of {train_run}"
    n = next(iter(metrics.values()))["n"]
    text = "\n\n".join([
        f"# Benchmark report: {cfg.split} split of {shards_dir} ({n} records)",
        "Values: the metric and its 95 % percentile-bootstrap interval over the records [lo, hi].",
        tables(metrics),
        "**Training budgets** (compute.json, summed over stages; – : not a training run)\n\n"
        + _markdown(["Run", "samples", "tokens", "generated tokens"], budget_rows),
        *([budget_note] if budget_note else []),
        *([comparisons, "Difference: run minus the first run; interval: paired bootstrap over records; p: paired "
                        "permutation test (two-sided)."] if comparisons else []),
        "Definitions and versions are in each run's JSON beside this file.",
        *(f"![{title}]({name})" for name, title in plots.items()),
    ]) + "\n"
    pio.write_bytes(pio.join(out_dir, "report.md"), text.encode())
    return text
