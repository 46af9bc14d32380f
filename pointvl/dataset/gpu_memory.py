"""How much device memory a GPU stage's weights take, and which offload fits the device.

Before a pipeline is loaded, :func:`plan_stage` reads the weight files of every component from the
local model folder or the local Hugging Face cache (never the network): the safetensors headers
(each tensor's dtype and shape, so the size at the dtype it will be loaded in is exact), or where
only a ``*.safetensors.index.json`` is there, its ``metadata.total_size``. :meth:`MemoryPlan.choose`
compares what each offload option keeps on the device with the device's free memory
(``torch.cuda.mem_get_info``) and either picks one or refuses, in one line naming the numbers.

What each option keeps on the device (weights only; ``margin_gb`` is added for activations, the VAE
decode and the CUDA context):

- ``none``: every component (``pipe.to(device)``).
- ``model`` (diffusers' ``enable_model_cpu_offload``): one model of the pipeline's offload chain at a
  time, the largest of them; beside it the VAE (it encodes before the transformer runs and stays)
  and the models outside the chain (the ControlNet, kept on the device for the whole call).
- ``sequential`` (``enable_sequential_cpu_offload``): one module at a time, the largest of them.
  Slowest: every weight crosses the bus at every step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pointvl.core.errors import InputError

logger = logging.getLogger(__name__)

GB = 1e9
OFFLOADS = ("auto", "none", "model", "sequential")
"""``auto`` picks the first of ``none``, ``model``, ``sequential`` that fits the device's free memory."""

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOATS = {"F64", "F32", "F16", "BF16"}
TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


class DeviceMemoryError(InputError):
    """The stage's weights do not fit the device with the offload asked for; the message names the option that does."""


@dataclass(frozen=True)
class Component:
    """One model of a pipeline: its weights at the load dtype and its largest module's (the unit of
    sequential offload), and whether it is in the pipeline's ``model_cpu_offload_seq``."""

    name: str
    bytes: int
    largest_module: int
    in_chain: bool = True


@dataclass(frozen=True)
class MemoryPlan:
    """A stage's components and what each offload option keeps on the device."""

    stage: str
    dtype: str
    components: tuple[Component, ...]
    margin: int = int(4 * GB)

    def weights(self, offload: str) -> int:
        """Bytes of weights on the device at the peak under ``offload`` (``none``, ``model``, ``sequential``)."""
        if offload == "none":
            return sum(c.bytes for c in self.components)
        if offload == "model":
            chain = [c.bytes for c in self.components if c.in_chain and c.name != "vae"]
            beside = [c.bytes for c in self.components if not c.in_chain or c.name == "vae"]
            return max(chain, default=0) + sum(beside)
        if offload == "sequential":
            return max((c.largest_module for c in self.components), default=0)
        raise ValueError(f"offload must be one of none, model, sequential, got {offload!r}")

    def need(self, offload: str) -> int:
        return self.weights(offload) + self.margin

    def choose(self, requested: str, free: int, device: str) -> str:
        """The offload to load with: ``requested``, or for ``auto`` the least offload that fits ``free`` bytes.

        Raises :class:`DeviceMemoryError` (one line: GB needed, GB free, the option to set) when the
        requested option, or for ``auto`` every option, needs more than ``free``.
        """
        options = ("none", "model", "sequential")
        fitting = [o for o in options if self.need(o) <= free]
        key = f"{self.stage}.offload"
        if requested == "auto":
            if not fitting:
                raise DeviceMemoryError(
                    f"{self.stage}: even offload: sequential needs {_gb(self.need('sequential'))} GB "
                    f"({self._what('sequential')}) but {device} has {_gb(free)} GB free; free the device "
                    f"(other processes?), use a larger GPU or lower {self.stage}.memory_margin_gb")
            chosen = fitting[0]
            line = (f"{self.stage}: {_gb(self.weights('none'))} GB of {self.dtype} weights, {_gb(free)} GB free on "
                    f"{device} -> offload: {chosen} (needs {_gb(self.need(chosen))} GB: {self._what(chosen)})")
            (logger.info if chosen == "none" else logger.warning)("%s; set %s to choose", line, key)
            return chosen
        if requested not in options:
            raise ValueError(f"{key} must be one of {OFFLOADS}, got {requested!r}")
        if self.need(requested) > free:
            hint = (f"set {key}: {fitting[0]} (needs {_gb(self.need(fitting[0]))} GB)" if fitting else
                    "nothing fits: free the device (other processes?) or use a larger GPU")
            raise DeviceMemoryError(
                f"{self.stage}: offload: {requested} needs {_gb(self.need(requested))} GB "
                f"({self._what(requested)}) but {device} has {_gb(free)} GB free; {hint}")
        logger.info("%s: offload: %s needs %s GB, %s GB free on %s", self.stage, requested,
                    _gb(self.need(requested)), _gb(free), device)
        return requested

    def _what(self, offload: str) -> str:
        return f"{_gb(self.weights(offload))} GB of {self.dtype} weights + {_gb(self.margin)} GB margin"

    def table(self) -> dict[str, float]:
        """GB of weights on the device per offload option (the README's table)."""
        return {o: round(self.weights(o) / GB, 1) for o in ("none", "model", "sequential")}


def _gb(n: int) -> str:
    return f"{n / GB:.1f}"


def read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """``{tensor name: (dtype, shape)}`` from a safetensors file's JSON header (its first bytes only)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {name: (t["dtype"], t["shape"]) for name, t in header.items()}


def _weight_files(folder: Path) -> tuple[list[Path], Path | None]:
    """The safetensors files from_pretrained would load in ``folder`` (no variants when plain ones
    exist), and the ``*.safetensors.index.json`` if there is one."""
    indexes = sorted(p for p in folder.glob("*.safetensors.index.json") if p.name.count(".") == 3)
    if indexes:
        shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        return [folder / s for s in shards], indexes[0]
    files = sorted(folder.glob("*.safetensors"))
    plain = [p for p in files if p.name.count(".") == 1]
    return plain or files, None


def component_weights(folder: Path, name: str, dtype: str, in_chain: bool = True) -> Component | None:
    """The weights of the model in ``folder`` loaded as ``dtype``; None when its weight files are not local.

    Floating-point tensors count at ``dtype`` (from_pretrained casts them), others at their own size.
    From the headers when every file is there; else from the index's ``metadata.total_size``, scaled
    from the config's ``torch_dtype`` to ``dtype`` (the largest module is then unknown: 0).
    """
    files, index = _weight_files(folder)
    target = TORCH_DTYPE_BYTES[dtype]
    if files and all(p.is_file() for p in files):
        modules: dict[str, int] = {}
        for path in files:
            for tensor, (kind, shape) in read_safetensors_header(path).items():
                numel = 1
                for d in shape:
                    numel *= d
                module = tensor.rsplit(".", 1)[0]
                modules[module] = modules.get(module, 0) + numel * (target if kind in FLOATS else DTYPE_BYTES[kind])
        return Component(name, sum(modules.values()), max(modules.values(), default=0), in_chain)
    if index is not None:
        total = json.loads(index.read_text())["metadata"]["total_size"]
        config = folder / "config.json"
        stored = json.loads(config.read_text()).get("torch_dtype") if config.is_file() else None
        scale = target / TORCH_DTYPE_BYTES[stored] if stored in TORCH_DTYPE_BYTES else 1.0
        return Component(name, int(total * scale), 0, in_chain)
    return None


def pipeline_components(folder: Path, dtype: str, chain: tuple[str, ...]) -> tuple[list[Component], list[str]]:
    """``(components, names whose weights are not local)`` of the pipeline saved in ``folder``.

    The models are the ``model_index.json`` entries whose subfolder has a ``config.json``
    (schedulers, tokenizers and processors have none); an entry without its subfolder is not local.
    ``chain``: the pipeline's offload sequence.
    """
    entries = json.loads((folder / "model_index.json").read_text())
    found, missing = [], []
    for name, value in entries.items():
        if name.startswith("_") or not isinstance(value, list) or value == [None, None]:
            continue
        if not (folder / name).is_dir():  # not cached yet: from_pretrained would download it
            missing.append(name)
            continue
        if not (folder / name / "config.json").is_file():  # a scheduler, tokenizer or processor
            continue
        component = component_weights(folder / name, name, dtype, name in chain)
        if component is None:
            missing.append(name)
        else:
            found.append(component)
    return found, missing


def offload_chain(folder: Path) -> tuple[str, ...]:
    """The ``model_cpu_offload_seq`` of the diffusers pipeline class ``model_index.json`` names."""
    import diffusers

    name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    return tuple(getattr(diffusers, name).model_cpu_offload_seq.split("->"))


def plan_stage(stage: str, folders: dict[str, Path | None], dtype: str, margin_gb: float) -> MemoryPlan | None:
    """The memory plan of ``stage`` from its local folders (``{"model": pipeline folder, "controlnet": ...}``);
    None, with a warning naming what is missing, when some weights are not local (nothing is downloaded)."""
    pipeline = folders["model"]
    if pipeline is None or not (pipeline / "model_index.json").is_file():
        logger.warning("%s: cannot check device memory before loading: %s holds no model_index.json locally",
                       stage, pipeline)
        return None
    components, missing = pipeline_components(pipeline, dtype, offload_chain(pipeline))
    for key, folder in folders.items():
        if key == "model":
            continue
        extra = component_weights(folder, key, dtype, in_chain=False) if folder is not None else None
        if extra is None:
            missing.append(key)
        else:
            components.append(extra)
    if missing:
        logger.warning("%s: cannot check device memory before loading: weights of %s are not local", stage, missing)
        return None
    return MemoryPlan(stage, dtype, tuple(components), int(margin_gb * GB))


def free_memory(device: str) -> int:
    """Free bytes on CUDA ``device`` now (``torch.cuda.mem_get_info``: other processes' use counts)."""
    import torch

    return torch.cuda.mem_get_info(torch.device(device))[0]
