"""The GPU stages as flows over a list of shards, so each can be a deployment on a GPU work pool.

    refine_shards(run_dir, [i, ...])      Qwen-Image-Edit over those render shards
    synthesize_shards(run_dir, [i, ...])  FLUX.1-Krea-dev + ControlNet-Union-Pro over those refine shards

A flow runs its shards one after another in one process, so the stage's model is loaded once for
all of them and stays resident (:func:`pointvl.dataset.diffusion_pipelines.load_pipeline` caches per
process, one pipeline at a time: in an in-process build refine's leaves the device before
synthesize's loads). A flow per shard would reload it for every shard: a ``process`` worker runs
each flow run in a fresh subprocess.

Deployment (entrypoints ``flows/gpu_stages.py:refine_shards`` and ``:synthesize_shards``, deployments
``refine-shards/refine`` and ``synthesize-shards/synthesize``): a ``process`` work pool with one
worker per GPU, each started with its GPU and a job limit of one,

    CUDA_VISIBLE_DEVICES=0 prefect worker start --pool gpu --limit 1
    CUDA_VISIBLE_DEVICES=1 prefect worker start --pool gpu --limit 1

the pool's concurrency limit set to the number of GPUs (``prefect work-pool set-concurrency-limit
gpu <n_gpus>``), and the build config's ``gpu_workers`` set to the number of workers: at most one
flow run per GPU at a time, and each worker gets one flow run with its share of the shards.

:func:`run_gpu_stage` is what the build flow calls: with a deployment name it splits the shards into
``gpu_workers`` flow runs on the pool and waits for all of them; without, it runs the shards
in-process as tasks, one after another (one GPU, one job at a time).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from prefect import flow

from pointvl.core.strict_config import load
from pointvl.dataset.dag import GPU_STAGES
from pointvl.dataset.diffusion_pipelines import release_pipelines
from pointvl.dataset.stages.refine import RefineConfig
from pointvl.dataset.stages.synthesize import SynthesizeConfig
from pointvl.dataset.tables import finished, read_stats
from pointvl.tasks.run_logs import send_library_logs
from pointvl.tasks.stage_tasks import refine, synthesize

logger = logging.getLogger(__name__)

CONFIGS = {stage.name: stage.config_class for stage in GPU_STAGES}
TASKS = {"refine": refine, "synthesize": synthesize}


def _run_shards(
    stage: str, run_dir: str, shard_indices: list[int], config: RefineConfig | SynthesizeConfig
) -> list[dict]:
    """Run ``stage``'s task on each shard in turn, in this process (one model load for all of them).

    Shards are independent, so a failed one does not stop the rest of the list: the flow fails at the
    end, naming the failed shards, and a re-run resumes them.
    """
    states = [TASKS[stage](run_dir, i, config, return_state=True) for i in shard_indices]
    failed = [f"{i}: {s.message}" for i, s in zip(shard_indices, states, strict=True) if not s.is_completed()]
    if failed:
        raise RuntimeError(f"{stage}: {len(failed)} of {len(shard_indices)} shards failed: {'; '.join(failed)}")
    return [s.result() for s in states]


@flow(name="refine-shards", description="Qwen-Image-Edit refinement of render shards (GPU)")
def refine_shards(run_dir: str, shard_indices: list[int], config: dict | None = None) -> list[dict]:
    send_library_logs()
    return _run_shards("refine", run_dir, shard_indices, load(RefineConfig, config, "refine"))


@flow(name="synthesize-shards", description="FLUX + ControlNet-Union-Pro synthesis of refined shards (GPU)")
def synthesize_shards(run_dir: str, shard_indices: list[int], config: dict | None = None) -> list[dict]:
    send_library_logs()
    return _run_shards("synthesize", run_dir, shard_indices, load(SynthesizeConfig, config, "synthesize"))


def split_round_robin(shard_indices: list[int], workers: int) -> list[list[int]]:
    """``min(workers, len(shard_indices))`` non-empty chunks, shard k going to chunk k mod n.

    Round-robin rather than contiguous blocks keeps the chunks' sizes within one shard of each other
    and spreads the (usually smaller) last shard of each split over the workers.
    """
    n = min(workers, len(shard_indices))
    return [shard_indices[k::n] for k in range(n)]


def run_gpu_stage(
    stage: str,
    run_dir: str,
    shard_indices: list[int],
    deployment: str | None,
    config: RefineConfig | SynthesizeConfig | dict | None = None,
    poll_seconds: float = 10.0,
    workers: int = 1,
) -> list[dict | None]:
    """Run ``stage`` over the shards: as deployment flow runs when ``deployment`` names one, else in-process.

    With a deployment, the shards are split round-robin into ``workers`` flow runs (one per GPU
    worker, so each worker loads the model once for its whole share); shards already finished start no
    flow run. Returns the per-shard stats
    (``None`` for deployment runs, whose results stay on the worker; the stats files are in the run
    folder). Raises if any shard's run did not complete.
    """
    if stage not in CONFIGS:
        raise ValueError(f"unknown GPU stage {stage!r}; use one of {sorted(CONFIGS)}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if isinstance(config, dict | None):
        config = load(CONFIGS[stage], config, stage)  # validate here, before any GPU job starts
    # finished = the final verified table exists: a re-entered build runs no task and sends no flow run for it
    done = {i for i in shard_indices if finished(run_dir, stage, i)}
    todo = [i for i in shard_indices if i not in done]
    if not deployment:
        # one shard after another (one GPU, one job), as tasks of the calling flow: a sub-flow would
        # only add orchestration time; the calling process's model cache spans all the shards, and
        # the pipeline leaves the device when they are done (the next stage's has it to itself)
        if not todo:
            return [read_stats(run_dir, stage, i) | {"skipped": True} for i in shard_indices]
        try:
            made = {i: TASKS[stage](run_dir, i, config) for i in todo}
        finally:
            release_pipelines()
        return [made[i] if i in made else read_stats(run_dir, stage, i) | {"skipped": True} for i in shard_indices]

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    if not todo:
        logger.info("%s: all %d shards finished, no flow run started", stage, len(shard_indices))
        return [None] * len(shard_indices)
    params = dataclasses.asdict(config)
    chunks = split_round_robin(todo, workers)
    runs = [
        run_deployment(
            name=deployment,
            parameters={"run_dir": run_dir, "shard_indices": chunk, "config": params},
            timeout=0,  # start them all; the pool's per-GPU limit decides how many run at once
            tags=[f"stage:{stage}"],
        )
        for chunk in chunks
    ]
    logger.info("%s: started %d flow runs over %d shards on deployment %s", stage, len(runs), len(todo),
                deployment)
    pending = {r.id: chunk for r, chunk in zip(runs, chunks, strict=True)}
    failed = []
    with get_client(sync_client=True) as client:
        while pending:
            for run_id in list(pending):
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_final():
                    chunk = pending.pop(run_id)
                    if not state.is_completed():
                        failed.append((chunk, state.name))
            if pending:
                time.sleep(poll_seconds)
    if failed:
        raise RuntimeError(f"{stage}: shards did not complete on {deployment}: {failed}; re-run to resume them")
    return [None] * len(shard_indices)
