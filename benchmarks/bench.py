"""`make bench`: throughput of the build's CPU stages, the render backends, GRCA scoring, the GPU
stages' per-item overhead, the Prefect orchestration overhead, and evaluation on hostile outputs.
Prints JSON lines and a table.

Targets: points + geometry + one 512² view ≤ 0.5 s per instance for an 80k-face mesh on two cores
(issue 2); on a 48-model × 20k-face tree, the CPU stages ≥ 1.7× faster with 2 worker processes than
with 1, and the flow within 5 % of the plain loop at the same worker count (issue 13).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
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
    from pointvl.dataset.stages.geometry import Geometry, GeometryConfig
    from pointvl.dataset.stages.render import Render, RenderConfig
    from pointvl.dataset.stages.sample_points import SamplePoints, SamplePointsConfig

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

    from pointvl.dataset.mesh import normalize
    from pointvl.dataset.tables import _sha_memo, finished, write_stage_table

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


def _cpu_part(shapenet: str, run: str, config: dict, workers: int) -> tuple[float, float]:
    """``(clean with the pool's start-up, the four CPU stages)`` in seconds, with ``workers`` processes."""
    from pointvl.dataset.build_config import BuildConfig
    from pointvl.dataset.cpu_stages import run_cpu_shard
    from pointvl.dataset.executor import open_executor
    from pointvl.dataset.runner import plan_run

    cfg = BuildConfig.from_dict(config)
    t0 = time.perf_counter()
    with open_executor(workers) as executor:
        plan = plan_run(shapenet, run, cfg, executor=executor)
        t1 = time.perf_counter()
        list(executor.map(run_cpu_shard, [s.index for s in plan.shards if s.models], run, cfg))
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def parallel_and_overhead(work: str, models: int = 48, faces: int = 20_000, workers: int = 2,
                          repeats: int = 3) -> dict[str, object]:
    """On a ShapeNet-layout tree of ``models`` × ``faces`` at 512²: the CPU stages with 1 and ``workers``
    processes (issue 13: ≥ 1.7× on 2 cores), and the whole build as the Prefect flow vs the plain loop
    at the same worker count (≤ 1.05).

    A 2-core machine's timings vary by ±10 % from run to run, so each comparison is measured ``repeats``
    times, its two sides alternating which goes first, and a ratio is the median of the ``repeats``
    ratios (every run's time is listed too)."""
    from benchmarks.bench_scale import write_tree
    from pointvl.dataset.build_config import BuildConfig
    from pointvl.dataset.runner import build_in_process
    from pointvl.flows.build import build_benchmark

    shapenet = write_tree(os.path.join(work, "tree"), [faces] * models)
    config = {"shard_size": 8, "clean": {"test_size": 0.25, "train_size": None},
              "render": {"width": 512, "height": 512, "backend": "open3d"}}
    # warm up: imports, Open3D, the page cache
    warm = {**config, "clean": {**config["clean"], "categories": ["chair", "lamp"]}}
    build_in_process(shapenet, os.path.join(work, "warm_plain"), BuildConfig.from_dict(warm), workers=workers)

    def plain(run: str) -> float:
        t0 = time.perf_counter()
        build_in_process(shapenet, run, BuildConfig.from_dict(config), workers=workers)
        return time.perf_counter() - t0

    def flow(run: str) -> float:
        t0 = time.perf_counter()
        build_benchmark(shapenet=shapenet, out=run, config=config, workers=workers)
        return time.perf_counter() - t0

    runs: dict[str, list] = {"cpu_1": [], "cpu_n": [], "plain": [], "flow": []}
    # the CPU stages first: once started, Prefect's embedded server stays up in the background until
    # this process exits (a few % of a core), which is not the CPU stages' own cost
    for r in range(repeats):
        for n in (1, workers) if r % 2 == 0 else (workers, 1):
            runs["cpu_1" if n == 1 else "cpu_n"].append(_cpu_part(shapenet, os.path.join(work, f"cpu_{n}_{r}"),
                                                                  config, n))
    build_benchmark(shapenet=shapenet, out=os.path.join(work, "warm_flow"), config=warm, workers=workers)
    for r in range(repeats):
        for name in ("plain", "flow") if r % 2 == 0 else ("flow", "plain"):
            runs[name].append((plain if name == "plain" else flow)(os.path.join(work, f"{name}_{r}")))
    (clean_one, one), (clean_many, many) = (zip(*runs[k], strict=True) for k in ("cpu_1", "cpu_n"))
    median = statistics.median
    # the speed-up of the CPU stages (issue 13's target), and with clean and the pool's start-up (a fixed
    # ~4 s of spawning processes and importing Open3D, which a 48-model tree does not amortize)
    return {"models": models, "faces": faces, "workers": workers, "repeats": repeats,
            "cpu_stages_1_worker_s": _rounded(one), f"cpu_stages_{workers}_workers_s": _rounded(many),
            "speedup": median(a / b for a, b in zip(one, many, strict=True)),
            "clean_and_startup_1_worker_s": _rounded(clean_one),
            f"clean_and_startup_{workers}_workers_s": _rounded(clean_many),
            "speedup_with_clean_and_startup": median(
                (a + b) / (c + d) for a, b, c, d in zip(clean_one, one, clean_many, many, strict=True)),
            "plain_loop_s": _rounded(runs["plain"]), "flow_s": _rounded(runs["flow"]),
            "overhead_ratio": median(f / p for f, p in zip(runs["flow"], runs["plain"], strict=True)),
            "load_average_1min_after": os.getloadavg()[0]}


def _rounded(seconds: tuple[float, ...] | list[float]) -> list[float]:
    return [round(s, 2) for s in seconds]


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # as the CLI: a busy machine
    results: dict[str, object] = {}
    for faces in (20_000, 80_000, 100_000):
        results[f"cpu_stages_{faces // 1000}k_faces"] = cpu_stages_per_instance(faces)
        print(json.dumps({f"cpu_stages_{faces // 1000}k_faces": results[f"cpu_stages_{faces // 1000}k_faces"]}))
    with tempfile.TemporaryDirectory() as work:
        results["integrity"] = integrity_overhead(work)
        print(json.dumps({"integrity": results["integrity"]}))
    with tempfile.TemporaryDirectory() as work:
        results["cpu_parallel_and_orchestration"] = parallel_and_overhead(work)
        print(json.dumps({"cpu_parallel_and_orchestration": results["cpu_parallel_and_orchestration"]}))
    for name in ("bench_render", "bench_grca", "bench_gpu", "bench_evaluate", "bench_train"):
        module = __import__(f"benchmarks.{name}", fromlist=["run"])
        results[name] = module.run()
        print(json.dumps({name: results[name]}))


if __name__ == "__main__":
    main()
