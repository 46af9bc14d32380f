"""Backends and model loading for the GPU stages (refine, synthesize).

A stage names a backend in its config:

- ``diffusers``: the real pipeline (``QwenImageEditPipeline`` or ``QwenImageEditPlusPipeline`` as the
  checkpoint names it, ``FluxControlNetPipeline``).
- ``passthrough``: no weights; the input image is carried forward unchanged (the summary and the
  dataset card then say, in their first lines, that the images are unrefined renders).
- ``auto``: ``diffusers`` on a machine with CUDA; ``passthrough`` on a machine without. On a CUDA
  machine, weights missing from the local cache (or diffusers missing) fail the stage at start with
  one line naming the repo and how to get it: never a silent pass-through. ``auto`` never downloads.

Asking for ``diffusers`` where it cannot run (no diffusers, no CUDA for ``device="cuda"``, weights
missing while ``HF_HUB_OFFLINE`` is set) raises at start, before any item is processed; it never
falls back silently.

One pipeline on the device per process: :func:`load_pipeline` memoizes on the model ids, dtype,
device and offload setting (a worker loads its stage's model once for all its shards), and before it
loads another pipeline it releases the resident one (:func:`release_pipelines`: dropped from the
cache, ``gc.collect()``, ``torch.cuda.empty_cache()``). Before loading it checks the weights' size
against the device's free memory and applies the offload option (:mod:`pointvl.dataset.gpu_memory`).
Real loads are counted in :data:`LOAD_COUNTS`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Protocol

from pointvl.core.errors import InputError
from pointvl.core.extras import MissingExtra, require
from pointvl.dataset import gpu_memory

logger = logging.getLogger(__name__)

Stage = Literal["refine", "synthesize"]
BACKENDS = ("auto", "diffusers", "passthrough")

LOAD_COUNTS: Counter[str] = Counter()
"""Real pipeline loads in this process, per stage (the per-process cache makes repeats free)."""

_CACHE: dict[tuple, Any] = {}


class ModelConfig(Protocol):
    """The fields :func:`load_pipeline` and :func:`resolve_backend` read from a stage config."""

    backend: str
    model: str
    device: str
    dtype: str
    memory_margin_gb: float

    def model_ids(self) -> dict[str, str]: ...

    def offload_mode(self) -> str: ...


class WeightsMissing(InputError):
    """The weights a stage needs are not on this machine; the message says how to get them."""


def _require_diffusers() -> None:
    require("diffusers", extra="gpu", purpose="the diffusers backend")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str, cuda: bool | None = None) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without CUDA raises.

    ``cuda``: whether this machine has CUDA (None: ask torch).
    """
    cuda = cuda_available() if cuda is None else cuda
    if device == "auto":
        return "cuda" if cuda else "cpu"
    if device.startswith("cuda") and not cuda:
        raise ValueError(
            f"device={device!r} but CUDA is not available here; run on a GPU worker or set device='cpu'"
        )
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` -> ``bfloat16`` on CUDA, ``float32`` on the CPU."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def is_local(model: str) -> bool:
    """A local folder (existing, or spelled as a path) rather than a Hub ``namespace/name`` id."""
    return Path(model).exists() or model.startswith(("/", ".", "~")) or model.count("/") != 1


def _model_index(model: str) -> Path | None:
    """The ``model_index.json`` or ``config.json`` of a local folder or a cached Hub repo, if present."""
    if is_local(model):
        if not Path(model).is_dir():
            return None
        for name in ("model_index.json", "config.json"):
            if (Path(model) / name).is_file():
                return Path(model) / name
        return None
    from huggingface_hub import try_to_load_from_cache

    for name in ("model_index.json", "config.json"):
        hit = try_to_load_from_cache(model, name)
        if isinstance(hit, str):
            return Path(hit)
    return None


def weights_present(model: str) -> bool:
    """True when ``model`` is a local model folder or a Hub id already in the local cache."""
    return _model_index(model) is not None


def resolve_backend(config: ModelConfig, stage: Stage, pipeline_given: bool = False,
                    cuda: bool | None = None) -> str:
    """The backend that will run: ``diffusers`` or ``passthrough``. Raises when ``diffusers`` can't run,
    and when ``auto`` finds CUDA (``cuda``: None asks torch) but not diffusers or the weights."""
    if config.backend == "passthrough":
        if pipeline_given:
            raise ValueError(f"{stage}: a pipeline was passed but backend='passthrough'; drop one of them")
        return "passthrough"
    if pipeline_given:
        _require_diffusers()
        return "diffusers"
    ids = config.model_ids()
    cuda = cuda_available() if cuda is None else cuda
    if config.backend == "auto":
        if not cuda:
            logger.warning("%s: backend auto -> passthrough (no CUDA device): the images are unrefined renders",
                           stage)
            return "passthrough"
        try:
            _require_diffusers()
        except MissingExtra as err:
            raise MissingExtra(f"{stage}: backend auto on a CUDA machine: {err}, or set {stage}.backend: "
                               "passthrough to build unrefined renders") from None
        missing = [m for m in ids.values() if not weights_present(m)]
        if missing:
            raise WeightsMissing(f"{stage}: backend auto on a CUDA machine but weights are not available: "
                                 f"{how_to_get(missing)}; or set {stage}.backend: passthrough to build unrefined "
                                 "renders")
        resolve_device(config.device, cuda)
        logger.info("%s: backend auto -> diffusers (%s)", stage, ids)
        return "diffusers"
    _require_diffusers()
    resolve_device(config.device, cuda)
    missing = [m for m in ids.values() if not weights_present(m)]
    if missing and (hub_offline() or any(is_local(m) for m in missing)):
        raise WeightsMissing(
            f"{stage}: backend='diffusers' but weights are not available"
            f"{' (HF_HUB_OFFLINE is set)' if hub_offline() else ''}: {how_to_get(missing)}; "
            f"or set {stage}.backend: passthrough"
        )
    return "diffusers"


def check_backends(configs: dict[str, ModelConfig], cuda: bool | None = None) -> dict[str, str]:
    """The backend of each GPU stage run in this process, resolved before the build's first stage, so
    missing weights on a CUDA machine fail the build in seconds, not after the CPU stages."""
    return {stage: resolve_backend(config, stage, cuda=cuda) for stage, config in configs.items()}


def how_to_get(missing: list[str]) -> str:
    """How to get each missing model: a local folder to create, or the Hub repo to download (gated
    repos, such as FLUX's, need their licence accepted on the Hub and a login first)."""
    folders = [m for m in missing if is_local(m)]
    repos = [m for m in missing if not is_local(m)]
    parts = [f"no model folder {m}" for m in folders]
    if repos:
        parts.append(" && ".join(f"`hf download {r}`" for r in repos) + " (gated: accept the licence at "
                     + ", ".join(f"https://huggingface.co/{r}" for r in repos) + " and `hf auth login` first)")
    return "; ".join(parts)


def model_folder(model: str) -> Path | None:
    """The local folder of ``model``: the folder itself, or its snapshot in the Hugging Face cache."""
    index = _model_index(model)
    return index.parent if index is not None else None


def _absent_components(model: str) -> dict[str, None]:
    """Components a saved pipeline folder holds as ``[null, null]`` (e.g. no text encoders), as ``None``.

    diffusers refuses to load such a folder unless those components are passed explicitly.
    """
    index = _model_index(model)
    if index is None or index.name != "model_index.json":
        return {}
    entries = json.loads(index.read_text())
    return {k: None for k, v in entries.items() if isinstance(v, list) and v == [None, None]}


REFINE_PIPELINES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
"""The classes refine runs, named by a checkpoint's ``model_index.json`` ``_class_name``."""


def pipeline_class(model: str, allowed: tuple[str, ...] = REFINE_PIPELINES) -> type:
    """The diffusers pipeline class that ``model`` (a folder or Hub id) names in its ``model_index.json``.

    Qwen/Qwen-Image-Edit is a ``QwenImageEditPipeline``; -2509 and -2511 are ``QwenImageEditPlusPipeline``
    (another prompt template and condition sizes). diffusers loads a checkpoint into whichever class is
    asked for, without a warning, so the class is read from the checkpoint. A class not in ``allowed``
    raises a one-line ``ValueError``.
    """
    import diffusers

    try:
        index = diffusers.DiffusionPipeline.load_config(model)
    except OSError as err:
        raise ValueError(f"{model} has no readable model_index.json ({str(err).splitlines()[0]}); "
                         "point the config at a diffusers pipeline folder or Hub repo") from None
    name = index.get("_class_name")
    if name not in allowed:
        raise ValueError(f"{model} is a {name} checkpoint (model_index.json _class_name); this stage runs "
                         f"{' or '.join(allowed)}: use e.g. Qwen/Qwen-Image-Edit or Qwen/Qwen-Image-Edit-2509")
    return getattr(diffusers, name)


def load_pipeline(stage: Stage, config: ModelConfig, free_bytes: int | None = None) -> Any:
    """The diffusers pipeline for ``stage``, loaded once per process and reused.

    ``refine``: the checkpoint's own class (:func:`pipeline_class`: ``QwenImageEditPipeline`` or
    ``QwenImageEditPlusPipeline``) ``.from_pretrained(config.model)``.
    ``synthesize``: ``FluxControlNetPipeline.from_pretrained(config.model)`` with the Union ControlNet
    ``config.controlnet_model`` wrapped in a ``FluxMultiControlNetModel`` (one net, several control
    images and modes: the Union-Pro multi-control usage).

    Another resident pipeline is released first. On CUDA the offload is then chosen (or refused)
    from the weights' size and the device's free memory, ``free_bytes`` when given (tests), else
    ``torch.cuda.mem_get_info``.
    """
    _require_diffusers()
    import torch

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    key = (stage, tuple(sorted(config.model_ids().items())), dtype, device, config.offload_mode())
    if key in _CACHE:
        return _CACHE[key]
    release_pipelines()
    offload = choose_offload(stage, config, device, dtype, free_bytes)
    torch_dtype = getattr(torch, dtype)
    absent = _absent_components(config.model)
    if stage == "refine":
        pipe = pipeline_class(config.model).from_pretrained(config.model, dtype=torch_dtype, **absent)
    elif stage == "synthesize":
        from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxMultiControlNetModel

        controlnet = FluxControlNetModel.from_pretrained(config.model_ids()["controlnet"], dtype=torch_dtype)
        pipe = FluxControlNetPipeline.from_pretrained(
            config.model,
            controlnet=FluxMultiControlNetModel([controlnet]),
            dtype=torch_dtype,
            **absent,
        )
    else:
        raise ValueError(f"unknown GPU stage {stage!r}; use 'refine' or 'synthesize'")
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    LOAD_COUNTS[stage] += 1
    logger.info("%s: loaded %s on %s (%s, offload %s)", stage, config.model_ids(), device, dtype, offload)
    _CACHE[key] = pipe
    return pipe


def choose_offload(stage: Stage, config: ModelConfig, device: str, dtype: str, free_bytes: int | None = None) -> str:
    """The offload to load ``stage`` with on ``device`` (``none``, ``model`` or ``sequential``).

    On CUDA: :meth:`pointvl.dataset.gpu_memory.MemoryPlan.choose` with the weights read from the local
    folders or cache, against ``free_bytes`` (None: the device's free memory now); raises
    :class:`~pointvl.dataset.gpu_memory.DeviceMemoryError` in one line when the option asked for does
    not fit. Where the weights are not local (they will be downloaded) the check is skipped with a
    warning. On the CPU there is nothing to offload to: ``none``.
    """
    requested = config.offload_mode()
    if not device.startswith("cuda"):
        if requested in ("model", "sequential"):
            logger.warning("%s: offload %s ignored on %s", stage, requested, device)
        return "none"
    folders = {k: model_folder(m) for k, m in config.model_ids().items()}
    plan = gpu_memory.plan_stage(stage, folders, dtype, config.memory_margin_gb)
    if plan is None:
        return "none" if requested == "auto" else requested
    free = gpu_memory.free_memory(device) if free_bytes is None else free_bytes
    return plan.choose(requested, free, device)


def release_pipelines() -> list[str]:
    """Release every resident pipeline: dropped from the cache, then ``gc.collect()`` and
    ``torch.cuda.empty_cache()``, so the next stage's pipeline has the device to itself.

    Returns the stages released. A pipeline still referenced elsewhere (a stage given one) is not freed.
    """
    released = [key[0] for key in _CACHE]
    if not released:
        return []
    _CACHE.clear()
    gc.collect()
    import torch

    torch.cuda.empty_cache()
    logger.info("released the %s pipeline%s from the device", ", ".join(released), "s" * (len(released) > 1))
    return released


def clear_cache() -> None:
    """Release the resident pipelines and reset the load counts (tests)."""
    release_pipelines()
    LOAD_COUNTS.clear()
