"""The configuration of stage ``annotate`` (paper §4.1.3): backends, models, endpoints, limits, prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pointvl.core.errors import check_range
from pointvl.core.package_data import prompts_root, schema_path
from pointvl.core.strict_config import OPERATIONAL

COORDINATES = ("qwen2.5-vl", "qwen3-vl", "absolute", "relative1000")


@dataclass
class AnnotateConfig:
    """LLM/VLM annotation (paper §4.1.3).

    Args:
        backend: ``"offline"`` (template annotator, no keys; the default) or ``"openai"``.
        llm_model: the QA/description model. Paper: GPT-5 (no temperature is sent to it).
        llm_base_url: any OpenAI-compatible endpoint; ``None`` = the SDK default (api.openai.com).
        llm_api_key_env: environment variable holding the LLM key.
        llm_temperature: sampling temperature for the LLM; ``None`` sends none (GPT-5 accepts only 1).
        vlm_model: the grounding checkpoint. The paper's "Qwen2.5-VL-30B-Instruct" does not exist
            (3B/7B/32B/72B; 30B-A3B is Qwen3-VL); the default is the nearest size, 32B.
        vlm_base_url: the VLM's OpenAI-compatible endpoint (e.g. ``vllm serve`` on port 8000).
        vlm_api_key_env: variable holding the VLM key; unset = a placeholder (vLLM without auth).
        vlm_coordinates: how the VLM writes boxes: ``"qwen2.5-vl"`` (absolute pixels of its resized
            input, sides multiples of 28), ``"qwen3-vl"``/``"relative1000"`` (0–1000 relative),
            ``"absolute"`` (pixels of the image sent).
        vlm_min_pixels, vlm_max_pixels: the Qwen2.5-VL processor's resize bounds (its defaults).
        bbox2d_source: which box becomes ``bbox2d``: ``"mask"`` or ``"vlm"``.
        agreement_threshold: IoU(VLM box, mask box) below this flags the item for review.
        n_attribute_qa: attribute questions asked of the LLM (3–8; the category question is extra).
        n_category_choices: choices of the category question (the true category + distractors).
        timeout_s, max_retries: per-request timeout and the SDK's transport retries (429, 5xx,
            timeouts, connection errors; exponential backoff with jitter).
        max_reasks: re-asks after invalid JSON or a schema violation, then the item fails.
        backoff_initial_s, backoff_max_s: jittered exponential backoff between re-asks.
        requests_per_minute, concurrency: the rate limit, per endpoint.
        cache_dir: response cache; ``""`` = ``RUN/cache/annotate``.
        prompt_version: selects ``prompts_dir/qa_{version}.txt`` and ``ground_{version}.txt``.
        prompts_dir, schema_path: the prompt templates and the LLM output schema (``None``: the
            package's ``prompts/annotate`` and ``schemas/annotation.schema.json``).
        batch: send the QA requests through the OpenAI Batch API (resumable); grounding stays live.
        batch_poll_interval_s, batch_max_wait_s: batch polling; past the wait the shard raises
            :class:`pointvl.core.chat_client.BatchPending` and a re-run picks the batch up.
        redo_failed: re-run a finished shard that has failed items (cached replies cost nothing).
        api_key_secret_block, vlm_api_key_secret_block: Prefect Secret blocks the task reads the keys
            from (used by ``tasks/stage_tasks.py`` only; the library reads the environment).
    """

    backend: str = "offline"
    llm_model: str = "gpt-5"
    llm_base_url: str | None = None
    llm_api_key_env: str = field(default="OPENAI_API_KEY", metadata=OPERATIONAL)
    llm_temperature: float | None = None
    vlm_model: str = "Qwen/Qwen2.5-VL-32B-Instruct"
    vlm_base_url: str = "http://127.0.0.1:8000/v1"
    vlm_api_key_env: str = field(default="VLM_API_KEY", metadata=OPERATIONAL)
    vlm_coordinates: str = "qwen2.5-vl"
    vlm_min_pixels: int = 4 * 28 * 28
    vlm_max_pixels: int = 16384 * 28 * 28
    bbox2d_source: str = "mask"
    agreement_threshold: float = 0.5
    n_attribute_qa: int = 4
    n_category_choices: int = 4
    timeout_s: float = 120.0
    max_retries: int = 5
    max_reasks: int = 2
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    requests_per_minute: float = field(default=60.0, metadata=OPERATIONAL)
    concurrency: int = field(default=4, metadata=OPERATIONAL)
    cache_dir: str = ""
    prompt_version: str = "v1"
    prompts_dir: str | None = None
    schema_path: str | None = None
    batch: bool = False
    batch_poll_interval_s: float = field(default=30.0, metadata=OPERATIONAL)
    batch_max_wait_s: float = field(default=3600.0, metadata=OPERATIONAL)
    redo_failed: bool = field(default=False, metadata=OPERATIONAL)
    api_key_secret_block: str = field(default="", metadata=OPERATIONAL)
    vlm_api_key_secret_block: str = field(default="", metadata=OPERATIONAL)

    def __post_init__(self) -> None:
        if self.backend not in ("offline", "openai"):
            raise ValueError(f"annotate.backend must be 'offline' or 'openai', got {self.backend!r}")
        if self.vlm_coordinates not in COORDINATES:
            raise ValueError(f"annotate.vlm_coordinates must be one of {COORDINATES}, got {self.vlm_coordinates!r}")
        if self.bbox2d_source not in ("mask", "vlm"):
            raise ValueError(f"annotate.bbox2d_source must be 'mask' or 'vlm', got {self.bbox2d_source!r}")
        if self.backend == "offline" and self.bbox2d_source == "vlm":
            raise ValueError("the offline backend has no VLM: set annotate.bbox2d_source='mask' or backend='openai'")
        if self.llm_model.startswith("gpt-5") and self.llm_temperature not in (None, 1, 1.0):
            raise ValueError("GPT-5 rejects any temperature but 1: set annotate.llm_temperature=None")
        if not 0.0 <= self.agreement_threshold <= 1.0:
            raise ValueError(f"annotate.agreement_threshold is an IoU in [0, 1], got {self.agreement_threshold}")
        if not 3 <= self.n_attribute_qa <= 8:
            raise ValueError(
                f"annotate.n_attribute_qa must be in [3, 8] (the schema's bounds), got {self.n_attribute_qa}"
            )
        if not 2 <= self.n_category_choices <= 8:
            raise ValueError(f"annotate.n_category_choices must be in [2, 8], got {self.n_category_choices}")
        for name in ("timeout_s", "backoff_initial_s", "backoff_max_s", "batch_poll_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"annotate.{name} must be > 0, got {getattr(self, name)}")
        check_range("annotate.timeout_s", self.timeout_s, 0, 3600, 120.0)
        check_range("annotate.backoff_max_s", self.backoff_max_s, self.backoff_initial_s, 3600, 30.0,
                    "at least backoff_initial_s")
        check_range("annotate.max_retries", self.max_retries, 0, 20, 5)
        check_range("annotate.max_reasks", self.max_reasks, 0, 10, 2, "each re-ask is a paid call")
        check_range("annotate.concurrency", self.concurrency, 1, 256, 4)
        check_range("annotate.requests_per_minute", self.requests_per_minute, 0, 1e6, 60.0, "0 = no spacing")
        check_range("annotate.vlm_min_pixels", self.vlm_min_pixels, 28 * 28, self.vlm_max_pixels, 4 * 28 * 28,
                    "at most vlm_max_pixels")
        for kind in ("qa", "ground"):
            p = self.prompt_file(kind)
            if not p.is_file():
                raise ValueError(f"annotate.prompt_version {self.prompt_version!r}: no prompt file {p}")
        if not self.schema_file().is_file():
            raise ValueError(f"annotate.schema_path: no such file {str(self.schema_file())!r}")

    def prompt_file(self, kind: str) -> Path:
        """The ``qa`` or ``ground`` prompt template of :attr:`prompt_version`."""
        root = Path(self.prompts_dir) if self.prompts_dir else prompts_root() / "annotate"
        return root / f"{kind}_{self.prompt_version}.txt"

    def schema_file(self) -> Path:
        return Path(self.schema_path) if self.schema_path else schema_path("annotation.schema.json")
