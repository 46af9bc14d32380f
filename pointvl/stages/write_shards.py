"""Stage `write_shards`: join a work shard's stage tables into benchmark records (one Parquet file).

The record contract is ``schemas/record.schema.json`` / :func:`pointvl.record.record_schema`.
Required inputs: ``sample_points``, ``geometry``, ``render``, ``kpts2d``. Optional inputs, when
their stage ran: ``refine`` (else ``refined`` is the render), ``synthesize`` (else ``image`` is
``refined``), ``annotate`` (QA, description, the chosen ``bbox2d``) and ``review`` (rejected
instances are left out). Items whose annotation failed are left out and counted. Every record's
``provenance`` says which stage ran with which backend (and how the mesh was normalized).

Like a stage table, a final shard is finished only when it checks out: its stats
(``RUN/stages/write_shards/shard-{i:05d}.stats.json``, written first) record the file's SHA-256 and
the checksums of the stage tables it joined. :meth:`WriteShards.up_to_date` compares content, not
modification times: a final file that is truncated or altered is moved aside and rebuilt; one whose
inputs changed since (e.g. failed annotations done again) is rebuilt.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import pyarrow as pa

from pointvl import __version__, io
from pointvl.plan import Shard, load_plan
from pointvl.record import IMAGE_COLUMNS, record_schema
from pointvl.run_folder import RunFolder
from pointvl.stages.base import (
    Drops,
    file_sha256,
    finished,
    move_aside,
    read_stage_table,
    recorded_sha,
    sha256_bytes,
)

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


class WriteShards:
    def __init__(self, config: WriteShardsConfig) -> None:
        self.config = config

    @staticmethod
    def up_to_date(run_dir: str, shard_index: int) -> bool:
        """The final file exists, has the content recorded when it was written (else it is moved aside),
        and was joined from the stage tables there are now (so a stage re-run reaches the shard)."""
        folder = RunFolder.of(run_dir)
        shard = load_plan(run_dir).shards[shard_index]
        final = folder.final_shard(shard)
        if not io.exists(final):
            return False
        recorded = recorded_sha(run_dir, STAGE, shard_index)
        if recorded is None or file_sha256(final) != recorded:
            why = ("no record of its checksum" if recorded is None
                   else "its bytes do not match the checksum recorded when it was written (truncated or altered)")
            move_aside(run_dir, [final], why)
            return False
        return io.read_json(folder.stage_stats(STAGE, shard_index)).get("inputs") == _inputs(run_dir, shard_index)

    def run_shard(self, run_dir: str, shard_index: int) -> dict:
        """Write ``shards/{split}-{i:05d}-of-{n:05d}.parquet`` for one work shard; return its stats."""
        folder = RunFolder.of(run_dir)
        start = time.perf_counter()
        shard = load_plan(run_dir).shards[shard_index]
        missing = [s for s in REQUIRED if not finished(run_dir, s, shard_index)]
        if missing:
            raise RuntimeError(f"{shard.name}: stages {missing} have not finished; run them first")
        inputs = _inputs(run_dir, shard_index)
        tables = {s: _rows_by_id(read_stage_table(run_dir, s, shard_index)) for s in inputs}
        records, drops = self._records(shard, tables)
        data = io.table_bytes(pa.Table.from_pylist(records, schema=record_schema(self.config.num_keypoints)))
        stats = {"records": len(records), **drops.stats(), "inputs": inputs, "table_sha256": sha256_bytes(data),
                 "seconds": round(time.perf_counter() - start, 3)}
        io.write_json(folder.stage_stats(STAGE, shard_index), stats)  # stats first, the shard last
        io.write_bytes(folder.final_shard(shard), data)
        logger.info("write_shards %s → %s: %d records", shard.name, shard.final_name, len(records))
        return stats

    def _records(self, shard: Shard, tables: dict[str, dict[str, dict]]) -> tuple[list[dict], Drops]:
        models = {(m.synset_id, m.model_id): m for m in shard.models}
        planned = set(shard.instance_ids())
        drops = Drops(STAGE)
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
                "flagged": bool((synth and synth["drift_flagged"]) or (annotate and annotate["annotate_flagged"])),
                "provenance": json.dumps(provenance, sort_keys=True),
            })
        return records, drops


def _inputs(run_dir: str, shard_index: int) -> dict[str, str | None]:
    """Checksums of the stage tables a final shard joins (required ones, and optional ones that ran)."""
    return {s: recorded_sha(run_dir, s, shard_index) for s in (*REQUIRED, *OPTIONAL)
            if s in REQUIRED or finished(run_dir, s, shard_index)}


def _rows_by_id(table: pa.Table) -> dict[str, dict]:
    return {row["instance_id"]: row for row in table.to_pylist()}
