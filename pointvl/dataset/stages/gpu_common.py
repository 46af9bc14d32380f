"""What the two GPU stages (refine, synthesize) share: their common settings, per-item resume, prompts, seeds.

Per-item resume. A GPU shard is slow, so its unit of restart is the item, not the shard:

```
RUN/stages/<stage>/shard-{i:05d}.items/<instance_id>.parquet   one finished item (one-row table)
RUN/stages/<stage>/shard-{i:05d}.stats.json                    counts, seconds
RUN/stages/<stage>/shard-{i:05d}.parquet                       the shard: written last, all items
```

Each item file is written atomically as soon as its item is done. A shard stopped after k of n
items resumes at item k+1; finished items are read back, never regenerated. The shard table
appears (atomically) only when every item is done, and then the ``.items/`` folder is removed
(``keep_items`` keeps it). A shard whose table exists is skipped entirely.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from pointvl.core import images, io
from pointvl.core.errors import check_range
from pointvl.core.package_data import prompts_root
from pointvl.dataset.diffusion_pipelines import BACKENDS, load_pipeline, resolve_backend, resolve_device, resolve_dtype
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.base import Drops, ShardOutput, Stage

PromptEncoder = Callable[[list[str]], dict[str, Any]]
# The errors of one item's data (an undecodable image, a bad size). Unlike the CPU stages
# (pointvl.core.errors.ITEM_ERRORS), RuntimeError is left out: torch raises it for device faults (CUDA
# errors, a lost worker), which are faults of the run.
ITEM_DATA_ERRORS = (ValueError, ArithmeticError, IndexError)

logger = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class GpuStageConfig:
    """The settings both GPU stages share, checked here; each stage's config adds its models and
    generation settings (:class:`pointvl.dataset.stages.refine.RefineConfig`,
    :class:`pointvl.dataset.stages.synthesize.SynthesizeConfig`) and names its ``stage``.

    Args:
        backend: ``auto`` (diffusers with CUDA and local weights, else passthrough), ``diffusers`` or
            ``passthrough`` (the stage's input image is carried forward byte for byte).
        prompt_version: ``prompts/<stage>/<version>.txt`` (+ ``.negative.txt``); stored in provenance.
        prompts_dir: folder holding ``<stage>/``; ``None`` = the package's ``prompts/``.
        seed: base seed; each item's seed is ``sha256(seed:<stage>:instance_id)`` (:func:`instance_seed`).
        device: ``auto`` (cuda if present), ``cuda``, ``cuda:N`` or ``cpu``.
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), or a torch dtype name.
        cpu_offload: ``enable_model_cpu_offload`` for GPUs that cannot hold the model (Qwen-Image-Edit: 20B).
        batch_size: images per pipeline call.
        keep_items: keep the per-item files after the shard table is written.
    """

    stage: ClassVar[str]
    backend: str = "auto"
    prompt_version: str = "v1"
    prompts_dir: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    cpu_offload: bool = False
    batch_size: int = 1
    keep_items: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"{self.stage}.backend must be one of {BACKENDS}, got {self.backend!r}")
        check_range(f"{self.stage}.batch_size", self.batch_size, 1, 256, 1)
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.stage}.dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        self.prompt()  # raises when the prompt file is missing

    def prompt(self) -> tuple[str, str | None, str]:
        """This stage's ``(prompt, negative prompt or None, "stage/version")`` (:func:`load_prompt`)."""
        return load_prompt(self.stage, self.prompt_version, self.prompts_dir)


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("pointvl", "diffusers", "torch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def prepare(stage: str, config: Any, pipeline: Any, encode_prompt: PromptEncoder | None,
            settings: dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
    """``(backend, pipeline or None, provenance base)`` for a GPU stage, before any item runs.

    The pipeline is ``pipeline`` when given, else loaded once per process; ``settings`` (the
    stage's generation settings) enter the provenance only when a model runs.
    """
    backend = resolve_backend(config, stage, pipeline_given=pipeline is not None)
    pipe = None
    if backend == "diffusers":
        pipe = pipeline if pipeline is not None else load_pipeline(stage, config)
        if pipe.text_encoder is None and encode_prompt is None:
            raise ValueError(f"the {stage} pipeline has no text encoder: pass encode_prompt=")
    base: dict[str, Any] = {
        "stage": stage,
        "backend": backend,
        "models": config.model_ids() if backend == "diffusers" else {},
        "versions": package_versions(),
    }
    if backend == "diffusers":
        device = resolve_device(config.device)
        base |= settings | {"dtype": resolve_dtype(config.dtype, device), "device": device}
    return backend, pipe, base


def text_inputs(encode_prompt: PromptEncoder | None, prompts: list[str], negative: str | None) -> dict[str, Any]:
    """The pipeline's prompt keywords: strings, or embeddings from ``encode_prompt`` (pipelines built
    without a text encoder); ``negative`` (or None: no negative prompt) for true CFG."""
    if encode_prompt is None:
        text: dict[str, Any] = {"prompt": prompts}
        if negative is not None:
            text["negative_prompt"] = [negative] * len(prompts)
        return text
    text = dict(encode_prompt(prompts))
    if negative is not None:
        text |= {f"negative_{k}": v for k, v in encode_prompt([negative] * len(prompts)).items()}
    return text


def generation_size(pipe: Any, height: int, width: int) -> tuple[int, int]:
    """The largest size at most ``height × width`` that the pipeline's latent grid accepts."""
    multiple = pipe.vae_scale_factor * 2
    th, tw = height // multiple * multiple, width // multiple * multiple
    if th == 0 or tw == 0:
        raise ValueError(f"image {width}x{height} is smaller than the pipeline's {multiple}-pixel multiple")
    return th, tw


def encode_outputs(result: list[Any], height: int, width: int) -> list[bytes]:
    """Pipeline output images as RGB PNGs at the input's size (the stage table's contract)."""
    from PIL import Image

    out = []
    for im in result:
        if im.size != (width, height):
            im = im.resize((width, height), Image.Resampling.LANCZOS)
        out.append(images.encode_rgb(np.asarray(im.convert("RGB"), dtype=np.uint8)))
    return out


def instance_seed(seed: int, stage: str, instance_id: str) -> int:
    """A stable 63-bit seed for one item: sha256 of ``"{seed}:{stage}:{instance_id}"``."""
    digest = hashlib.sha256(f"{seed}:{stage}:{instance_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def load_prompt(stage: str, version: str, prompts_dir: str | None = None) -> tuple[str, str | None, str]:
    """``(prompt, negative prompt or None, "stage/version")`` from ``prompts/<stage>/<version>[.negative].txt``."""
    root = Path(prompts_dir) if prompts_dir else prompts_root()
    path = root / stage / f"{version}.txt"
    if not path.is_file():
        raise ValueError(f"prompt {path} not found; set prompt_version to one of "
                         f"{sorted(p.stem for p in (root / stage).glob('v*.txt') if '.' not in p.stem)}")
    negative = root / stage / f"{version}.negative.txt"
    neg = negative.read_text().strip() if negative.is_file() else None
    return path.read_text().strip(), neg, f"{stage}/{version}"


def _process(process: Callable[[list[dict]], list[dict]], batch: list[dict], drops: Drops) -> list[dict]:
    """``process(batch)``; after an item error, each item of a larger batch alone, so only the items that
    fail alone are dropped (with the error as their reason)."""
    try:
        return process(batch)
    except ITEM_DATA_ERRORS as err:
        if len(batch) == 1:
            drops.add(batch[0]["instance_id"], f"{drops.stage}_failed", f"{type(err).__name__}: {err}")
            return []
    return [out for row in batch for out in _process(process, [row], drops)]


def run_items(
    run: RunFolder,
    stage: str,
    shard_index: int,
    inputs: pa.Table,
    process: Callable[[list[dict]], list[dict]],
    schema: pa.Schema,
    drops: Drops,
    batch_size: int = 1,
) -> ShardOutput:
    """Run ``process`` over the rows of ``inputs`` not finished yet, in batches, each item's output
    written to its own file at once; returns the shard's rows, every item read back from its file.

    ``process`` takes input rows (dicts) and returns one output row per input row, each with
    ``instance_id`` and the columns of ``schema``.
    """
    folder = run.stage_items(stage, shard_index)
    ids = inputs.column("instance_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError(f"{stage} shard {shard_index:05d}: duplicate instance_id in the input table")
    fs, local = io.filesystem(folder)
    present = {p.rsplit("/", 1)[-1] for p in io.ls_matching(fs, local, "*.parquet")}
    done = {i for i in ids if f"{i}.parquet" in present}
    todo = [row for row in inputs.to_pylist() if row["instance_id"] not in done]
    if done:
        logger.info("%s shard %05d: resuming, %d/%d items already done", stage, shard_index, len(done), len(ids))
    n_done = len(done)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        outputs = _process(process, batch, drops)
        expected = [r["instance_id"] for r in batch if r["instance_id"] not in drops.items]
        if [o["instance_id"] for o in outputs] != expected:
            raise RuntimeError(f"{stage}: process returned rows out of order or missing")
        for out in outputs:
            io.write_table(io.join(folder, f"{out['instance_id']}.parquet"), pa.Table.from_pylist([out], schema))
        n_done += len(batch)
        logger.info("%s shard %05d: %d/%d", stage, shard_index, n_done, len(ids))
    drops.check(len(todo))
    # Assemble in input order; every item is read back from its file, fresh or resumed alike.
    parts = [io.read_table(io.join(folder, f"{i}.parquet")) for i in ids if i not in drops.items]
    table = (pa.concat_tables(parts) if parts else schema.empty_table()).cast(schema)
    return ShardOutput(table, {"generated": len(todo), "resumed": len(done)})


class GpuStage(Stage):
    """A stage whose items run on a GPU model: resumable item by item (this module's docstring). Its
    finished test comes before any model is loaded, so a finished shard costs no GPU time.

    ``pipeline``: a ready diffusers pipeline (else loaded once per process from the config's model).
    ``encode_prompt``: maps prompt strings to the pipeline's embedding keywords, for pipelines built
    without a text encoder (tests, benchmarks)."""

    def __init__(self, config: GpuStageConfig | None = None, pipeline: Any = None,
                 encode_prompt: PromptEncoder | None = None) -> None:
        super().__init__(config)
        self.pipeline = pipeline
        self.encode_prompt = encode_prompt
        self.model_seconds = 0.0  # time inside the pipeline, for the stats

    def write(self, run: RunFolder | str, shard_index: int, out: ShardOutput | list[dict], drops: Drops,
              seconds: float) -> dict:
        """The shard's table, then (unless ``keep_items``) its per-item files are removed."""
        stats = super().write(run, shard_index, out, drops, seconds)
        fs, items = io.filesystem(RunFolder.of(run).stage_items(self.name, shard_index))
        if not self.config.keep_items and fs.exists(items):
            fs.rm(items, recursive=True)
        return stats
