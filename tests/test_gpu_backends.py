"""Which backend a GPU stage runs, and one pipeline on the device at a time per process.

``backend: auto`` passes through only on a machine without CUDA; with CUDA (``cuda=True`` given to the
stage, as a GPU worker's torch would report) missing weights fail the stage at start in one line. A
process that runs refine then synthesize (the in-process build) releases refine's pipeline before
synthesize's loads.
"""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
from gpu_inputs import write_render_shard

from pointvl.core import io
from pointvl.dataset import diffusion_pipelines
from pointvl.dataset.diffusion_pipelines import WeightsMissing, load_pipeline, release_pipelines, resolve_backend
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.refine import Refine, RefineConfig
from pointvl.dataset.stages.synthesize import Synthesize, SynthesizeConfig
from pointvl.dataset.tables import read_stage_table
from pointvl.testing.tiny_pipelines import HashPromptEncoder, save_tiny_models


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    return save_tiny_models(str(tmp_path_factory.mktemp("models")))


@pytest.fixture(autouse=True)
def empty_cache():
    diffusion_pipelines.clear_cache()
    yield
    diffusion_pipelines.clear_cache()


@pytest.fixture
def small_condition_image(monkeypatch):
    """Qwen-Image-Edit resizes its conditioning image to ~1 MP; 32x32 keeps the CPU test fast
    (docs/facts.md#diffusion-models)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as qe

    monkeypatch.setattr(qe, "calculate_dimensions", lambda area, ratio: (32, 32, None))


def test_auto_with_cuda_and_missing_weights_fails_the_stage_in_one_line_naming_the_repo(tmp_path):
    run = str(tmp_path)
    write_render_shard(run, 0, n=2)
    stage = Refine(RefineConfig(model="pointvl-tests/not-cached-edit"), cuda=True)
    with pytest.raises(WeightsMissing) as err:
        stage.run_shard(run, 0)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("refine: backend auto on a CUDA machine but weights are not available: ")
    assert "`hf download pointvl-tests/not-cached-edit`" in message
    assert "accept the licence at https://huggingface.co/pointvl-tests/not-cached-edit" in message
    assert message.endswith("or set refine.backend: passthrough to build unrefined renders")
    assert not io.exists(RunFolder.of(run).stage_items("refine", 0))  # failed at start: no item ran
    # synthesize names just the repo that is missing (here the ControlNet), not the folder that is there
    config = SynthesizeConfig(model=str(tmp_path / "no-such-flux"), controlnet_model="pointvl-tests/not-cached-cn")
    with pytest.raises(WeightsMissing, match=r"synthesize: .*no model folder .*no-such-flux; "
                                             r"`hf download pointvl-tests/not-cached-cn`"):
        resolve_backend(config, "synthesize", cuda=True)


def test_auto_passes_through_only_without_cuda_and_says_so(tmp_path, saved, caplog):
    config = RefineConfig(model="pointvl-tests/not-cached-edit")
    with caplog.at_level(logging.WARNING, logger="pointvl.dataset.diffusion_pipelines"):
        assert resolve_backend(config, "refine", cuda=False) == "passthrough"
    assert "backend auto -> passthrough (no CUDA device): the images are unrefined renders" in caplog.text
    assert resolve_backend(RefineConfig(model=saved["refine"], device="cpu"), "refine", cuda=True) == "diffusers"
    assert resolve_backend(RefineConfig(backend="passthrough"), "refine", cuda=True) == "passthrough"


def test_loading_another_pipeline_releases_the_resident_one(saved, caplog):
    refine = RefineConfig(backend="diffusers", device="cpu", model=saved["refine"])
    synth = SynthesizeConfig(backend="diffusers", device="cpu", model=saved["synthesize"],
                             controlnet_model=saved["controlnet"])
    pipe = load_pipeline("refine", refine)
    assert load_pipeline("refine", refine) is pipe  # resident: one load for all shards
    held = weakref.ref(pipe)
    transformer = weakref.ref(pipe.transformer)
    del pipe
    with caplog.at_level(logging.INFO, logger="pointvl.dataset.diffusion_pipelines"):
        load_pipeline("synthesize", synth)
    assert held() is None and transformer() is None  # freed, not merely uncached
    messages = [r.message for r in caplog.records]
    released = messages.index("released the refine pipeline from the device")
    assert released < next(i for i, m in enumerate(messages) if m.startswith("synthesize: loaded"))
    assert [key[0] for key in diffusion_pipelines._CACHE] == ["synthesize"]
    assert dict(diffusion_pipelines.LOAD_COUNTS) == {"refine": 1, "synthesize": 1}
    assert release_pipelines() == ["synthesize"] and not diffusion_pipelines._CACHE
    assert release_pipelines() == []


def test_refine_then_synthesize_in_one_process_holds_one_pipeline_at_a_time(tmp_path, saved, small_condition_image):
    """The in-process build's order: every refine shard, then every synthesize shard, in this process."""
    run = str(tmp_path)
    for shard in (0, 1):
        write_render_shard(run, shard, n=1)
    refine = Refine(RefineConfig(backend="diffusers", device="cpu", model=saved["refine"], num_inference_steps=1),
                    encode_prompt=HashPromptEncoder("refine"))
    for shard in (0, 1):
        refine.run_shard(run, shard)
    [refine_pipe] = diffusion_pipelines._CACHE.values()
    held = weakref.ref(refine_pipe)
    del refine_pipe
    synthesize = Synthesize(SynthesizeConfig(backend="diffusers", device="cpu", model=saved["synthesize"],
                                             controlnet_model=saved["controlnet"], num_inference_steps=1),
                            encode_prompt=HashPromptEncoder("synthesize"))
    for shard in (0, 1):
        synthesize.run_shard(run, shard)
    gc.collect()
    assert held() is None
    assert [key[0] for key in diffusion_pipelines._CACHE] == ["synthesize"]
    assert dict(diffusion_pipelines.LOAD_COUNTS) == {"refine": 1, "synthesize": 1}
    assert read_stage_table(run, "synthesize", 1).num_rows == 1


def test_a_build_checks_its_in_process_gpu_stages_before_any_stage(shapenet, tmp_path):
    from pointvl.dataset.build_config import BuildConfig
    from pointvl.dataset.runner import build_in_process

    config = BuildConfig.from_dict({"refine": {"backend": "diffusers", "model": str(tmp_path / "no-such-model")}})
    with pytest.raises(WeightsMissing, match="refine: backend='diffusers' but weights are not available"):
        build_in_process(shapenet.root, str(tmp_path / "run"), config)
    assert not (tmp_path / "run").exists()  # nothing cleaned, planned or rendered
