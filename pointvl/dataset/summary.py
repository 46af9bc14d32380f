"""What a build produced: counts per split and category, why things were dropped, where it is.

Read from the run folder alone (cleaning report, stage stats, final shards), so it describes a
resumed build exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pointvl.dataset.dag import STAGES
from pointvl.dataset.plan import load_plan
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.base import finished, read_stats
from pointvl.dataset.stages.write_shards import STAGE as WRITE_SHARDS
from pointvl.core import io


def summarize(run_dir: str) -> dict:
    folder = RunFolder.of(run_dir)
    plan = load_plan(run_dir)
    fs, _ = io.filesystem(run_dir)
    with fs.open(io.filesystem(folder.cleaning_report)[1], "rb") as f:
        report = pacsv.read_csv(f).to_pylist()
    dropped = Counter(f"clean:{r['reason']}" for r in report if r["status"] == "dropped")
    backends: Counter[str] = Counter()
    review: Counter[str] = Counter()
    failed: Counter[str] = Counter()  # annotation failures by kind (qa, vlm), over finished shards
    misaligned = 0  # refine's alignment gate, flagged or dropped (stats "align_flagged")
    for shard in plan.shards:
        for stage in (s.name for s in STAGES):
            if stage == WRITE_SHARDS:  # a final shard's stats exist once it was written
                if not io.exists(folder.stage_stats(stage, shard.index)):
                    continue
            elif not finished(run_dir, stage, shard.index):
                continue
            stats = read_stats(run_dir, stage, shard.index)
            if stage == "review":
                review.update({k: stats.get(k, 0) for k in ("approved", "rejected", "held")})
                dropped.update({f"review:{k}": stats[k] for k in ("rejected", "held") if stats.get(k)})
            if stage == "refine":
                misaligned += stats.get("align_flagged", 0)
            if stage == "annotate":
                failed.update({k.removeprefix("failed_"): v for k, v in stats.items() if k.startswith("failed_")})
                failed["items"] += stats.get("failed", 0)
            # review decisions are counted above as review:<decision>, not again as write_shards drops
            dropped.update({f"{stage}:{k.removeprefix('dropped_')}": v for k, v in stats.items()
                            if k.startswith("dropped_") and not k.endswith("_in_review")})
    counts: Counter[tuple[str, str]] = Counter()
    shard_files = []
    flagged = 0
    for shard in plan.shards:
        path = folder.final_shard(shard)
        if not io.exists(path):
            continue
        shard_files.append(path)
        with fs.open(io.filesystem(path)[1], "rb") as f:
            table = pq.read_table(f, columns=["split", "category", "flagged", "provenance"])
        for row in table.to_pylist():
            counts[(row["split"], row["category"])] += 1
            flagged += bool(row["flagged"])
            provenance = json.loads(row["provenance"])
            for stage in ("render", "refine", "synthesize", "annotate"):
                value = provenance.get(stage)
                backends[f"{stage}:{value.get('backend') if isinstance(value, dict) else value}"] += 1
    per_split = Counter()
    for (split, _), n in counts.items():
        per_split[split] += n
    config = io.read_json(folder.config) if io.exists(folder.config) else {}
    retry = (f"pointvl build --shapenet {config.get('shapenet', 'SHAPENET')} --out {run_dir} "
             "--config CONFIG --redo-failed")
    return {
        "run_dir": run_dir,
        "shards_dir": folder.shards,
        "shard_files": shard_files,
        "shards_planned": len(plan.shards),
        "records": sum(counts.values()),
        "per_split": dict(sorted(per_split.items())),
        "per_split_category": {f"{s}/{c}": n for (s, c), n in sorted(counts.items())},
        "dropped": dict(sorted(dropped.items())),
        "flagged": flagged,
        "refine_misaligned": misaligned,
        "annotate_failed": {"items": failed.pop("items", 0), **dict(sorted(failed.items())), "retry": retry},
        "review": {"approved": review["approved"], "rejected": review["rejected"], "held": review["held"]},
        "backends": dict(sorted(backends.items())),
    }


def format_summary(summary: dict) -> str:
    """A plain-text summary for the terminal."""
    lines = [f"records: {summary['records']} in {len(summary['shard_files'])}/{summary['shards_planned']} shards"]
    lines += [f"  {split:<6} {n}" for split, n in summary["per_split"].items()]
    lines.append("per split/category:")
    lines += [f"  {key:<28} {n}" for key, n in summary["per_split_category"].items()]
    lines.append("dropped (stage:reason):")
    lines += [f"  {key:<40} {n}" for key, n in summary["dropped"].items()] or ["  none"]
    lines.append(annotate_failed_line(summary))
    lines.append(alignment_line(summary))
    lines.append(f"flagged for review: {summary['flagged']}; review: {summary['review']['approved']} approved, "
                 f"{summary['review']['rejected']} rejected, {summary['review']['held']} held "
                 "(RUN/reports/review_log.jsonl)")
    lines.append("backends: " + ", ".join(f"{k} ×{v}" for k, v in summary["backends"].items()))
    lines.append(f"shards: {summary['shards_dir']}")
    return "\n".join(lines)


def annotate_failed_line(summary: dict) -> str:
    """How many items failed annotation (left out of the shards), why, and the command that retries them."""
    failed = summary["annotate_failed"]
    if not failed["items"]:
        return "annotation failed: 0 items"
    kinds = ", ".join(f"{k} {v}" for k, v in failed.items() if k not in ("items", "retry"))
    return (f"annotation failed: {failed['items']} items ({kinds}), left out of the shards; "
            f"retry them (cached replies cost nothing): {failed['retry']}")


def alignment_line(summary: dict) -> str:
    """How many refined images the alignment gate found misaligned with their render."""
    n = summary["refine_misaligned"]
    dropped = summary["dropped"].get("refine:misaligned", 0)
    return (f"refined images misaligned with the render (refine's alignment gate): {n}"
            + (f", {dropped} dropped" if dropped else f"{', flagged for review' if n else ''}"))


def dataset_card(summary: dict) -> str:
    """The ``README.md`` beside the shards (a Hugging Face dataset card)."""
    splits = "\n".join(
        f"  - split: {split}\n    path: \"{split}-*.parquet\"" for split in summary["per_split"]
    )
    rows = "\n".join(f"| {key.split('/')[0]} | {key.split('/')[1]} | {n} |"
                     for key, n in summary["per_split_category"].items())
    drops = "\n".join(f"| {key} | {n} |" for key, n in summary["dropped"].items()) or "| none | 0 |"
    return f"""---
configs:
- config_name: default
  data_files:
{splits}
license: other
task_categories:
- visual-question-answering
tags:
- 3d
- point-cloud
- shapenet
---
# Generative-Refined 3D-VL benchmark (built by pointvl)

One row per instance (`{{synset_id}}-{{model_id}}-{{view_index}}`): a Poisson-disk point cloud, the
render / refined / photoreal images with mask, depth and normals, the OpenCV camera `K, R, t`,
grounding targets (`bbox2d`, `bbox3d`, 16 `kpts2d` and `kpts3d`), QA pairs, a description, and the
provenance of every stage. The record contract is `schemas/record.schema.json` in the pointvl
repository; images decode with `datasets.load_dataset("parquet", data_files=...)`.

Source meshes: ShapeNetCore v2 (see its terms of use). {summary['records']} records.

| split | category | records |
|---|---|---|
{rows}

Dropped during the build (stage:reason):

| reason | models/items |
|---|---|
{drops}

{annotate_failed_line(summary)}.

{alignment_line(summary)}.
"""
