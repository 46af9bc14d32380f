"""Backends and model loading for the GPU stages (refine, synthesize).

A stage names a backend in its config:

- ``diffusers``: the real pipeline (``QwenImageEditPipeline`` or ``QwenImageEditPlusPipeline`` as the
  checkpoint names it, ``FluxControlNetPipeline``).
- ``passthrough``: no weights; the input image is carried forward unchanged.
- ``auto``: ``diffusers`` when CUDA and the weights are present on this machine, ``passthrough``
  otherwise; the choice and its reason are logged. ``auto`` never downloads: to fetch weights, name
  ``diffusers``.

Asking for ``diffusers`` where it cannot run (no diffusers, no CUDA for ``device="cuda"``, weights
missing while ``HF_HUB_OFFLINE`` is set) raises at start, before any item is processed; it never
falls back silently.

Pipelines are loaded once per worker process and kept resident: :func:`load_pipeline` memoizes on
the model ids, dtype, device and offload setting, and counts real loads in :data:`LOAD_COUNTS`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Protocol

from pointvl.core.extras import require

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
    cpu_offload: bool

    def model_ids(self) -> dict[str, str]: ...


def _require_diffusers() -> None:
    require("diffusers", extra="gpu", purpose="the diffusers backend")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without CUDA raises."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device.startswith("cuda") and not cuda_available():
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


def resolve_backend(config: ModelConfig, stage: Stage, pipeline_given: bool = False) -> str:
    """The backend that will run: ``diffusers`` or ``passthrough``. Raises when ``diffusers`` can't run."""
    if config.backend == "passthrough":
        if pipeline_given:
            raise ValueError(f"{stage}: a pipeline was passed but backend='passthrough'; drop one of them")
        return "passthrough"
    if pipeline_given:
        _require_diffusers()
        return "diffusers"
    ids = config.model_ids()
    if config.backend == "auto":
        try:
            _require_diffusers()
        except ImportError:
            logger.info("%s: backend auto -> passthrough (diffusers is not installed)", stage)
            return "passthrough"
        if config.device == "auto" and not cuda_available():
            logger.info("%s: backend auto -> passthrough (no CUDA device)", stage)
            return "passthrough"
        missing = [m for m in ids.values() if not weights_present(m)]
        if missing:
            logger.info("%s: backend auto -> passthrough (weights not present locally: %s)", stage, missing)
            return "passthrough"
        resolve_device(config.device)
        logger.info("%s: backend auto -> diffusers (%s)", stage, ids)
        return "diffusers"
    _require_diffusers()
    resolve_device(config.device)
    missing = [m for m in ids.values() if not weights_present(m)]
    if missing and (hub_offline() or any(is_local(m) for m in missing)):
        raise ValueError(
            f"{stage}: backend='diffusers' but weights are not available: {missing} "
            f"({'HF_HUB_OFFLINE is set; ' if hub_offline() else ''}download them with "
            "`huggingface-cli download <id>` or point the config at a local folder, "
            "or set backend='passthrough')"
        )
    return "diffusers"


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


def load_pipeline(stage: Stage, config: ModelConfig) -> Any:
    """The diffusers pipeline for ``stage``, loaded once per process and reused.

    ``refine``: the checkpoint's own class (:func:`pipeline_class`: ``QwenImageEditPipeline`` or
    ``QwenImageEditPlusPipeline``) ``.from_pretrained(config.model)``.
    ``synthesize``: ``FluxControlNetPipeline.from_pretrained(config.model)`` with the Union ControlNet
    ``config.controlnet_model`` wrapped in a ``FluxMultiControlNetModel`` (one net, several control
    images and modes: the Union-Pro multi-control usage).
    """
    _require_diffusers()
    import torch

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    key = (stage, tuple(sorted(config.model_ids().items())), dtype, device, config.cpu_offload)
    if key in _CACHE:
        return _CACHE[key]
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
    if config.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    LOAD_COUNTS[stage] += 1
    logger.info("%s: loaded %s on %s (%s, cpu_offload=%s)", stage, config.model_ids(), device, dtype,
                config.cpu_offload)
    _CACHE[key] = pipe
    return pipe


def clear_cache() -> None:
    """Drop the resident pipelines (tests; a worker keeps them for its whole life)."""
    _CACHE.clear()
    LOAD_COUNTS.clear()
