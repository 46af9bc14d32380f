"""`make bench`: throughput of the build's CPU stages, the render backends, GRCA scoring, the GPU
stages' per-item overhead, the Prefect orchestration overhead, and evaluation on hostile outputs.
Prints JSON lines and a table.

Targets (issue 2): points + geometry + one 512² view ≤ 0.5 s per instance for an 80k-face mesh on
two cores; flow vs plain-loop overhead ratio ≤ 1.10.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

import numpy as np
import trimesh

logger = logging.getLogger(__name__)


def shapenet_sized_mesh(faces: int, seed: int = 0) -> trimesh.Trimesh:
    """A lumpy, coloured, unit-normalized closed mesh with about ``faces`` faces."""
    segments = int(round(np.sqrt(faces / 4)))  # a UV sphere of n × n segments has about 4n² faces
    mesh = trimesh.creation.uv_sphere(count=[segments, segments])
    rng = np.random.default_rng(seed)
    directions = mesh.vertices / np.linalg.norm(mesh.vertices, axis=1, keepdims=True)
    bumps = sum(np.sin(directions @ rng.normal(size=3) * f) for f in (3, 7, 13)) * 0.05
    mesh.vertices = directions * (1 + bumps)[:, None] * np.array([0.5, 0.3, 0.8])
    mesh.vertices -= mesh.bounds.mean(axis=0)
    mesh.vertices /= np.linalg.norm(mesh.extents)
    mesh.visual.face_colors = rng.integers(0, 255, size=(len(mesh.faces), 4), dtype=np.uint8)
    return mesh


def cpu_stages_per_instance(faces: int, repeats: int = 2) -> dict[str, float]:
    """Seconds per instance of sample_points (8192) + geometry + one 512² Open3D view."""
    from pointvl.stages.geometry import Geometry, GeometryConfig
    from pointvl.stages.render import Render, RenderConfig
    from pointvl.stages.sample_points import SamplePoints, SamplePointsConfig

    mesh = shapenet_sized_mesh(faces)
    sampler, geometry = SamplePoints(SamplePointsConfig()), Geometry(GeometryConfig())
    render = Render(RenderConfig(width=512, height=512, backend="open3d"))
    timings: dict[str, list[float]] = {"sample_points": [], "geometry": [], "render": []}
    for i in range(repeats):
        t0 = time.perf_counter()
        points, _ = sampler.run_mesh(mesh, f"m{i}")
        t1 = time.perf_counter()
        geometry.run_points(points)
        t2 = time.perf_counter()
        render.run_model(mesh, "02958343", f"m{i}")
        t3 = time.perf_counter()
        for key, value in zip(timings, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            timings[key].append(value)
    result = {f"{k}_s": float(np.median(v)) for k, v in timings.items()}
    result["total_s"] = sum(result.values())
    result["faces"] = len(mesh.faces)
    return result


def integrity_overhead(work: str, faces: int = 80_000, table_mb: int = 64) -> dict[str, float]:
    """What bad-data handling costs: normalizing (stray check included) an ``faces``-face mesh, and
    verifying a ``table_mb`` MB stage table the first time (checksum) and again (memoized).

    Target: both well under the cost of the stages themselves (~0.2 s per instance at 80k faces).
    """
    import pyarrow as pa

    from pointvl.mesh import normalize
    from pointvl.stages.base import _sha_memo, finished, write_stage_table

    mesh = shapenet_sized_mesh(faces)
    mesh.apply_scale(250.0)  # other units: the full normalization path
    t0 = time.perf_counter()
    normalize(mesh, "bench")
    normalize_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    blobs = [rng.bytes(1 << 20) for _ in range(table_mb)]  # incompressible, like PNG bytes
    write_stage_table(work, "render", 0, pa.table({"instance_id": [str(i) for i in range(table_mb)],
                                                   "render": pa.array(blobs, pa.binary())}), {})
    _sha_memo.clear()
    t0 = time.perf_counter()
    assert finished(work, "render", 0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert finished(work, "render", 0)
    again = time.perf_counter() - t0
    return {"normalize_s": normalize_s, "faces": len(mesh.faces), "verify_first_s": first,
            "verify_again_s": again, "table_mb": table_mb}


def orchestration_overhead(shapenet: str, config: dict, work: str) -> dict[str, float]:
    """The same stages over the same shards: the Prefect flow vs a plain Python loop."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.build import build_benchmark
    from pointvl.config import BuildConfig
    from pointvl.local import build_in_process

    # warm both paths up (imports, Open3D, the embedded Prefect server) on two categories first
    warmup = {**config, "clean": {**config.get("clean", {}), "categories": ["mug", "car"]}}
    build_in_process(shapenet, os.path.join(work, "warmup_plain"), BuildConfig.from_dict(warmup))
    build_benchmark(shapenet=shapenet, out=os.path.join(work, "warmup_flow"), config=warmup)
    t0 = time.perf_counter()
    build_in_process(shapenet, os.path.join(work, "plain"), BuildConfig.from_dict(config))
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_benchmark(shapenet=shapenet, out=os.path.join(work, "flow"), config=config)
    flow = time.perf_counter() - t0
    # one task at a time: the orchestration cost alone, without the flow's concurrency gain
    serial_flow = build_benchmark.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))
    t0 = time.perf_counter()
    serial_flow(shapenet=shapenet, out=os.path.join(work, "flow_serial"), config=config)
    serial = time.perf_counter() - t0
    return {"plain_loop_s": plain, "flow_s": flow, "overhead_ratio": flow / plain,
            "flow_one_task_at_a_time_s": serial, "overhead_ratio_one_task_at_a_time": serial / plain}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from pointvl.fixture import write_fixture

    results: dict[str, object] = {}
    for faces in (20_000, 80_000, 100_000):
        results[f"cpu_stages_{faces // 1000}k_faces"] = cpu_stages_per_instance(faces)
        print(json.dumps({f"cpu_stages_{faces // 1000}k_faces": results[f"cpu_stages_{faces // 1000}k_faces"]}))
    with tempfile.TemporaryDirectory() as work:
        results["integrity"] = integrity_overhead(work)
        print(json.dumps({"integrity": results["integrity"]}))
    with tempfile.TemporaryDirectory() as work:
        shapenet = write_fixture(os.path.join(work, "shapenet")).root
        # 8 instances a shard: 6 shards, ~70 task runs for 36 models (orchestration-heavy);
        # 32: 2 shards, nearer the 64-512 of a real build
        for shard_size in (8, 32):
            config = {"shard_size": shard_size, "clean": {"test_size": 0.25, "train_size": None}}
            key = f"orchestration_shard_size_{shard_size}"
            results[key] = orchestration_overhead(shapenet, config, os.path.join(work, key))
            print(json.dumps({key: results[key]}))
    for name in ("bench_render", "bench_grca", "bench_gpu", "bench_evaluate", "bench_train"):
        module = __import__(f"benchmarks.{name}", fromlist=["run"])
        results[name] = module.run()
        print(json.dumps({name: results[name]}))


if __name__ == "__main__":
    main()
