"""Stage `write_shards`: join a work shard's stage tables into benchmark records (one Parquet file).

The record contract is ``schemas/record.schema.json`` / :func:`pointvl.core.record.record_schema`.
Required inputs: ``sample_points``, ``geometry``, ``render``, ``kpts2d``. Optional inputs, when
their stage ran: ``refine`` (else ``refined`` is the render), ``synthesize`` (else ``image`` is
``refined``), ``annotate`` (QA, description, the chosen ``bbox2d``) and ``review`` (rejected
instances are left out). Items whose annotation failed are left out and counted. Every record's
``provenance`` says which stage ran with which backend (and how the mesh was normalized).

Like a stage table, a final shard is finished only when it checks out: its stats
(``RUN/stages/write_shards/shard-{i:05d}.stats.json``, written first) record the file's SHA-256 and
the checksums of the stage tables it joined. :meth:`WriteShards.finished` compares content, not
modification times: a final file that is truncated or altered is moved aside and rebuilt; one whose
inputs changed since (e.g. failed annotations done again) is rebuilt.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pyarrow as pa

from pointvl import __version__
from pointvl.dataset.plan import Shard, load_plan
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.base import (
    Drops,
    ShardOutput,
    Stage,
    file_sha256,
    finished,
    move_aside,
    ran,
    read_stage_table,
    recorded_sha,
    sha256_bytes,
)
from pointvl.core import io
from pointvl.core.record import IMAGE_COLUMNS, record_schema

logger = logging.getLogger(__name__)

REQUIRED = ("sample_points", "geometry", "render", "kpts2d")
OPTIONAL = ("refine", "synthesize", "annotate", "review")
STAGE = "write_shards"


@dataclass
class WriteShardsConfig:
    """Final shard files.

    Args:
        num_keypoints: keypoints per record (must match geometry and kpts2d; paper: 16).
    """

    num_keypoints: int = 16

    def __post_init__(self) -> None:
        if self.num_keypoints < 1:
            raise ValueError(f"write_shards.num_keypoints must be >= 1, got {self.num_keypoints}")


class WriteShards(Stage):
    """Stage ``write_shards``: the final shard of a work shard, joined from its stage tables."""

    name = STAGE
    inputs = (*REQUIRED, *OPTIONAL)
    config_class = WriteShardsConfig

    @property
    def schema(self) -> pa.Schema:  # type: ignore[override]  # the keypoint count is configured
        return record_schema(self.config.num_keypoints)

    def finished(self, run: RunFolder | str, shard_index: int) -> bool:
        """The final file exists, has the content recorded when it was written (else it is moved aside),
        and was joined from the stage tables there are now (so a stage re-run reaches the shard)."""
        folder = RunFolder.of(run)
        final = folder.final_shard(load_plan(folder).shards[shard_index])
        if not io.exists(final):
            return False
        recorded = recorded_sha(folder, STAGE, shard_index)
        if recorded is None or file_sha256(final) != recorded:
            why = ("no record of its checksum" if recorded is None
                   else "its bytes do not match the checksum recorded when it was written (truncated or altered)")
            move_aside(folder, [final], why)
            return False
        return io.read_json(folder.stage_stats(STAGE, shard_index)).get("inputs") == _inputs(folder, shard_index)

    def process_shard(self, run: RunFolder, shard_index: int, drops: Drops) -> ShardOutput:
        shard = load_plan(run).shards[shard_index]
        missing = [s for s in REQUIRED if not finished(run, s, shard_index)]
        if missing:
            raise RuntimeError(f"{shard.name}: stages {missing} have not finished; run them first")
        inputs = _inputs(run, shard_index)
        tables = {s: _rows_by_id(read_stage_table(run, s, shard_index)) for s in inputs}
        return ShardOutput(self._records(shard, tables, drops), {"inputs": inputs}, made_from=tuple(inputs))

    def write(self, run: RunFolder | str, shard_index: int, out: ShardOutput | list[dict], drops: Drops,
              seconds: float) -> dict:
        """Write ``shards/{split}-{i:05d}-of-{n:05d}.parquet``: its stats, with the file's checksum and its
        inputs', first; the file last."""
        folder, out = RunFolder.of(run), out if isinstance(out, ShardOutput) else ShardOutput(out)
        shard = load_plan(folder).shards[shard_index]
        table = self.to_table(out.rows)
        data = io.table_bytes(table)
        stats = {"instances": table.num_rows, **drops.stats(), **out.stats, "table_sha256": sha256_bytes(data),
                 "seconds": round(seconds, 3)}
        io.write_json(folder.stage_stats(STAGE, shard_index), stats)
        io.write_bytes(folder.final_shard(shard), data)
        logger.info("write_shards %s → %s: %d records", shard.name, shard.final_name, table.num_rows)
        return stats

    def _records(self, shard: Shard, tables: dict[str, dict[str, dict]], drops: Drops) -> list[dict]:
        models = {(m.synset_id, m.model_id): m for m in shard.models}
        planned = set(shard.instance_ids())
        records = []
        for iid, render in tables["render"].items():
            if iid not in planned:  # stage tables are checked against the plan; this is the last guard
                drops.add(iid, "not_in_plan", f"not an instance of {shard.name}")
                continue
            missing = [s for s in (*REQUIRED, "refine", "synthesize") if s in tables and iid not in tables[s]]
            if missing:  # dropped by an earlier stage (e.g. an empty mask), counted there
                continue
            review = tables.get("review", {}).get(iid)
            if review is not None and review["decision"] != "approved":  # rejected, or held for a person
                drops.add(iid, f"{review['decision']}_in_review", review.get("reason") or "", logging.INFO)
                continue
            annotate = tables.get("annotate", {}).get(iid)
            if annotate is not None and annotate["annotate_status"] != "ok":
                drops.add(iid, "annotate_failed", annotate.get("annotate_failure_reason") or "", logging.INFO)
                continue
            refine = tables.get("refine", {}).get(iid)
            synth = tables.get("synthesize", {}).get(iid)
            points, geometry, kpts = (tables[s][iid] for s in ("sample_points", "geometry", "kpts2d"))
            model = models[(render["synset_id"], render["model_id"])]
            refined = refine["refined"] if refine else render["render"]
            provenance = {
                "pipeline_version": __version__,
                "render": {"backend": render["render_backend"]},
                "mesh": json.loads(render.get("mesh_normalization") or '{"normalized": false}'),
                "refine": json.loads(refine["refine_provenance"]) if refine else "not run",
                "synthesize": json.loads(synth["synthesize_provenance"]) if synth else "not run",
                "annotate": json.loads(annotate["annotate_provenance"]) if annotate else "not run",
                # the decision, not its time: the review log keeps when, and shards stay reproducible
                "review": {k: review[k] for k in ("decision", "reason", "reviewer")} if review else "not run",
            }
            images = {
                "render": render["render"], "refined": refined, "image": synth["image"] if synth else refined,
                "mask": render["mask"], "depth": render["depth"], "normal_map": render["normal_map"],
            }
            records.append({
                "instance_id": iid, "synset_id": model.synset_id, "model_id": model.model_id,
                "category": model.category, "split": model.split, "view_index": render["view_index"],
                "points": points["points"], "normals": points["normals"],
                **{k: {"bytes": images[k], "path": None} for k in IMAGE_COLUMNS},
                "depth_scale": render["depth_scale"],
                **{k: render[k] for k in ("K", "R", "t", "width", "height", "elevation_deg", "azimuth_deg")},
                "bbox2d": annotate["bbox2d"] if annotate else kpts["bbox2d"],
                "bbox3d": geometry["bbox3d"], "kpts2d": kpts["kpts2d"], "kpts3d": geometry["kpts3d"],
                "qa": annotate["qa"] if annotate else "[]",
                "description": annotate["description"] if annotate else "",
                "bbox2d_mask": kpts["bbox2d"],
                "bbox2d_vlm": annotate["bbox2d_vlm"] if annotate else None,
                "vlm_agreement": annotate["vlm_agreement"] if annotate else None,
                "drift": synth["drift"] if synth else None,
                "flagged": bool((synth and synth["drift_flagged"]) or (annotate and annotate["annotate_flagged"])
                                or (refine and refine.get("align_flagged"))),  # absent in older runs' tables
                "provenance": json.dumps(provenance, sort_keys=True),
            })
        return records


def _inputs(run_dir: str, shard_index: int) -> dict[str, str | None]:
    """Checksums of the stage tables a final shard joins (required ones, and optional ones that ran)."""
    return {s: recorded_sha(run_dir, s, shard_index) for s in (*REQUIRED, *OPTIONAL)
            if s in REQUIRED or ran(run_dir, s, shard_index)}


def _rows_by_id(table: pa.Table) -> dict[str, dict]:
    return {row["instance_id"]: row for row in table.to_pylist()}
