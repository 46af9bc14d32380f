"""The GPU stages, one flow per shard, so each can be a deployment on a GPU work pool.

    refine_shard(run_dir, i)      Qwen-Image-Edit over render shard i
    synthesize_shard(run_dir, i)  FLUX.1-Krea-dev + ControlNet-Union-Pro over refine shard i

Deployment (entrypoints ``flows/gpu_stages.py:refine_shard`` and ``:synthesize_shard``): a
``process`` work pool with one worker per GPU, each started with its GPU and a job limit of one,

    CUDA_VISIBLE_DEVICES=0 prefect worker start --pool gpu --limit 1
    CUDA_VISIBLE_DEVICES=1 prefect worker start --pool gpu --limit 1

and the pool's concurrency limit set to the number of GPUs (``prefect work-pool set-concurrency-limit
gpu <n_gpus>``): at most one shard runs per GPU at a time. Each worker process loads a model once
and keeps it resident for every shard it runs (:func:`pointvl.models.load_pipeline`).

:func:`run_gpu_stage` is what the build flow calls: with a deployment name it starts one flow run
per shard on the pool and waits for all of them; without, it runs the shards in-process as tasks, one
after another (one GPU, one job at a time).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from prefect import flow

from pointvl.stages.refine import RefineConfig
from pointvl.stages.synthesize import SynthesizeConfig
from tasks.refine import refine
from tasks.synthesize import synthesize

logger = logging.getLogger(__name__)

CONFIGS = {"refine": RefineConfig, "synthesize": SynthesizeConfig}


@flow(name="refine-shard", description="Qwen-Image-Edit refinement of one render shard (GPU)")
def refine_shard(run_dir: str, shard_index: int, config: dict | None = None) -> dict:
    return refine(run_dir, shard_index, RefineConfig(**(config or {})))


@flow(name="synthesize-shard", description="FLUX + ControlNet-Union-Pro synthesis of one refined shard (GPU)")
def synthesize_shard(run_dir: str, shard_index: int, config: dict | None = None) -> dict:
    return synthesize(run_dir, shard_index, SynthesizeConfig(**(config or {})))


FLOWS = {"refine": refine_shard, "synthesize": synthesize_shard}
TASKS = {"refine": refine, "synthesize": synthesize}


def run_gpu_stage(
    stage: str,
    run_dir: str,
    shard_indices: list[int],
    deployment: str | None,
    config: RefineConfig | SynthesizeConfig | dict | None = None,
    poll_seconds: float = 10.0,
) -> list[dict | None]:
    """Run ``stage`` over the shards: as deployment flow runs when ``deployment`` names one, else in-process.

    Returns the per-shard stats (``None`` for deployment runs, whose results stay on the worker; the
    stats files are in the run folder). Raises if any shard's run did not complete.
    """
    if stage not in FLOWS:
        raise ValueError(f"unknown GPU stage {stage!r}; use one of {sorted(FLOWS)}")
    if isinstance(config, dict | None):
        config = CONFIGS[stage](**(config or {}))  # validate here, before any GPU job starts
    params = dataclasses.asdict(config)
    if not deployment:
        # one shard after another (one GPU, one job), as tasks of the calling flow: a sub-flow per
        # shard would only add orchestration time
        return [TASKS[stage](run_dir, i, config) for i in shard_indices]

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    runs = [
        run_deployment(
            name=deployment,
            parameters={"run_dir": run_dir, "shard_index": i, "config": params},
            timeout=0,  # start them all; the pool's per-GPU limit decides how many run at once
            tags=[f"stage:{stage}"],
        )
        for i in shard_indices
    ]
    logger.info("%s: started %d flow runs on deployment %s", stage, len(runs), deployment)
    pending = {r.id: i for r, i in zip(runs, shard_indices, strict=True)}
    failed = []
    with get_client(sync_client=True) as client:
        while pending:
            for run_id in list(pending):
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_final():
                    shard = pending.pop(run_id)
                    if not state.is_completed():
                        failed.append((shard, state.name))
            if pending:
                time.sleep(poll_seconds)
    if failed:
        raise RuntimeError(f"{stage}: shards did not complete on {deployment}: {failed}; re-run to resume them")
    return [None] * len(shard_indices)
