import time

import pyarrow as pa
import pyarrow.parquet as pq

from pointvl.dataset.build_config import BuildConfig
from pointvl.dataset.plan import load_plan
from pointvl.dataset.runner import build_in_process
from pointvl.dataset.tables import read_stage_table, read_stats, write_stage_table

CONFIG = {"shard_size": 16, "clean": {"test_size": 0.25, "train_size": None, "categories": ["mug", "car"]},
          "sample_points": {"num_points": 256}, "render": {"width": 48, "height": 48}}


def test_a_stage_rerun_after_the_fact_reaches_only_its_shard(shapenet, tmp_path):
    run = str(tmp_path / "run")
    cfg = BuildConfig.from_dict(CONFIG)
    build_in_process(shapenet.root, run, cfg)
    plan = load_plan(run)
    finals = {s.index: tmp_path / "run" / "shards" / s.final_name for s in plan.shards}
    before = {i: p.stat().st_mtime_ns for i, p in finals.items()}

    time.sleep(0.01)
    annotations = read_stage_table(run, "annotate", 0)  # e.g. failed items annotated again
    redone = annotations.set_column(annotations.column_names.index("description"), "description",
                                    pa.array(["redone"] * annotations.num_rows))
    write_stage_table(run, "annotate", 0, redone, read_stats(run, "annotate", 0))
    build_in_process(shapenet.root, run, cfg)

    assert set(pq.read_table(finals[0]).column("description").to_pylist()) == {"redone"}
    assert all(finals[i].stat().st_mtime_ns == before[i] for i in finals if i != 0)
