"""refine: the real QwenImageEditPipeline code path with tiny random components, and passthrough."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from gpu_inputs import write_render_shard

from pointvl.dataset import diffusion_pipelines
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.base import read_stage_table, read_stats
from pointvl.dataset.stages.gpu_common import instance_seed
from pointvl.dataset.stages.refine import Refine, RefineConfig
from pointvl.core import images, io
from pointvl.testing.tiny_pipelines import HashPromptEncoder, save_tiny_models, tiny_refine_pipeline

STEPS = 2


@pytest.fixture(autouse=True)
def small_condition_image(monkeypatch):
    """Qwen-Image-Edit resizes its conditioning image to ~1 MP; 32x32 keeps the CPU test fast (FACTS)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as qe

    monkeypatch.setattr(qe, "calculate_dimensions", lambda area, ratio: (32, 32, None))


def tiny_config(**kw) -> RefineConfig:
    return RefineConfig(**({"backend": "diffusers", "device": "cpu", "num_inference_steps": STEPS} | kw))


def test_passthrough_carries_the_render_forward(tmp_path):
    run = str(tmp_path)
    ids = write_render_shard(run, 0, n=3)
    stats = Refine(RefineConfig(backend="passthrough")).run_shard(run, 0)
    table = read_stage_table(run, "refine", 0)
    renders = read_stage_table(run, "render", 0)
    assert table.column_names == ["instance_id", "refined", "align_iou", "align_shift_px", "align_scale",
                                  "align_flagged", "refine_provenance"]
    assert not any(table.column("align_flagged").to_pylist()) and stats["align_flagged"] == 0  # its own mask
    assert table.column("instance_id").to_pylist() == ids
    assert table.column("refined").to_pylist() == renders.column("render").to_pylist()
    prov = json.loads(table.column("refine_provenance")[0].as_py())
    assert prov["backend"] == "passthrough" and prov["prompt_version"] == "refine/v1"
    assert prov["seed"] == instance_seed(0, "refine", ids[0])
    assert stats["generated"] == 3 and stats["backend"] == "passthrough"
    assert not io.exists(RunFolder.of(run).stage_items("refine", 0))
    assert read_stats(run, "refine", 0)["instances"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU default")
def test_auto_is_passthrough_without_cuda_and_says_so(tmp_path, caplog):
    write_render_shard(str(tmp_path), 0, n=1)
    with caplog.at_level(logging.INFO, logger="pointvl.dataset.diffusion_pipelines"):
        stats = Refine(RefineConfig()).run_shard(str(tmp_path), 0)
    assert stats["backend"] == "passthrough"
    assert "backend auto -> passthrough (no CUDA device)" in caplog.text


def test_diffusers_without_weights_fails_at_start(tmp_path, monkeypatch):
    run = str(tmp_path)
    write_render_shard(run, 0, n=2)
    with pytest.raises(ValueError, match="weights are not available"):
        Refine(tiny_config(model=str(tmp_path / "no-such-model"))).run_shard(run, 0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        Refine(tiny_config(model="Qwen/Qwen-Image-Edit")).run_shard(run, 0)
    assert not io.exists(RunFolder.of(run).stage_items("refine", 0))
    with pytest.raises(ValueError, match="backend must be one of"):
        RefineConfig(backend="cuda")


@pytest.mark.parametrize("batch_size", [1, 2])
def test_tiny_pipeline_keeps_render_size_and_is_seeded(tmp_path, batch_size):
    pipe = tiny_refine_pipeline()
    encoder = HashPromptEncoder("refine")
    outputs = []
    for name in ("a", "b"):
        run = str(tmp_path / name)
        ids = write_render_shard(run, 0, n=3, width=44, height=36)  # not a multiple of 16: resized back
        stats = Refine(tiny_config(batch_size=batch_size), pipe, encoder).run_shard(run, 0)
        table = read_stage_table(run, "refine", 0)
        outputs.append(table.column("refined").to_pylist())
    assert stats["backend"] == "diffusers" and stats["generated"] == 3 and stats["model_seconds"] > 0
    for png in outputs[0]:
        assert images.decode_rgb(png).shape == (36, 44, 3)
    assert outputs[0] == outputs[1]  # same seeds -> same images
    assert outputs[0][0] != outputs[0][1]  # different instances -> different seeds
    prov = json.loads(table.column("refine_provenance")[1].as_py())
    assert prov["backend"] == "diffusers" and prov["models"] == {"model": "Qwen/Qwen-Image-Edit"}
    assert prov["seed"] == instance_seed(0, "refine", ids[1]) and prov["true_cfg_scale"] == 4.0


def test_model_loaded_once_per_process(tmp_path):
    paths = save_tiny_models(str(tmp_path / "models"))
    diffusion_pipelines.clear_cache()
    cfg = tiny_config(model=paths["refine"])
    for shard in (0, 1):
        write_render_shard(str(tmp_path / "run"), shard, n=2)
        Refine(cfg, encode_prompt=HashPromptEncoder("refine")).run_shard(str(tmp_path / "run"), shard)
    assert diffusion_pipelines.LOAD_COUNTS["refine"] == 1
    table = read_stage_table(str(tmp_path / "run"), "refine", 1)
    assert json.loads(table.column("refine_provenance")[0].as_py())["models"] == {"model": paths["refine"]}
    diffusion_pipelines.clear_cache()


def test_resume_skips_finished_items(tmp_path):
    run = str(tmp_path)
    folder = RunFolder.of(run)
    ids = write_render_shard(run, 0, n=4)
    pipe = tiny_refine_pipeline()
    calls_per_item = STEPS * 2  # true CFG: a conditional and an unconditional pass per step
    calls = []

    def stop_after_two_items(module, args, kwargs):
        calls.append(1)
        if len(calls) > 2 * calls_per_item:
            raise RuntimeError("worker lost")

    hook = pipe.transformer.register_forward_pre_hook(stop_after_two_items, with_kwargs=True)
    stage = Refine(tiny_config(keep_items=True), pipe, HashPromptEncoder("refine"))
    with pytest.raises(RuntimeError, match="worker lost"):
        stage.run_shard(run, 0)
    hook.remove()
    assert not io.exists(f"{run}/stages/refine/shard-00000.parquet")
    assert [io.exists(io.join(folder.stage_items("refine", 0), f"{i}.parquet")) for i in ids] == [
        True, True, False, False]
    first_two = [io.read_table(io.join(folder.stage_items("refine", 0), f"{i}.parquet")) for i in ids[:2]]

    calls.clear()
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    stats = stage.run_shard(run, 0)
    assert len(calls) == 2 * calls_per_item  # only items 3 and 4 ran
    assert stats["generated"] == 2 and stats["resumed"] == 2
    table = read_stage_table(run, "refine", 0)
    assert table.column("instance_id").to_pylist() == ids
    assert table.column("refined").to_pylist()[:2] == [t.column("refined")[0].as_py() for t in first_two]

    calls.clear()
    assert stage.run_shard(run, 0)["skipped"] is True and calls == []
    hook.remove()
    assert np.isfinite(stats["seconds"])
