"""The build's Prefect tasks: one per stage (the four CPU stages of a shard are one task), thin wrappers over
the library's stages with the retries, logging and artifacts that suit each. A finished shard is skipped."""

from __future__ import annotations

from collections.abc import Callable

from prefect import Task, task
from prefect.artifacts import create_link_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.logging import get_run_logger
from prefect.states import State
from pydantic import SecretStr

from pointvl.core.chat_client import FatalAPIError
from pointvl.core.errors import InputError
from pointvl.core.fence import LockLost
from pointvl.core.progress import Progress
from pointvl.dataset.annotation_config import AnnotateConfig
from pointvl.dataset.build_config import BuildConfig
from pointvl.dataset.cpu_stages import run_cpu_shard
from pointvl.dataset.executor import Executor
from pointvl.dataset.handoff import build_id
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.runner import plan_run
from pointvl.dataset.stages.annotate import Annotate
from pointvl.dataset.stages.base import Stage
from pointvl.dataset.stages.refine import Refine, RefineConfig
from pointvl.dataset.stages.synthesize import Synthesize, SynthesizeConfig
from pointvl.dataset.stages.write_shards import WriteShards, WriteShardsConfig
from pointvl.tasks.artifacts import artifact_key


def run_stage(stage: Stage, run_dir: str, shard_index: int) -> dict:
    """``stage.run_shard(run_dir, shard_index)``, logged to the flow run; returns the shard's stats."""
    stats = stage.run_shard(run_dir, shard_index)
    shown = {k: v for k, v in stats.items() if k != "drops"}
    get_run_logger().info("%s shard-%05d: %s", stage.name, shard_index, "skipped (finished)" if stats.get("skipped")
                          else shown)
    return stats


def retry_unless(*permanent: type[Exception]) -> Callable[[Task, TaskRun, State], bool]:
    """A task's retry condition: retry a failure unless it is one of ``permanent``, which will not fix itself."""

    def condition(task: Task, task_run: TaskRun, state: State) -> bool:
        try:
            state.result()
        except permanent:
            return False
        except Exception:
            return True
        return True

    return condition


# Faults of the run (a lost worker, a CUDA error) are retried; missing weights, a device too small for the
# offload asked for or a bad config (InputError) are not, nor a build that lost its run folder (LockLost).
retry_unless_input_error = retry_unless(InputError, LockLost)


@task(name="clean", cache_policy=NO_CACHE)
def clean(
    shapenet: str, run_dir: str, config: BuildConfig, incremental: bool = False, executor: Executor | None = None
) -> list[int]:
    """Clean the taxonomy and models, split by model, and fix the shard plan; returns the shards to build.

    A shard whose models all left in an incremental build keeps its index but is not built (no
    stage handles an empty shard, and it has no records).

    ``incremental``: extend the run folder's plan to the current input and config, and move outputs
    made for another config or model list aside (:func:`pointvl.dataset.runner.plan_run`).

    The mesh validation runs on ``executor``'s workers; its i/n, rate and ETA are a progress artifact of the
    task run while it goes (keyless: the build id comes from the plan made here), then the keyed
    ``progress-clean-<run folder tag>-<build id>`` with the last line.
    """
    live, last = None, "clean: plan exists, cleaning skipped"

    def publish(p: Progress) -> None:
        nonlocal live, last
        percent = 100.0 * p.done / p.total if p.total else 100.0
        last = p.line()
        if live is None:
            live = create_progress_artifact(percent, description=last)
        else:
            update_progress_artifact(live, percent, description=last)

    plan = plan_run(shapenet, run_dir, config, incremental, executor, publish)
    bid = build_id(run_dir)
    create_progress_artifact(100.0, key=artifact_key("progress-clean", run_dir, bid), description=last)
    create_link_artifact(key=artifact_key("cleaning-report", run_dir, bid), link=RunFolder.of(run_dir).cleaning_report,
                         description="Kept and dropped models, with reasons")
    get_run_logger().info("%d shards planned", len(plan.shards))
    return [s.index for s in plan.shards if s.models]


@task(name="cpu_stages", cache_policy=NO_CACHE, retries=1, task_run_name="cpu_stages-{shard_index:05d}")
def cpu_stages(run_dir: str, shard_index: int, config: BuildConfig, executor: Executor) -> dict:
    """sample_points, geometry, render and kpts2d of one shard on one of the executor's workers
    (finished stages are skipped there); returns each stage's stats."""
    stats = executor.submit(run_cpu_shard, shard_index, run_dir, config).result()
    get_run_logger().info("cpu stages shard-%05d: %s", shard_index,
                          {s: {k: v for k, v in st.items() if k != "drops"} for s, st in stats.items()})
    return stats


@task(
    name="refine", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=30,
    retry_condition_fn=retry_unless_input_error, task_run_name="refine-{shard_index:05d}",
)
def refine(run_dir: str, shard_index: int, config: RefineConfig) -> dict:
    """Qwen-Image-Edit refinement of one shard's renders; a retry resumes at the first unfinished item."""
    return run_stage(Refine(config), run_dir, shard_index)


@task(
    name="synthesize", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=30,
    retry_condition_fn=retry_unless_input_error, task_run_name="synthesize-{shard_index:05d}",
)
def synthesize(run_dir: str, shard_index: int, config: SynthesizeConfig) -> dict:
    """FLUX + ControlNet-Union-Pro synthesis of one shard, with drift scores; a retry resumes per item."""
    return run_stage(Synthesize(config), run_dir, shard_index)


def _secret(block_name: str) -> SecretStr | None:
    """The value of Prefect Secret block ``block_name`` (``None`` when no block is named)."""
    if not block_name:
        return None
    from prefect.blocks.system import Secret

    return SecretStr(str(Secret.load(block_name).get()))


# A batch still running or a dropped connection is retried; a rejected key or model, an invalid config or a
# run folder taken over by another build is not.
_retry_unless_fatal = retry_unless(FatalAPIError, ValueError, FileNotFoundError, LockLost)


@task(
    name="annotate",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[30, 300, 1800],
    retry_condition_fn=_retry_unless_fatal,
    task_run_name="annotate-{shard_index:05d}",
)
def annotate(run_dir: str, shard_index: int, config: AnnotateConfig) -> dict:
    """QA, descriptions and 2D grounding for one shard (skipped when finished; a retry pays for no reply
    twice: replies are cached under ``RUN/cache/annotate`` and a running batch is picked up again).

    Keys come from the Secret blocks named in ``config`` when set, else from the environment variables
    it names. Categories are those of the run's plan.
    """
    stage = Annotate(
        config,
        api_key=_secret(config.api_key_secret_block),
        vlm_api_key=_secret(config.vlm_api_key_secret_block),
    )
    return run_stage(stage, run_dir, shard_index)


@task(name="write_shards", cache_policy=NO_CACHE, task_run_name="write_shards-{shard_index:05d}")
def write_shards(run_dir: str, shard_index: int, config: WriteShardsConfig) -> dict:
    """Join one work shard's stage tables into its final Parquet file (skipped when it is up to date)."""
    return run_stage(WriteShards(config), run_dir, shard_index)
