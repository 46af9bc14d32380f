"""`make bench-scale`: the CPU part of a build at ShapeNet scale, with 1 and 2 workers.

Generates a ShapeNet-layout tree (``taxonomy.json``, ``<synset>/<model>/models/model_normalized.obj``)
whose face counts follow a long tail like ShapeNetCore's (log-normal, median 12k, clipped to
1k–500k faces), builds it (clean + the four CPU stages, 512², one view per model) with 1 and 2
worker processes, each build in a fresh process so its peak RSS is its own, and prints models/s,
seconds per instance per stage (from the stage stats), peak RSS of the main process and of the
largest worker, and the ratios. Also measures peak RSS at 48 and 480 models of one size
(``--rss-faces``, 20k), which shows whether memory grows with the number of models. JSON lines, then
a table.

    python -m benchmarks.bench_scale [--models 480] [--workers 1 2] [--rss-faces 20000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

from benchmarks.bench import shapenet_sized_mesh
from pointvl.core import io

logger = logging.getLogger(__name__)

# Real ShapeNet synsets (names as taxonomy.json spells them); the models are generated lumps.
SYNSETS = {"02691156": "airplane,aeroplane,plane", "02958343": "car,auto,automobile,machine,motorcar",
           "03001627": "chair", "04379243": "table", "03636649": "lamp", "02876657": "bottle",
           "04401088": "telephone,phone,telephone set", "02992529": "cellular telephone,cellphone"}
MEDIAN_FACES, SIGMA, MIN_FACES, MAX_FACES = 12_000, 1.2, 1_000, 500_000
CONFIG = {"shard_size": 16, "clean": {"test_size": 0.1, "train_size": None},
          "render": {"width": 512, "height": 512, "backend": "open3d"}}


def long_tail_faces(n: int, seed: int = 0) -> list[int]:
    """``n`` face counts, log-normal around ``MEDIAN_FACES`` and clipped to ShapeNet's 1k–500k range."""
    rng = np.random.default_rng(seed)
    return [int(f) for f in np.clip(rng.lognormal(np.log(MEDIAN_FACES), SIGMA, n), MIN_FACES, MAX_FACES)]


def _obj_text(faces: int, seed: int) -> bytes:
    mesh = shapenet_sized_mesh(faces, seed)
    lines = ["mtllib model_normalized.mtl", "usemtl body"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh.vertices]
    lines += [f"f {a} {b} {c}" for a, b, c in mesh.faces + 1]
    return ("\n".join(lines) + "\n").encode()


def write_tree(root: str, face_counts: list[int], seed: int = 0) -> str:
    """A ShapeNet-layout tree at ``root`` with one model per face count (synsets in turn); returns root."""
    synsets = list(SYNSETS)
    io.write_json(io.join(root, "taxonomy.json"),
                  [{"synsetId": s, "name": n, "children": [], "numInstances": 0} for s, n in SYNSETS.items()])
    rng = np.random.default_rng(seed)
    for i, faces in enumerate(face_counts):
        folder = io.join(root, synsets[i % len(synsets)], f"{rng.integers(2**63):016x}{i:06d}", "models")
        colour = rng.uniform(0.2, 0.9, 3)
        io.write_bytes(io.join(folder, "model_normalized.mtl"),
                       f"newmtl body\nKd {colour[0]:.3f} {colour[1]:.3f} {colour[2]:.3f}\n".encode())
        io.write_bytes(io.join(folder, "model_normalized.obj"), _obj_text(faces, seed + i))
    return root


def build_once(shapenet: str, run: str, workers: int) -> dict:
    """Clean + CPU stages of the tree with ``workers`` processes, in this process; timings, stats, RSS."""
    from pointvl.dataset.build_config import BuildConfig
    from pointvl.dataset.cpu_stages import STAGE_NAMES, run_cpu_shard
    from pointvl.dataset.executor import open_executor
    from pointvl.dataset.runner import plan_run
    from pointvl.dataset.tables import read_stats

    cfg = BuildConfig.from_dict(CONFIG)
    t0 = time.perf_counter()
    with open_executor(workers) as executor:
        plan = plan_run(shapenet, run, cfg, executor=executor)
        t1 = time.perf_counter()
        shards = [s.index for s in plan.shards if s.models]
        list(executor.map(run_cpu_shard, shards, run, cfg))
    t2 = time.perf_counter()
    seconds: dict[str, float] = defaultdict(float)
    instances = 0
    for i in shards:
        for stage in STAGE_NAMES:
            stats = read_stats(run, stage, i)
            seconds[stage] += stats["seconds"]
            if stage == "sample_points":
                seconds["mesh_load"] += stats.get("mesh_load_seconds", 0.0)
                instances += stats["instances"]
    models = sum(len(s.models) for s in plan.shards)
    return {
        "workers": workers, "models_kept": models, "instances": instances,
        "clean_s": t1 - t0, "cpu_stages_s": t2 - t1, "total_s": t2 - t0, "models_per_s": models / (t2 - t0),
        "s_per_instance": {k: v / max(instances, 1) for k, v in sorted(seconds.items())},
        "peak_rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _in_fresh_process(shapenet: str, run: str, workers: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", "--one", shapenet, run, str(workers)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=480)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", help="keep the trees and runs here (default: a temporary folder)")
    parser.add_argument("--skip-rss", action="store_true", help="skip the 48 vs 480 models memory runs")
    parser.add_argument("--rss-faces", type=int, default=20_000, help="faces per model of the memory runs")
    parser.add_argument("--one", nargs=3, metavar=("SHAPENET", "RUN", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.one:
        print(json.dumps(build_once(args.one[0], args.one[1], int(args.one[2]))))
        return
    work = args.out or tempfile.mkdtemp(prefix="bench-scale-")
    results: dict[str, dict] = {}
    faces = long_tail_faces(args.models)
    t0 = time.perf_counter()
    tree = write_tree(os.path.join(work, f"tree-{args.models}"), faces)
    print(json.dumps({"tree": {"models": len(faces), "faces_median": int(np.median(faces)),
                               "faces_p99": int(np.percentile(faces, 99)), "faces_max": max(faces),
                               "write_s": round(time.perf_counter() - t0, 1)}}), flush=True)
    for w in args.workers:
        results[f"long_tail_{w}w"] = _in_fresh_process(tree, os.path.join(work, f"run-{args.models}-{w}w"), w)
        print(json.dumps({f"long_tail_{w}w": results[f"long_tail_{w}w"]}), flush=True)
    if not args.skip_rss:
        for n in (48, 480):
            uniform = write_tree(os.path.join(work, f"uniform-{n}"), [args.rss_faces] * n)
            results[f"rss_{n}_models"] = _in_fresh_process(uniform, os.path.join(work, f"run-uniform-{n}"), 2)
            print(json.dumps({f"rss_{n}_models_{args.rss_faces}_faces_2w": results[f"rss_{n}_models"]}), flush=True)
    print("\n| run | models/s | clean s | CPU stages s | s/instance load, points, geometry, render, kpts2d "
          "| peak RSS main / worker MB |\n|---|---|---|---|---|---|")
    for key, r in results.items():
        s = r["s_per_instance"]
        per = ", ".join(f"{s.get(k, 0):.3f}" for k in ("mesh_load", "sample_points", "geometry", "render", "kpts2d"))
        print(f"| {key} | {r['models_per_s']:.2f} | {r['clean_s']:.1f} | {r['cpu_stages_s']:.1f} | {per} "
              f"| {r['peak_rss_main_mb']:.0f} / {r['peak_rss_worker_mb']:.0f} |")
    if {"long_tail_1w", "long_tail_2w"} <= results.keys():
        one, two = results["long_tail_1w"], results["long_tail_2w"]
        print(f"\nworkers 2 / workers 1: {one['total_s'] / two['total_s']:.2f}x (whole), "
              f"{one['cpu_stages_s'] / two['cpu_stages_s']:.2f}x (CPU stages), "
              f"{one['clean_s'] / two['clean_s']:.2f}x (clean)")


if __name__ == "__main__":
    main()
